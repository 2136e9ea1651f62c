"""The parameter table: every parameter of the GPT model, declared once.

Each ``ParamSpec`` says which pipeline entry holds a parameter, its name inside that entry's module,
how tensor parallelism cuts it (``Kind``), how it is initialised, and whether weight decay applies.
Global names, TP slicing (``slicing.py``), initialisation (``init.py``), the
``universal_checkpoint_info`` patterns (``ucp_info.py``) and the optimizer's parameter groups are all
derived from this table.

Names are DeepSpeed ``PipelineModule`` names, which are the same at every TP and PP degree because
the model is a PipelineModule at every PP (including 1) and DeepSpeed names a layer by its *global*
index in the spec list:

    tied_modules.embed.word_embeddings.weight        the tied input embedding / output head
    1.self_attention.query_key_value.weight          transformer layer 0 (spec index 1)
    {L+1}.final_layernorm.weight                     the final norm
    0.word_embeddings.weight, {L+2}.lm_head.weight   untied embedding and head (Llama family)

Which parameters exist depends on the model config (biases, norms, position embeddings, tying),
so the table is ``param_specs(cfg)``.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Callable

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.experts import EXPERTS, GATE


class Kind(enum.Enum):
    """How tensor parallelism cuts a parameter."""

    COLUMN = "column"  # output features split: dim 0 (weights and their biases)
    # Two fused sub-parameters [a; b] (SwiGLU's gate and up), each split on dim 0: TP rank r holds
    # [a_r; b_r]. Not TP-invariant under a plain concatenation, so declared to the converter.
    COLUMN_2SUB = "column_2sub"
    ROW = "row"  # input features split: dim 1
    VOCAB = "vocab"  # vocabulary rows split on dim 0, padded to a multiple of divisible_by * TP
    REPLICATED = "replicated"  # the full tensor on every TP rank, kept bitwise equal

    @property
    def partition_dim(self) -> int | None:
        return {Kind.COLUMN: 0, Kind.COLUMN_2SUB: 0, Kind.ROW: 1, Kind.VOCAB: 0, Kind.REPLICATED: None}[self]

    @property
    def num_sub_params(self) -> int:
        return 2 if self is Kind.COLUMN_2SUB else 1


class Init(enum.Enum):
    NORMAL = "normal"  # N(0, init_method_std)
    SCALED_NORMAL = "scaled_normal"  # N(0, init_method_std / sqrt(2 * num_layers)), for residual outputs
    ZEROS = "zeros"
    ONES = "ones"


class Role(enum.Enum):
    """The pipeline entries of the GPT model, in spec-list order."""

    EMBED = "embed"
    BLOCK = "block"
    FINAL_NORM = "final_norm"
    HEAD = "head"


@dataclass(frozen=True)
class PipeEntry:
    """One entry of the PipelineModule spec list."""

    index: int  # global position in the spec list; DeepSpeed's name prefix and layer-file number
    role: Role
    layer_number: int | None = None  # 0-based transformer layer, for BLOCK entries
    tied_key: str | None = None  # TiedLayerSpec key, for the tied embedding and head

    @property
    def name_prefix(self) -> str:
        return f"tied_modules.{self.tied_key}." if self.tied_key else f"{self.index}."


TIED_EMBEDDING_KEY = "embed"


def pipe_entries(cfg: ModelConfig) -> list[PipeEntry]:
    """The spec list GPTPipe is built from: embedding, layers, final norm, head."""
    tied = TIED_EMBEDDING_KEY if cfg.tie_embeddings else None
    entries = [PipeEntry(0, Role.EMBED, tied_key=tied)]
    entries += [PipeEntry(1 + i, Role.BLOCK, layer_number=i) for i in range(cfg.num_layers)]
    entries.append(PipeEntry(cfg.num_layers + 1, Role.FINAL_NORM))
    # A tied head reuses the embedding module (a TiedLayerSpec with a forward_fn) and owns no parameters.
    entries.append(PipeEntry(cfg.num_layers + 2, Role.HEAD, tied_key=tied))
    return entries


@dataclass(frozen=True)
class ParamSpec:
    """One parameter rule: where it lives, how TP cuts it, how it starts."""

    role: Role
    local_name: str  # name inside the entry's module
    kind: Kind
    init: Init
    weight_decay: bool
    shape: Callable[[ModelConfig], tuple[int, ...]]  # the full logical shape (vocab unpadded)
    tied: bool = False  # lives in the tied embedding module (first and last pipeline stage)
    # One of an MoE layer's experts: ``local_name`` holds ``{e}``, the expert's index (global in the table,
    # local in a module: ``layout.experts``); ``model_params`` lists one parameter per global expert.
    expert: bool = False

    def regex(self) -> str:
        """The anchored pattern matching this parameter's global name at every layer and layout."""
        if self.tied:
            prefix = re.escape(f"tied_modules.{TIED_EMBEDDING_KEY}.")
        else:
            prefix = r"\d+\."
        return prefix + re.escape(self.local_name).replace(re.escape("{e}"), r"\d+") + "$"

    def name_at(self, prefix: str, expert: int | None = None) -> str:
        """The global name of this parameter in the entry named ``prefix`` (of global expert ``expert``)."""
        if self.expert != (expert is not None):
            raise ValueError(f"{self.local_name}: an expert index is given exactly for expert parameters")
        return prefix + (self.local_name.format(e=expert) if self.expert else self.local_name)

    @property
    def pipeline_tied(self) -> bool:
        """Present (and kept equal) on the first and the last pipeline stage."""
        return self.tied


