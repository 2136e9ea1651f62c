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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ucp.distributed.groups import TensorParallelContext
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.placement import check_heads, split_qkv_heads, split_sub_params
from megatron_ucp.model.gpt import region_dropout
from megatron_ucp.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, mark_parallel
from megatron_ucp.tensor_parallel.mappings import copy_to_tp_region

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

    def __init__(self, hidden: int, eps: float, tp: TensorParallelContext | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = mark_parallel(nn.Parameter(torch.empty(hidden)), Kind.REPLICATED)  # ones: model.init
        # Given a TP context, the norm runs on this rank's share of the heads (q/k norms) or of the sequence
        # (sequence parallelism): each rank's weight gradient is then a partial sum, all-reduced over TP so the
        # replicas stay equal.
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., h] -> [..., h]
        input_dtype = x.dtype
        # fp32 for half and fp32 inputs (HF); float64 inputs stay float64 (HF would round them to fp32)
        xc = x.to(torch.promote_types(input_dtype, torch.float32))
        variance = xc.pow(2).mean(-1, keepdim=True)
        xc = xc * torch.rsqrt(variance + self.eps)
        weight = self.weight if self.tp is None else copy_to_tp_region(self.weight, self.tp.group)
        return weight * xc.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# --------------------------------------------------------------------------------------------------
# rotary position embeddings (HF Llama convention: rotate_half, frequencies repeated as [f, f])
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding frequencies: base ``theta`` and a scaling of the inverse frequencies, as transformers
    computes them (``modeling_rope_utils``): ``none``; ``linear`` (every frequency / ``factor``); ``llama3``
    (Llama 3.1: wavelengths longer than ``original_context / low_freq_factor`` are divided by ``factor``,
    shorter than ``original_context / high_freq_factor`` kept, those between interpolated)."""

    theta: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def inv_freq(self, head_dim: int, device=None) -> torch.Tensor:
        """[hn/2] fp32 inverse frequencies, bitwise transformers' for the same settings."""
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        if self.scaling == "none":
            return inv_freq
        if self.scaling == "linear":
            return inv_freq / self.factor
        if self.scaling != "llama3":
            raise ValueError(f"unknown rotary scaling {self.scaling!r}")
        low_freq_wavelen = self.original_context / self.low_freq_factor
        high_freq_wavelen = self.original_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float | Rotary = 10000.0, device=None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each [s, hn], for positions 0..s-1; computed in fp32, returned in ``dtype``.

    The angle table is ``[pos * inv_freq, pos * inv_freq]`` (the two halves repeated, not interleaved),
    exactly HF's ``LlamaRotaryEmbedding``; ``theta`` is the base (default rope) or a ``Rotary``.
    """
    rotary = theta if isinstance(theta, Rotary) else Rotary(theta=theta)
    inv_freq = rotary.inv_freq(head_dim, device=device)
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


def sliding_window_mask(seq_len: int, window: int, device=None) -> torch.Tensor:
    """[s, s] bool, True where query i may attend key j: ``i - window < j <= i`` (transformers' sliding
    window: the token itself and the ``window - 1`` before it)."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                      window: int | None = None) -> torch.Tensor:
    """SDPA, causal (banded when ``window`` is shorter than the sequence); on CPU half-precision inputs
    run in fp32 (exact for the half values), like gpt.py."""
    s = q.shape[-2]
    mask = sliding_window_mask(s, window, q.device) if window is not None and window < s else None
    upcast = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    qc, kc, vc = (q.float(), k.float(), v.float()) if upcast else (q, k, v)
    if mask is None:
        out = F.scaled_dot_product_attention(qc, kc, vc, dropout_p=dropout_p, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, dropout_p=dropout_p)
    return out.to(q.dtype) if upcast else out


def ulysses_attention(local_attention, tp: TensorParallelContext, local_kv_heads: int):
    """DeepSpeed's ``DistributedAttention`` around ``local_attention`` (q, k, v [b, s, heads, hn] -> [b, s, heads,
    hn]) when the sequence is split over Ulysses ranks: an all-to-all from sequence slices of every head to whole
    sequences of ``1 / sp`` of the heads (following the key/value groups), and back. None without Ulysses."""
    if tp.ulysses.size == 1:
        return None
    from deepspeed.sequence.layer import DistributedAttention

    if local_kv_heads % tp.ulysses.size:
        raise ValueError(f"Ulysses sequence parallel {tp.ulysses.size} does not divide the {local_kv_heads} "
                         "key/value heads of a tensor-parallel rank")
    return DistributedAttention(local_attention, tp.ulysses.group, scatter_idx=2, gather_idx=1,
                                num_kv_heads=local_kv_heads)


