"""Placement as data (``layout/placement.py``) against the earlier hand-written rules (``placement_oracle``).

For every kind and fused layout, TP 1..4 and random shapes: applying the placement to a full tensor
gives exactly the oracle's shards, merging them gives the full tensor back bitwise, and the flattened
segments the converter copies are the same elements. A deliberately wrong placement (sub-parameters in
swapped order) is caught by the same checks.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import placement_oracle as oracle
from megatron_ucp.layout import placement as pl
from megatron_ucp.layout import slicing
from megatron_ucp.layout.params import Kind

TPS = (1, 2, 3, 4)
SEEDS = range(6)


def _shape(rng: random.Random, kind: Kind, tp: int) -> tuple[int, ...]:
    """A random shape that ``tp`` divides along the kind's dim (1-D for some dim-0 kinds: biases)."""
    unit = tp * kind.num_sub_params
    if kind is Kind.ROW:
        return rng.randint(1, 5), unit * rng.randint(1, 4)
    if kind is Kind.REPLICATED:
        return tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 2)))
    rows = unit * rng.randint(1, 4)
    return (rows,) if rng.random() < 0.3 else (rows, rng.randint(1, 5))


def _assert_placement_matches(full: torch.Tensor, kind: Kind, tp: int, m: pl.RegionMap) -> None:
    shards = m.apply_all([full])
    for r in range(tp):
        assert torch.equal(shards[r], oracle.shard(full, kind, tp, r)), f"{kind.value} TP{tp} rank {r}"
    if kind is not Kind.REPLICATED:
        assert torch.equal(m.inverted().apply(shards, 0), full)
        assert torch.equal(oracle.merge(shards, kind), full)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("tp", TPS)
def test_placement_equals_the_oracle_for_every_kind(kind, tp):
    for seed in SEEDS:
        rng = random.Random(seed * 31 + tp)
        full = torch.randn(_shape(rng, kind, tp), generator=torch.Generator().manual_seed(seed))
        dim = kind.partition_dim
        m = pl.tp_map(kind, full.shape[dim] if dim is not None else full.shape[0], tp)
        m.check()
        _assert_placement_matches(full, kind, tp, m)
        shards = [slicing.shard(full, kind, tp, r) for r in range(tp)]  # the library path, same map
        for r in range(tp):
            assert torch.equal(shards[r], oracle.shard(full, kind, tp, r))
            assert tuple(shards[r].shape) == slicing.local_shape(kind, tuple(full.shape), tp)
        assert torch.equal(slicing.merge(shards, kind), full)


