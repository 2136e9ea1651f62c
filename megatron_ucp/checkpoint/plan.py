"""Byte-range plans: the one walk of a parameter's data-parallel fragments through the placement maps.

Where a tensor's elements lie in a ZeRO checkpoint is the composition of placements
(``layout.placement``). The checkpoint's index says which data-parallel fragment holds which flat range
of a source TP rank's local tensor, at which byte of which file (``pieces``: the only walk of the
fragments); the source's placement (``rules.source_tp_map``) says where that local tensor sits in the
full tensor; a target's placement says which slices of the full tensor a target TP rank holds. A
``ReadPlan`` lists the byte ranges that land in a target tensor, and nothing else: the bytes a rank
reads are the bytes it owns (one copy of a replicated parameter; vocabulary padding rows are zeros,
not read). The same plan serves every consumer:

* ``atom_plan``: the converter's atom, the full tensor, is the plan of TP rank 0 of a TP 1 target;
* ``read_plan``: a target TP rank's local tensor (direct resume), and ``window_plan`` its ZeRO window;
* ``local_plan``: a source TP rank's own local tensor, in the source's layout (verification).

Executing a plan is ``executors``' part.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from megatron_ucp.checkpoint.rules import MergeRule, source_tp_map
from megatron_ucp.checkpoint.zero import CheckpointError, FlatRef, Fragment, ParamSource, ZeroCheckpoint
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.placement import flat_segments, tp_map


@dataclass(frozen=True)
class Read:
    """``numel`` elements at byte ``offset`` of ``path`` go to flat element ``dst`` of the target tensor."""

    path: str
    offset: int
    dst: int
    numel: int


@dataclass(frozen=True)
class ReadPlan:
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    reads: tuple[Read, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.numel for r in self.reads) * self.dtype.itemsize


@dataclass(frozen=True)
class Piece:
    """One data-parallel fragment of source TP rank ``tp``'s local tensor: its elements [lo, lo + numel)
    (row-major) are elements [start, start + numel) of the flat tensor ``ref`` in a shard file."""

    tp: int
    dp: int
    lo: int
    start: int
    numel: int
    ref: FlatRef | None  # None when the walk was asked for no state (sizes only)


def _walk(src: ParamSource, ranks: Sequence[int] | None) -> Iterator[tuple[int, Fragment, int]]:
    every = range(len(src.fragments))
    for s in every if ranks is None else ranks:
        lo = 0
        for frag in src.fragments[s]:  # the one walk of the fragments; every plan is built from it
            yield s, frag, lo
            lo += frag.numel


def pieces(src: ParamSource, ckpt: ZeroCheckpoint | None = None, key: str | None = None,
           ranks: Sequence[int] | None = None) -> Iterator[Piece]:
    """``src``'s fragments, TP rank by TP rank (``ranks``, default all) in DP order, each with where it
    starts in its rank's local tensor and, given ``ckpt`` and ``key``, that state's flat tensor."""
    for s, frag, lo in _walk(src, ranks):
        ref = ckpt.flat_ref(src.pp, s, frag.dp, src.group, key) if ckpt is not None and key is not None else None
        yield Piece(s, frag.dp, lo, frag.start, frag.numel, ref)


def numel(src: ParamSource) -> int:
    """Elements of every TP rank's local tensor together."""
    return sum(p.numel for p in pieces(src))


def source_bytes(src: ParamSource, ckpt: ZeroCheckpoint, keys: Sequence[str]) -> int:
    """Bytes of the states ``keys`` stored in the shards for one parameter (every TP copy)."""
    return sum(p.numel * p.ref.dtype.itemsize for key in keys for p in pieces(src, ckpt, key) if p.ref is not None)


def _refs(ckpt: ZeroCheckpoint, src: ParamSource, key: str, ranks: Sequence[int]) -> tuple[list[Piece], torch.dtype]:
    """The pieces of ``ranks`` and their one dtype (a plan has one element size)."""
    found = list(pieces(src, ckpt, key, ranks))
    first = found[0].ref
    assert first is not None
    for p in found:
        assert p.ref is not None
        if p.ref.dtype != first.dtype:
            raise CheckpointError(f"{p.ref.path}: holds {key} of {src.name} as {p.ref.dtype}, but {first.path} as "
                                  f"{first.dtype}; refusing to read mixed dtypes into one tensor")
    return found, first.dtype


