"""Llama building blocks (``megatron_ucp/model/llama.py``) against dense references and across TP.

Part 1, single process: RMSNorm, rotary embeddings, SwiGLU and GQA attention against hand-written
formulas and (when importable) Hugging Face ``transformers``' Llama modules; a whole ``LlamaLayer``
against HF's ``LlamaDecoderLayer`` with weights mapped through ``fuse_qkv`` / ``fuse_swiglu``.

Part 2, single process: the fused layouts under TP slicing (``slicing.shard`` / ``merge``) and
conversion between TP degrees, including DeepSpeed's ``parameter_with_2_sub_params_cat_dim_0`` rule
and the parameter table's ``Kind.COLUMN_2SUB``; the table's Llama rows against LlamaLayer's parameters.

Part 3, spawned gloo ranks (one spawn per world size, many checks, as in test_tp_parity.py): a
``LlamaLayer`` at TP = world size against the TP=1 layer with the same full weights, in float64.

Every comparison has a negative control (a plausible layout or convention mistake) that must fail it.

Tolerances:
* float64 (``_close``: rtol 1e-10, atol 1e-12): TP and the references change only the order of sums,
  which moves float64 results by ~1e-15 relative; a layout mistake is O(1).
* fp32 against HF (``_close_hf``: rtol 1e-5, atol 1e-5 on O(1) activations): HF runs eager attention
  (matmul, softmax, matmul) where we run SDPA, and separate q/k/v GEMMs where we run one fused GEMM, so
  results differ by a few fp32 ulps (~1e-7) per op over a dozen chained ops; measured max error is
  ~1e-6. The negative controls are off by > 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import report_check, run_tp_checks, spawned_results
from helpers import assert_equal, assert_fails, leaf, load_param, same_forward_and_backward
from helpers import close64 as _close
from megatron_ucp.distributed.groups import TensorParallelContext
from megatron_ucp.distributed.random import MODEL_PARALLEL_RNG
from megatron_ucp.layout import slicing
from megatron_ucp.layout.params import Kind
from megatron_ucp.model.llama import (
    GQAAttention,
    LlamaLayer,
    RMSNorm,
    SwiGLUMLP,
    apply_rotary,
    rotary_cos_sin,
)
from megatron_ucp.layout.placement import fuse_qkv, fuse_swiglu, unfuse_qkv, unfuse_swiglu

F64, F32 = torch.float64, torch.float32
B, S = 2, 6
# TP 4 (one spawned run shared by every check) runs in the full suite; TP 2 also in the fast tier.
WORLD_SIZES = (2, pytest.param(4, marks=pytest.mark.slow))


def _hf_llama():
    """transformers' Llama module, or None (imported lazily: it costs seconds, and spawned ranks skip it)."""
    try:
        from transformers.models.llama import modeling_llama
    except Exception:  # noqa: BLE001 - any import problem means "no transformers"
        return None
    return modeling_llama


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape: int, dtype=F64, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=_gen(seed), dtype=F64)).to(dtype)


def _close_hf(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")






def _tp1() -> TensorParallelContext:
    ctx = TensorParallelContext(size=1, rank=0, group=None)
    ctx.rng.add(MODEL_PARALLEL_RNG, 1234 + 2718)
    return ctx


def _causal_mask(s: int, dtype) -> torch.Tensor:
    """Additive [1, 1, s, s] mask: 0 on and below the diagonal, the dtype's minimum above."""
    return torch.full((s, s), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


# Separate (Hugging Face-shaped) weights of one layer, and our fused parameters built from them.


def _separate_weights(seed: int, hidden: int, nh: int, nkv: int, ffn: int, dtype=F64) -> dict[str, torch.Tensor]:
    hn = hidden // nh

    def w(i, out_f, in_f):  # ~unit-variance activations through every projection
        return _randn(seed + i, out_f, in_f, dtype=dtype, scale=1 / math.sqrt(in_f))

    return {
        "q": w(0, nh * hn, hidden), "k": w(1, nkv * hn, hidden), "v": w(2, nkv * hn, hidden),
        "o": w(3, hidden, nh * hn), "gate": w(4, ffn, hidden), "up": w(5, ffn, hidden), "down": w(6, hidden, ffn),
        # norms away from ones, so their gradients and a wrong norm formula are visible
        "ln1": 1.0 + _randn(seed + 7, hidden, dtype=dtype, scale=0.3),
        "ln2": 1.0 + _randn(seed + 8, hidden, dtype=dtype, scale=0.3),
    }


# How TP cuts each LlamaLayer parameter when its full tensor is the TP-rank concatenation at that degree
# (``fuse_swiglu(gate, up, tp)`` for dense_h_to_4h). The parameter table instead declares dense_h_to_4h
# as Kind.COLUMN_2SUB on the universal ``[gate; up]``; both give the same shards (checked below).
LAYER_KINDS = {
    "input_layernorm.weight": Kind.REPLICATED,
    "self_attention.query_key_value.weight": Kind.COLUMN,
    "self_attention.dense.weight": Kind.ROW,
    "post_attention_layernorm.weight": Kind.REPLICATED,
    "mlp.dense_h_to_4h.weight": Kind.COLUMN,
    "mlp.dense_4h_to_h.weight": Kind.ROW,
}


def _fused_full(w: dict, nh: int, nkv: int, tp: int, naive_qkv=False, naive_swiglu=False) -> dict[str, torch.Tensor]:
    """Our full (TP-concatenated) parameters at TP degree ``tp``. The ``naive_*`` flags build the
    negative controls: ``[q_all; k_all; v_all]`` and ``[gate_full; up_full]``."""
    qkv = torch.cat([w["q"], w["k"], w["v"]]) if naive_qkv else fuse_qkv(w["q"], w["k"], w["v"], nh, nkv)
    h4h = torch.cat([w["gate"], w["up"]]) if naive_swiglu else fuse_swiglu(w["gate"], w["up"], tp)
    return {
        "input_layernorm.weight": w["ln1"],
        "self_attention.query_key_value.weight": qkv,
        "self_attention.dense.weight": w["o"],
        "post_attention_layernorm.weight": w["ln2"],
        "mlp.dense_h_to_4h.weight": h4h,
        "mlp.dense_4h_to_h.weight": w["down"],
    }


def _load_layer(layer: torch.nn.Module, full: dict, tp: int, rank: int) -> None:
    names = {n for n, _ in layer.named_parameters()}
    assert names == set(LAYER_KINDS), f"parameter names {sorted(names)}"
    for name, p in layer.named_parameters():
        kind = LAYER_KINDS[name]
        assert p.partition_dim == (-1 if kind.partition_dim is None else kind.partition_dim), name
        assert p.tensor_model_parallel == (kind is not Kind.REPLICATED), name
        load_param(p, slicing.shard(full[name], kind, tp, rank))


# Hand-written dense references (float64).


def _ref_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hn/2]) by pos * inv_freq[i], written out pair by pair.

    cos and sin are computed in fp32 like HF (the convention under test is the pairing, not the
    precision), then the rotation runs in x's dtype."""
    s, hn = x.shape[-2], x.shape[-1]
    half = hn // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, hn, 2, dtype=F32) / hn))
    ang = torch.arange(s, dtype=F32)[:, None] * inv_freq[None, :]  # [s, hn/2]
    c, sn = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], dim=-1)


