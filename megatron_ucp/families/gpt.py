"""GPT-2: LayerNorm, learned positions, GeLU MLP, biases everywhere, tied head; HF ``GPT2LMHeadModel``.

HF stores linear weights as ``Conv1D`` [in, out], so every linear is transposed, and ``c_attn`` holds
``[Q; K; V]`` (all heads of each) on its output dim, where our fused QKV is per head ``[q_i; k_i; v_i]``.
"""

from __future__ import annotations

from typing import Any

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, register
from megatron_ucp.layout.hf import Combine, HFRule, UnsupportedConfig, require
from megatron_ucp.layout.params import Role

_L = "transformer.h.{i}."

RULES: dict[tuple[Role, str], HFRule] = {
    (Role.EMBED, "word_embeddings.weight"): HFRule(("transformer.wte.weight",)),
    (Role.EMBED, "position_embeddings.weight"): HFRule(("transformer.wpe.weight",)),
    (Role.BLOCK, "input_layernorm.weight"): HFRule((_L + "ln_1.weight",)),
    (Role.BLOCK, "input_layernorm.bias"): HFRule((_L + "ln_1.bias",)),
    (Role.BLOCK, "self_attention.query_key_value.weight"):
        HFRule((_L + "attn.c_attn.weight",), transpose=True, combine=Combine.QKV_PACKED),
    (Role.BLOCK, "self_attention.query_key_value.bias"): HFRule((_L + "attn.c_attn.bias",), combine=Combine.QKV_PACKED),
    (Role.BLOCK, "self_attention.dense.weight"): HFRule((_L + "attn.c_proj.weight",), transpose=True),
    (Role.BLOCK, "self_attention.dense.bias"): HFRule((_L + "attn.c_proj.bias",)),
    (Role.BLOCK, "post_attention_layernorm.weight"): HFRule((_L + "ln_2.weight",)),
    (Role.BLOCK, "post_attention_layernorm.bias"): HFRule((_L + "ln_2.bias",)),
    (Role.BLOCK, "mlp.dense_h_to_4h.weight"): HFRule((_L + "mlp.c_fc.weight",), transpose=True),
    (Role.BLOCK, "mlp.dense_h_to_4h.bias"): HFRule((_L + "mlp.c_fc.bias",)),
    (Role.BLOCK, "mlp.dense_4h_to_h.weight"): HFRule((_L + "mlp.c_proj.weight",), transpose=True),
    (Role.BLOCK, "mlp.dense_4h_to_h.bias"): HFRule((_L + "mlp.c_proj.bias",)),
    (Role.FINAL_NORM, "final_layernorm.weight"): HFRule(("transformer.ln_f.weight",)),
    (Role.FINAL_NORM, "final_layernorm.bias"): HFRule(("transformer.ln_f.bias",)),
    (Role.HEAD, "lm_head.weight"): HFRule(("lm_head.weight",)),
}


def config_from_hf(hf: dict) -> dict:
    require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "our MLP uses tanh-approximated GeLU")
    require(hf, "scale_attn_weights", True, "attention is scaled by 1/sqrt(head_dim)", True)
    require(hf, "scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling", False)
    require(hf, "add_cross_attention", False, "decoder-only", False)
    return dict(
        num_layers=hf["n_layer"], hidden_size=hf["n_embd"], num_attention_heads=hf["n_head"],
        vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
        ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
        layernorm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        hidden_dropout=float(hf.get("resid_pdrop", 0.1)), attention_dropout=float(hf.get("attn_pdrop", 0.1)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def hf_config(cfg: ModelConfig) -> dict:
    if not cfg.add_bias_linear or cfg.normalization != "layernorm":
        raise UnsupportedConfig("only the GPT-2 shape (biases, LayerNorm) exports as GPT2LMHeadModel")
    return dict(n_layer=cfg.num_layers, n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads,
                n_positions=cfg.max_position_embeddings, n_inner=cfg.ffn_hidden_size,
                activation_function="gelu_new", layer_norm_epsilon=cfg.layernorm_epsilon,
                resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)


def block(cfg: ModelConfig, tp, layer_number: int, ep: int = 1):
    from deepspeed.pipe import LayerSpec

    from megatron_ucp.model.gpt import TransformerLayer

    return LayerSpec(TransformerLayer, cfg, tp, layer_number)


def hf_model(*, vocab_size: int, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int | None,
             ffn_hidden_size: int | None, max_position_embeddings: int, tie_embeddings: bool | None,
             bos_token_id, eos_token_id, overrides: dict | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**dict(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
        n_positions=max_position_embeddings, n_inner=ffn_hidden_size, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, tie_word_embeddings=True if tie_embeddings is None else tie_embeddings),
        **(overrides or {})))


# GPT-2's block: LayerNorm, learned positions, GeLU; none of the Llama-shaped switches.
OPTIONS: dict[str, Any] = dict(swiglu=False, normalization="layernorm", use_rotary_position_embeddings=False, add_qkv_bias=False,
               qk_layernorm=False, sliding_window=None)

FAMILY = register(Family(
    name="gpt", architecture="GPT2LMHeadModel", model_type="gpt2", options=OPTIONS,
    block=block, hf_rules=RULES, config_from_hf=config_from_hf,
    hf_config=hf_config, hf_model=hf_model,
    # attention-mask buffers older GPT-2 checkpoints saved
    ignored_hf_suffixes=(".attn.bias", ".attn.masked_bias")))
