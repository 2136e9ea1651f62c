"""The model families: one declared spec each (``Family``), found by name through one registry.

A family module (``gpt.py``, ``llama.py``, ``qwen2.py``, ``mistral.py``, ``qwen3.py``) declares
everything that is particular to it, in one ``Family`` object:

* its name, which is how it is chosen: ``ModelConfig.model_family`` (the trainer's ``--model-family``,
  recorded in every checkpoint's metadata), or, for a Hugging Face folder, the ``model_type`` and
  ``architectures`` of its ``config.json``, which the family claims. Nothing guesses a family from the
  shape of a config (the one exception, for checkpoints written before the family was recorded, is
  ``checkpoint/format.py``'s ``legacy_model_family``);
* its ``options``: the ``ModelConfig`` fields it fixes (its block's declared switches, which also decide
  its entries of the parameter table, ``layout/params.py``), checked against every config that names
  it; the recipes' trainer flags follow from them (``model_flags``);
* its transformer block (``block``, built lazily so this package stays importable without DeepSpeed),
  which the model's builder is given (``model/`` knows no family);
* the Hugging Face side: architecture and ``model_type``, one ``HFRule`` per entry of the parameter
  table, and the ``config.json`` mapping both ways.

HF models we know but do not build would be ``REFUSED`` by name, so they are never read as another
family (none today: the mixture-of-experts families ``mixtral.py`` and ``qwen3_moe.py`` are built). ``python -m megatron_ucp.families`` lists what each family claims. Everything else
(the parameter table, placement, the converters, the trainer) is shared. Adding a family is one new
module here plus its entries in the parameter table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

from megatron_ucp.config import ModelConfig, cli_fields
from megatron_ucp.layout.hf import HFRule, UnsupportedConfig, check_hf_config
from megatron_ucp.layout.params import Role


@dataclass(frozen=True)
class Family:
    """One model family, declared (what torchtitan calls a ``ModelSpec``)."""

    name: str  # ModelConfig.model_family, --model-family, the recipes' MODEL_FAMILY and hf.build's --family
    architecture: str  # the HF ``architectures`` class name it claims (and exports as)
    model_type: str  # the HF ``model_type`` it claims
    options: Mapping[str, Any]  # the ModelConfig fields it fixes: every config of the family has these values
    block: Callable[..., Any]  # (cfg, tp, layer_number) -> one block's pipeline LayerSpec (model.pipe.BlockBuilder)
    hf_rules: Mapping[tuple[Role, str], HFRule]  # one per parameter-table entry the family's configs produce
    config_from_hf: Callable[[dict], dict]  # HF config.json -> ModelConfig keyword arguments beyond ``options``
    hf_config: Callable[[ModelConfig], dict]  # ModelConfig -> the family's config.json entries
    hf_model: Callable[..., Any]  # (sizes..., overrides=config.json entries) -> a random-init transformers model
    recipe_flags: tuple[str, ...] = ()  # the recipes' defaults beyond ``options`` (an untied head, a window)
    grouped_query: bool = False  # takes --num-key-value-heads and a free --ffn-hidden-size in recipes
    moe: bool = False  # a mixture-of-experts family: its configs have --num-experts, no other family's do
    ignored_hf_suffixes: tuple[str, ...] = field(default=())  # HF tensors that carry nothing of ours

    @property
    def model_flags(self) -> tuple[str, ...]:
        """The trainer flags selecting this family (sizes aside): its name, its options, its recipe defaults."""
        return ("--model-family", self.name) + option_flags(self.options) + self.recipe_flags

    def check(self, cfg: ModelConfig) -> None:
        """ValueError (one line) when ``cfg`` lacks one of the options this family fixes."""
        if cfg.is_moe != self.moe:
            moe = [f.name for f in FAMILIES.values() if f.moe]
            raise ValueError(f"model family {self.name!r} is {'a mixture of experts: give --num-experts' if self.moe else 'dense'}"
                             + ("" if self.moe else f"; --num-experts is for the families {', '.join(moe)}"))
        for key, want in self.options.items():
            got = getattr(cfg, key)
            if got != want:
                raise ValueError(f"model family {self.name!r} has {key}={want!r}, but the config has {got!r} "
                                 f"(--model-family names the family; python -m megatron_ucp.families lists them)")


def option_flags(options: Mapping[str, Any]) -> tuple[str, ...]:
    """The trainer flags that set ``options`` (fields left at their default need none)."""
    flags: list[str] = []
    for f, spec in cli_fields(ModelConfig):
        if f.name not in options or options[f.name] == f.default:
            continue
        value = options[f.name]
        if isinstance(value, bool):
            flags.append(spec.names[0])  # a switch: --swiglu, or a negated one such as --disable-bias-linear
        else:
            flags += [spec.names[0], str(value)]
    return tuple(flags)


class Refused(NamedTuple):
    """An HF model we recognise and do not build: refused by name, never read as another family."""

    architecture: str
    model_type: str
    why: str


REFUSED: tuple[Refused, ...] = ()

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    unknown = sorted(set(family.options) - {f.name for f, _ in cli_fields(ModelConfig)})
    if unknown:
        raise ValueError(f"model family {family.name!r} fixes unknown ModelConfig fields: {', '.join(unknown)}")
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
    """The family an HF ``config.json`` dict names by its ``model_type`` and ``architectures``: each name
    it gives must be claimed, and all by the same family."""
    model_type = hf.get("model_type")
    archs = list(hf.get("architectures") or [])
    what = ", ".join(([f"model_type {model_type!r}"] if model_type is not None or not archs else [])
                     + ([f"architectures {archs}"] if archs else []))
    for r in REFUSED:
        if model_type == r.model_type or r.architecture in archs:
            raise UnsupportedConfig(f"{r.architecture} (model_type {r.model_type!r}) is {r.why}")
    claims = ([[f for f in FAMILIES.values() if f.model_type == model_type]] if model_type is not None else []) + \
        [[f for f in FAMILIES.values() if f.architecture == a] for a in archs]
    if not claims or not all(claims):
        raise UnsupportedConfig(f"unsupported Hugging Face model ({what}); supported: {supported()}")
    found = {f.name: f for fams in claims for f in fams}
    if len(found) != 1:
        raise UnsupportedConfig(f"ambiguous Hugging Face model ({what}): it names the families "
                                f"{', '.join(found)}")
    return next(iter(found.values()))


def family_of_model(cfg: ModelConfig) -> Family:
    """The family ``cfg`` names (``model_family``), checked against the options it fixes."""
    family = family_named(cfg.model_family)
    family.check(cfg)
    return family


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> tuple[Family, ModelConfig]:
    """(family, ModelConfig) for an HF ``config.json`` dict; UnsupportedConfig for what we cannot match."""
    check_hf_config(hf)
    family = family_of_hf(hf)
    kwargs = dict(family.config_from_hf(hf), **family.options)
    return family, ModelConfig(make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                               model_family=family.name, **kwargs)


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
from megatron_ucp.families import gpt, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe  # noqa: E402,F401