def _interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """The wrong convention for HF Llama (GPT-J / Meta's complex form): pairs (x[2i], x[2i+1])."""
    s, hn = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hn, 2, dtype=F32) / hn))
    ang = torch.arange(s, dtype=F32)[:, None] * inv_freq[None, :]
    c, sn = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * c - x2 * sn, x2 * c + x1 * sn], dim=-1).flatten(-2)


def _ref_attention(x, q_w, k_w, v_w, o_w, nh, nkv, theta):
    """Separate projections, repeat_interleave of k/v heads, explicit causal softmax."""
    b, s, _ = x.shape
    hn = q_w.shape[0] // nh
    q = F.linear(x, q_w).view(b, s, nh, hn).transpose(1, 2)
    k = F.linear(x, k_w).view(b, s, nkv, hn).transpose(1, 2)
    v = F.linear(x, v_w).view(b, s, nkv, hn).transpose(1, 2)
    q, k = _ref_rope(q, theta), _ref_rope(k, theta)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hn)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    ctx = torch.softmax(scores, dim=-1) @ v
    return F.linear(ctx.transpose(1, 2).reshape(b, s, nh * hn), o_w)


def _ref_swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


# --------------------------------------------------------------------------------------------------
# 1. dense references (single process)
# --------------------------------------------------------------------------------------------------


