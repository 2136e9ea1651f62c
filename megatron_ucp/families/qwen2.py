"""Qwen2: the Llama family plus biases on the q, k and v projections; HF ``Qwen2ForCausalLM``.

The biases follow their weights' layout: q/k/v biases fuse into our grouped QKV bias exactly like
the weights' rows. Sliding-window attention (``use_sliding_window``) is not modelled and is refused.
"""

from __future__ import annotations

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, llama, register
from megatron_ucp.layout.hf import Combine, HFRule, require
from megatron_ucp.layout.params import Role

RULES: dict[tuple[Role, str], HFRule] = dict(llama.RULES)
RULES[(Role.BLOCK, "self_attention.query_key_value.bias")] = HFRule(
    tuple(llama.L + f"self_attn.{p}_proj.bias" for p in "qkv"), combine=Combine.QKV)


def config_from_hf(hf: dict) -> dict:
    require(hf, "use_sliding_window", False, "sliding-window attention is not modelled", False)
    return llama.config_from_hf(hf)


def hf_config(cfg: ModelConfig) -> dict:
    return dict(llama.hf_config(cfg), use_sliding_window=False, max_window_layers=cfg.num_layers)


def hf_model(overrides: dict | None = None, **sizes):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**dict(llama.hf_sizes(**sizes), **(overrides or {}))))


FAMILY = register(Family(
    name="qwen2", architecture="Qwen2ForCausalLM", model_type="qwen2", options=dict(llama.OPTIONS, add_qkv_bias=True),
    recipe_flags=llama.RECIPE_FLAGS, block=llama.block, hf_rules=RULES, config_from_hf=config_from_hf,
    hf_config=hf_config, hf_model=hf_model, grouped_query=True, ignored_hf_suffixes=(".rotary_emb.inv_freq",)))
