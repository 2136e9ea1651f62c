"""Qwen3: the Llama block with a per-head RMSNorm on queries and keys, usually an explicit ``head_dim``,
and no biases; HF ``Qwen3ForCausalLM``.

The q/k norms act on each head (width ``head_dim``) before the rotary embedding; their weights are
shared by all heads, so every TP rank holds them whole (replicated) and their gradients are summed
over TP. Sliding-window layers (``use_sliding_window``) are not modelled and are refused.
"""

from __future__ import annotations

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, llama, register
from megatron_ucp.layout.hf import HFRule, require
from megatron_ucp.layout.params import Role

RULES: dict[tuple[Role, str], HFRule] = dict(llama.RULES)
for _n in "qk":
    RULES[(Role.BLOCK, f"self_attention.{_n}_layernorm.weight")] = HFRule((llama.L + f"self_attn.{_n}_norm.weight",))


def config_from_hf(hf: dict) -> dict:
    require(hf, "use_sliding_window", False, "sliding-window layers are not modelled", False)
    require(hf, "attention_bias", False, "the Qwen3 family is built without linear biases", False)
    return llama.config_from_hf(hf)


def hf_config(cfg: ModelConfig) -> dict:
    return dict(llama.hf_config(cfg), attention_bias=False, use_sliding_window=False, sliding_window=None,
                max_window_layers=cfg.num_layers)


def hf_model(overrides: dict | None = None, **sizes):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**dict(llama.hf_sizes(**sizes), **(overrides or {}))))


FAMILY = register(Family(
    name="qwen3", architecture="Qwen3ForCausalLM", model_type="qwen3", options=dict(llama.OPTIONS, qk_layernorm=True),
    recipe_flags=llama.RECIPE_FLAGS, block=llama.block, hf_rules=RULES, config_from_hf=config_from_hf,
    hf_config=hf_config, hf_model=hf_model, grouped_query=True, ignored_hf_suffixes=(".rotary_emb.inv_freq",)))