def test_rmsnorm_matches_formula_and_hf():
    hidden, eps = 16, 1e-5
    norm = RMSNorm(hidden, eps)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert norm.weight.tensor_model_parallel is False and norm.weight.partition_dim == -1
    w = 1.0 + _randn(1, hidden, scale=0.3)
    x = _randn(2, B, S, hidden, scale=3.0) + 0.5  # a non-zero mean: RMSNorm must not subtract it

    norm64 = norm.to(F64)
    load_param(norm64.weight, w)
    _close(norm64(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w, "rmsnorm formula (f64)")
    # negative control: LayerNorm (mean subtracted) with the same weight is a different function
    assert_fails(lambda: _close(norm64(x), F.layer_norm(x, (hidden,), w, None, eps), "layernorm"),
                  "RMSNorm compared with LayerNorm")

    hf = _hf_llama()
    if hf is None:  # the checks above ran; the comparison with transformers cannot
        pytest.skip("transformers is not installed")
    for dtype in (F32, torch.bfloat16):
        ours = RMSNorm(hidden, eps).to(dtype)
        theirs = hf.LlamaRMSNorm(hidden, eps=eps).to(dtype)
        load_param(ours.weight, w.to(dtype))
        load_param(theirs.weight, w.to(dtype))
        xd = x.to(dtype)
        y = ours(xd)
        assert y.dtype == dtype
        assert_equal(y, theirs(xd), f"rmsnorm vs HF LlamaRMSNorm ({dtype}); same fp32 ops in the same order")
    # bf16 activations into an fp32 weight: HF's dtype promotion (fp32 out), reproduced exactly
    ours, theirs = RMSNorm(hidden, eps), hf.LlamaRMSNorm(hidden, eps=eps)
    load_param(ours.weight, w.float())
    load_param(theirs.weight, w.float())
    assert_equal(ours(x.to(torch.bfloat16)), theirs(x.to(torch.bfloat16)), "rmsnorm bf16 input, fp32 weight")


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rotary_matches_hf_and_reference(theta):
    nh, hn = 3, 8
    x = _randn(10, B, nh, S, hn, dtype=F32)
    k = _randn(11, B, nh, S, hn, dtype=F32)
    cos, sin = rotary_cos_sin(S, hn, theta, dtype=F32)
    assert cos.shape == sin.shape == (S, hn) and cos.dtype == F32
    assert_equal(rotary_cos_sin(S, hn, theta, dtype=torch.bfloat16)[0], cos.to(torch.bfloat16), "cos cast from fp32")
    ours = apply_rotary(x, cos, sin)

    # the hand-written pair-by-pair rotation (float64 arithmetic on fp32 cos/sin)
    ref = _ref_rope(x.double(), theta)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)  # fp32 rounding of x*cos + y*sin
    # position 0 is the identity; the rotation preserves each pair's norm
    assert_equal(ours[:, :, 0], x[:, :, 0], "position 0")
    torch.testing.assert_close(ours.norm(dim=-1), x.norm(dim=-1))
    # relative positions: <R_m q, R_n k> depends on m - n only (shift both by one position)
    q1 = x[:, :, :1].expand(B, nh, S, hn)
    k1 = k[:, :, :1].expand(B, nh, S, hn)
    rq, rk = apply_rotary(q1.double(), cos.double(), sin.double()), apply_rotary(k1.double(), cos.double(), sin.double())
    dots = (rq[:, :, 1:] * rk[:, :, :-1]).sum(-1)  # positions (m, m-1) for m = 1..S-1
    # (up to the fp32 rounding of the angles, ~1e-7; a convention mistake breaks this by O(1))
    torch.testing.assert_close(dots, dots[:, :, :1].expand_as(dots), rtol=1e-5, atol=1e-5)

    # negative control: the interleaved (even/odd pairs) convention
    assert_fails(lambda: torch.testing.assert_close(ours.double(), _interleaved_rope(x.double(), theta),
                                                     rtol=1e-5, atol=1e-5), "interleaved RoPE vs rotate_half")

    hf = _hf_llama()
    if hf is None:  # the checks above ran; the comparison with transformers cannot
        pytest.skip("transformers is not installed")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=nh * hn, num_attention_heads=nh, num_key_value_heads=nh, intermediate_size=8,
                      max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = hf.LlamaRotaryEmbedding(cfg)
    hf_cos, hf_sin = rotary(x, torch.arange(S)[None].expand(B, S))  # [b, s, hn]
    assert_equal(hf_cos[0], cos, "cos vs HF")
    assert_equal(hf_sin[0], sin, "sin vs HF")
    hq, hk = hf.apply_rotary_pos_emb(x, k, hf_cos, hf_sin)
    assert_equal(ours, hq, "rotary q vs HF apply_rotary_pos_emb")
    assert_equal(apply_rotary(k, cos, sin), hk, "rotary k vs HF apply_rotary_pos_emb")
    assert_fails(lambda: _close_hf(_interleaved_rope(x.double(), theta).float(), hq, "interleaved"),
                  "interleaved RoPE vs HF")


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp_dense(bias):
    hidden, ffn = 8, 12
    mlp = SwiGLUMLP(hidden, ffn, _tp1(), bias=bias).to(F64)
    expected = {"dense_h_to_4h.weight", "dense_4h_to_h.weight"}
    if bias:
        expected |= {"dense_h_to_4h.bias", "dense_4h_to_h.bias"}
    assert {n for n, _ in mlp.named_parameters()} == expected
    gate, up, down = _randn(20, ffn, hidden), _randn(21, ffn, hidden), _randn(22, hidden, ffn)
    bg, bu, bd = _randn(23, ffn), _randn(24, ffn), _randn(25, hidden)
    load_param(mlp.dense_h_to_4h.weight, fuse_swiglu(gate, up, 1))
    load_param(mlp.dense_4h_to_h.weight, down)
    if bias:
        load_param(mlp.dense_h_to_4h.bias, fuse_swiglu(bg, bu, 1))
        load_param(mlp.dense_4h_to_h.bias, bd)
    x, g = _randn(26, B, S, hidden), _randn(27, B, S, hidden)
    dense = [leaf(t) for t in (gate, up, down, bg, bu, bd)]
    xd, xm = leaf(x), leaf(x)
    if bias:
        ref = F.linear(F.silu(F.linear(xd, dense[0], dense[3])) * F.linear(xd, dense[1], dense[4]), dense[2], dense[5])
    else:
        ref = _ref_swiglu(xd, *dense[:3])
    ref.backward(g)
    y = mlp(xm)
    _close(y, ref.detach(), "swiglu output")
    y.backward(g)
    _close(xm.grad, xd.grad, "swiglu input grad")
    g_gate, g_up = unfuse_swiglu(mlp.dense_h_to_4h.weight.grad, 1)
    _close(g_gate, dense[0].grad, "gate grad")
    _close(g_up, dense[1].grad, "up grad")
    _close(mlp.dense_4h_to_h.weight.grad, dense[2].grad, "down grad")

    # negative control: [up; gate] (the two halves swapped)
    load_param(mlp.dense_h_to_4h.weight, fuse_swiglu(up, gate, 1))
    with torch.no_grad():
        assert_fails(lambda: _close(mlp(x), ref.detach(), "swapped"), "SwiGLU with gate and up swapped")


