"""The only code in the project that cuts, joins or pads weights along tensor-parallel dimensions.

Every rule is driven by ``params.Kind``; nothing here knows a parameter by name.
"""

from __future__ import annotations

import math

import torch

from megatron_ucp.layout.params import Kind


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: the vocabulary rounded up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def vocab_range(padded_vocab: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """The [start, end) rows of the padded vocabulary that ``tp_rank`` holds."""
    if padded_vocab % tp:
        raise ValueError(f"padded vocab {padded_vocab} is not divisible by tensor parallel {tp}")
    per_rank = padded_vocab // tp
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


def pad_vocab(t: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Zero rows appended on dim 0 up to ``padded_rows`` (the padded vocabulary)."""
    if t.shape[0] > padded_rows:
        raise ValueError(f"cannot pad {t.shape[0]} vocab rows down to {padded_rows}")
    if t.shape[0] == padded_rows:
        return t
    pad = t.new_zeros((padded_rows - t.shape[0],) + tuple(t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def unpad_vocab(t: torch.Tensor, vocab_rows: int) -> torch.Tensor:
    if t.shape[0] < vocab_rows:
        raise ValueError(f"tensor has {t.shape[0]} rows, fewer than the vocabulary's {vocab_rows}")
    return t[:vocab_rows]


def local_shape(kind: Kind, full_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape one TP rank holds, for a full shape (already padded for VOCAB)."""
    dim = kind.partition_dim
    if dim is None:
        return tuple(full_shape)
    if dim >= len(full_shape):  # 1-D biases of row-parallel layers are never ROW
        raise ValueError(f"{kind.value} parameter of shape {tuple(full_shape)} has no dim {dim}")
    if full_shape[dim] % (tp * kind.num_sub_params):
        what = f"each of the {kind.num_sub_params} sub-parameters in " if kind.num_sub_params > 1 else ""
        raise ValueError(f"tensor parallel {tp} does not divide {what}dim {dim} of shape {tuple(full_shape)}")
    shape = list(full_shape)
    shape[dim] //= tp
    return tuple(shape)


def shard(full: torch.Tensor, kind: Kind, tp: int, tp_rank: int) -> torch.Tensor:
    """The slice of ``full`` that ``tp_rank`` holds (a view, except for fused sub-parameters, which are
    re-assembled per rank; VOCAB tensors must be padded already)."""
    dim = kind.partition_dim
    if dim is None:
        return full
    local_shape(kind, tuple(full.shape), tp)  # validates divisibility
    if kind.num_sub_params > 1:  # [a; b] -> [a_r; b_r]
        return torch.cat([sub.chunk(tp, dim=dim)[tp_rank] for sub in full.chunk(kind.num_sub_params, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def merge(shards: list[torch.Tensor], kind: Kind) -> torch.Tensor:
    """Join the TP slices of one parameter, in TP-rank order; the inverse of ``shard``.

    Replicated parameters must be bitwise equal on every rank: they are never averaged silently.
    """
    dim = kind.partition_dim
    if dim is None:
        first = shards[0]
        for r, other in enumerate(shards[1:], start=1):
            if not torch.equal(first, other):
                raise ValueError(f"replicated parameter differs between TP rank 0 and TP rank {r}")
        return first
    n = kind.num_sub_params
    if n > 1:  # [a_r; b_r] per rank -> [a; b]
        parts = [s.chunk(n, dim=dim) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts], dim=dim) for i in range(n)], dim=dim)
    return torch.cat(shards, dim=dim)
