"""Merge rules: how each parameter's TP-local tensors make its full tensor, from a checkpoint's metadata.

Checkpoints written by our trainer carry their model config, and each parameter's rule
(``layout.params.Kind``) comes from the parameter table; other checkpoints fall back to their
``universal_checkpoint_info`` patterns, as DeepSpeed does. ``source_tp_map`` is where a rule puts
each source TP rank's local tensor in the full one (``layout.placement``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol, cast

from megatron_ucp.checkpoint.zero import CheckpointError, ParamSource, ZeroCheckpoint
from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import Kind, spec_of
from megatron_ucp.layout.placement import RegionMap, tp_map


@dataclass(frozen=True)
class MergeRule:
    kind: Kind
    vocab_rows: int | None = None  # rows kept for VOCAB parameters (the original vocabulary)

    @property
    def kept_vocab_rows(self) -> int:
        """``vocab_rows``, which a VOCAB rule needs; foreign ``universal_checkpoint_info`` may lack it."""
        if self.vocab_rows is None:
            raise TypeError(f"a {self.kind.value} merge rule without vocab_rows")
        return self.vocab_rows


def rules_from_table(metadata: dict):
    """Merge rules from our parameter table, for checkpoints our trainer wrote."""
    vocab = int(metadata["original_vocab_size"])
    cfg = ModelConfig.from_dict(metadata["model_config"])

    def rule(name: str) -> MergeRule:
        kind = spec_of(name, cfg).kind
        return MergeRule(kind, vocab if kind is Kind.VOCAB else None)

    return rule


class UcpInfoRules(Protocol):
    """A merge rule per parameter name, and the patterns no parameter matched so far."""

    unmatched: Callable[[], list[str]]

    def __call__(self, name: str) -> MergeRule: ...


def rules_from_ucp_info(info: dict, strict: bool) -> UcpInfoRules:
    """DeepSpeed's semantics for foreign checkpoints: replicated, row, vocab patterns; default column."""
    unsupported = [k for k in ("parameter_with_sub_params", "parameter_to_average_patterns", "affine_map")
                   if info.get(k)]
    if unsupported:
        raise CheckpointError(f"universal_checkpoint_info uses {', '.join(unsupported)}, which this converter does "
                              "not support for checkpoints not written by megatron_ucp; use DeepSpeed's converter")
    lists = {
        Kind.REPLICATED: info.get("tp_replicated_parameter_patterns", []),
        Kind.COLUMN_2SUB: info.get("parameter_with_2_sub_params_cat_dim_0", []),
        Kind.ROW: info.get("parameter_with_row_parallelism_patterns", []),
    }
    vocab_patterns = info.get("vocabulary_parameter_patterns", [])
    if vocab_patterns and not isinstance(info.get("original_vocab_size"), int):
        raise CheckpointError("universal_checkpoint_info has vocabulary_parameter_patterns but no integer "
                              "original_vocab_size, so the vocabulary padding cannot be stripped")
    used: set[str] = set()

    def first_match(patterns, name):
        hits = [p for p in patterns if re.match(p, name)]
        if len(hits) > 1:
            raise CheckpointError(f"parameter {name} matches several patterns of one list: {hits}")
        used.update(hits)
        return bool(hits)

    def rule(name: str) -> MergeRule:
        is_vocab = first_match(vocab_patterns, name)
        for kind in (Kind.REPLICATED, Kind.COLUMN_2SUB, Kind.ROW):  # DeepSpeed's precedence
            if first_match(lists[kind], name):
                return MergeRule(kind, info["original_vocab_size"] if is_vocab else None)
        return MergeRule(Kind.VOCAB if is_vocab else Kind.COLUMN, info.get("original_vocab_size") if is_vocab else None)

    def unmatched() -> list[str]:
        every = set(vocab_patterns).union(*lists.values())
        return sorted(every - used) if strict else []

    rules = cast(UcpInfoRules, rule)
    rules.unmatched = unmatched
    return rules


def source_tp_map(src: ParamSource, rule: MergeRule, tp: int, folder: str) -> RegionMap:
    """Where each TP rank's local tensor sits in the atom's full tensor (``layout.placement``)."""
    local = src.local_shapes[0]
    dim = rule.kind.partition_dim
    kept = rule.kept_vocab_rows if rule.kind is Kind.VOCAB else None
    extent = local[dim] * tp if dim is not None else (local[0] if local else 1)
    if kept is not None and extent < kept:
        raise CheckpointError(f"{folder}: {src.name} has {extent} rows, fewer than the original vocabulary of {kept}")
    try:
        return tp_map(rule.kind, extent, tp, kept=kept)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {src.name}: {e}") from None


def conversion_rules(ckpt: ZeroCheckpoint, strict: bool, inject_missing_state: bool) -> dict[str, MergeRule]:
    """Each parameter's merge rule: from our table when the checkpoint carries our metadata, else from
    its ``universal_checkpoint_info`` patterns, as DeepSpeed does."""
    info = ckpt.universal_checkpoint_info
    metadata = ckpt.metadata
    if info is None and not inject_missing_state:
        raise CheckpointError(f"{ckpt.model_files[0]}: required universal_checkpoint_info is missing "
                              "(pass inject_missing_state to convert with DeepSpeed's defaults)")
    try:
        if metadata is not None:
            rule_of = rules_from_table(metadata)
        else:
            rule_of = rules_from_ucp_info(info or {"universal_checkpoint_version": 0.4}, strict)
        rules = {name: rule_of(name) for name in ckpt.param_sources}
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.model_files[0]}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:  # the parameter table or the config refuses what the file says
        raise CheckpointError(f"{ckpt.model_files[0]}: {type(e).__name__}: {e}") from None
    if metadata is None:
        unmatched = rule_of.unmatched()
        if unmatched:
            raise CheckpointError(f"{ckpt.model_files[0]}: universal_checkpoint_info patterns match no parameter: "
                                  f"{unmatched} (pass strict=False / --no_strict to ignore)")
    return rules
