"""Where every element of a parameter lives, as data.

A ``RegionMap`` says which slices of some source tensors make up some destination tensors, along one
dimension: each ``Run`` moves ``length`` slices ``[src_start, src_start + length)`` of source
``src`` to ``[dst_start, dst_start + length)`` of destination ``dst``. Destination slices that no run
covers are zeros (the vocabulary's padding rows). This one description serves every direction:

* ``tp_map(kind, ...)``: the full tensor (source 0) -> the TP shards (destination ``r`` is rank ``r``),
  for every ``params.Kind`` including the padded vocabulary and SwiGLU's per-rank ``[gate_r; up_r]``;
  ``.inverted()`` merges shards back into the full tensor, dropping padding rows;
* ``qkv_map``: HF's separate (or packed) q, k, v -> our grouped fused QKV (per key/value group its
  query heads, then its key and value head; GPT-2's per-head ``[q k v]`` is the case of one query
  head per group), and ``swiglu_map``: gate and up -> the TP-rank concatenation of ``[gate_r; up_r]``;
* ``flat_segments``: the same runs as contiguous element ranges of the flattened tensors, which is
  what the converter copies between files.

``shard``/``merge`` in ``slicing.py``, the fused-layout functions below, the converter's copy plans
and replica checks, vocabulary padding and truncation, and the HF transforms are all derived from
these maps, so a new kind or fused layout is one edit here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from megatron_ucp.layout.params import Kind


@dataclass(frozen=True)
class Run:
    """Slices ``[src_start, src_start + length)`` of source ``src`` are ``[dst_start, ...)`` of destination ``dst``."""

    src: int
    src_start: int
    dst: int
    dst_start: int
    length: int


@dataclass(frozen=True)
class RegionMap:
    """Runs along ``dim`` from sources of the given extents to destinations of the given extents.

    ``dim`` None means every destination is the whole (single) source: a replicated parameter.
    """

    dim: int | None
    src_extents: tuple[int, ...]
    dst_extents: tuple[int, ...]
    runs: tuple[Run, ...]

    def inverted(self) -> RegionMap:
        """The map back from destinations to sources (a merge where this is a split)."""
        if self.dim is None:
            raise ValueError("a replicated parameter has no inverse map: its copies must be checked equal instead")
        runs = tuple(Run(r.dst, r.dst_start, r.src, r.src_start, r.length) for r in self.runs)
        return RegionMap(self.dim, self.dst_extents, self.src_extents, runs)

    def runs_into(self, dst: int) -> tuple[Run, ...]:
        """Destination ``dst``'s runs, in destination order: its placement."""
        return tuple(sorted((r for r in self.runs if r.dst == dst), key=lambda r: r.dst_start))

    def check(self) -> None:
        """Every run inside its source and destination, and no destination slice written twice."""
        for r in self.runs:
            if r.length < 1 or r.src_start < 0 or r.dst_start < 0 or \
                    r.src_start + r.length > self.src_extents[r.src] or r.dst_start + r.length > self.dst_extents[r.dst]:
                raise ValueError(f"run {r} is outside its source or destination ({self})")
        for d in range(len(self.dst_extents)):
            end = 0
            for r in self.runs_into(d):
                if r.dst_start < end:
                    raise ValueError(f"destination {d} is written twice at slice {r.dst_start}")
                end = r.dst_start + r.length

    def _dst_shape(self, like: torch.Tensor, dst: int) -> list[int]:
        shape = list(like.shape)
        if self.dim is not None:
            shape[self.dim] = self.dst_extents[dst]
        return shape

    def apply(self, sources: Sequence[torch.Tensor], dst: int) -> torch.Tensor:
        """Destination ``dst`` built from ``sources``: a view when it is one whole run of one source."""
        if self.dim is None:
            return sources[0]
        dim = self.dim
        for i, s in enumerate(sources):
            if s.shape[dim] != self.src_extents[i]:
                raise ValueError(f"source {i} has {s.shape[dim]} slices on dim {dim}, the map expects "
                                 f"{self.src_extents[i]}")
        runs = self.runs_into(dst)
        if len(runs) == 1 and runs[0].length == self.dst_extents[dst]:
            r = runs[0]
            return sources[r.src].narrow(dim, r.src_start, r.length)
        out = sources[0].new_zeros(self._dst_shape(sources[0], dst))
        for r in runs:
            out.narrow(dim, r.dst_start, r.length).copy_(sources[r.src].narrow(dim, r.src_start, r.length))
        return out

    def apply_all(self, sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.apply(sources, d) for d in range(len(self.dst_extents))]


