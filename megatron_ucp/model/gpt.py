"""GPT building blocks: architecture only (no ranks, flags or globals).

Numerically the Hugging Face GPT-2 architecture: pre-LayerNorm blocks, learned position
embeddings, tanh-approximated GeLU, biases everywhere, LayerNorm epsilon from the config, and the
output head tied to the input embedding.

Shapes: b = micro-batch, s = sequence, h = hidden, np = heads on this TP rank, hn = head dim,
v = this rank's slice of the padded vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ucp.config import ModelConfig
from megatron_ucp.distributed.groups import TensorParallelContext
from megatron_ucp.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    mark_parallel,
    parallel_lm_logits,
    sequence_parallel_weight,
)
from megatron_ucp.tensor_parallel.mappings import scatter_to_sequence_region
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.placement import split_qkv_heads

try:  # optional fused kernels on GPUs
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm
except Exception:  # noqa: BLE001 - any import problem means "no apex"
    _ApexLayerNorm = None


def region_dropout(dropout: nn.Module, x: torch.Tensor, tp: TensorParallelContext) -> torch.Tensor:
    """Dropout between the tensor-parallel regions: replicated activations take the default RNG stream (the
    same mask on every TP rank); sequence-parallel ones, which differ per rank, the rank's own stream."""
    if tp.sequence_parallel:
        with tp.rng.fork():
            return dropout(x)
    return dropout(x)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """torch's LayerNorm on this rank's slice of the sequence: its weight and bias gradients are summed over TP."""

    def __init__(self, hidden: int, eps: float, tp: TensorParallelContext) -> None:
        super().__init__(hidden, eps=eps)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, sequence_parallel_weight(self.weight, self.tp),
                            sequence_parallel_weight(self.bias, self.tp), self.eps)


def layer_norm(hidden: int, eps: float, tp: TensorParallelContext | None = None) -> nn.Module:
    """apex's fused LayerNorm on CUDA when importable, torch's otherwise (same parameter names); on the
    sequence-split activations of sequence parallelism (``tp``), ``SequenceParallelLayerNorm``."""
    if tp is not None and tp.sequence_parallel:
        norm: nn.Module = SequenceParallelLayerNorm(hidden, eps, tp)
    elif _ApexLayerNorm is not None and torch.cuda.is_available():
        norm = _ApexLayerNorm(hidden, eps=eps)
    else:
        norm = nn.LayerNorm(hidden, eps=eps)
    for p in norm.parameters():
        mark_parallel(p, Kind.REPLICATED)
    return norm


class EmbeddingLayer(nn.Module):
    """Word (+ learned position) embeddings; also the tied output head (``head``)."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, tp: TensorParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.word_embeddings = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, tp)
        self.position_embeddings = None
        if not cfg.use_rotary_position_embeddings:  # rotary models encode positions in attention
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
            mark_parallel(self.position_embeddings.weight, Kind.REPLICATED)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [b, s] -> [b, s, h] ([b, s / tp, h] under SP)
        x = self.word_embeddings(ids)
        if self.position_embeddings is not None:  # under Ulysses, ids are this rank's slice of the sequence
            start = self.tp.ulysses.offset(ids.shape[-1])
            x = x + self.position_embeddings(torch.arange(start, start + ids.shape[-1], device=ids.device))
        if self.tp.sequence_parallel:
            x = scatter_to_sequence_region(x, self.tp.group)
        return region_dropout(self.dropout, x, self.tp)

    def head(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, v]
        return parallel_lm_logits(x, self.word_embeddings.weight, self.tp)


def _attention(q, k, v, dropout_p: float) -> torch.Tensor:
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # CPU half-precision attention is slow; fp32 inputs hold the half values exactly.
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class ParallelAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.local_heads = cfg.num_attention_heads // tp.size
        self.head_dim = cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, tp)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp)
        from megatron_ucp.model.llama import ulysses_attention

        self.ulysses = ulysses_attention(self._local_attention, tp, self.local_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.query_key_value(x)  # the whole sequence (gathered under sequence parallelism)
        b, s, _ = fused.shape  # under Ulysses, s is this rank's slice of the sequence
        # Per head [q k v]: the grouped layout with one query head per group (layout.placement.qkv_map).
        q, k, v = split_qkv_heads(fused, self.local_heads, 1, self.head_dim)  # [b, s, np, hn]
        if self.ulysses is not None:  # all-to-all: whole sequences of 1/sp of the heads, and back
            ctx = self.ulysses(q, k, v, 0)
        else:
            ctx = self._local_attention(q, k, v)
        return self.dense(ctx.reshape(b, s, self.local_heads * self.head_dim))

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over whole sequences: [b, s, heads, hn] in and out."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, hn]
        p = self.attention_dropout if self.training else 0.0
        with self.tp.rng.fork():  # this rank's heads draw their own dropout masks
            ctx = _attention(q, k, v, p)
        return ctx.transpose(1, 2)


class ParallelMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallelContext) -> None:
        super().__init__()
        assert cfg.ffn_hidden_size is not None  # set by ModelConfig.__post_init__
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, tp)
        self.dense_4h_to_h = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)).

    GPT's block, kept apart from ``llama.LlamaLayer`` (whose declared options cover the four
    Llama-shaped families) on purpose: the two share no sub-module (LayerNorm with biases vs fp32
    RMSNorm, learned positions vs rotary, multi-head vs grouped-query attention, GeLU vs SwiGLU), so one
    class would be two behind a switch, and merging them risks the numerics both are tested bitwise on.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallelContext, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.tp = tp
        self.input_layernorm = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon, tp)
        self.self_attention = ParallelAttention(cfg, tp)
        self.post_attention_layernorm = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon, tp)
        self.mlp = ParallelMLP(cfg, tp)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + region_dropout(self.dropout, self.self_attention(self.input_layernorm(x)), self.tp)
        return x + region_dropout(self.dropout, self.mlp(self.post_attention_layernorm(x)), self.tp)


def carried(fn, x):
    """``fn(x)``, or ``(fn(x), aux)`` for the ``(x, aux)`` an MoE model's blocks pass on (model/llama.py)."""
    if isinstance(x, tuple):
        return fn(x[0]), x[1]
    return fn(x)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallelContext | None = None) -> None:
        super().__init__()
        if cfg.normalization == "rmsnorm":
            from megatron_ucp.model.llama import RMSNorm

            self.final_layernorm: nn.Module = RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon,
                                                      tp if tp is not None and tp.sequence_parallel else None)
        else:
            self.final_layernorm = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon, tp)

    def forward(self, x):
        return carried(self.final_layernorm, x)


class LMHead(nn.Module):
    """The untied output head (Llama family): its own vocab-parallel weight, ``lm_head.weight``."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, tp: TensorParallelContext) -> None:
        super().__init__()
        self.lm_head = VocabParallelHead(padded_vocab, cfg.hidden_size, tp)

    def forward(self, x):
        return carried(self.lm_head, x)
