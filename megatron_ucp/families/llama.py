"""Llama: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, no biases; HF ``LlamaForCausalLM``.

HF stores ``nn.Linear`` [out, in] weights with separate q/k/v projections; our fused QKV is per
key/value group ``[q.. k v]``, and gate and up become ``[gate; up]`` (the universal form of the SwiGLU
sub-parameters). HF checkpoints are already in the rotate-half RoPE convention ``model/llama.py`` uses.
Qwen2 (``qwen2.py``) is this family plus QKV biases and reuses its pieces.
"""

from __future__ import annotations

from typing import Any

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, register
from megatron_ucp.layout.hf import Combine, HFRule, hf_rope, require, rope_of
from megatron_ucp.layout.params import Role

L = "model.layers.{i}."

RULES: dict[tuple[Role, str], HFRule] = {
    (Role.EMBED, "word_embeddings.weight"): HFRule(("model.embed_tokens.weight",)),
    (Role.BLOCK, "input_layernorm.weight"): HFRule((L + "input_layernorm.weight",)),
    (Role.BLOCK, "self_attention.query_key_value.weight"): HFRule(
        tuple(L + f"self_attn.{p}_proj.weight" for p in "qkv"), combine=Combine.QKV),
    (Role.BLOCK, "self_attention.dense.weight"): HFRule((L + "self_attn.o_proj.weight",)),
    (Role.BLOCK, "post_attention_layernorm.weight"): HFRule((L + "post_attention_layernorm.weight",)),
    (Role.BLOCK, "mlp.dense_h_to_4h.weight"): HFRule(
        (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), combine=Combine.SWIGLU),
    (Role.BLOCK, "mlp.dense_4h_to_h.weight"): HFRule((L + "mlp.down_proj.weight",)),
    (Role.FINAL_NORM, "final_layernorm.weight"): HFRule(("model.norm.weight",)),
    (Role.HEAD, "lm_head.weight"): HFRule(("lm_head.weight",)),
}

# What a Llama is, once: the Llama-shaped families start from these and change what they add.
OPTIONS: dict[str, Any] = dict(swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True, add_bias_linear=False,
               add_qkv_bias=False, qk_layernorm=False, sliding_window=None)
RECIPE_FLAGS: tuple[str, ...] = ("--untie-embeddings-and-output-weights",)  # the recipes' Llamas have their own head


def config_from_hf(hf: dict) -> dict:
    """ModelConfig arguments of a Llama-shaped config beyond the family's ``options`` (biases are checked
    by the caller's family)."""
    require(hf, "hidden_act", "silu", "SwiGLU uses SiLU", "silu")
    require(hf, "pretraining_tp", 1, "sliced projections are not modelled", 1)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    kv_channels = None if head_dim is None or head_dim * heads == hf["hidden_size"] else int(head_dim)
    return dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"], ffn_hidden_size=hf["intermediate_size"],
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), hidden_dropout=0.0,
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), kv_channels=kv_channels, **rope_of(hf))


def _llama_config_from_hf(hf: dict) -> dict:
    require(hf, "attention_bias", False, "the Llama family is built without linear biases", False)
    require(hf, "mlp_bias", False, "the Llama family is built without linear biases", False)
    return config_from_hf(hf)


def hf_config(cfg: ModelConfig) -> dict:
    """The Llama-shaped entries of config.json (Qwen2 adds its own on top)."""
    return dict(num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                head_dim=cfg.head_dim, intermediate_size=cfg.ffn_hidden_size,
                max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.layernorm_epsilon,
                hidden_act="silu", attention_dropout=cfg.attention_dropout, **hf_rope(cfg))


def _llama_hf_config(cfg: ModelConfig) -> dict:
    return dict(hf_config(cfg), attention_bias=False, mlp_bias=False, pretraining_tp=1)


def rotary(cfg: ModelConfig):
    """The model's ``Rotary`` (base and frequency scaling) from its config."""
    from megatron_ucp.model.llama import Rotary

    return Rotary(theta=cfg.rope_theta, scaling=cfg.rope_scaling_type, factor=cfg.rope_scaling_factor,
                  low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                  original_context=cfg.rope_original_context)


def moe_options(cfg: ModelConfig, ep: int) -> dict | None:
    """The MoE layer's settings (``model.moe.sparse_mlp``) of an MoE config, None for a dense one."""
    if cfg.num_experts is None:
        return None
    return dict(num_experts=cfg.num_experts, ep=ep, k=cfg.moe_top_k, renormalize=cfg.moe_renormalize,
                token_dropping=cfg.moe_token_dropping, capacity_factor=cfg.moe_train_capacity_factor,
                eval_capacity_factor=cfg.moe_eval_capacity_factor, min_capacity=cfg.moe_min_capacity)


def block(cfg: ModelConfig, tp, layer_number: int, ep: int = 1):
    """Every Llama-shaped family's block: the config's switches say which parts it has."""
    from deepspeed.pipe import LayerSpec

    from megatron_ucp.model.llama import LlamaLayer

    return LayerSpec(LlamaLayer, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.ffn_hidden_size, cfg.layernorm_epsilon, tp, layer_number, rope_theta=cfg.rope_theta,
                     attention_dropout=cfg.attention_dropout, hidden_dropout=cfg.hidden_dropout,
                     qkv_bias=cfg.add_qkv_bias, head_dim=cfg.head_dim, rotary=rotary(cfg),
                     qk_norm=cfg.qk_layernorm, sliding_window=cfg.sliding_window, moe=moe_options(cfg, ep))


def hf_sizes(*, vocab_size: int, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int | None,
             ffn_hidden_size: int | None, max_position_embeddings: int, tie_embeddings: bool | None,
             bos_token_id, eos_token_id) -> dict:
    """The HF config arguments Llama and Qwen2 share, from hf.build's sizes."""
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=ffn_hidden_size or 4 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_position_embeddings,
                tie_word_embeddings=bool(tie_embeddings), bos_token_id=bos_token_id, eos_token_id=eos_token_id)


def hf_model(overrides: dict | None = None, **sizes):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**dict(hf_sizes(**sizes), **(overrides or {}))))


FAMILY = register(Family(
    name="llama", architecture="LlamaForCausalLM", model_type="llama", options=OPTIONS, recipe_flags=RECIPE_FLAGS,
    block=block, hf_rules=RULES, config_from_hf=_llama_config_from_hf,
    hf_config=_llama_hf_config, hf_model=hf_model, grouped_query=True, ignored_hf_suffixes=(".rotary_emb.inv_freq",)))
