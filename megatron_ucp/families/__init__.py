"""The model families, one module each, found through one registry.

A family module (``gpt.py``, ``llama.py``, ``qwen2.py``, ``mistral.py``, ``qwen3.py``) declares everything that is particular to it:

* which ``ModelConfig`` shapes belong to it (``matches``) and the trainer flags that select it (the
  recipes' defaults, ``model_flags``);
* its transformer block (``block``, built lazily so this package stays importable without DeepSpeed),
  which the model's builder is given (``model/`` knows no family);
* the Hugging Face side: architecture and ``model_type``, one ``HFRule`` per entry of the parameter
  table, and the ``config.json`` mapping both ways.

Everything else (the parameter table in ``layout/params.py``, placement, the converters, the trainer)
is shared. Adding a family is one new module here plus its entries in the parameter table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.hf import HFRule, UnsupportedConfig, check_hf_config
from megatron_ucp.layout.params import Role


@dataclass(frozen=True)
class Family:
    name: str  # the recipes' MODEL_FAMILY and hf.build's --family
    architecture: str  # the HF ``architectures`` class name
    model_type: str  # the HF ``model_type``
    matches: Callable[[ModelConfig], bool]  # this family's ModelConfig shapes
    model_flags: tuple[str, ...]  # trainer flags selecting this family (sizes aside)
    block: Callable[..., Any]  # (cfg, tp, layer_number) -> one block's pipeline LayerSpec (model.pipe.BlockBuilder)
    hf_rules: Mapping[tuple[Role, str], HFRule]  # one per parameter-table entry the family's configs produce
    config_from_hf: Callable[[dict], dict]  # HF config.json -> ModelConfig keyword arguments
    hf_config: Callable[[ModelConfig], dict]  # ModelConfig -> the family's config.json entries
    hf_model: Callable[..., Any]  # (sizes..., overrides=config.json entries) -> a random-init transformers model
    grouped_query: bool = False  # takes --num-key-value-heads and a free --ffn-hidden-size in recipes
    ignored_hf_suffixes: tuple[str, ...] = field(default=())  # HF tensors that carry nothing of ours


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def supported() -> str:
    return ", ".join(f"{f.architecture} (model_type {f.model_type!r})" for f in FAMILIES.values())


def family_of_hf(hf: dict) -> Family:
    """The family of an HF ``config.json`` dict (by ``architectures``, else ``model_type``)."""
    archs = hf.get("architectures") or []
    for family in FAMILIES.values():
        if family.architecture in archs or (not archs and hf.get("model_type") == family.model_type):
            return family
    what = f"architectures {archs}" if archs else f"model_type {hf.get('model_type')!r}"
    raise UnsupportedConfig(f"unsupported Hugging Face model ({what}); supported: {supported()}")


def family_of_model(cfg: ModelConfig) -> Family:
    """The one family whose shapes include ``cfg``."""
    hits = [f for f in FAMILIES.values() if f.matches(cfg)]
    if len(hits) != 1:
        raise ValueError(f"the model config matches {len(hits)} families ({', '.join(f.name for f in hits)}); "
                         "each config must belong to exactly one")
    return hits[0]


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> tuple[Family, ModelConfig]:
    """(family, ModelConfig) for an HF ``config.json`` dict; UnsupportedConfig for what we cannot match."""
    check_hf_config(hf)
    family = family_of_hf(hf)
    kwargs = family.config_from_hf(hf)
    return family, ModelConfig(make_vocab_size_divisible_by=make_vocab_size_divisible_by, **kwargs)


def hf_config_from_model(cfg: ModelConfig, dtype: str, extra: dict | None = None) -> dict:
    """The ``config.json`` dict of the HF model equal to ``cfg`` (``extra``: token ids and the like)."""
    family = family_of_model(cfg)
    out = {"architectures": [family.architecture], "model_type": family.model_type, "dtype": dtype,
           "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_method_std,
           "tie_word_embeddings": cfg.tie_embeddings}
    out.update(family.hf_config(cfg))
    out.update(extra or {})
    return out


def recipe_flags(family: Family, kv_heads: int, ffn_hidden: int) -> list[str]:
    """The trainer flags a recipe passes for ``family`` (its shape flags, then its size flags)."""
    flags = list(family.model_flags)
    if family.grouped_query:
        flags += ["--num-key-value-heads", str(kv_heads), "--ffn-hidden-size", str(ffn_hidden)]
    return flags


# The registry's contents: importing a family module registers it (order: the export preference).
from megatron_ucp.families import gpt, llama, mistral, qwen2, qwen3  # noqa: E402,F401
