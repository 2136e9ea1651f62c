"""Llama building blocks: architecture only (no ranks, flags or globals).

Numerically the Hugging Face Llama architecture (``transformers.models.llama.modeling_llama``): RMSNorm
computed in fp32, rotary position embeddings in the rotate-half (non-interleaved) convention, SwiGLU
MLP, grouped-query attention, no biases by default. The fused weights use Megatron-DeepSpeed's
layouts, so its checkpoints map one to one:

* ``self_attention.query_key_value``: rows grouped per key/value group,
  ``[group 0: q_0 .. q_{qpg-1}, k, v | group 1: ... ]``. A TP cut on dim 0 hands each rank whole groups,
  so the full tensor is the same at every TP degree (plain ``Kind.COLUMN``), given
  ``num_kv_heads % tp == 0``.
* ``mlp.dense_h_to_4h``: each rank holds ``[gate_r; up_r]`` (its slices of the gate and up projections,
  stacked). The TP-rank concatenation of those shards depends on the TP degree (see
  ``layout.placement.fuse_swiglu``).

Shapes: b = micro-batch, s = sequence, h = hidden, np = query heads on this TP rank, ng = key/value
groups (= key/value heads) on this TP rank, qpg = query heads per group (np / ng), hn = head dim,
f = ffn hidden (full), fl = f / tp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ucp.distributed.groups import TensorParallelContext
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.placement import check_heads, split_qkv_heads, split_sub_params
from megatron_ucp.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, mark_parallel

# --------------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 (Hugging Face ``LlamaRMSNorm``).

    Half and fp32 inputs are normalised in fp32 exactly as HF does; float64 inputs (parity tests) are
    normalised in float64 instead of HF's round trip through fp32.

    As in HF the normalised activations are cast back to the input dtype *before* the weight multiply,
    so the output dtype is ``promote(weight.dtype, x.dtype)``: the input dtype whenever the module has
    been cast with the model (the usual case), fp32 for bf16 inputs to an fp32 weight.
    """

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = mark_parallel(nn.Parameter(torch.empty(hidden)), Kind.REPLICATED)  # ones: model.init

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., h] -> [..., h]
        input_dtype = x.dtype
        # fp32 for half and fp32 inputs (HF); float64 inputs stay float64 (HF would round them to fp32)
        xc = x.to(torch.promote_types(input_dtype, torch.float32))
        variance = xc.pow(2).mean(-1, keepdim=True)
        xc = xc * torch.rsqrt(variance + self.eps)
        return self.weight * xc.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# --------------------------------------------------------------------------------------------------
# rotary position embeddings (HF Llama convention: rotate_half, frequencies repeated as [f, f])
# --------------------------------------------------------------------------------------------------


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float = 10000.0, device=None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each [s, hn], for positions 0..s-1; computed in fp32, returned in ``dtype``.

    inv_freq[i] = 1 / theta^(2i / hn) for i < hn/2; the angle table is ``[pos * inv_freq, pos * inv_freq]``
    (the two halves repeated, not interleaved), exactly HF's ``LlamaRotaryEmbedding`` (default rope).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq[None, :]  # [s, hn/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [s, hn]; rotary angles, not a weight layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (halves, not even/odd pairs)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotary arithmetic, not a weight layout


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, hn] rotated by position: x * cos + rotate_half(x) * sin (cos/sin [s, hn])."""
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------
# MLP and attention
# --------------------------------------------------------------------------------------------------


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up fused into one column-parallel ``dense_h_to_4h``."""

    def __init__(self, hidden: int, ffn_hidden: int, tp: TensorParallelContext, bias: bool = False) -> None:
        super().__init__()
        if ffn_hidden % tp.size:
            raise ValueError(f"tensor parallel {tp.size} does not divide ffn_hidden_size {ffn_hidden}")
        self.dense_h_to_4h = ColumnParallelLinear(hidden, 2 * ffn_hidden, tp, bias=bias)  # local [gate_r; up_r]
        self.dense_4h_to_h = RowParallelLinear(ffn_hidden, hidden, tp, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, h]
        gate, up = split_sub_params(self.dense_h_to_4h(x), Kind.COLUMN_2SUB)  # [b, s, fl] each
        return self.dense_4h_to_h(F.silu(gate) * up)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA, causal; on CPU half-precision inputs run in fp32 (exact for the half values), like gpt.py."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, is_causal=True)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class GQAAttention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings; this rank holds ng whole groups."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, tp: TensorParallelContext,
                 rope_theta: float = 10000.0, attention_dropout: float = 0.0, bias: bool = False,
                 qkv_bias: bool = False) -> None:
        super().__init__()
        qpg = check_heads(num_heads, num_kv_heads)
        if hidden % num_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {num_heads}")
        if num_kv_heads % tp.size:
            raise ValueError(f"tensor parallel {tp.size} does not divide num_key_value_heads {num_kv_heads}: "
                             "each rank must hold whole key/value groups")
        self.tp = tp
        self.head_dim = hidden // num_heads
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.head_dim}")
        self.q_per_group = qpg
        self.local_groups = num_kv_heads // tp.size
        self.local_heads = num_heads // tp.size
        self.rope_theta = rope_theta
        self.attention_dropout = attention_dropout
        qkv_out = num_kv_heads * (qpg + 2) * self.head_dim  # = (num_heads + 2 * num_kv_heads) * hn
        self.query_key_value = ColumnParallelLinear(hidden, qkv_out, tp, bias=bias or qkv_bias)
        self.dense = RowParallelLinear(num_heads * self.head_dim, hidden, tp, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, h]
        b, s, _ = x.shape
        ng, qpg, hn = self.local_groups, self.q_per_group, self.head_dim
        q, k, v = split_qkv_heads(self.query_key_value(x), ng, qpg, hn)  # the fused rows' layout (placement)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, np | ng, s, hn]
        cos, sin = rotary_cos_sin(s, hn, self.rope_theta, device=x.device, dtype=q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if qpg > 1:  # query head g*qpg + j reads key/value head g
            k = k.repeat_interleave(qpg, dim=1)
            v = v.repeat_interleave(qpg, dim=1)
        p = self.attention_dropout if self.training else 0.0
        if p > 0.0:
            with self.tp.rng.fork():  # this rank's heads draw their own dropout masks
                ctx = _causal_attention(q, k, v, p)
        else:
            ctx = _causal_attention(q, k, v, 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.local_heads * hn)  # [b, s, np * hn]
        return self.dense(ctx)


# --------------------------------------------------------------------------------------------------
# the block
# --------------------------------------------------------------------------------------------------


class LlamaLayer(nn.Module):
    """Pre-RMSNorm block: x + attn(norm(x)), then x + mlp(norm(x)). [b, s, h] -> [b, s, h]."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, ffn_hidden: int, eps: float,
                 tp: TensorParallelContext, layer_number: int, rope_theta: float = 10000.0,
                 attention_dropout: float = 0.0, hidden_dropout: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attention = GQAAttention(hidden, num_heads, num_kv_heads, tp, rope_theta=rope_theta,
                                           attention_dropout=attention_dropout, qkv_bias=qkv_bias)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLUMLP(hidden, ffn_hidden, tp)
        self.dropout = nn.Dropout(hidden_dropout)  # on replicated activations: the default RNG stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.input_layernorm(x)))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
