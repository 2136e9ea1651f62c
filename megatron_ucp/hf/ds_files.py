"""The non-atom files DeepSpeed's stock universal loader needs, for a universal folder we build ourselves.

A universal folder made from something other than a ZeRO checkpoint (an HF model) has no
``mp_rank_*`` file or optimizer state to copy, and DeepSpeed 0.19.8 refuses a folder without them
(an empty mp-file list fails an assertion; ``zero/optimizer_state.pt`` is required). This writes:

* ``mp_rank_XX_model_states.pt``: DeepSpeed's counters (``dp_world_size``, ``mp_world_size`` = the
  number of such files, ``global_steps``, ``skipped_steps``, ``global_samples``), our scheduler's
  state and the client state our trainer reads (``iteration``, ``consumed_train_samples``,
  ``universal_checkpoint_info``, ``megatron_ucp`` metadata); ``module`` is None, as with the pipeline
  engine, because universal loading restores weights from ``zero/``;
* the same dict as ``zero_pp_rank_0_mp_rank_XX_model_states.pt``, the name ZeRO-3 engines look for;
* ``zero/optimizer_state.pt``: ``param_groups`` (the trainer's two groups, decay then no_decay),
  ``ds_version``, and ``optimizer_state_dict = {'state': {0: {'step': step}}, 'param_groups': ...}``,
  where DeepSpeed's stage-3 universal loader reads the step and hyperparameters.

No DeepSpeed import: its version comes from the package metadata.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

import torch

from megatron_ucp.checkpoint.atoms import stage_compatible_global_state
from megatron_ucp.checkpoint.format import model_state_names, optimizer_state_path, zero_dir
from megatron_ucp.config import TrainConfig
from megatron_ucp.training.optim import GROUP_NAMES, group_hyperparameters
from megatron_ucp.training.schedule import LRSchedule, LRScheduler


def deepspeed_version() -> str:
    try:
        return version("deepspeed")
    except PackageNotFoundError:  # pragma: no cover - the trainer cannot run without it either
        return "0.19.8"


def default_param_groups(cfg: TrainConfig | None = None) -> list[dict]:
    """The trainer's two AdamW groups (decay, no_decay) as ``optimizer.state_dict()['param_groups']``:
    ``training.optim``'s names and settings, around a stand-in parameter each."""
    cfg = cfg or TrainConfig(mock_data=True, vocab_size=1)
    groups = [dict(settings, params=[torch.nn.Parameter(torch.zeros(1))], name=name)
              for settings, name in zip(group_hyperparameters(cfg), GROUP_NAMES)]
    return torch.optim.AdamW(groups, lr=cfg.lr).state_dict()["param_groups"]


def fresh_scheduler_state(cfg: TrainConfig | None = None) -> dict:
    """Our LRScheduler's ``state_dict()`` before any step."""
    cfg = cfg or TrainConfig(mock_data=True, vocab_size=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    assert cfg.lr_decay_iters is not None  # set by TrainConfig.__post_init__
    schedule = LRSchedule(cfg.lr, cfg.min_lr, cfg.lr_warmup_iters, cfg.lr_decay_iters, cfg.lr_decay_style)
    return LRScheduler(opt, schedule).state_dict()


def optimizer_state_file(param_groups: list[dict], step: int) -> dict:
    """``zero/optimizer_state.pt`` for every ZeRO stage (``stage_compatible_global_state``).

    The step is a float32 scalar tensor, as torch's Adam keeps it: stage 3 puts it into the optimizer
    state as is, and Adam refuses a plain int there."""
    return stage_compatible_global_state({"ds_version": deepspeed_version()}, param_groups,
                                         torch.tensor(float(step)))


def write_loader_files(folder: str, *, client_state: dict, step: int = 0, global_samples: int = 0,
                       param_groups: list[dict] | None = None, lr_scheduler: dict | None = None,
                       mp_world_size: int = 1, dp_world_size: int = 1) -> list[str]:
    """Write the model-state files and ``zero/optimizer_state.pt`` into ``folder``; return their paths."""
    param_groups = param_groups if param_groups is not None else default_param_groups()
    model_state = {
        "module": None,
        "dp_world_size": dp_world_size,
        "mp_world_size": mp_world_size,
        "global_steps": step,
        "skipped_steps": 0,
        "global_samples": global_samples,
        "lr_scheduler": lr_scheduler if lr_scheduler is not None else fresh_scheduler_state(),
        "ds_version": deepspeed_version(),
        **client_state,
    }
    paths = []
    for mp in range(mp_world_size):
        for name in model_state_names(mp):
            paths.append(os.path.join(folder, name))
            torch.save(model_state, paths[-1])  # a model-state file DeepSpeed's engine loads, not an atom
    os.makedirs(zero_dir(folder), exist_ok=True)
    paths.append(optimizer_state_path(folder))
    torch.save(optimizer_state_file(param_groups, step), paths[-1])  # DeepSpeed's ZeRO file, loaded by DeepSpeed
    return paths