def local_plan(ckpt: ZeroCheckpoint, src: ParamSource, key: str, tp: int) -> ReadPlan:
    """Source TP rank ``tp``'s local tensor of state ``key``, as it was saved: its fragments in DP order
    (no placement: the source's own layout)."""
    found, dtype = _refs(ckpt, src, key, [tp])
    size = dtype.itemsize
    reads = tuple(Read(p.ref.path, p.ref.offset + p.start * size, p.lo, p.numel) for p in found if p.ref is not None)
    return ReadPlan(tuple(src.local_shapes[tp]), dtype, reads)


def _full_index(kind: Kind, full: tuple[int, ...], target_extent: int, tp: int, tp_rank: int,
                kept: int | None) -> tuple[tuple[int, ...], list[tuple[int, int, int]]]:
    """(the target's local shape, its (full flat, local flat, elements) segments sorted by full offset)."""
    dim = kind.partition_dim
    assert dim is not None
    m = tp_map(kind, target_extent, tp, kept=kept)
    local = list(full)
    local[dim] = m.dst_extents[tp_rank]
    segs = [(f, a, n) for a, f, n in flat_segments(m.runs_into(tp_rank), dim, full, local, 0, math.prod(local))]
    return tuple(local), sorted(segs)


def read_plan(ckpt: ZeroCheckpoint, src: ParamSource, rule: MergeRule, key: str, tp: int, tp_rank: int,
              target_extent: int | None = None, window: tuple[int, int] | None = None) -> ReadPlan:
    """The byte ranges of ``ckpt``'s shards that make TP rank ``tp_rank``'s (of ``tp``) tensor of state
    ``key`` of parameter ``src``. ``target_extent``: the target's padded vocabulary rows (VOCAB kinds;
    the default keeps the source's padded size when ``tp`` allows it). ``window``: only flat elements
    [lo, hi) of that tensor, the part of it a ZeRO data-parallel rank owns (element ``dst`` of a read
    then counts from ``lo``)."""
    plan = _read_plan(ckpt, src, rule, key, tp, tp_rank, target_extent)
    return plan if window is None else window_plan(plan, window, src.name)


def atom_plan(ckpt: ZeroCheckpoint, src: ParamSource, rule: MergeRule, key: str) -> ReadPlan:
    """The converter's atom of state ``key``: the full tensor (vocabulary padding dropped) is TP rank 0's
    tensor at TP 1. Its reads are coalesced: neighbours in both the source file and the atom become one."""
    target = rule.kept_vocab_rows if rule.kind is Kind.VOCAB else None
    return coalesced(read_plan(ckpt, src, rule, key, 1, 0, target))


def coalesced(plan: ReadPlan) -> ReadPlan:
    """``plan`` with each read that continues the previous one in its file and in the tensor merged into it."""
    size = plan.dtype.itemsize
    out: list[Read] = []
    for r in plan.reads:
        prev = out[-1] if out else None
        if prev and prev.path == r.path and prev.offset + prev.numel * size == r.offset and prev.dst + prev.numel == r.dst:
            out[-1] = Read(prev.path, prev.offset, prev.dst, prev.numel + r.numel)
        else:
            out.append(r)
    return ReadPlan(plan.local_shape, plan.dtype, tuple(out))


def window_plan(plan: ReadPlan, window: tuple[int, int], what: str) -> ReadPlan:
    """The reads of flat elements [lo, hi) of ``plan``'s tensor, as a flat tensor of ``hi - lo`` elements."""
    lo, hi = window
    numel = math.prod(plan.local_shape)
    if not 0 <= lo <= hi <= numel:
        raise CheckpointError(f"{what}: window [{lo}, {hi}) is outside its {numel} elements")
    size = plan.dtype.itemsize
    reads = []
    for r in plan.reads:
        a, b = max(lo, r.dst), min(hi, r.dst + r.numel)
        if a < b:
            reads.append(Read(r.path, r.offset + (a - r.dst) * size, a - lo, b - a))
    return ReadPlan((hi - lo,), plan.dtype, tuple(reads))


def rebased(plan: ReadPlan, moves: dict[str, tuple[str, int]]) -> ReadPlan:
    """The same reads from other files or places: bytes at ``offset`` of ``path`` are at ``offset + delta``
    of ``moves[path] = (new path, delta)``. Adam's moments lie in the shards (or atoms) exactly as the fp32
    master does, so one plan per parameter serves all three states."""
    return ReadPlan(plan.local_shape, plan.dtype,
                    tuple(Read(moves[r.path][0], r.offset + moves[r.path][1], r.dst, r.numel) for r in plan.reads))


