"""Cutting, joining and padding whole tensors along tensor-parallel dimensions.

Every operation executes a ``placement.RegionMap`` derived from ``params.Kind``; nothing here knows a
parameter by name, and no index arithmetic lives here: it is all in ``placement.py``.
"""

from __future__ import annotations

import torch

from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.placement import (  # noqa: F401 - padded_vocab_size, vocab_range: re-exported
    RegionMap,
    Run,
    local_shape,
    padded_vocab_size,
    tp_map,
    vocab_range,
)


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits. ``torch.equal`` compares values: a NaN never equals itself (so a state
    holding one would never match its own copy) and ``-0.0`` equals ``0.0`` (a flipped sign bit passes);
    here floating tensors are compared as integers of the same width, which works on strided views too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_complex:
        return bitwise_equal(torch.view_as_real(a), torch.view_as_real(b))
    if a.dtype.is_floating_point:
        as_int = _SAME_WIDTH_INT[a.element_size()]
        a, b = a.view(as_int), b.view(as_int)
    return bool(torch.equal(a, b))


def pad_vocab(t: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Zero rows appended on dim 0 up to ``padded_rows`` (the padded vocabulary)."""
    if t.shape[0] > padded_rows:
        raise ValueError(f"cannot pad {t.shape[0]} vocab rows down to {padded_rows}")
    if t.shape[0] == padded_rows:
        return t
    # The padded tensor as one destination of a map whose only run is the real rows.
    m = RegionMap(0, (t.shape[0],), (padded_rows,), (Run(0, 0, 0, 0, t.shape[0]),) if t.shape[0] else ())
    return m.apply([t], 0)


def unpad_vocab(t: torch.Tensor, vocab_rows: int) -> torch.Tensor:
    if t.shape[0] < vocab_rows:
        raise ValueError(f"tensor has {t.shape[0]} rows, fewer than the vocabulary's {vocab_rows}")
    return t[:vocab_rows]


def shard(full: torch.Tensor, kind: Kind, tp: int, tp_rank: int) -> torch.Tensor:
    """The slice of ``full`` that ``tp_rank`` holds (a view, except for fused sub-parameters, which are
    re-assembled per rank; VOCAB tensors must be padded already)."""
    dim = kind.partition_dim
    if dim is None:
        return full
    local_shape(kind, tuple(full.shape), tp)  # validates the dim and divisibility
    if not 0 <= tp_rank < tp:
        raise ValueError(f"TP rank {tp_rank} is not in [0, {tp})")
    return tp_map(kind, full.shape[dim], tp).apply([full], tp_rank)


def merge(shards: list[torch.Tensor], kind: Kind, kept: int | None = None) -> torch.Tensor:
    """Join the TP slices of one parameter, in TP-rank order; the inverse of ``shard``.

    ``kept`` (VOCAB only) drops the padding rows: the result has the original vocabulary's rows.
    Replicated parameters must be bitwise equal on every rank: they are never averaged silently.
    """
    dim = kind.partition_dim
    if dim is None:
        first = shards[0]
        for r, other in enumerate(shards[1:], start=1):
            if not bitwise_equal(first, other):
                raise ValueError(f"replicated parameter differs between TP rank 0 and TP rank {r}")
        return first
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"uneven TP shards {[tuple(s.shape) for s in shards]}")
    m = tp_map(kind, shards[0].shape[dim] * len(shards), len(shards), kept)
    return m.inverted().apply(shards, 0)
