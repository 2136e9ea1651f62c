"""Tensor-parallel layers. Each allocates only its local shard; values are set by ``model.init``.

Parameters carry Megatron's attributes (``tensor_model_parallel``, ``partition_dim``,
``partition_stride``), which DeepSpeed reads to count each sharded gradient once in the global norm.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ucp.distributed.groups import TensorParallelContext
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.slicing import local_shape, vocab_range
from megatron_ucp.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
)

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_T = TypeVar("_T", bound=torch.Tensor)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; on CPU, half-precision GEMMs run in fp32 and round the result back.

    Without AVX512-BF16, CPU bf16 matmuls are ~80x slower than fp32. Products of two bf16 values are
    exact in fp32, so this is the same arithmetic a GPU tensor core does (bf16 in, fp32 accumulate,
    bf16 out), only faster here.
    """
    if x.device.type == "cpu" and x.dtype in _LOW_PRECISION:
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)
    return F.linear(x, weight, bias)


def mark_parallel(param: _T, kind: Kind) -> _T:
    # setattr: torch's Parameter type does not declare these Megatron attributes.
    dim = kind.partition_dim
    setattr(param, "tensor_model_parallel", dim is not None)
    setattr(param, "partition_dim", -1 if dim is None else dim)
    setattr(param, "partition_stride", 1)
    return param


def _param(shape: tuple[int, ...], kind: Kind) -> nn.Parameter:
    return mark_parallel(nn.Parameter(torch.empty(shape)), kind)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by rows (output features) across TP ranks.

    Input: full activations, replicated on the TP group. Output: this rank's slice of the features
    (or all of them with ``gather_output``).
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelContext,
                 bias: bool = True, gather_output: bool = False) -> None:
        super().__init__()
        self.tp = tp
        self.gather_output = gather_output
        self.weight = _param(local_shape(Kind.COLUMN, (out_features, in_features), tp.size), Kind.COLUMN)
        self.bias = _param(local_shape(Kind.COLUMN, (out_features,), tp.size), Kind.COLUMN) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.tp)
        y = linear(x, self.weight, self.bias)
        return gather_from_tp_region(y, self.tp.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by columns (input features); the bias is replicated.

    Input: this rank's slice of the features. Output: full activations (summed over the TP group),
    then the bias, added once.
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallelContext, bias: bool = True) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _param(local_shape(Kind.ROW, (out_features, in_features), tp.size), Kind.ROW)
        self.bias = _param((out_features,), Kind.REPLICATED) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.sequence_parallel:  # back to this rank's slice of the sequence, where the bias is a replica
            y = reduce_scatter_to_sequence_region(linear(x, self.weight), self.tp.group)
            return y if self.bias is None else y + copy_to_tp_region(self.bias, self.tp.group)
        y = reduce_from_tp_region(linear(x, self.weight), self.tp.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split across TP ranks.

    Each rank looks up the ids in its row range, zeroes the rest, and the TP all-reduce assembles
    the full embedding.
    """

    def __init__(self, padded_vocab: int, hidden: int, tp: TensorParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_start, self.vocab_end = vocab_range(padded_vocab, tp.size, tp.rank)
        self.weight = _param(local_shape(Kind.VOCAB, (padded_vocab, hidden), tp.size), Kind.VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.tp.group)


def parallel_lm_logits(x: torch.Tensor, word_embeddings: torch.Tensor, tp: TensorParallelContext) -> torch.Tensor:
    """Logits for this rank's vocabulary slice from the (tied) embedding matrix (the whole sequence: under
    sequence parallelism the activations are gathered first)."""
    return linear(enter_tp_region(x, tp), word_embeddings)


def enter_tp_region(x: torch.Tensor, tp: TensorParallelContext) -> torch.Tensor:
    """The input of a column-parallel product: the full activations on every TP rank. Replicated ones are
    copied (their gradient all-reduced); sequence-parallel ones are gathered (their gradient
    reduce-scattered)."""
    if tp.sequence_parallel:
        return gather_from_sequence_region(x, tp.group)
    return copy_to_tp_region(x, tp.group)


def sequence_parallel_weight(p: torch.Tensor, tp: TensorParallelContext | None) -> torch.Tensor:
    """A replicated weight used on this rank's slice of the sequence: its gradient is a partial sum,
    summed over TP in backward so the replicas stay equal."""
    if tp is None or not tp.sequence_parallel:
        return p
    return copy_to_tp_region(p, tp.group)


class VocabParallelHead(nn.Module):
    """An untied output head: vocabulary rows split across TP ranks; returns this rank's logits."""

    def __init__(self, padded_vocab: int, hidden: int, tp: TensorParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _param(local_shape(Kind.VOCAB, (padded_vocab, hidden), tp.size), Kind.VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel_lm_logits(x, self.weight, self.tp)