def state_moves(ckpt: ZeroCheckpoint, src: ParamSource, from_key: str, to_key: str) -> dict[str, tuple[str, int]]:
    """Where ``to_key``'s bytes of ``src`` are, relative to ``from_key``'s (``rebased``): in each shard file,
    that state's flat tensor instead of the other's."""
    out: dict[str, tuple[str, int]] = {}
    for p, q in zip(pieces(src, ckpt, from_key), pieces(src, ckpt, to_key)):
        a, b = p.ref, q.ref
        assert a is not None and b is not None
        move = (b.path, b.offset - a.offset)
        # (the last DP rank's fp32 partition may be shorter than its moments: padding)
        if a.dtype != b.dtype or p.start + p.numel > min(a.numel, b.numel) or out.setdefault(a.path, move) != move:
            raise CheckpointError(f"{a.path}: {to_key} of {src.name} is not laid out as its {from_key}")
    return out


def atom_read_plan(ref: FlatRef, shape: tuple[int, ...], kind: Kind, tp: int, tp_rank: int,
                   target_extent: int | None = None) -> ReadPlan:
    """The byte ranges of a universal atom (the full tensor of ``shape``, stored contiguously at
    ``ref``) that make TP rank ``tp_rank``'s (of ``tp``) tensor. A VOCAB atom holds the original
    vocabulary's rows; ``target_extent`` is the target's padded row count (default: no padding)."""
    size = ref.dtype.itemsize
    if math.prod(shape) != ref.numel:
        raise CheckpointError(f"{ref.path}: holds {ref.numel} elements, its shape {shape} needs {math.prod(shape)}")
    if kind is Kind.REPLICATED:
        return ReadPlan(tuple(shape), ref.dtype, (Read(ref.path, ref.offset, 0, ref.numel),))
    dim = kind.partition_dim
    assert dim is not None
    extent = shape[dim] if target_extent is None else target_extent
    kept = shape[dim] if kind is Kind.VOCAB else None
    try:
        local, index = _full_index(kind, tuple(shape), extent, tp, tp_rank, kept)
    except ValueError as e:
        raise CheckpointError(f"{ref.path}: at TP {tp}: {e}") from None
    reads = tuple(Read(ref.path, ref.offset + f * size, t, n) for f, t, n in index)
    return ReadPlan(local, ref.dtype, tuple(sorted(reads, key=lambda r: r.dst)))


def _read_plan(ckpt: ZeroCheckpoint, src: ParamSource, rule: MergeRule, key: str, tp: int, tp_rank: int,
               target_extent: int | None) -> ReadPlan:
    found, dtype = _refs(ckpt, src, key, range(ckpt.tp))
    if rule.kind is Kind.REPLICATED:  # every rank holds the whole tensor: one copy, source TP rank 0's
        return local_plan(ckpt, src, key, 0)
    size = dtype.itemsize
    dim = rule.kind.partition_dim
    assert dim is not None
    source = source_tp_map(src, rule, ckpt.tp, ckpt.folder)
    kept = rule.kept_vocab_rows if rule.kind is Kind.VOCAB else None
    full = list(src.local_shapes[0])
    full[dim] = source.src_extents[0]  # the kept rows, for VOCAB
    extent = target_extent if target_extent is not None else src.local_shapes[0][dim] * ckpt.tp
    try:
        local, index = _full_index(rule.kind, tuple(full), extent, tp, tp_rank, kept)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.folder}: {src.name} at TP {tp}: {e}") from None
    starts = [f for f, _, _ in index]
    runs = {s: source.runs_into(s) for s in range(ckpt.tp)}
    reads = []
    for p in found:
        ref = p.ref
        assert ref is not None
        segments = flat_segments(runs[p.tp], dim, tuple(full), tuple(src.local_shapes[p.tp]), p.lo, p.lo + p.numel)
        for a, f, n in segments:
            # [f, f + n) of the full tensor, from element a of source rank p.tp: where does the target want it?
            i = max(bisect.bisect_right(starts, f) - 1, 0)
            while i < len(index) and index[i][0] < f + n:
                g, t, m = index[i]
                x, y = max(f, g), min(f + n, g + m)
                if x < y:
                    src_elem = p.start + (a - p.lo) + (x - f)
                    reads.append(Read(ref.path, ref.offset + src_elem * size, t + (x - g), y - x))
                i += 1
    return ReadPlan(local, dtype, tuple(sorted(reads, key=lambda r: r.dst)))
