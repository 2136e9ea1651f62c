"""One target rank's piece of a parameter's optimizer state, read straight from a ZeRO checkpoint.

The first building block of direct resume (no universal folder in between): where a target TP rank's
local tensor comes from is the composition of two placements (``layout.placement``). The source's
says which source TP rank holds which slices of the full tensor, and the checkpoint's index which
data-parallel fragment holds which flat range of that rank's tensor, at which byte of which file;
the target's says which slices of the full tensor the target rank holds. A ``read_plan`` lists the
byte ranges that land in the target tensor, and nothing else: the bytes a rank reads are the bytes
it owns (one copy of a replicated parameter; vocabulary padding rows are zeros, not read).
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass

import torch

from megatron_ucp.checkpoint.universal import MergeRule, source_tp_map
from megatron_ucp.checkpoint.zero import CheckpointError, FlatRef, ParamSource, ZeroCheckpoint, pread_exact
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
    refs = {(s, f.dp): ckpt.flat_ref(src.pp, s, f.dp, src.group, key) for s in range(ckpt.tp) for f in src.fragments[s]}
    first = next(iter(refs.values()))
    dtype = first.dtype
    for ref in refs.values():  # one element size for every piece: a plan has one dtype
        if ref.dtype != dtype:
            raise CheckpointError(f"{ref.path}: holds {key} of {src.name} as {ref.dtype}, but {first.path} as "
                                  f"{dtype}; refusing to read mixed dtypes into one tensor")
    size = dtype.itemsize
    if rule.kind is Kind.REPLICATED:  # every rank holds the whole tensor: one copy, source TP rank 0's
        reads, lo = [], 0
        for frag in src.fragments[0]:
            ref = refs[(0, frag.dp)]
            reads.append(Read(ref.path, ref.offset + frag.start * size, lo, frag.numel))
            lo += frag.numel
        return ReadPlan(tuple(src.local_shapes[0]), dtype, tuple(reads))

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
    reads = []
    for s in range(ckpt.tp):
        runs = source.runs_into(s)
        lo = 0
        for frag in src.fragments[s]:
            ref = refs[(s, frag.dp)]
            for a, f, n in flat_segments(runs, dim, tuple(full), tuple(src.local_shapes[s]), lo, lo + frag.numel):
                # [f, f + n) of the full tensor, from element a of source rank s: where does the target want it?
                i = max(bisect.bisect_right(starts, f) - 1, 0)
                while i < len(index) and index[i][0] < f + n:
                    g, t, m = index[i]
                    x, y = max(f, g), min(f + n, g + m)
                    if x < y:
                        src_elem = frag.start + (a - lo) + (x - f)
                        reads.append(Read(ref.path, ref.offset + src_elem * size, t + (x - g), y - x))
                    i += 1
            lo += frag.numel
    return ReadPlan(local, dtype, tuple(sorted(reads, key=lambda r: r.dst)))


def read_local(plan: ReadPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """Execute ``plan``: the target tensor, zeros where no source byte lands (vocabulary padding).

    ``out``: fill this contiguous tensor of the plan's dtype and size instead of a new one (an optimizer's
    own flat partition: no fresh memory, whose first touch costs a page fault per page)."""
    if out is None:
        out = torch.zeros(plan.local_shape, dtype=plan.dtype)
    else:
        if out.dtype != plan.dtype or out.numel() != math.prod(plan.local_shape) or not out.is_contiguous():
            raise ValueError(f"read_local: the destination ({out.dtype}, {out.numel()} elements, contiguous "
                             f"{out.is_contiguous()}) is not the plan's {plan.dtype} x {plan.local_shape}")
        flat, pos = out.view(-1), 0
        for r in plan.reads:  # sorted by destination: zero what falls between them
            if r.dst > pos:
                flat[pos:r.dst].zero_()
            pos = max(pos, r.dst + r.numel)
        if pos < flat.numel():
            flat[pos:].zero_()
    buf = out.view(-1).view(torch.uint8).numpy().data  # the tensor's bytes as a writable memoryview
    size = plan.dtype.itemsize
    fds: dict[str, int] = {}
    try:
        for r in plan.reads:
            if r.path not in fds:
                fds[r.path] = os.open(r.path, os.O_RDONLY)
            pread_exact(fds[r.path], buf[r.dst * size:(r.dst + r.numel) * size], r.offset, r.path)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out