@pytest.mark.parametrize("nh,nkv", [(8, 2), (4, 4), (4, 1)])  # GQA, MHA, MQA
def test_gqa_attention_dense(nh, nkv):
    hidden, theta = 32, 10000.0
    attn = GQAAttention(hidden, nh, nkv, _tp1(), rope_theta=theta).to(F64)
    assert {n for n, _ in attn.named_parameters()} == {"query_key_value.weight", "dense.weight"}
    w = _separate_weights(100, hidden, nh, nkv, 4)
    fused = fuse_qkv(w["q"], w["k"], w["v"], nh, nkv)
    hn = hidden // nh
    assert fused.shape == ((nh + 2 * nkv) * hn, hidden)
    load_param(attn.query_key_value.weight, fused)
    load_param(attn.dense.weight, w["o"])

    x, g = _randn(110, B, S, hidden), _randn(111, B, S, hidden)
    dense = {n: leaf(w[n]) for n in ("q", "k", "v", "o")}
    xd, xa = leaf(x), leaf(x)
    ref = _ref_attention(xd, dense["q"], dense["k"], dense["v"], dense["o"], nh, nkv, theta)
    ref.backward(g)
    y = attn(xa)
    _close(y, ref.detach(), "attention output")
    y.backward(g)
    _close(xa.grad, xd.grad, "attention input grad")
    gq, gk, gv = unfuse_qkv(attn.query_key_value.weight.grad, nh, nkv)
    for name, got in (("q", gq), ("k", gk), ("v", gv)):
        _close(got, dense[name].grad, f"{name} grad")
    _close(attn.dense.weight.grad, dense["o"].grad, "dense grad")

    # causality: a change at the last position leaves every earlier output untouched
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert_equal(attn(x2)[:, :-1], y.detach()[:, :-1], "causal")

    # negative control: [q_all; k_all; v_all] instead of the grouped layout
    if nkv > 1:  # with one group the two layouts coincide
        load_param(attn.query_key_value.weight, torch.cat([w["q"], w["k"], w["v"]]))
        with torch.no_grad():
            assert_fails(lambda: _close(attn(x), ref.detach(), "[q;k;v]"), "fused QKV as [q_all; k_all; v_all]")
    else:
        assert_equal(fused, torch.cat([w["q"], w["k"], w["v"]]), "one group: grouped layout = [q; k; v]")


def test_llama_layer_matches_hf_decoder_layer():
    hf = _hf_llama()
    if hf is None:
        pytest.skip("transformers is not importable")
    from transformers import LlamaConfig

    hidden, nh, nkv, ffn, eps, theta = 64, 8, 2, 96, 1e-5, 500000.0  # non-default theta: it must be plumbed
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=nh, num_key_value_heads=nkv, intermediate_size=ffn,
                      rms_norm_eps=eps, attention_bias=False, mlp_bias=False, hidden_act="silu",
                      max_position_embeddings=64, num_hidden_layers=1, vocab_size=64, attention_dropout=0.0,
                      rope_parameters={"rope_type": "default", "rope_theta": theta}, attn_implementation="eager")
    theirs = hf.LlamaDecoderLayer(cfg, layer_idx=0).to(F32)
    ours = LlamaLayer(hidden, nh, nkv, ffn, eps, _tp1(), layer_number=0, rope_theta=theta).to(F32)
    w = _separate_weights(200, hidden, nh, nkv, ffn, dtype=F32)
    hf_names = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
                "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
                "mlp.down_proj.weight": "down", "input_layernorm.weight": "ln1", "post_attention_layernorm.weight": "ln2"}
    theirs_params = dict(theirs.named_parameters())
    assert set(theirs_params) == set(hf_names)
    for name, key in hf_names.items():
        load_param(theirs_params[name], w[key])
    _load_layer(ours, _fused_full(w, nh, nkv, tp=1), 1, 0)
    ours.eval(), theirs.eval()

    x, g = _randn(210, B, S, hidden, dtype=F32), _randn(211, B, S, hidden, dtype=F32)
    xo, xt = leaf(x), leaf(x)
    positions = torch.arange(S)[None].expand(B, S)
    cos_sin = hf.LlamaRotaryEmbedding(cfg)(xt, positions)
    yt = theirs(xt, attention_mask=_causal_mask(S, F32), position_ids=positions, position_embeddings=cos_sin)
    yt = yt[0] if isinstance(yt, tuple) else yt
    yt.backward(g)
    yo = ours(xo)
    yo.backward(g)
    _close_hf(yo, yt.detach(), "layer output vs HF")
    _close_hf(xo.grad, xt.grad, "layer input grad vs HF")
    grads = {n: p.grad for n, p in ours.named_parameters()}
    gq, gk, gv = unfuse_qkv(grads["self_attention.query_key_value.weight"], nh, nkv)
    g_gate, g_up = unfuse_swiglu(grads["mlp.dense_h_to_4h.weight"], 1)
    for got, name in ((gq, "self_attn.q_proj.weight"), (gk, "self_attn.k_proj.weight"),
                      (gv, "self_attn.v_proj.weight"), (g_gate, "mlp.gate_proj.weight"),
                      (g_up, "mlp.up_proj.weight"),
                      (grads["self_attention.dense.weight"], "self_attn.o_proj.weight"),
                      (grads["mlp.dense_4h_to_h.weight"], "mlp.down_proj.weight"),
                      (grads["input_layernorm.weight"], "input_layernorm.weight"),
                      (grads["post_attention_layernorm.weight"], "post_attention_layernorm.weight")):
        _close_hf(got, theirs_params[name].grad, f"grad of {name} vs HF")

    # negative controls, each against the same HF output
    def output_with(full):
        layer = LlamaLayer(hidden, nh, nkv, ffn, eps, _tp1(), 0, rope_theta=theta).to(F32)
        _load_layer(layer, full, 1, 0)
        with torch.no_grad():
            return layer(x)

    assert_fails(lambda: _close_hf(output_with(_fused_full(w, nh, nkv, 1, naive_qkv=True)), yt.detach(), "qkv"),
                  "LlamaLayer with fused QKV as [q_all; k_all; v_all]")
    swapped = dict(w, gate=w["up"], up=w["gate"])
    assert_fails(lambda: _close_hf(output_with(_fused_full(swapped, nh, nkv, 1)), yt.detach(), "gate/up"),
                  "LlamaLayer with gate and up swapped")
    default_theta = LlamaLayer(hidden, nh, nkv, ffn, eps, _tp1(), 0).to(F32)  # theta 10000, HF has 500000
    _load_layer(default_theta, _fused_full(w, nh, nkv, 1), 1, 0)
    with torch.no_grad():
        y_default = default_theta(x)
    assert_fails(lambda: _close_hf(y_default, yt.detach(), "theta"), "LlamaLayer with the wrong rope theta")


