"""``universal_checkpoint_info`` generated from the parameter table.

DeepSpeed's converter reads these regex lists (``re.match``: anchored at the start only, so every
pattern here also ends in ``$`` and escapes its dots). All lists are emitted at every TP degree:
a TP=1 checkpoint without the row-parallel list would be cut on the wrong dim when resumed at TP>1.
"""

from __future__ import annotations

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import Kind, ParamSpec, param_specs

UNIVERSAL_CHECKPOINT_VERSION = 0.4

# DeepSpeed's key names (deepspeed/checkpoint/constants.py), spelled out so this module stays pure.
VOCABULARY_PARAMETER_PATTERNS = "vocabulary_parameter_patterns"
PIPELINE_REPLICATED_PARAMETER_PATTERNS = "pipeline_replicated_parameter_patterns"
TP_REPLICATED_PARAMETER_PATTERNS = "tp_replicated_parameter_patterns"
PARAMETER_WITH_ROW_PARALLELISM_PATTERNS = "parameter_with_row_parallelism_patterns"
PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0 = "parameter_with_2_sub_params_cat_dim_0"

CATEGORY_BY_KIND: dict[Kind, str | None] = {
    Kind.VOCAB: VOCABULARY_PARAMETER_PATTERNS,
    Kind.REPLICATED: TP_REPLICATED_PARAMETER_PATTERNS,
    Kind.ROW: PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
    Kind.COLUMN_2SUB: PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
    Kind.COLUMN: None,  # DeepSpeed's default rule: concatenate on dim 0
}


def categories(spec: ParamSpec) -> set[str]:
    """The pattern lists that must match a parameter of this spec, and no others."""
    out: set[str] = set()
    category = CATEGORY_BY_KIND[spec.kind]
    if category:
        out.add(category)
    if spec.pipeline_tied:
        out.add(PIPELINE_REPLICATED_PARAMETER_PATTERNS)
    return out


def universal_checkpoint_info(cfg: ModelConfig, padded_vocab_size: int) -> dict:
    info: dict = {
        "universal_checkpoint_version": UNIVERSAL_CHECKPOINT_VERSION,
        "original_vocab_size": cfg.vocab_size,
        "padded_vocab_size": padded_vocab_size,
        VOCABULARY_PARAMETER_PATTERNS: [],
        PIPELINE_REPLICATED_PARAMETER_PATTERNS: [],
        TP_REPLICATED_PARAMETER_PATTERNS: [],
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [],
    }
    specs = param_specs(cfg)
    if any(s.kind is Kind.COLUMN_2SUB for s in specs):  # emitted only when used: strict mode wants a match
        info[PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = []
    for spec in specs:
        for category in sorted(categories(spec)):
            info[category].append(spec.regex())
    return info
