"""Set every local parameter from its layout-invariant full value (``layout.init``)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.experts import ExpertPlacement
from megatron_ucp.layout.init import local_init
from megatron_ucp.layout.params import model_params


@torch.no_grad()
def initialize_parameters(module: nn.Module, cfg: ModelConfig, seed: int, padded_vocab: int,
                          tp: int, tp_rank: int, ep: tuple[int, int] = (1, 0)) -> None:
    """Fill ``module``'s parameters (named by their global names) with this TP rank's slices; ``ep`` is
    (expert parallel size, this rank's expert-parallel rank): an expert's value is its global expert's."""
    infos = {info.name: info for info in model_params(cfg)}
    placement = ExpertPlacement(cfg.num_experts, ep[0]) if cfg.num_experts is not None else None
    for local_name, param in module.named_parameters():
        name = placement.global_name(local_name, ep[1]) if placement is not None else local_name
        if name not in infos:
            raise KeyError(f"parameter {name!r} is not in the parameter table")
        value = local_init(infos[name], cfg, seed, padded_vocab, tp, tp_rank)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: table gives local shape {tuple(value.shape)}, module has {tuple(param.shape)}")
        param.copy_(value)