def test_constructor_errors():
    tp4 = TensorParallelContext(size=4, rank=0, group=None)  # construction happens before any communication
    with pytest.raises(ValueError, match="tensor parallel 4 does not divide num_key_value_heads 2"):
        GQAAttention(32, 8, 2, tp4)
    with pytest.raises(ValueError, match="tensor parallel 4 does not divide num_key_value_heads 2"):
        LlamaLayer(32, 8, 2, 64, 1e-5, tp4, 0)
    with pytest.raises(ValueError, match="num_key_value_heads 3 must divide num_attention_heads 8"):
        GQAAttention(32, 8, 3, _tp1())
    with pytest.raises(ValueError, match="tensor parallel 4 does not divide ffn_hidden_size 30"):
        SwiGLUMLP(32, 30, tp4)
    with pytest.raises(ValueError, match="even head dim"):
        GQAAttention(24, 8, 2, _tp1())  # hn = 3
    with pytest.raises(ValueError):
        fuse_qkv(torch.zeros(16, 4), torch.zeros(8, 4), torch.zeros(4, 4), 4, 2)
    with pytest.raises(ValueError):
        unfuse_swiglu(torch.zeros(6, 4), 2)  # 6 rows are not 2 ranks of [gate; up] of equal halves


def test_dropout_streams_and_bf16():
    hidden, nh, nkv, ffn = 32, 4, 2, 48
    w = _separate_weights(300, hidden, nh, nkv, ffn, dtype=F32)
    x = _randn(310, B, S, hidden, dtype=F32)

    # attention dropout draws from the tracker's per-rank stream, never from the default generator
    ctx = _tp1()
    layer = LlamaLayer(hidden, nh, nkv, ffn, 1e-5, ctx, 0, attention_dropout=0.5)
    _load_layer(layer, _fused_full(w, nh, nkv, 1), 1, 0)
    layer.eval()
    with torch.no_grad():
        y_eval = layer(x)
    layer.train()
    before = torch.get_rng_state()
    with torch.no_grad():
        y_train = layer(x)
    assert_equal(torch.get_rng_state(), before, "attention dropout leaves the default generator alone")
    assert not torch.allclose(y_train, y_eval), "attention dropout had no effect in training mode"
    unseeded = LlamaLayer(hidden, nh, nkv, ffn, 1e-5, TensorParallelContext(), 0, attention_dropout=0.5)
    _load_layer(unseeded, _fused_full(w, nh, nkv, 1), 1, 0)
    with pytest.raises(KeyError):
        unseeded(x)  # dropout without a seeded tracker stream is refused, not silently shared

    # bf16 on CPU: runs (fp32 GEMMs/attention inside), returns bf16, close to fp32 on the same values
    l16 = LlamaLayer(hidden, nh, nkv, ffn, 1e-5, _tp1(), 0).to(torch.bfloat16)
    l32 = LlamaLayer(hidden, nh, nkv, ffn, 1e-5, _tp1(), 0)
    full16 = {k: v.to(torch.bfloat16) for k, v in _fused_full(w, nh, nkv, 1).items()}
    _load_layer(l16, full16, 1, 0)
    _load_layer(l32, {k: v.float() for k, v in full16.items()}, 1, 0)
    x16 = x.to(torch.bfloat16)
    with torch.no_grad():
        y16, y32 = l16(x16), l32(x16.float())
    assert y16.dtype == torch.bfloat16
    # bf16 keeps 8 bits: ~4e-3 relative per rounding, a handful of roundings on O(1) activations
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)


# --------------------------------------------------------------------------------------------------
# 2. fused layouts under TP slicing, and conversion between TP degrees
# --------------------------------------------------------------------------------------------------


