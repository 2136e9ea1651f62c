"""The layout of an elastic job at the world size it gets.

torchrun's elastic agent restarts the workers at whatever world size the rendezvous formed. The job keeps its
tensor- and pipeline-parallel degrees and takes the data-parallel degree the world leaves, DP = world /
(TP x PP [x Ulysses SP]); gradient accumulation is recomputed so the global batch stays the same
(``TrainConfig.gradient_accumulation_steps``). The direct reshard loads the checkpoint at that layout.

Where that layout does not exist (fewer ranks than TP x PP, or a DP that does not divide the global batch):

* with ``--elastic-layout`` the job lowers TP or PP to the largest pair that fits: the most model-parallel
  ranks TP' x PP' (TP' <= TP, PP' <= PP), on a tie the larger TP';
* without it, the job stops with one line naming the world sizes that would work.

Pure: the checks are ``arguments.check_run``'s, no process group is touched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_ucp.config import TrainConfig
from megatron_ucp.training.arguments import check_run


def problem(model_kwargs: dict[str, Any], cfg: TrainConfig, world_size: int) -> str | None:
    """Why the run ``cfg`` cannot run on ``world_size`` ranks (``check_run``'s one line), or None."""
    try:
        check_run(model_kwargs, cfg, world_size)
    except ValueError as e:
        return str(e)
    return None


def workable_world_sizes(model_kwargs: dict[str, Any], cfg: TrainConfig) -> list[int]:
    """Every world size the run fits at its own TP and PP (and Ulysses SP): one per data-parallel degree that
    divides the global batch into whole micro batches."""
    fixed = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size * cfg.ds_sequence_parallel_size
    most = cfg.global_batch_size // cfg.micro_batch_size
    return [fixed * dp for dp in range(1, most + 1)
            if most % dp == 0 and problem(model_kwargs, cfg, fixed * dp) is None]


def _smaller_layouts(cfg: TrainConfig) -> list[tuple[int, int]]:
    """(TP', PP') below the run's own, most model-parallel ranks first, then the larger TP'."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    pairs = [(t, p) for t in range(1, tp + 1) for p in range(1, pp + 1) if (t, p) != (tp, pp)]
    return sorted(pairs, key=lambda tp_pp: (-tp_pp[0] * tp_pp[1], -tp_pp[0]))


def fit_layout(model_kwargs: dict[str, Any], cfg: TrainConfig, world_size: int) -> TrainConfig:
    """``cfg`` when it runs on ``world_size`` ranks; with ``cfg.elastic_layout``, ``cfg`` at the largest TP and
    PP that do; else a ValueError whose one line names the world sizes that would work."""
    reason = problem(model_kwargs, cfg, world_size)
    if reason is None:
        return cfg
    if cfg.elastic_layout:
        for tp, pp in _smaller_layouts(cfg):
            fitted = dataclasses.replace(cfg, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            if problem(model_kwargs, fitted, world_size) is None:
                return fitted
    sizes = workable_world_sizes(model_kwargs, cfg)
    if not sizes or world_size in sizes:  # not a matter of the world size: the run itself is refused
        raise ValueError(reason)
    layout = f"TP{cfg.tensor_model_parallel_size} PP{cfg.pipeline_model_parallel_size}"
    if cfg.ds_sequence_parallel_size != 1:
        layout += f" SP{cfg.ds_sequence_parallel_size}"
    hint = ("no smaller TP or PP fits either" if cfg.elastic_layout
            else "or pass --elastic-layout to lower TP or PP to fit")
    raise ValueError(f"world size {world_size} does not fit this run ({reason}); world sizes that would work at "
                     f"{layout} with global batch {cfg.global_batch_size} and micro batch {cfg.micro_batch_size}: "
                     f"{', '.join(map(str, sizes))}; {hint}")