class GQAAttention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings; this rank holds ng whole groups.

    ``head_dim`` may differ from hidden / heads (Qwen3); ``qk_norm`` adds a per-head RMSNorm on queries
    and keys before the rotary embedding (Qwen3); ``sliding_window`` bands the causal mask (Mistral).
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, tp: TensorParallelContext,
                 rope_theta: float = 10000.0, attention_dropout: float = 0.0, bias: bool = False,
                 qkv_bias: bool = False, head_dim: int | None = None, rotary: Rotary | None = None,
                 qk_norm: bool = False, norm_eps: float = 1e-6, sliding_window: int | None = None) -> None:
        super().__init__()
        qpg = check_heads(num_heads, num_kv_heads)
        if head_dim is None:
            if hidden % num_heads:
                raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {num_heads}")
            head_dim = hidden // num_heads
        if num_kv_heads % tp.size:
            raise ValueError(f"tensor parallel {tp.size} does not divide num_key_value_heads {num_kv_heads}: "
                             "each rank must hold whole key/value groups")
        self.tp = tp
        self.head_dim = head_dim
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.head_dim}")
        self.q_per_group = qpg
        self.local_groups = num_kv_heads // tp.size
        self.local_heads = num_heads // tp.size
        self.rotary = rotary if rotary is not None else Rotary(theta=rope_theta)
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        qkv_out = num_kv_heads * (qpg + 2) * self.head_dim  # = (num_heads + 2 * num_kv_heads) * hn
        self.query_key_value = ColumnParallelLinear(hidden, qkv_out, tp, bias=bias or qkv_bias)
        if qk_norm:
            self.q_layernorm = RMSNorm(self.head_dim, norm_eps, tp)
            self.k_layernorm = RMSNorm(self.head_dim, norm_eps, tp)
        self.qk_norm = qk_norm
        self.dense = RowParallelLinear(num_heads * self.head_dim, hidden, tp, bias=bias)
        self.ulysses = ulysses_attention(self._local_attention, tp, self.local_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, h] (s / tp each under SP)
        qkv = self.query_key_value(x)  # the whole sequence (gathered under sequence parallelism)
        b, s, _ = qkv.shape  # under Ulysses, s is this rank's slice of the sequence
        ng, qpg, hn = self.local_groups, self.q_per_group, self.head_dim
        q, k, v = split_qkv_heads(qkv, ng, qpg, hn)  # the fused rows' layout (placement)
        if self.qk_norm:  # per head, before the rotation (HF Qwen3)
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, np | ng, s, hn]
        offset = self.tp.ulysses.offset(s)  # the slice's positions in the sequence (0 without Ulysses)
        cos, sin = rotary_cos_sin(offset + s, hn, self.rotary, device=x.device, dtype=q.dtype)
        q, k = apply_rotary(q, cos[offset:], sin[offset:]), apply_rotary(k, cos[offset:], sin[offset:])
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, s, np | ng, hn]
        if self.ulysses is not None:  # all-to-all: whole sequences of 1/sp of the heads, and back
            ctx = self.ulysses(q, k, v, 0)
        else:
            ctx = self._local_attention(q, k, v)
        return self.dense(ctx.reshape(b, s, self.local_heads * hn))  # [b, s, np * hn]

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over whole sequences: [b, s, heads, hn] in (key/value heads for k, v), out."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, hn]
        qpg = q.shape[1] // k.shape[1]
        if qpg > 1:  # query head g*qpg + j reads key/value head g
            k = k.repeat_interleave(qpg, dim=1)
            v = v.repeat_interleave(qpg, dim=1)
        p = self.attention_dropout if self.training else 0.0
        if p > 0.0:
            with self.tp.rng.fork():  # this rank's heads draw their own dropout masks
                ctx = _causal_attention(q, k, v, p, self.sliding_window)
        else:
            ctx = _causal_attention(q, k, v, 0.0, self.sliding_window)
        return ctx.transpose(1, 2)  # [b, s, heads, hn]


# --------------------------------------------------------------------------------------------------
# the block
# --------------------------------------------------------------------------------------------------


class LlamaLayer(nn.Module):
    """Pre-RMSNorm block: x + attn(norm(x)), then x + mlp(norm(x)). [b, s, h] -> [b, s, h].

    Given ``moe`` (the keyword arguments of ``model.moe.sparse_mlp`` beyond the sizes), the MLP is
    DeepSpeed's MoE layer, and the block passes on ``(x, aux)``: ``aux`` [1] fp32 is the running sum of
    the load-balancing losses of the MoE layers so far (the input may be ``x`` alone: the first block).
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, ffn_hidden: int, eps: float,
                 tp: TensorParallelContext, layer_number: int, rope_theta: float = 10000.0,
                 attention_dropout: float = 0.0, hidden_dropout: float = 0.0, qkv_bias: bool = False,
                 head_dim: int | None = None, rotary: Rotary | None = None, qk_norm: bool = False,
                 sliding_window: int | None = None, moe: dict | None = None) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.tp = tp
        sp = tp if tp.sequence_parallel else None  # the norms run on this rank's slice of the sequence
        self.input_layernorm = RMSNorm(hidden, eps, sp)
        self.self_attention = GQAAttention(hidden, num_heads, num_kv_heads, tp, rope_theta=rope_theta,
                                           attention_dropout=attention_dropout, qkv_bias=qkv_bias,
                                           head_dim=head_dim, rotary=rotary, qk_norm=qk_norm, norm_eps=eps,
                                           sliding_window=sliding_window)
        self.post_attention_layernorm = RMSNorm(hidden, eps, sp)
        self.moe = moe is not None
        if moe is not None:
            from megatron_ucp.model.moe import sparse_mlp

            self.mlp = sparse_mlp(hidden, ffn_hidden, tp=tp.size, **moe)
        else:
            self.mlp = SwiGLUMLP(hidden, ffn_hidden, tp)
        self.dropout = nn.Dropout(hidden_dropout)  # on replicated activations: the default RNG stream

    def forward(self, x):
        if not self.moe:
            x = x + region_dropout(self.dropout, self.self_attention(self.input_layernorm(x)), self.tp)
            return x + region_dropout(self.dropout, self.mlp(self.post_attention_layernorm(x)), self.tp)
        x, aux = x if isinstance(x, tuple) else (x, torch.zeros(1, device=x.device))
        x = x + self.dropout(self.self_attention(self.input_layernorm(x)))
        y, l_aux, _ = self.mlp(self.post_attention_layernorm(x))
        return x + self.dropout(y), aux + l_aux.float().reshape(1)
