"""Hugging Face names and layouts of our parameters, declared once per family.

Pure (torch-free): which HF tensors make each entry of the parameter table (``params.py``) and how
they are laid out, and how an HF ``config.json`` maps onto ``ModelConfig``. The tensor work
(``megatron_ucp.hf.transforms``) and both converters read only this module, so a parameter the table
gains without an HF rule here is an error, never a silently missing tensor.

Layouts (ours on the left, see ``params.py`` and ``model/llama.py``):

* GPT-2 (``GPT2LMHeadModel``) stores linear weights as ``Conv1D`` [in, out]: every linear is
  transposed. ``c_attn`` holds ``[Q; K; V]`` (all heads of Q, then K, then V) on its output dim; our
  fused QKV is per head ``[q_i; k_i; v_i]`` (the grouped layout with one head per group).
* Llama (``LlamaForCausalLM``) stores ``nn.Linear`` [out, in] weights with separate q/k/v projections;
  our fused QKV is per key/value group ``[q.. k v]``; gate and up become ``[gate; up]`` (the universal
  form of the SwiGLU sub-parameters). HF checkpoints are already in the rotate-half RoPE convention
  that ``model/llama.py`` uses, so no rotary permutation of q/k rows is needed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import ParamSpec, Role, model_params


class Family(enum.Enum):
    """A supported HF architecture: its ``architectures`` class name and ``model_type``."""

    GPT2 = ("GPT2LMHeadModel", "gpt2")
    LLAMA = ("LlamaForCausalLM", "llama")

    @property
    def architecture(self) -> str:
        return self.value[0]

    @property
    def model_type(self) -> str:
        return self.value[1]


SUPPORTED = ", ".join(f"{f.architecture} (model_type {f.model_type!r})" for f in Family)


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


_GPT2 = "transformer.h.{i}."
_LLAMA = "model.layers.{i}."

# Keyed by (role, our local name); each family must cover every table entry its configs produce.
RULES: dict[Family, dict[tuple[Role, str], HFRule]] = {
    Family.GPT2: {
        (Role.EMBED, "word_embeddings.weight"): HFRule(("transformer.wte.weight",)),
        (Role.EMBED, "position_embeddings.weight"): HFRule(("transformer.wpe.weight",)),
        (Role.BLOCK, "input_layernorm.weight"): HFRule((_GPT2 + "ln_1.weight",)),
        (Role.BLOCK, "input_layernorm.bias"): HFRule((_GPT2 + "ln_1.bias",)),
        (Role.BLOCK, "self_attention.query_key_value.weight"):
            HFRule((_GPT2 + "attn.c_attn.weight",), transpose=True, combine=Combine.QKV_PACKED),
        (Role.BLOCK, "self_attention.query_key_value.bias"):
            HFRule((_GPT2 + "attn.c_attn.bias",), combine=Combine.QKV_PACKED),
        (Role.BLOCK, "self_attention.dense.weight"): HFRule((_GPT2 + "attn.c_proj.weight",), transpose=True),
        (Role.BLOCK, "self_attention.dense.bias"): HFRule((_GPT2 + "attn.c_proj.bias",)),
        (Role.BLOCK, "post_attention_layernorm.weight"): HFRule((_GPT2 + "ln_2.weight",)),
        (Role.BLOCK, "post_attention_layernorm.bias"): HFRule((_GPT2 + "ln_2.bias",)),
        (Role.BLOCK, "mlp.dense_h_to_4h.weight"): HFRule((_GPT2 + "mlp.c_fc.weight",), transpose=True),
        (Role.BLOCK, "mlp.dense_h_to_4h.bias"): HFRule((_GPT2 + "mlp.c_fc.bias",)),
        (Role.BLOCK, "mlp.dense_4h_to_h.weight"): HFRule((_GPT2 + "mlp.c_proj.weight",), transpose=True),
        (Role.BLOCK, "mlp.dense_4h_to_h.bias"): HFRule((_GPT2 + "mlp.c_proj.bias",)),
        (Role.FINAL_NORM, "final_layernorm.weight"): HFRule(("transformer.ln_f.weight",)),
        (Role.FINAL_NORM, "final_layernorm.bias"): HFRule(("transformer.ln_f.bias",)),
        (Role.HEAD, "lm_head.weight"): HFRule(("lm_head.weight",)),
    },
    Family.LLAMA: {
        (Role.EMBED, "word_embeddings.weight"): HFRule(("model.embed_tokens.weight",)),
        (Role.BLOCK, "input_layernorm.weight"): HFRule((_LLAMA + "input_layernorm.weight",)),
        (Role.BLOCK, "self_attention.query_key_value.weight"): HFRule(
            tuple(_LLAMA + f"self_attn.{p}_proj.weight" for p in "qkv"), combine=Combine.QKV),
        (Role.BLOCK, "self_attention.dense.weight"): HFRule((_LLAMA + "self_attn.o_proj.weight",)),
        (Role.BLOCK, "post_attention_layernorm.weight"): HFRule((_LLAMA + "post_attention_layernorm.weight",)),
        (Role.BLOCK, "mlp.dense_h_to_4h.weight"): HFRule(
            (_LLAMA + "mlp.gate_proj.weight", _LLAMA + "mlp.up_proj.weight"), combine=Combine.SWIGLU),
        (Role.BLOCK, "mlp.dense_4h_to_h.weight"): HFRule((_LLAMA + "mlp.down_proj.weight",)),
        (Role.FINAL_NORM, "final_layernorm.weight"): HFRule(("model.norm.weight",)),
        (Role.HEAD, "lm_head.weight"): HFRule(("lm_head.weight",)),
    },
}

# HF tensors that are not parameters of ours and carry no information: a tied head's copy of the
# embedding, attention-mask buffers older GPT-2 checkpoints saved, RoPE frequency buffers.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


TIED_HEAD = "lm_head.weight"  # both families' head; absent from (or a copy in) a tied model's files


def hf_mappings(cfg: ModelConfig, family: Family) -> list[HFMapping]:
    """Every parameter of the model (table order) with its HF tensors; ValueError for an uncovered one."""
    rules = RULES[family]
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
    """True for an HF tensor that maps to nothing of ours by design."""
    if cfg.tie_embeddings and hf_name == TIED_HEAD:
        return True
    return hf_name.endswith(IGNORED_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------


class UnsupportedConfig(ValueError):
    """An HF config this mapping cannot represent exactly; the message says which field and why."""


def family_of(hf: dict) -> Family:
    archs = hf.get("architectures") or []
    for family in Family:
        if family.architecture in archs or (not archs and hf.get("model_type") == family.model_type):
            return family
    what = f"architectures {archs}" if archs else f"model_type {hf.get('model_type')!r}"
    raise UnsupportedConfig(f"unsupported Hugging Face model ({what}); supported: {SUPPORTED}")


def _require(hf: dict, key: str, wanted, why: str, default=None) -> None:
    value = hf.get(key, default)
    ok = value in wanted if isinstance(wanted, tuple) else value == wanted
    if not ok:
        raise UnsupportedConfig(f"{key}={value!r} is not supported ({why}); expected {wanted!r}")


def _rope_theta(hf: dict) -> float:
    """rope_theta from ``rope_parameters`` (transformers >= 5) or the top level, default RoPE only."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedConfig(f"rope_type {rope_type!r} is not supported (only the default rotary embedding)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def source_dtype(hf: dict) -> str | None:
    """The checkpoint's stored dtype as config.json names it (``dtype`` or the older ``torch_dtype``)."""
    value = hf.get("dtype") or hf.get("torch_dtype")
    return str(value) if value else None


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> tuple[Family, ModelConfig]:
    """(family, ModelConfig) for an HF ``config.json`` dict; UnsupportedConfig for what we cannot match."""
    family = family_of(hf)
    if family is Family.GPT2:
        _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "our MLP uses tanh-approximated GeLU")
        _require(hf, "scale_attn_weights", True, "attention is scaled by 1/sqrt(head_dim)", True)
        _require(hf, "scale_attn_by_inverse_layer_idx", False, "no per-layer attention scaling", False)
        _require(hf, "add_cross_attention", False, "decoder-only", False)
        kwargs = dict(
            num_layers=hf["n_layer"], hidden_size=hf["n_embd"], num_attention_heads=hf["n_head"],
            vocab_size=hf["vocab_size"], max_position_embeddings=hf["n_positions"],
            ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
            layernorm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            hidden_dropout=float(hf.get("resid_pdrop", 0.1)), attention_dropout=float(hf.get("attn_pdrop", 0.1)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    else:
        _require(hf, "hidden_act", "silu", "SwiGLU uses SiLU", "silu")
        _require(hf, "attention_bias", False, "the Llama family is built without linear biases", False)
        _require(hf, "mlp_bias", False, "the Llama family is built without linear biases", False)
        _require(hf, "pretraining_tp", 1, "sliced projections are not modelled", 1)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if head_dim * heads != hf["hidden_size"]:
            raise UnsupportedConfig(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size="
                                    f"{hf['hidden_size']} is not supported (our attention width is hidden_size)")
        kwargs = dict(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
            max_position_embeddings=hf["max_position_embeddings"], ffn_hidden_size=hf["intermediate_size"],
            layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), hidden_dropout=0.0,
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), swiglu=True, normalization="rmsnorm",
            use_rotary_position_embeddings=True, rope_theta=_rope_theta(hf), add_bias_linear=False)
    return family, ModelConfig(make_vocab_size_divisible_by=make_vocab_size_divisible_by, **kwargs)