@pytest.mark.parametrize("tp", TPS)
def test_padded_vocabulary(tp):
    """The unpadded vocabulary -> padded shards (padding rows zero), and back with the padding dropped."""
    for seed in SEEDS:
        rng = random.Random(seed)
        vocab, h, divisible = rng.randint(1, 40), rng.randint(1, 4), rng.choice((1, 4, 8))
        padded = pl.padded_vocab_size(vocab, divisible, tp)
        full = torch.randn(vocab, h, generator=torch.Generator().manual_seed(seed))
        padded_full = torch.cat([full, torch.zeros(padded - vocab, h)])  # the oracle's padding
        m = pl.tp_map(Kind.VOCAB, padded, tp, kept=vocab)
        m.check()
        shards = m.apply_all([full])
        for r in range(tp):
            assert torch.equal(shards[r], oracle.shard(padded_full, Kind.VOCAB, tp, r))
            assert (r * (padded // tp), (r + 1) * (padded // tp)) == pl.vocab_range(padded, tp, r)
        assert torch.equal(slicing.merge(shards, Kind.VOCAB, kept=vocab), full)
        assert torch.equal(slicing.pad_vocab(full, padded), padded_full)


@pytest.mark.parametrize("tp", TPS)
def test_fused_layouts_equal_the_oracle(tp):
    for seed in SEEDS:
        rng = random.Random(seed * 7 + tp)
        g = torch.Generator().manual_seed(seed)
        nkv = tp * rng.randint(1, 2)  # TP must divide the key/value heads
        nh = nkv * rng.choice((1, 2, 3))  # qpg 1 is GPT-2's per-head [q k v]
        hn, h = rng.choice((2, 4)), rng.randint(1, 3)
        q, k, v = torch.randn(nh * hn, h, generator=g), torch.randn(nkv * hn, h, generator=g), \
            torch.randn(nkv * hn, h, generator=g)
        fused = pl.fuse_qkv(q, k, v, nh, nkv)
        assert torch.equal(fused, oracle.fuse_qkv(q, k, v, nh, nkv))
        for mine, theirs in zip(pl.unfuse_qkv(fused, nh, nkv), (q, k, v)):
            assert torch.equal(mine, theirs)
        for r in range(tp):  # a rank's shard of the fused tensor is the fused form of its heads
            local = slicing.shard(fused, Kind.COLUMN, tp, r)
            want = oracle.fuse_qkv(q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r], nh // tp, nkv // tp)
            assert torch.equal(local, want)
            lq, lk, lv = pl.split_qkv_heads(local.t(), nkv // tp, nh // nkv, hn)  # activations: [.., rows]
            assert torch.equal(lq.reshape(h, -1).t(), q.chunk(tp)[r]) and torch.equal(lv.reshape(h, -1).t(),
                                                                                      v.chunk(tp)[r])
            assert torch.equal(lk.reshape(h, -1).t(), k.chunk(tp)[r])

        f = tp * rng.randint(1, 4)
        gate, up = torch.randn(f, h, generator=g), torch.randn(f, h, generator=g)
        for t in (1, tp):
            assert torch.equal(pl.fuse_swiglu(gate, up, t), oracle.fuse_swiglu(gate, up, t))
            for mine, theirs in zip(pl.unfuse_swiglu(oracle.fuse_swiglu(gate, up, t), t), (gate, up)):
                assert torch.equal(mine, theirs)
        universal = pl.fuse_swiglu(gate, up, 1)
        for r in range(tp):  # COLUMN_2SUB's shard of [gate; up] is the COLUMN shard of the per-TP fusion
            assert torch.equal(slicing.shard(universal, Kind.COLUMN_2SUB, tp, r),
                               oracle.shard(oracle.fuse_swiglu(gate, up, tp), Kind.COLUMN, tp, r))
            lg, lu = pl.split_sub_params(slicing.shard(universal, Kind.COLUMN_2SUB, tp, r).t(), Kind.COLUMN_2SUB)
            assert torch.equal(lg.t(), gate.chunk(tp)[r]) and torch.equal(lu.t(), up.chunk(tp)[r])


def _swap_sub_params(m: pl.RegionMap, a: int, b: int) -> pl.RegionMap:
    """The same map with sub-parameters ``a`` and ``b`` exchanged in every destination (a bug)."""
    by_dst: dict = {}
    for r in m.runs:
        by_dst.setdefault(r.dst, []).append(r)
    runs = []
    for dst, rs in by_dst.items():
        rs = sorted(rs, key=lambda r: r.dst_start)
        slots = [(r.dst_start, r.length) for r in rs]
        rs[a], rs[b] = rs[b], rs[a]
        for (start, _), r in zip(slots, rs):
            runs.append(dataclasses.replace(r, dst_start=start))
    return dataclasses.replace(m, runs=tuple(runs))


def test_a_wrong_placement_fails():
    full = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    right = pl.tp_map(Kind.COLUMN_2SUB, 16, 2)
    _assert_placement_matches(full, Kind.COLUMN_2SUB, 2, right)  # control: the right map passes
    wrong = _swap_sub_params(right, 0, 1)  # [up_r; gate_r] instead of [gate_r; up_r]
    wrong.check()  # still a well-formed map: only the numbers can tell
    with pytest.raises(AssertionError, match="column_2sub TP2 rank 0"):
        _assert_placement_matches(full, Kind.COLUMN_2SUB, 2, wrong)

    nh, nkv, hn = 4, 2, 2
    q, k, v = (torch.randn(n * hn, 3, generator=torch.Generator().manual_seed(i)) for i, n in enumerate((nh, nkv, nkv)))
    right_qkv = pl.qkv_map(nh, nkv, hn)
    assert torch.equal(right_qkv.apply([q, k, v], 0), oracle.fuse_qkv(q, k, v, nh, nkv))
    wrong_qkv = _swap_sub_params(right_qkv, 1, 2)  # group 0's k and v swapped: each is hn rows, shapes agree
    assert not torch.equal(wrong_qkv.apply([q, k, v], 0), oracle.fuse_qkv(q, k, v, nh, nkv))


def test_maps_refuse_overlaps_and_out_of_range_runs():
    bad = pl.RegionMap(0, (4,), (4,), (pl.Run(0, 0, 0, 0, 3), pl.Run(0, 3, 0, 2, 1)))
    with pytest.raises(ValueError, match="destination 0 is written twice at slice 2"):
        bad.check()
    with pytest.raises(ValueError, match="outside its source or destination"):
        pl.RegionMap(0, (4,), (4,), (pl.Run(0, 2, 0, 0, 3),)).check()
    with pytest.raises(ValueError, match="tensor parallel 3 does not divide 8 slices on dim 0"):
        pl.tp_map(Kind.COLUMN, 8, 3)
    with pytest.raises(ValueError, match="only vocabulary parameters have padding rows"):
        pl.tp_map(Kind.ROW, 8, 2, kept=6)


@pytest.mark.parametrize("kind", [Kind.COLUMN, Kind.COLUMN_2SUB, Kind.ROW, Kind.VOCAB])
@pytest.mark.parametrize("tp", TPS)
def test_flat_segments_are_the_elements_of_the_shard(kind, tp):
    """What the converter copies between files: local flat ranges -> full flat ranges, padding skipped."""
    rng = random.Random(tp)
    for seed in SEEDS:
        shape = list(_shape(rng, kind, tp))
        if len(shape) == 1:
            shape.append(2)
        kept = None
        if kind is Kind.VOCAB:
            kept = rng.randint(1, shape[0])
        full = torch.randn(kept if kept is not None else shape[0], *shape[1:],
                           generator=torch.Generator().manual_seed(seed))
        dim = kind.partition_dim
        assert dim is not None
        m = pl.tp_map(kind, shape[dim], tp, kept=kept)
        src_shape = list(shape)
        src_shape[dim] = m.src_extents[0]
        flat_full = full.reshape(-1)
        for r in range(tp):
            local = m.apply([full], r).reshape(-1)
            local_shape = list(shape)
            local_shape[dim] = m.dst_extents[r]
            lo = rng.randint(0, local.numel())
            hi = rng.randint(lo, local.numel())
            covered = 0
            last = lo
            for a, f, n in pl.flat_segments(m.runs_into(r), dim, src_shape, local_shape, lo, hi):
                assert last <= a and a + n <= hi
                assert torch.equal(local[a:a + n], flat_full[f:f + n])
                assert torch.count_nonzero(local[last:a]) == 0  # skipped elements are padding
                covered, last = covered + n, a + n
            assert torch.count_nonzero(local[last:hi]) == 0
            if kept is None:
                assert covered == hi - lo
