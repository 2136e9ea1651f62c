"""Hugging Face names and layouts of our parameters: the shared vocabulary of the family modules.

Pure (torch-free). Each family (``megatron_ucp/families/``) declares, with the types here, which HF
tensors make each entry of the parameter table (``params.py``) and how they are laid out, and how its
``config.json`` maps onto ``ModelConfig``. The tensor work (``megatron_ucp.hf.transforms``) and both
converters read only ``hf_mappings``, so a parameter the table gains without an HF rule is an error,
never a silently missing tensor.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Mapping, Protocol

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import ParamSpec, Role, model_params


class Combine(enum.Enum):
    """How the HF tensors of one of our parameters are joined (after any transpose)."""

    NONE = "none"  # one HF tensor, same layout
    QKV_PACKED = "qkv_packed"  # one HF tensor holding [Q; K; V] on dim 0
    QKV = "qkv"  # three HF tensors q, k, v
    SWIGLU = "swiglu"  # two HF tensors gate, up -> [gate; up]
    EXPERT = "expert"  # one HF tensor holding every expert of the layer on dim 0: ours is slice [e]


class ExpertLayout(enum.Enum):
    """How an HF checkpoint of a mixture-of-experts model stores its experts."""

    FUSED = "fused"  # transformers 5's modules: one [E, ...] tensor per layer and projection
    PER_EXPERT = "per_expert"  # one tensor per expert and projection: the Hub's files, and save_pretrained's


@dataclass(frozen=True)
class HFRule:
    hf_names: tuple[str, ...]  # templates; ``{i}`` is the 0-based transformer layer, ``{e}`` the global expert
    transpose: bool = False  # GPT-2 Conv1D weights are [in, out]
    combine: Combine = Combine.NONE
    per_expert: HFRule | None = None  # the same parameter in a per-expert checkpoint, where its names differ


@dataclass(frozen=True)
class HFMapping:
    """One of our parameters and the HF tensors it is made of."""

    name: str  # our global parameter name (the universal atom folder)
    spec: ParamSpec
    hf_names: tuple[str, ...]
    transpose: bool
    combine: Combine
    expert: int | None = None  # the global expert index of an expert parameter (``Combine.EXPERT``'s slice)


class FamilyRules(Protocol):
    """What the mappings read of a family (``megatron_ucp.families.Family``, whose registry imports this
    module; it is passed in, never looked up here)."""

    @property
    def architecture(self) -> str: ...

    @property
    def hf_rules(self) -> Mapping[tuple[Role, str], HFRule]: ...

    @property
    def ignored_hf_suffixes(self) -> tuple[str, ...]: ...


TIED_HEAD = "lm_head.weight"  # every family's head; absent from (or a copy in) a tied model's files


def hf_mappings(cfg: ModelConfig, family: FamilyRules,
                experts: ExpertLayout = ExpertLayout.PER_EXPERT) -> list[HFMapping]:
    """Every parameter of the model (table order) with its HF tensors, experts stored as ``experts`` says
    (a dense model's are the same either way); ValueError for an uncovered parameter."""
    rules = family.hf_rules
    out = []
    for p in model_params(cfg):
        rule = rules.get((p.spec.role, p.spec.local_name))
        if rule is None:
            raise ValueError(f"{family.architecture}: no Hugging Face rule for our parameter {p.name} "
                             f"({p.spec.role.value} {p.spec.local_name})")
        if experts is ExpertLayout.PER_EXPERT and rule.per_expert is not None:
            rule = rule.per_expert
        layer = p.entry.layer_number
        names = tuple(n.format(i=layer, e=p.expert) for n in rule.hf_names)
        out.append(HFMapping(p.name, p.spec, names, rule.transpose, rule.combine, p.expert))
    return out


def expert_layout_of(names, cfg: ModelConfig, family: FamilyRules) -> ExpertLayout:
    """The expert layout of a checkpoint holding the tensors ``names``: fused when it holds any tensor only
    the fused layout has, per expert otherwise (``check_coverage`` then names whatever is missing)."""
    per_expert = {n for m in hf_mappings(cfg, family, ExpertLayout.PER_EXPERT) for n in m.hf_names}
    fused_only = {n for m in hf_mappings(cfg, family, ExpertLayout.FUSED) for n in m.hf_names} - per_expert
    return ExpertLayout.FUSED if fused_only & set(names) else ExpertLayout.PER_EXPERT


def is_ignored(hf_name: str, cfg: ModelConfig, family: FamilyRules) -> bool:
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


# The config.json entries the families read, by the values they may take: sizes are positive integers
# (null where optional), epsilons and the rotary base positive finite numbers, dropouts in [0, 1).
_POSITIVE_INTS = ("num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head",
                  "vocab_size", "max_position_embeddings", "n_positions", "intermediate_size", "num_local_experts",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "n_inner", "head_dim", "original_max_position_embeddings",
                           "sliding_window", "max_window_layers")
_POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")
_DROPOUTS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")
_NON_NEGATIVE_NUMBERS = ("initializer_range", "router_aux_loss_coef", "router_jitter_noise")
_BOOLS = ("tie_word_embeddings", "norm_topk_prob", "output_router_logits", "use_sliding_window")
_ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor")  # positive, inside rope_scaling


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_hf_config(hf) -> None:
    """The entries of an HF ``config.json`` (untrusted) the families read: types and ranges, by name.
    UnsupportedConfig names the key and the value (the caller names the file)."""
    if not isinstance(hf, dict):
        raise UnsupportedConfig(f"expected a JSON object, found {_shown(hf)}")
    archs = hf.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise UnsupportedConfig(f"architectures: expected a list of class names, found {_shown(archs)}")
    if hf.get("model_type") is not None and not isinstance(hf["model_type"], str):
        raise UnsupportedConfig(f"model_type: expected a string, found {_shown(hf['model_type'])}")

    def positive_int(d: dict, key: str, where: str, optional: bool) -> None:
        value = d.get(key)
        if value is None and (optional or key not in d):
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedConfig(f"{where}{key}: expected a positive integer, found {_shown(value)}")

    def positive_number(d: dict, key: str, where: str) -> None:
        if key in d and not (_is_number(d[key]) and d[key] > 0):
            raise UnsupportedConfig(f"{where}{key}: expected a positive finite number, found {_shown(d[key])}")

    for key in _POSITIVE_INTS:
        positive_int(hf, key, "", optional=False)
    for key in _OPTIONAL_POSITIVE_INTS:
        positive_int(hf, key, "", optional=True)
    for key in _POSITIVE_NUMBERS:
        positive_number(hf, key, "")
    for key in _DROPOUTS:
        if key in hf and not (_is_number(hf[key]) and 0 <= hf[key] < 1):
            raise UnsupportedConfig(f"{key}: expected a dropout probability in [0, 1), found {_shown(hf[key])}")
    for key in _NON_NEGATIVE_NUMBERS:
        if key in hf and not (_is_number(hf[key]) and hf[key] >= 0):
            raise UnsupportedConfig(f"{key}: expected a finite number >= 0, found {_shown(hf[key])}")
    layers = hf.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise UnsupportedConfig(f"mlp_only_layers: expected a list of layer numbers, found {_shown(layers)}")
    for key in _BOOLS:
        if key in hf and not isinstance(hf[key], bool):
            raise UnsupportedConfig(f"{key}: expected true or false, found {_shown(hf[key])}")
    for section in ("rope_parameters", "rope_scaling"):
        params = hf.get(section)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise UnsupportedConfig(f"{section}: expected an object or null, found {_shown(params)}")
        for key in _ROPE_NUMBERS:
            if params.get(key) is not None:
                positive_number(params, key, f"{section}.")
        positive_int(params, "original_max_position_embeddings", f"{section}.", optional=True)


def _hf_key(hf: dict, *names: str) -> str:
    """The name config.json gives a size (families spell some differently: ``n_layer``, ``num_hidden_layers``)."""
    return next((n for n in names if n in hf), names[0])


def check_declared_sizes(hf: dict, cfg: ModelConfig, family: FamilyRules, shapes: dict[str, tuple[int, ...]]) -> None:
    """The sizes config.json declares, against the tensors the weights hold (``shapes``: name -> shape, from
    the reader's index), before anything is sized from them: the parameter table has entries per layer, and
    the attention maps work per head, so a config declaring a million layers or heads would take gigabytes
    of memory before the tensors could disagree. UnsupportedConfig names the key."""
    rules = [r for rule in family.hf_rules.values() for r in (rule, rule.per_expert) if r is not None]
    prefixes = {t.split("{i}")[0] for rule in rules for t in rule.hf_names if "{i}" in t}
    layer_re = re.compile("^(?:" + "|".join(re.escape(p) for p in sorted(prefixes)) + r")(\d+)\.")
    layers = {int(m.group(1)) for name in shapes if (m := layer_re.match(name))}
    if len(layers) != cfg.num_layers or (layers and max(layers) != cfg.num_layers - 1):  # not 0..n-1 exactly
        held = f"layers {min(layers)}-{max(layers)}" if layers else "no layers"
        raise UnsupportedConfig(f"{_hf_key(hf, 'num_hidden_layers', 'n_layer')}: {cfg.num_layers} layers declared, "
                                f"but the weights hold {len(layers)} ({held})")
    embed = family.hf_rules.get((Role.EMBED, "word_embeddings.weight"))
    if embed is not None and embed.hf_names[0] in shapes:
        name, shape = embed.hf_names[0], shapes[embed.hf_names[0]]
        declared = (cfg.vocab_size, cfg.hidden_size)
        if tuple(shape) != declared:
            raise UnsupportedConfig(f"{_hf_key(hf, 'vocab_size')} x {_hf_key(hf, 'hidden_size', 'n_embd')}: "
                                    f"{declared[0]} x {declared[1]} declared, but {name} is {tuple(shape)}")
    largest = max((d for shape in shapes.values() for d in shape), default=0)
    sizes = {_hf_key(hf, "num_attention_heads", "n_head"): cfg.num_attention_heads,
             _hf_key(hf, "num_key_value_heads"): cfg.num_key_value_heads,
             _hf_key(hf, "moe_intermediate_size", "intermediate_size", "n_inner"): cfg.ffn_hidden_size,
             "head_dim": cfg.kv_channels, _hf_key(hf, "num_local_experts", "num_experts"): cfg.num_experts}
    for key, value in sizes.items():
        if value is not None and value > largest:
            raise UnsupportedConfig(f"{key}: {value} is larger than every dimension of every tensor in the "
                                    f"weights (at most {largest})")

