"""Mistral: the Llama block with sliding-window attention; HF ``MistralForCausalLM``.

Each token attends to itself and the ``sliding_window - 1`` tokens before it (a banded causal mask
through SDPA, ``model/llama.py``). The weights and their names are Llama's. A Mistral config without a
window (``sliding_window: null``, as in Mistral 7B v0.2 and later) computes the Llama model exactly, but
its family is declared (``ModelConfig.model_family``), so it stays Mistral: it exports as
``MistralForCausalLM`` with ``sliding_window: null``.
"""

from __future__ import annotations

from typing import Any

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, llama, register

DEFAULT_WINDOW = 4096  # transformers' MistralConfig default, and the recipes' --sliding-window


def config_from_hf(hf: dict) -> dict:
    window = hf.get("sliding_window")
    return dict(llama.config_from_hf(hf), sliding_window=int(window) if window is not None else None)


def hf_config(cfg: ModelConfig) -> dict:
    return dict(llama.hf_config(cfg), sliding_window=cfg.sliding_window)


def hf_model(overrides: dict | None = None, **sizes):
    from transformers import MistralConfig, MistralForCausalLM

    config = dict(llama.hf_sizes(**sizes), sliding_window=DEFAULT_WINDOW)
    return MistralForCausalLM(MistralConfig(**dict(config, **(overrides or {}))))


OPTIONS: dict[str, Any] = {k: v for k, v in llama.OPTIONS.items() if k != "sliding_window"}  # a window, or none

FAMILY = register(Family(
    name="mistral", architecture="MistralForCausalLM", model_type="mistral", options=OPTIONS,
    recipe_flags=llama.RECIPE_FLAGS + ("--sliding-window", str(DEFAULT_WINDOW)),
    block=llama.block, hf_rules=llama.RULES, config_from_hf=config_from_hf,
    hf_config=hf_config, hf_model=hf_model, grouped_query=True, ignored_hf_suffixes=(".rotary_emb.inv_freq",)))
