"""Tensor work of the HF mapping: HF tensors -> one full tensor of ours, and back.

What to do for each parameter is declared in ``layout/hf.py``; this module only executes the
``Combine`` kinds and the GPT-2 ``Conv1D`` transpose, with the fused-QKV and SwiGLU maps of
``layout/placement.py`` (our grouped QKV with one head per group is GPT-2's per-head ``[q; k; v]``).
An expert's parameter of a fused HF layout (``Combine.EXPERT``) is one slice, ``[m.expert]``, of the
layer's HF tensor: the HF tensor "of" such a mapping here is that slice (the reader reads just its bytes,
``HFCheckpoint.read_slice``; the export stacks the slices, ``hf_shapes`` giving the whole tensor's shape).

The private ``_skip_*`` flags are negative controls for the tests: they reproduce the two classic
converter bugs (a plain ``[Q; K; V]`` instead of our per-group order; a ``reshape`` where the
``Conv1D`` transpose belongs), keeping every shape right so only the numbers can tell.
"""

from __future__ import annotations

import torch

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.hf import Combine, HFMapping
from megatron_ucp.layout.placement import concat_map, fuse_qkv, fuse_swiglu, unfuse_qkv, unfuse_swiglu


def _from_conv1d(t: torch.Tensor, skip: bool) -> torch.Tensor:
    return t.reshape(tuple(reversed(t.shape))) if skip else t.t()


def to_ours(m: HFMapping, hf: list[torch.Tensor], cfg: ModelConfig, *, _skip_qkv_reorder: bool = False,
            _skip_conv1d_transpose: bool = False) -> torch.Tensor:
    """Our full (unpadded) tensor of ``m.name`` from its HF tensors, in their dtype, contiguous."""
    if len(hf) != len(m.hf_names):
        raise ValueError(f"{m.name}: expected {len(m.hf_names)} tensors ({', '.join(m.hf_names)}), got {len(hf)}")
    ts = [_from_conv1d(t, _skip_conv1d_transpose) if m.transpose else t for t in hf]
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    assert nkv is not None  # set by ModelConfig.__post_init__
    if m.combine is Combine.NONE:
        out = ts[0]
    elif m.combine is Combine.QKV_PACKED:
        if _skip_qkv_reorder:
            out = ts[0]
        else:
            q, k, v = concat_map((ts[0].shape[0] // 3,) * 3).inverted().apply_all(ts)
            out = fuse_qkv(q, k, v, nh, nkv)
    elif m.combine is Combine.QKV:
        if _skip_qkv_reorder:
            out = concat_map([t.shape[0] for t in ts]).apply(ts, 0)
        else:
            q, k, v = ts  # the three tensors of m.hf_names (counted above)
            out = fuse_qkv(q, k, v, nh, nkv)
    elif m.combine is Combine.SWIGLU:
        out = fuse_swiglu(ts[0], ts[1], 1)  # [gate; up]: the universal form of the two sub-parameters
    elif m.combine is Combine.EXPERT:
        out = ts[0]  # the expert's slice of the fused tensor, already in our layout
    else:  # pragma: no cover - the enum is closed
        raise ValueError(f"unknown combine {m.combine}")
    return out.contiguous()


def to_hf(m: HFMapping, ours: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The HF tensors of ``m`` (in ``m.hf_names`` order) from our full unpadded tensor; the inverse of ``to_ours``."""
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    assert nkv is not None  # set by ModelConfig.__post_init__
    if m.combine is Combine.NONE:
        ts = [ours]
    elif m.combine is Combine.QKV_PACKED:
        qkv = unfuse_qkv(ours, nh, nkv)
        ts = [concat_map([t.shape[0] for t in qkv]).apply(qkv, 0)]
    elif m.combine is Combine.QKV:
        ts = list(unfuse_qkv(ours, nh, nkv))
    elif m.combine is Combine.SWIGLU:
        ts = list(unfuse_swiglu(ours, 1))
    elif m.combine is Combine.EXPERT:
        ts = [ours]  # the expert's slice of the fused tensor
    else:  # pragma: no cover
        raise ValueError(f"unknown combine {m.combine}")
    return [(t.t() if m.transpose else t).contiguous() for t in ts]


def hf_shapes(m: HFMapping, cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The shapes of ``m``'s HF tensors as a checkpoint holds them: a fused expert tensor whole, [E, ...]."""
    shapes = [tuple(t.shape) for t in to_hf(m, torch.empty(m.spec.shape(cfg), device="meta"), cfg)]
    return [(cfg.num_experts or 0, *s) for s in shapes] if m.combine is Combine.EXPERT else shapes
