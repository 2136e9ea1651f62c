"""Layout-invariant initialisation: each full tensor comes from a generator seeded by (seed, name).

This is Megatron's "build the master weight on every process and keep your slice", made
per-parameter: a parameter's full value never depends on TP, PP or DP, so runs at different layouts
start from the same weights and their losses are comparable from step 1.
"""

from __future__ import annotations

import math
import zlib

import torch

from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import Init, Kind, ParamInfo
from megatron_ucp.layout.slicing import pad_vocab, shard, vocab_range


def param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def full_init(info: ParamInfo, cfg: ModelConfig, seed: int, padded_vocab: int | None = None) -> torch.Tensor:
    """The full fp32 value of one parameter at initialisation (VOCAB rows zero-padded to ``padded_vocab``)."""
    init = info.spec.init
    if init is Init.ZEROS:
        t = torch.zeros(info.full_shape)
    elif init is Init.ONES:
        t = torch.ones(info.full_shape)
    else:
        std = cfg.init_method_std
        if init is Init.SCALED_NORMAL:
            std = std / math.sqrt(2.0 * cfg.num_layers)
        g = torch.Generator().manual_seed(param_seed(seed, info.name))
        t = torch.randn(info.full_shape, generator=g) * std
    if info.kind is Kind.VOCAB and padded_vocab is not None:
        t = pad_vocab(t, padded_vocab)
    return t


def local_init(info: ParamInfo, cfg: ModelConfig, seed: int, padded_vocab: int, tp: int, tp_rank: int) -> torch.Tensor:
    """The slice of ``full_init`` that ``tp_rank`` holds."""
    return shard(full_init(info, cfg, seed, padded_vocab), info.kind, tp, tp_rank).contiguous()


def new_vocab_rows(info: ParamInfo, cfg: ModelConfig, seed: int, padded_vocab: int, tp: int, tp_rank: int,
                   kept: int) -> tuple[int, torch.Tensor] | None:
    """The vocabulary rows [``kept``, ``cfg.vocab_size``) of TP rank ``tp_rank``'s local tensor, which a
    checkpoint of ``kept`` rows lacks: (the flat element of the local tensor where they start, their
    initial values flat, as ``local_init`` gives them). None for a parameter that is not VOCAB, or when
    this rank holds none of those rows. They are contiguous: VOCAB tensors are cut along their rows."""
    if info.kind is not Kind.VOCAB:
        return None
    start, end = vocab_range(padded_vocab, tp, tp_rank)
    lo, hi = max(kept, start), min(cfg.vocab_size, end)
    if lo >= hi:
        return None
    local = local_init(info, cfg, seed, padded_vocab, tp, tp_rank)
    row = math.prod(local.shape[1:])
    return (lo - start) * row, local[lo - start:hi - start].reshape(-1)