# --- tensor parallelism -----------------------------------------------------------------------------


def tp_map(kind: Kind, extent: int, tp: int, kept: int | None = None, dim: int | None = None) -> RegionMap:
    """The full tensor -> its ``tp`` shards, along ``kind.partition_dim`` (or ``dim``: vocab-parallel
    logits are cut on their last dim like the vocabulary's rows).

    ``extent`` is the full size along that dim (padded, for VOCAB). For VOCAB, ``kept`` rows (the
    original vocabulary) are the source; rows from ``kept`` up to ``extent`` are padding: zeros in the
    shards, dropped by the inverse. A replicated kind maps the whole tensor to every rank.
    """
    if kind.partition_dim is None:
        return RegionMap(None, (extent,), (extent,) * tp, tuple(Run(0, 0, r, 0, extent) for r in range(tp)))
    n_sub = kind.num_sub_params
    if tp < 1 or extent % (tp * n_sub):
        what = f"each of the {n_sub} sub-parameters in " if n_sub > 1 else ""
        raise ValueError(f"tensor parallel {tp} does not divide {what}{extent} slices on dim {kind.partition_dim}")
    if kept is not None and kind is not Kind.VOCAB:
        raise ValueError(f"only vocabulary parameters have padding rows, not {kind.value}")
    kept = extent if kept is None else kept
    if kept > extent:
        raise ValueError(f"the vocabulary's {kept} rows do not fit in {extent} padded rows")
    sub, local_sub = extent // n_sub, extent // (n_sub * tp)
    runs = []
    for r in range(tp):
        for i in range(n_sub):  # rank r holds [sub-parameter 0's r-th block; sub-parameter 1's r-th block]
            start = i * sub + r * local_sub
            length = min(local_sub, kept - start)
            if length > 0:
                runs.append(Run(0, start, r, i * local_sub, length))
    return RegionMap(kind.partition_dim if dim is None else dim, (kept,), (extent // tp,) * tp, tuple(runs))


def placement(kind: Kind, full_shape: Sequence[int], tp: int, tp_rank: int,
              kept: int | None = None) -> tuple[Run, ...]:
    """Where TP rank ``tp_rank``'s shard comes from in the full tensor (runs along ``partition_dim``)."""
    dim = kind.partition_dim
    if dim is not None and dim >= len(full_shape):
        raise ValueError(f"{kind.value} parameter of shape {tuple(full_shape)} has no dim {dim}")
    extent = full_shape[dim] if dim is not None else (full_shape[0] if full_shape else 1)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"TP rank {tp_rank} is not in [0, {tp})")
    return tp_map(kind, extent, tp, kept).runs_into(tp_rank)


def local_shape(kind: Kind, full_shape: Sequence[int], tp: int) -> tuple[int, ...]:
    """The shape one TP rank holds, for a full shape (already padded for VOCAB)."""
    dim = kind.partition_dim
    if dim is None:
        return tuple(full_shape)
    if dim >= len(full_shape):
        raise ValueError(f"{kind.value} parameter of shape {tuple(full_shape)} has no dim {dim}")
    if full_shape[dim] % (tp * kind.num_sub_params):
        what = f"each of the {kind.num_sub_params} sub-parameters in " if kind.num_sub_params > 1 else ""
        raise ValueError(f"tensor parallel {tp} does not divide {what}dim {dim} of shape {tuple(full_shape)}")
    shape = list(full_shape)
    shape[dim] = tp_map(kind, full_shape[dim], tp).dst_extents[0]
    return tuple(shape)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: the vocabulary rounded up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def embedding_rows(vocab_size: int, divisible_by: int, tp: int, zero_stage: int = 0) -> int:
    """Rows of the embedding and head: Megatron's padded vocabulary, except ZeRO-3 at TP 1, which keeps
    it unpadded. DeepSpeed's stage-3 universal loader flattens each atom without re-padding vocabulary
    rows (a padded parameter would shift every later parameter's slice), and at TP 1 it is a loader a
    run may choose; at TP > 1 only our sliced loader loads ZeRO-3 (DeepSpeed's slices TP only for
    AutoTP models), which pads like every other stage."""
    if zero_stage == 3 and tp == 1:
        return vocab_size
    return padded_vocab_size(vocab_size, divisible_by, tp)


def vocab_range(padded_vocab: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """The [start, end) rows of the padded vocabulary that ``tp_rank`` holds."""
    if padded_vocab % tp:
        raise ValueError(f"padded vocab {padded_vocab} is not divisible by tensor parallel {tp}")
    (run,) = tp_map(Kind.VOCAB, padded_vocab, tp).runs_into(tp_rank)
    return run.src_start, run.src_start + run.length


# --- flattened views (what the converter copies between files) ---------------------------------------


def flat_segments(runs: Sequence[Run], dim: int, full_shape: Sequence[int], local_shape_: Sequence[int],
                  lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """(local flat offset, full flat offset, elements) for local flat elements [lo, hi), in order.

    ``runs`` is one rank's placement along ``dim`` (``full_shape`` is the shape of the runs' source,
    the kept rows for VOCAB). Elements of the local tensor that no run covers (padding) are skipped.
    Row-major order: along dim 0 a run is one contiguous range; along dim 1 it is one range per row.
    """
    inner = math.prod(full_shape[dim + 1:])
    outer = math.prod(full_shape[:dim])
    local_row = local_shape_[dim] * inner  # elements of one outer index in the local tensor
    full_row = full_shape[dim] * inner
    for o in range(outer):
        base_l, base_f = o * local_row, o * full_row
        if base_l + local_row <= lo:
            continue
        if base_l >= hi:
            return
        for r in runs:
            a = max(lo, base_l + r.dst_start * inner)
            b = min(hi, base_l + (r.dst_start + r.length) * inner)
            if a < b:
                yield a, base_f + r.src_start * inner + (a - base_l - r.dst_start * inner), b - a


# --- fused layouts ----------------------------------------------------------------------------------


def check_heads(num_heads: int, num_kv_heads: int) -> int:
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} must divide num_attention_heads {num_heads}")
    return num_heads // num_kv_heads


def concat_map(extents: Sequence[int]) -> RegionMap:
    """Sources of the given extents (dim 0) -> one destination holding them one after the other (HF's
    packed ``c_attn`` of GPT-2: ``[q; k; v]``)."""
    runs, start = [], 0
    for i, n in enumerate(extents):
        runs.append(Run(i, 0, 0, start, n))
        start += n
    return RegionMap(0, tuple(extents), (start,), tuple(runs))


def qkv_map(num_heads: int, num_kv_heads: int, head_dim: int) -> RegionMap:
    """q [nh*hn], k [nkv*hn], v [nkv*hn] (sources 0, 1, 2, dim 0) -> our grouped fused QKV (destination 0).

    Rows of the fused tensor: for each group g, query heads g*qpg .. g*qpg+qpg-1, then k_g, then v_g
    (query head i uses key/value head i // qpg, as in HF's ``repeat_kv``). A TP cut on dim 0 hands each
    rank whole groups.
    """
    qpg = check_heads(num_heads, num_kv_heads)
    hn = head_dim
    runs = []
    for g in range(num_kv_heads):
        base = g * (qpg + 2) * hn
        runs += [Run(0, g * qpg * hn, 0, base, qpg * hn), Run(1, g * hn, 0, base + qpg * hn, hn),
                 Run(2, g * hn, 0, base + (qpg + 1) * hn, hn)]
    return RegionMap(0, (num_heads * hn, num_kv_heads * hn, num_kv_heads * hn),
                     ((num_heads + 2 * num_kv_heads) * hn,), tuple(runs))


def swiglu_map(ffn: int, tp: int) -> RegionMap:
    """gate [f], up [f] (sources 0, 1, dim 0) -> the TP-rank concatenation of ``[gate_r; up_r]``.

    At ``tp`` 1 that is ``[gate; up]``, the universal form of ``Kind.COLUMN_2SUB``; at ``tp`` > 1 it is
    what a plain concatenation of the TP shards gives, which is why that kind is declared.
    """
    if ffn % tp:
        raise ValueError(f"tensor parallel {tp} does not divide ffn_hidden_size {ffn}")
    f = ffn // tp
    runs = []
    for r in range(tp):
        runs += [Run(0, r * f, 0, 2 * r * f, f), Run(1, r * f, 0, (2 * r + 1) * f, f)]
    return RegionMap(0, (ffn, ffn), (2 * ffn,), tuple(runs))


def fuse_qkv(q_full: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor,
             num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Separate projections (weights [., h] or biases) -> Megatron-DeepSpeed's grouped fused QKV."""
    check_heads(num_heads, num_kv_heads)
    if k_full.shape != v_full.shape or k_full.shape[0] % num_kv_heads:
        raise ValueError(f"k {tuple(k_full.shape)} and v {tuple(v_full.shape)} must be equal and hold "
                         f"{num_kv_heads} heads")
    hn = k_full.shape[0] // num_kv_heads
    if tuple(q_full.shape) != (num_heads * hn,) + tuple(k_full.shape[1:]):
        raise ValueError(f"q {tuple(q_full.shape)} does not hold {num_heads} heads of {hn} rows")
    return qkv_map(num_heads, num_kv_heads, hn).apply([q_full, k_full, v_full], 0)


def unfuse_qkv(fused: torch.Tensor, num_heads: int,
               num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``fuse_qkv``: grouped fused QKV -> (q [nh*hn, ...], k [nkv*hn, ...], v [nkv*hn, ...])."""
    qpg = check_heads(num_heads, num_kv_heads)
    rows = fused.shape[0]
    if rows % (num_kv_heads * (qpg + 2)):
        raise ValueError(f"fused QKV with {rows} rows does not split into {num_kv_heads} groups of {qpg + 2} heads")
    q, k, v = qkv_map(num_heads, num_kv_heads, rows // (num_kv_heads * (qpg + 2))).inverted().apply_all([fused])
    return q, k, v


def fuse_swiglu(gate_full: torch.Tensor, up_full: torch.Tensor, tp: int) -> torch.Tensor:
    """Gate and up projections [f, ...] -> the TP-rank concatenation of per-rank ``[gate_r; up_r]``.

    ``slicing.shard(result, Kind.COLUMN, tp, r)`` is then exactly rank r's ``dense_h_to_4h`` shard.
    The result depends on ``tp``, so a checkpoint merged by plain concatenation at one TP degree cannot
    be re-split at another (DeepSpeed's ``parameter_with_2_sub_params_cat_dim_0``; its universal form is
    ``fuse_swiglu(gate, up, 1)``, which ``slicing.shard(., Kind.COLUMN_2SUB, tp, r)`` cuts into the
    same per-rank shards).
    """
    if gate_full.shape != up_full.shape:
        raise ValueError(f"gate {tuple(gate_full.shape)} and up {tuple(up_full.shape)} differ in shape")
    return swiglu_map(gate_full.shape[0], tp).apply([gate_full, up_full], 0)


def unfuse_swiglu(full: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``fuse_swiglu(gate, up, tp)``: -> (gate [f, ...], up [f, ...])."""
    if full.shape[0] % (2 * tp):
        raise ValueError(f"fused SwiGLU with {full.shape[0]} rows does not split into {tp} ranks of [gate; up]")
    gate, up = swiglu_map(full.shape[0] // 2, tp).inverted().apply_all([full])
    return gate, up


def split_qkv_heads(x: torch.Tensor, local_groups: int, queries_per_group: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank's fused QKV activations [..., local rows] -> q [..., g*qpg, hn], k and v [..., g, hn].

    The activation's last dim is the rank's shard of ``qkv_map``'s rows, so it splits the same way.
    """
    grouped = x.view(*x.shape[:-1], local_groups, queries_per_group + 2, head_dim)
    q = grouped[..., :queries_per_group, :].reshape(*x.shape[:-1], local_groups * queries_per_group, head_dim)
    return q, grouped[..., queries_per_group, :], grouped[..., queries_per_group + 1, :]


def split_sub_params(x: torch.Tensor, kind: Kind) -> tuple[torch.Tensor, ...]:
    """A rank's activations of a fused kind [..., local] -> one tensor per sub-parameter.

    ``tp_map`` gives each rank its sub-parameters' blocks one after the other, in equal sizes
    (SwiGLU's ``[gate_r; up_r]``), so the last dim splits evenly in sub-parameter order.
    """
    return tuple(x.chunk(kind.num_sub_params, dim=-1))