def family_of_model(cfg: ModelConfig) -> Family:
    """The HF family a model config exports to (its table shape decides)."""
    return Family.LLAMA if cfg.swiglu_family else Family.GPT2


def hf_config_from_model(cfg: ModelConfig, dtype: str, extra: dict | None = None) -> dict:
    """The ``config.json`` dict of the HF model equal to ``cfg`` (``extra``: token ids and the like)."""
    family = family_of_model(cfg)
    common = {"architectures": [family.architecture], "model_type": family.model_type, "dtype": dtype,
              "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_method_std,
              "tie_word_embeddings": cfg.tie_embeddings}
    if family is Family.GPT2:
        if not cfg.add_bias_linear or cfg.normalization != "layernorm":
            raise UnsupportedConfig("only the GPT-2 shape (biases, LayerNorm) exports as GPT2LMHeadModel")
        out = dict(common, n_layer=cfg.num_layers, n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads,
                   n_positions=cfg.max_position_embeddings, n_inner=cfg.ffn_hidden_size,
                   activation_function="gelu_new", layer_norm_epsilon=cfg.layernorm_epsilon,
                   resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    else:
        out = dict(common, num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                   num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                   head_dim=cfg.head_dim, intermediate_size=cfg.ffn_hidden_size,
                   max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.layernorm_epsilon,
                   hidden_act="silu", attention_bias=False, mlp_bias=False, attention_dropout=cfg.attention_dropout,
                   pretraining_tp=1, rope_theta=cfg.rope_theta,
                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    out.update(extra or {})
    return out