def _ds_merge_2_sub_params(shards: list[torch.Tensor]) -> torch.Tensor:
    """DeepSpeed ds_to_universal's merge for ``parameter_with_2_sub_params_cat_dim_0`` (as written there)."""
    chunked = [torch.chunk(s, 2, dim=0) for s in shards]
    return torch.cat([torch.cat([c[0] for c in chunked]), torch.cat([c[1] for c in chunked])])


def _ds_load_2_sub_params(full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """DeepSpeed universal_checkpoint's load for a parameter saved with 2 sub-params (as written there)."""
    sub_params = full.chunk(2, dim=0)
    return torch.cat([p.chunk(tp, dim=0)[rank] for p in sub_params], dim=0)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_layout_under_tp(tp):
    nh, nkv, hn, hidden = 8, 4, 3, 5
    q, k, v = _randn(400, nh * hn, hidden), _randn(401, nkv * hn, hidden), _randn(402, nkv * hn, hidden)
    full = fuse_qkv(q, k, v, nh, nkv)
    assert_equal(torch.cat(unfuse_qkv(full, nh, nkv)), torch.cat([q, k, v]), "unfuse(fuse)")
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], nh, nkv)  # biases use the same row layout
    assert_equal(bias, full[:, 0], "bias layout = weight row layout")
    shards = [slicing.shard(full, Kind.COLUMN, tp, r) for r in range(tp)]
    for r, got in enumerate(shards):
        # rank r's groups: kv heads r*nkv/tp .. and the query heads that read them
        expected = fuse_qkv(q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r], nh // tp, nkv // tp)
        assert_equal(got, expected, f"rank {r} of {tp}: its groups' q, k, v rows")
        lq, lk, lv = unfuse_qkv(got, nh // tp, nkv // tp)
        assert_equal(lk, k[r * nkv // tp * hn:(r + 1) * nkv // tp * hn], f"rank {r} k heads")
        assert_equal(lq, q[r * nh // tp * hn:(r + 1) * nh // tp * hn], f"rank {r} q heads")
        assert_equal(lv, v[r * nkv // tp * hn:(r + 1) * nkv // tp * hn], f"rank {r} v heads")
    assert_equal(slicing.merge(shards, Kind.COLUMN), full, "merge(shard)")
    # TP-invariant: the full tensor does not depend on tp, so a plain COLUMN re-split converts degrees
    for tp_dst in (1, 2, 4):
        assert_equal(slicing.merge([slicing.shard(full, Kind.COLUMN, tp_dst, r) for r in range(tp_dst)], Kind.COLUMN),
               full, f"re-split at tp {tp_dst}")
    if tp > 1:  # negative control: [q_all; k_all; v_all] hands rank 0 only query rows
        naive = torch.cat([q, k, v])
        assert_fails(lambda: assert_equal(slicing.shard(naive, Kind.COLUMN, tp, 0), shards[0], "naive"),
                      "rank 0's shard of [q_all; k_all; v_all]")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_swiglu_layout_under_tp(tp):
    ffn, hidden = 8, 3
    gate, up = _randn(500, ffn, hidden), _randn(501, ffn, hidden)
    full = fuse_swiglu(gate, up, tp)
    shards = [slicing.shard(full, Kind.COLUMN, tp, r) for r in range(tp)]
    for r, got in enumerate(shards):
        assert_equal(got, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]), f"rank {r} of {tp}: [gate_r; up_r]")
    assert_equal(slicing.merge(shards, Kind.COLUMN), full, "merge(shard)")
    g2, u2 = unfuse_swiglu(full, tp)
    assert_equal(g2, gate, "unfuse gate")
    assert_equal(u2, up, "unfuse up")
    assert_equal(fuse_swiglu(gate, up, 1), torch.cat([gate, up]), "tp 1 is [gate; up]")

    # converting between degrees goes through unfuse(src) -> fuse(dst), exactly
    for tp_dst in (1, 2, 4):
        assert_equal(fuse_swiglu(*unfuse_swiglu(full, tp), tp_dst), fuse_swiglu(gate, up, tp_dst), f"{tp} -> {tp_dst}")

    # the parameter table's Kind.COLUMN_2SUB works on the universal [gate; up] and yields the same shards
    universal = fuse_swiglu(gate, up, 1)
    for r in range(tp):
        assert_equal(slicing.shard(universal, Kind.COLUMN_2SUB, tp, r), shards[r], f"COLUMN_2SUB shard {r} of {tp}")
    assert_equal(slicing.merge(shards, Kind.COLUMN_2SUB), universal, "COLUMN_2SUB merge = [gate; up]")

    # DeepSpeed's parameter_with_2_sub_params_cat_dim_0: merge gives the universal [gate; up] ...
    assert_equal(_ds_merge_2_sub_params(shards), torch.cat([gate, up]), "DeepSpeed merge of the shards")
    # ... and loading it at any degree gives exactly fuse_swiglu's shards at that degree
    for tp_dst in (1, 2, 4):
        for r in range(tp_dst):
            assert_equal(_ds_load_2_sub_params(torch.cat([gate, up]), tp_dst, r),
                   slicing.shard(fuse_swiglu(gate, up, tp_dst), Kind.COLUMN, tp_dst, r), f"DS load {tp_dst}/{r}")

    if tp > 1:
        # NOT TP-invariant: the plain concatenation at tp differs from the one at 1, and re-splitting it
        # at another degree as if it were one plain COLUMN tensor hands ranks mixed gate/up rows
        assert not torch.equal(full, fuse_swiglu(gate, up, 1))
        assert_fails(lambda: assert_equal(unfuse_swiglu(full, 1)[0], gate, "plain"), "tp>1 concatenation read at tp 1")
        # negative control: [gate_full; up_full] cut by COLUMN gives rank 0 gate rows only
        assert_fails(lambda: assert_equal(slicing.shard(torch.cat([gate, up]), Kind.COLUMN, tp, 0), shards[0], "naive"),
                      "rank 0's shard of [gate_full; up_full]")


def test_tp2_to_tp1_swiglu_conversion_is_exact():
    ffn, hidden = 12, 4
    gate, up = _randn(600, ffn, hidden), _randn(601, ffn, hidden)
    tp2 = torch.cat([torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]) for r in range(2)])  # what 2 ranks hold, joined
    assert_equal(tp2, fuse_swiglu(gate, up, 2), "fuse_swiglu(tp=2) = the two ranks' shards joined")
    assert_equal(fuse_swiglu(*unfuse_swiglu(tp2, 2), 1), torch.cat([gate, up]), "tp 2 -> tp 1")


def test_parameter_table_matches_llama_layer():
    """The Llama rows of ``layout.params`` describe exactly the parameters LlamaLayer allocates."""
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.layout.params import Role, param_specs, spec_of

    hidden, nh, nkv, ffn = 64, 8, 4, 96
    cfg = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=nh, num_key_value_heads=nkv,
                      vocab_size=64, max_position_embeddings=16, ffn_hidden_size=ffn, swiglu=True,
                      normalization="rmsnorm", use_rotary_position_embeddings=True, add_bias_linear=False,
                      tie_embeddings=False, model_family="llama")
    table = {s.local_name: s for s in param_specs(cfg) if s.role is Role.BLOCK}
    expected_kinds = dict(LAYER_KINDS, **{"mlp.dense_h_to_4h.weight": Kind.COLUMN_2SUB})
    assert {n: s.kind for n, s in table.items()} == expected_kinds
    for tp in (1, 2, 4):
        layer = LlamaLayer(hidden, nh, nkv, ffn, cfg.layernorm_epsilon, TensorParallelContext(size=tp), 0)
        assert {n for n, _ in layer.named_parameters()} == set(table)
        for name, p in layer.named_parameters():
            spec = spec_of(f"1.{name}", cfg)
            assert spec is table[name]
            assert tuple(p.shape) == slicing.local_shape(spec.kind, spec.shape(cfg), tp), (name, tp)
            dim = spec.kind.partition_dim
            assert p.partition_dim == (-1 if dim is None else dim), name


# --------------------------------------------------------------------------------------------------
# 3. LlamaLayer at TP = N against TP = 1 (spawned gloo ranks)
# --------------------------------------------------------------------------------------------------


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _layer_configs(world: int) -> list[tuple[int, int]]:
    """(num_heads, num_kv_heads): one and several groups per rank, and MHA at 4."""
    return [(8, 2), (8, 4)] if world == 2 else [(8, 4), (8, 8)]


def _check_layer_tp(ctx: TensorParallelContext, nh: int, nkv: int) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    hidden, ffn, eps, theta = 64, 96, 1e-5, 10000.0
    w = _separate_weights(700 + nkv, hidden, nh, nkv, ffn)
    dense = LlamaLayer(hidden, nh, nkv, ffn, eps, _tp1(), 0, rope_theta=theta).to(F64)
    layer = LlamaLayer(hidden, nh, nkv, ffn, eps, ctx, 0, rope_theta=theta).to(F64)
    _load_layer(dense, _fused_full(w, nh, nkv, 1), 1, 0)
    _load_layer(layer, _fused_full(w, nh, nkv, world), world, rank)
    assert layer.mlp.dense_h_to_4h.weight.shape == (2 * ffn // world, hidden)
    assert layer.self_attention.query_key_value.weight.shape == ((nh + 2 * nkv) * (hidden // nh) // world, hidden)

    x, g = _randn(800, B, S, hidden), _randn(801, B, S, hidden)
    yd, dense_grads = same_forward_and_backward(dense, layer, x, g)
    # the dense gradients in the TP layout: only the SwiGLU fusion depends on the degree
    expected = dict(dense_grads)
    expected["mlp.dense_h_to_4h.weight"] = fuse_swiglu(*unfuse_swiglu(dense_grads["mlp.dense_h_to_4h.weight"], 1),
                                                       world)
    for name, p in layer.named_parameters():
        merged = slicing.merge(_all_gather(p.grad, group), LAYER_KINDS[name])  # replicated: bitwise equal
        _close(merged, expected[name], f"grad of {name}")
    # the same shard and gradient through the parameter table's kind, on the universal [gate; up] layout
    h4h = layer.mlp.dense_h_to_4h.weight
    assert_equal(h4h.detach(), slicing.shard(_fused_full(w, nh, nkv, 1)["mlp.dense_h_to_4h.weight"], Kind.COLUMN_2SUB,
                                       world, rank), "dense_h_to_4h shard via COLUMN_2SUB")
    _close(slicing.merge(_all_gather(h4h.grad, group), Kind.COLUMN_2SUB), dense_grads["mlp.dense_h_to_4h.weight"],
           "dense_h_to_4h grad merged via COLUMN_2SUB")
    merged_h4h = slicing.merge(_all_gather(h4h.grad, group), Kind.COLUMN)
    assert_fails(lambda: _close(merged_h4h, dense_grads["mlp.dense_h_to_4h.weight"], "tp1 layout"),
                  "SwiGLU gradient compared in the TP=1 layout")

    # negative controls: the same TP layer loaded from the wrong fused layouts
    for what, kwargs in (("[gate_full; up_full] cut by COLUMN", dict(naive_swiglu=True)),
                         ("[q_all; k_all; v_all] cut by COLUMN", dict(naive_qkv=True))):
        _load_layer(layer, _fused_full(w, nh, nkv, world, **kwargs), world, rank)
        with torch.no_grad():
            y_wrong = layer(x)
        assert_fails(lambda: _close(y_wrong, yd.detach(), what), f"TP layer with {what}")


def check_llama_layer_tp(ctx: TensorParallelContext) -> None:
    for nh, nkv in _layer_configs(ctx.size):
        _check_layer_tp(ctx, nh, nkv)


def check_indivisible_kv_heads_raise(ctx: TensorParallelContext) -> None:
    nkv = ctx.size // 2  # 1 kv head at tp 2, 2 at tp 4
    with pytest.raises(ValueError, match=f"tensor parallel {ctx.size} does not divide num_key_value_heads {nkv}"):
        LlamaLayer(64, 8, nkv, 96, 1e-5, ctx, 0)


VARIANT_KINDS = dict(LAYER_KINDS, **{"mlp.dense_h_to_4h.weight": Kind.COLUMN_2SUB,
                                      "self_attention.q_layernorm.weight": Kind.REPLICATED,
                                      "self_attention.k_layernorm.weight": Kind.REPLICATED})


def check_attention_variants_tp(ctx: TensorParallelContext) -> None:
    """A Qwen3/Mistral/Llama-3-shaped layer (head_dim 12 != 64 / 8, q/k norms, a window of 3, llama3 rope
    scaling) at TP = N against TP = 1: output, input grad and every parameter grad. The q/k norm weights
    act on each rank's own heads: without the gradient all-reduce over TP they would drift apart."""
    from megatron_ucp.model.llama import Rotary

    world, rank, group = ctx.size, ctx.rank, ctx.group
    hidden, nh, nkv, ffn, hn = 64, 8, 4, 96, 12
    kw = dict(head_dim=hn, qk_norm=True, sliding_window=3,
              rotary=Rotary(theta=500.0, scaling="llama3", factor=8.0, original_context=4))
    dense = LlamaLayer(hidden, nh, nkv, ffn, 1e-5, _tp1(), 0, **kw).to(F64)
    layer = LlamaLayer(hidden, nh, nkv, ffn, 1e-5, ctx, 0, **kw).to(F64)
    full = {name: _randn(900 + i, *p.shape, scale=0.3) + (1.0 if p.dim() == 1 else 0.0)
            for i, (name, p) in enumerate(dense.named_parameters())}
    assert set(full) == set(VARIANT_KINDS) and dense.self_attention.dense.weight.shape == (hidden, nh * hn)
    for name, p in dense.named_parameters():
        load_param(p, full[name])
    for name, p in layer.named_parameters():
        load_param(p, slicing.shard(full[name], VARIANT_KINDS[name], world, rank))

    x, g = _randn(910, B, S, hidden), _randn(911, B, S, hidden)
    _, dense_grads = same_forward_and_backward(dense, layer, x, g)
    for name, p in layer.named_parameters():
        merged = slicing.merge(_all_gather(p.grad, group), VARIANT_KINDS[name])  # replicated: bitwise equal
        _close(merged, dense_grads[name], f"grad of {name}")
    # negative control: the q/k norms without their TP all-reduce give each rank a partial gradient
    attn = layer.self_attention
    attn.q_layernorm.tp = attn.k_layernorm.tp = None
    for p in layer.parameters():
        p.grad = None
    layer(leaf(x)).backward(g)
    partial = attn.q_layernorm.weight.grad
    assert_fails(lambda: _close(partial, dense_grads["self_attention.q_layernorm.weight"], "no all-reduce"),
                 "q/k norm gradient without the TP all-reduce")


CHECKS = {f.__name__[len("check_"):]: f
          for f in (check_llama_layer_tp, check_attention_variants_tp, check_indivisible_kv_heads_raise)}


def _tp_worker(rank: int, world_size: int, out_dir: str) -> None:
    run_tp_checks(rank, world_size, out_dir, CHECKS)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """``get(world_size)`` -> per-rank results; one spawned run per world size, shared by the tests."""
    return spawned_results(tmp_path_factory, _tp_worker, "llama_tp")


@pytest.mark.dist
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_llama_layer_tp_parity(tp_results, world_size):
    """LlamaLayer at TP=world size vs TP=1: output, input grad, every parameter grad (float64)."""
    report_check(tp_results(world_size), "llama_layer_tp")


@pytest.mark.dist
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_attention_variants_tp_parity(tp_results, world_size):
    """head_dim != hidden / heads, q/k norms, sliding window and llama3 rope at TP = N vs TP = 1 (float64)."""
    report_check(tp_results(world_size), "attention_variants_tp")


@pytest.mark.dist
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_indivisible_kv_heads_raise(tp_results, world_size):
    report_check(tp_results(world_size), "indivisible_kv_heads_raise")