def _h(c: ModelConfig) -> tuple[int, ...]:
    return (c.hidden_size,)


def _ffn(c: ModelConfig) -> int:
    assert c.ffn_hidden_size is not None  # set by ModelConfig.__post_init__
    return c.ffn_hidden_size


def _qkv_rows(c: ModelConfig) -> int:
    """Fused QKV rows: per key/value group, its query heads then its key and value heads."""
    assert c.num_key_value_heads is not None  # set by ModelConfig.__post_init__
    return (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim


@functools.lru_cache(maxsize=64)
def param_specs(cfg: ModelConfig) -> tuple[ParamSpec, ...]:
    """The parameter table of one model configuration, in module order (the same objects per config)."""
    tied = cfg.tie_embeddings
    bias = cfg.add_bias_linear
    layernorm = cfg.normalization == "layernorm"
    mlp_kind = Kind.COLUMN_2SUB if cfg.swiglu else Kind.COLUMN
    mlp_rows = (lambda c: (2 * _ffn(c),)) if cfg.swiglu else (lambda c: (_ffn(c),))
    specs = [ParamSpec(Role.EMBED, "word_embeddings.weight", Kind.VOCAB, Init.NORMAL, True,
                       lambda c: (c.vocab_size, c.hidden_size), tied=tied)]
    if not cfg.use_rotary_position_embeddings:
        specs.append(ParamSpec(Role.EMBED, "position_embeddings.weight", Kind.REPLICATED, Init.NORMAL, True,
                               lambda c: (c.max_position_embeddings, c.hidden_size), tied=tied))

    def norm(role: Role, name: str) -> list[ParamSpec]:
        out = [ParamSpec(role, f"{name}.weight", Kind.REPLICATED, Init.ONES, False, _h)]
        if layernorm:
            out.append(ParamSpec(role, f"{name}.bias", Kind.REPLICATED, Init.ZEROS, False, _h))
        return out

    specs += norm(Role.BLOCK, "input_layernorm")
    # Fused QKV in Megatron's grouped layout: rows are [group0: q.. k v, group1: ...] (one head per
    # group without GQA), so a TP cut on dim 0 hands each rank whole groups and a plain concatenation
    # re-splits at any TP that divides the key/value heads.
    specs.append(ParamSpec(Role.BLOCK, "self_attention.query_key_value.weight", Kind.COLUMN, Init.NORMAL, True,
                           lambda c: (_qkv_rows(c), c.hidden_size)))
    if bias or cfg.add_qkv_bias:  # every linear's bias (GPT), or the QKV projection's alone (Qwen2)
        specs.append(ParamSpec(Role.BLOCK, "self_attention.query_key_value.bias", Kind.COLUMN, Init.ZEROS, False,
                               lambda c: (_qkv_rows(c),)))
    if cfg.qk_layernorm:  # per-head RMSNorm weights, the same for every head: replicated across TP (Qwen3)
        specs += [ParamSpec(Role.BLOCK, f"self_attention.{n}_layernorm.weight", Kind.REPLICATED, Init.ONES, False,
                            lambda c: (c.head_dim,)) for n in "qk"]
    specs.append(ParamSpec(Role.BLOCK, "self_attention.dense.weight", Kind.ROW, Init.SCALED_NORMAL, True,
                           lambda c: (c.hidden_size, c.attention_width)))
    if bias:
        specs.append(ParamSpec(Role.BLOCK, "self_attention.dense.bias", Kind.REPLICATED, Init.ZEROS, False, _h))
    specs += norm(Role.BLOCK, "post_attention_layernorm")
    if cfg.num_experts is not None:
        specs += _moe_specs()
    else:
        specs += _mlp_specs(cfg, bias, mlp_kind, mlp_rows)
    specs += norm(Role.FINAL_NORM, "final_layernorm")
    if not tied:
        specs.append(ParamSpec(Role.HEAD, "lm_head.weight", Kind.VOCAB, Init.NORMAL, True,
                               lambda c: (c.vocab_size, c.hidden_size)))
    return tuple(specs)


def _moe_specs() -> list[ParamSpec]:
    """A sparse MLP (``model/moe.py``): DeepSpeed's MoE layer with a router and SwiGLU experts.

    The router's weight and every expert are whole on each TP rank (experts are replicated over tensor
    parallelism; their gradients are summed over it). An expert's ``dense_h_to_4h`` is ``[gate; up]``,
    the SwiGLU layout at TP 1."""
    experts = EXPERTS + "{e}."
    return [
        ParamSpec(Role.BLOCK, GATE, Kind.REPLICATED, Init.NORMAL, True,
                  lambda c: (c.num_experts or 0, c.hidden_size)),
        ParamSpec(Role.BLOCK, experts + "dense_h_to_4h.weight", Kind.REPLICATED, Init.NORMAL, True,
                  lambda c: (2 * _ffn(c), c.hidden_size), expert=True),
        ParamSpec(Role.BLOCK, experts + "dense_4h_to_h.weight", Kind.REPLICATED, Init.SCALED_NORMAL, True,
                  lambda c: (c.hidden_size, _ffn(c)), expert=True),
    ]


def _mlp_specs(cfg: ModelConfig, bias: bool, mlp_kind: Kind, mlp_rows) -> list[ParamSpec]:
    """A dense MLP: Megatron's column-parallel h -> 4h (SwiGLU's fused [gate_r; up_r]) and row-parallel 4h -> h."""
    specs = []
    specs.append(ParamSpec(Role.BLOCK, "mlp.dense_h_to_4h.weight", mlp_kind, Init.NORMAL, True,
                           lambda c: mlp_rows(c) + (c.hidden_size,)))
    if bias:
        specs.append(ParamSpec(Role.BLOCK, "mlp.dense_h_to_4h.bias", mlp_kind, Init.ZEROS, False, mlp_rows))
    specs.append(ParamSpec(Role.BLOCK, "mlp.dense_4h_to_h.weight", Kind.ROW, Init.SCALED_NORMAL, True,
                           lambda c: (c.hidden_size, _ffn(c))))
    if bias:
        specs.append(ParamSpec(Role.BLOCK, "mlp.dense_4h_to_h.bias", Kind.REPLICATED, Init.ZEROS, False, _h))
    return specs


@dataclass(frozen=True)
class ParamInfo:
    """A concrete parameter of one model: its global name, rule and full shape."""

    name: str
    spec: ParamSpec
    entry: PipeEntry
    full_shape: tuple[int, ...]  # logical shape; for VOCAB parameters the *unpadded* row count
    expert: int | None = None  # the global expert index of an expert parameter

    @property
    def kind(self) -> Kind:
        return self.spec.kind


def model_params(cfg: ModelConfig) -> list[ParamInfo]:
    """Every parameter of the model, in spec-list order, each once (the tied copy is one name)."""
    out: list[ParamInfo] = []
    specs = param_specs(cfg)
    for entry in pipe_entries(cfg):
        if entry.role is Role.HEAD and entry.tied_key:
            continue  # the tied head owns no parameters of its own
        mine = [spec for spec in specs if spec.role is entry.role]
        experts = [spec for spec in mine if spec.expert]
        for spec in mine:
            if not spec.expert:
                out.append(ParamInfo(spec.name_at(entry.name_prefix), spec, entry, spec.shape(cfg)))
            elif spec is experts[0]:  # module order: expert 0's parameters, then expert 1's, ...
                out += [ParamInfo(s.name_at(entry.name_prefix, e), s, entry, s.shape(cfg), e)
                        for e in range(cfg.num_experts or 0) for s in experts]
    return out


_COMPILED: dict[str, re.Pattern] = {}


def spec_of(name: str, cfg: ModelConfig) -> ParamSpec:
    """The single table entry whose pattern matches ``name``; ValueError when none or several do."""
    hits = []
    for spec in param_specs(cfg):
        pattern = _COMPILED.setdefault(spec.regex(), re.compile(spec.regex()))
        if pattern.match(name):
            hits.append(spec)
    if len(hits) != 1:
        what = "no" if not hits else f"{len(hits)}"
        raise ValueError(f"parameter {name!r} matches {what} entries of the parameter table")
    return hits[0]
