"""The optimizer of a run: two AdamW groups by weight decay and the LR schedule, built in one place.

The trainer and the training benchmark's plain PyTorch loop both build their optimizer here, so the
baseline the benchmark compares against cannot drift from the trainer (a different group split or
schedule would change every loss). Universal checkpoints depend on the group order too: group 0 is
``decay``, group 1 ``no_decay``, at every layout and ZeRO stage.
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_ucp.config import ModelConfig, TrainConfig
from megatron_ucp.layout.params import spec_of
from megatron_ucp.training.schedule import LRSchedule, LRScheduler

NamedParameters = Iterable[tuple[str, torch.nn.Parameter]]
GROUP_NAMES = ("decay", "no_decay")  # the groups' order, which universal checkpoints rely on


def optimizer_param_groups(params: torch.nn.Module | NamedParameters, cfg: ModelConfig,
                           weight_decay: float) -> list[dict]:
    """Two groups, always in this order: with weight decay, without (biases and norms).

    ``params`` is a model or its ``(name, parameter)`` pairs; the pairs let a caller group tensors
    that are not the module's own under the module's names (the benchmark's fp32 master copies).
    The parameter table (``layout.params.spec_of``) decides each name's group.
    """
    named = params.named_parameters() if isinstance(params, torch.nn.Module) else params
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in named:
        (decay if spec_of(name, cfg).weight_decay else no_decay).append(p)
    if not decay or not no_decay:
        raise RuntimeError("every pipeline stage must hold parameters of both weight-decay groups")
    param_groups = [{"params": decay, "name": GROUP_NAMES[0], "weight_decay": weight_decay},
                    {"params": no_decay, "name": GROUP_NAMES[1], "weight_decay": 0.0}]
    if cfg.is_moe:
        # The experts' own group (DeepSpeed's: ``moe`` True, named by the expert group), last: ZeRO partitions
        # it over the expert-data-parallel ranks. Every expert weight decays, so it comes from group 0.
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        param_groups = split_params_into_different_moe_groups_for_optimizer(param_groups)
    return param_groups


def group_hyperparameters(cfg: TrainConfig, moe: bool = False) -> list[dict]:
    """The per-group settings of ``build_optimizer``'s groups, without the parameters (a fine-tune
    load puts them back over a checkpoint's); an MoE model's third group, its experts', decays."""
    common = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}
    out = [dict(common, weight_decay=cfg.weight_decay), dict(common, weight_decay=0.0)]
    return out + [dict(common, weight_decay=cfg.weight_decay)] if moe else out


def build_optimizer(params: torch.nn.Module | NamedParameters, model_cfg: ModelConfig,
                    cfg: TrainConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``optimizer_param_groups`` with this run's settings."""
    return torch.optim.AdamW(optimizer_param_groups(params, model_cfg, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LRScheduler:
    """Warmup then decay as ``cfg`` says; stepped once per optimizer step."""
    assert cfg.lr_decay_iters is not None  # set by TrainConfig.__post_init__
    schedule = LRSchedule(cfg.lr, cfg.min_lr, cfg.lr_warmup_iters, cfg.lr_decay_iters, cfg.lr_decay_style)
    return LRScheduler(optimizer, schedule)
