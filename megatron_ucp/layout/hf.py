"""Hugging Face names and layouts of our parameters: the shared vocabulary of the family modules.

Pure (torch-free). Each family (``megatron_ucp/families/``) declares, with the types here, which HF
tensors make each entry of the parameter table (``params.py``) and how they are laid out, and how its
``config.json`` maps onto ``ModelConfig``. The tensor work (``megatron_ucp.hf.transforms``) and both
converters read only ``hf_mappings``, so a parameter the table gains without an HF rule is an error,
never a silently missing tensor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from typing import TYPE_CHECKING

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import ParamSpec, Role, model_params

if TYPE_CHECKING:
    from megatron_ucp.families import Family


class Combine(enum.Enum):
    """How the HF tensors of one of our parameters are joined (after any transpose)."""

    NONE = "none"  # one HF tensor, same layout
    QKV_PACKED = "qkv_packed"  # one HF tensor holding [Q; K; V] on dim 0
    QKV = "qkv"  # three HF tensors q, k, v
    SWIGLU = "swiglu"  # two HF tensors gate, up -> [gate; up]


@dataclass(frozen=True)
class HFRule:
    hf_names: tuple[str, ...]  # templates; ``{i}`` is the 0-based transformer layer
    transpose: bool = False  # GPT-2 Conv1D weights are [in, out]
    combine: Combine = Combine.NONE


@dataclass(frozen=True)
class HFMapping:
    """One of our parameters and the HF tensors it is made of."""

    name: str  # our global parameter name (the universal atom folder)
    spec: ParamSpec
    hf_names: tuple[str, ...]
    transpose: bool
    combine: Combine


TIED_HEAD = "lm_head.weight"  # every family's head; absent from (or a copy in) a tied model's files


def hf_mappings(cfg: ModelConfig, family: Family) -> list[HFMapping]:
    """Every parameter of the model (table order) with its HF tensors; ValueError for an uncovered one."""
    rules = family.hf_rules
    out = []
    for p in model_params(cfg):
        rule = rules.get((p.spec.role, p.spec.local_name))
        if rule is None:
            raise ValueError(f"{family.architecture}: no Hugging Face rule for our parameter {p.name} "
                             f"({p.spec.role.value} {p.spec.local_name})")
        layer = p.entry.layer_number
        names = tuple(n.format(i=layer) for n in rule.hf_names)
        out.append(HFMapping(p.name, p.spec, names, rule.transpose, rule.combine))
    return out


def is_ignored(hf_name: str, cfg: ModelConfig, family: Family) -> bool:
    """True for an HF tensor that maps to nothing of ours by design: a tied head's copy of the
    embedding, or a buffer the family lists (attention masks, RoPE frequencies)."""
    if cfg.tie_embeddings and hf_name == TIED_HEAD:
        return True
    return bool(family.ignored_hf_suffixes) and hf_name.endswith(family.ignored_hf_suffixes)


# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------


class UnsupportedConfig(ValueError):
    """An HF config this mapping cannot represent exactly; the message says which field and why."""


def family_of(hf: dict) -> Family:
    """The family of an HF ``config.json`` dict (the registry in ``megatron_ucp.families``)."""
    from megatron_ucp.families import family_of_hf

    return family_of_hf(hf)


def require(hf: dict, key: str, wanted, why: str, default=None) -> None:
    value = hf.get(key, default)
    ok = value in wanted if isinstance(wanted, tuple) else value == wanted
    if not ok:
        raise UnsupportedConfig(f"{key}={value!r} is not supported ({why}); expected {wanted!r}")


ROPE_TYPES = ("default", "linear", "llama3")  # the rope_type values we compute exactly as transformers does


def rope_of(hf: dict) -> dict:
    """The rotary ``ModelConfig`` fields of an HF config, in either form: ``rope_parameters`` (transformers 5,
    ``rope_theta`` inside) or top-level ``rope_theta`` with ``rope_scaling`` (the Hub's transformers 4
    configs). ``default``, ``linear`` and ``llama3`` are computed exactly; every other type is refused."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedConfig(f"rope_parameters per layer type ({', '.join(params)}) are not supported: "
                                "every layer shares one rotary embedding here")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedConfig(f"rope_type={rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedConfig(f"partial_rotary_factor={partial!r} is not supported (rotary embeddings cover "
                                "the whole head)")
    out = dict(rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
               rope_scaling_type="none" if rope_type == "default" else rope_type)

    def need(key: str):
        if params.get(key) is None:
            raise UnsupportedConfig(f"rope_type={rope_type!r} needs {key} in its rope parameters")
        return params[key]

    if rope_type in ("linear", "llama3"):
        out["rope_scaling_factor"] = float(need("factor"))
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(need("low_freq_factor"))
        out["rope_high_freq_factor"] = float(need("high_freq_factor"))
        # transformers takes a top-level original_max_position_embeddings first, then the rope parameters',
        # then max_position_embeddings
        original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
        out["rope_original_max_position_embeddings"] = int(original or hf["max_position_embeddings"])
    return out


def hf_rope(cfg: ModelConfig) -> dict:
    """The rotary entries of an exported config.json: ``rope_theta`` and ``rope_parameters`` (read by
    transformers 5), and for a scaled rope also ``rope_scaling`` (what transformers 4 reads)."""
    params: dict = {"rope_type": "default" if cfg.rope_scaling_type == "none" else cfg.rope_scaling_type,
                    "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_type in ("linear", "llama3"):
        params["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling_type == "llama3":
        params.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_context)
    out: dict = {"rope_theta": cfg.rope_theta, "rope_parameters": params}
    if cfg.rope_scaling_type != "none":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def source_dtype(hf: dict) -> str | None:
    """The checkpoint's stored dtype as config.json names it (``dtype`` or the older ``torch_dtype``)."""
    value = hf.get("dtype") or hf.get("torch_dtype")
    return str(value) if value else None


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> tuple[Family, ModelConfig]:
    """(family, ModelConfig) for an HF ``config.json`` dict; UnsupportedConfig for what we cannot match."""
    family = family_of(hf)
    kwargs = family.config_from_hf(hf)
    return family, ModelConfig(make_vocab_size_divisible_by=make_vocab_size_divisible_by, **kwargs)


def family_of_model(cfg: ModelConfig) -> Family:
    """The HF family a model config exports to (the one family whose shapes include it)."""
    from megatron_ucp.families import family_of_model as of_model

    return of_model(cfg)


def hf_config_from_model(cfg: ModelConfig, dtype: str, extra: dict | None = None) -> dict:
    """The ``config.json`` dict of the HF model equal to ``cfg`` (``extra``: token ids and the like)."""
    family = family_of_model(cfg)
    out = {"architectures": [family.architecture], "model_type": family.model_type, "dtype": dtype,
           "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_method_std,
           "tie_word_embeddings": cfg.tie_embeddings}
    out.update(family.hf_config(cfg))
    out.update(extra or {})
    return out
