"""The index of a ZeRO-1/2 checkpoint that was never written: what ``zero.open_zero_checkpoint`` would
build for a model and layout, without the files.

A checkpoint's index is a function of the model (``layout.params``: every parameter, its TP cut and its
weight-decay group), the layout it was saved at and DeepSpeed's partitioning, so it can be computed at
any scale: a Llama-70B-shaped model saved at 1,024 ranks indexes in a second or two, with no data. The
index is built by the same code as a real one (``zero.index_zero_checkpoint``), from synthetic model
states and synthetic shard headers (``zero.ShardHeader``), so planning through it
(``training.sliced_load``) runs the real planner.

DeepSpeed 0.19.8's ZeRO-1/2 partitioning (``stage_1_and_2.py``, ``bf16_optimizer.py``), per optimizer
group of one model-parallel rank: the group's parameters, in module order, are concatenated into one flat
buffer, padded at the end to a multiple of ``2 * DP`` elements (``nccl_start_alignment_factor``); DP rank
``r`` owns elements ``[r * P, (r + 1) * P)``, ``P`` = the padded size / DP; a parameter's fragment on ``r``
is its part of that window, addressed from the window's start. The fp32 master and both Adam moments are
flat tensors of ``P`` elements. The groups are ours (``training.optim``): ``decay`` first, ``no_decay``.

Only the fragments' element addresses are DeepSpeed's; where the flat tensors lie in the (absent) files is
made up (``_file_offsets``): one record after another, each 64-byte aligned behind a 64-byte header, as
torch's zip writer lays them, but not at the bytes a real file would put them. Byte offsets therefore
differ from a real checkpoint's; every count (files, reads, bytes) does not.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_ucp.checkpoint.format import (
    METADATA_KEY,
    STATE_KEYS,
    CheckpointMetadata,
    model_states_name,
    optim_states_name,
)
from megatron_ucp.checkpoint.zero import FlatRef, ShardHeader, ZeroCheckpoint, index_zero_checkpoint
from megatron_ucp.layout.params import Kind, ParamInfo, model_params
from megatron_ucp.layout.placement import local_shape
from megatron_ucp.layout.ucp_info import universal_checkpoint_info

GROUP_NAMES = ("decay", "no_decay")  # training.optim's groups, in its order
_ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: the flat buffer is padded to 2 * DP elements
_RECORD = 64  # torch's zip writer aligns each record's data to 64 bytes


@dataclass(frozen=True)
class Partition:
    """One optimizer group of one model-parallel rank, partitioned over DP: ``P`` elements per rank and each
    parameter's fragments ``(dp, start in that rank's window, numel)``, in module order."""

    size: int  # P: elements of each DP rank's flat partition
    fragments: dict[str, list[tuple[int, int, int]]]


def partition(numels: dict[str, int], dp: int) -> Partition:
    """DeepSpeed's ZeRO-1/2 partition of one group's parameters (``numels``, in module order) over ``dp`` ranks."""
    total = sum(numels.values())
    padded = math.ceil(total / (_ALIGNMENT * dp)) * _ALIGNMENT * dp if total else 0
    size = padded // dp
    out: dict[str, list[tuple[int, int, int]]] = {}
    offset = 0
    for name, n in numels.items():
        frags = []
        first, last = offset, offset + n
        for r in range(first // size if size else 0, (last - 1) // size + 1 if n else 0):
            lo, hi = max(first, r * size), min(last, (r + 1) * size)
            frags.append((r, lo - r * size, hi - lo))
        out[name] = frags
        offset = last
    return Partition(size, out)


def stage_params(meta: CheckpointMetadata, pp_rank: int) -> list[ParamInfo]:
    """The parameters pipeline stage ``pp_rank`` holds, in module order: its entries' (``pipeline_parts``),
    and the tied embedding on the last stage too when the embedding and head are tied."""
    cfg = meta.model_config
    parts = meta.pipeline_parts
    assert parts is not None and meta.topology is not None
    lo, hi = parts[pp_rank], parts[pp_rank + 1]
    params = model_params(cfg)
    mine = [p for p in params if lo <= p.entry.index < hi]
    last = pp_rank == meta.topology.pp - 1
    tied = [p for p in params if p.spec.tied]
    if tied and last and pp_rank > 0:  # the tied head's module holds the embedding on the last stage
        mine = tied + mine
    return mine


def _local_shape(info: ParamInfo, meta: CheckpointMetadata, tp: int) -> tuple[int, ...]:
    full = list(info.full_shape)
    if info.kind is Kind.VOCAB:
        full[0] = meta.padded_vocab_size
    return local_shape(info.kind, full, tp)


def param_shapes(meta: CheckpointMetadata, pp_rank: int) -> list[dict[str, tuple[int, ...]]]:
    """A model-parallel rank's ``param_shapes`` (TP-local, per optimizer group; the same on every TP rank)."""
    assert meta.topology is not None
    groups: list[dict[str, tuple[int, ...]]] = [{}, {}]
    for info in stage_params(meta, pp_rank):
        groups[0 if info.spec.weight_decay else 1][info.name] = _local_shape(info, meta, meta.topology.tp)
    return groups


def model_state(meta: CheckpointMetadata, pp_rank: int) -> dict:
    """What the index reads of a model-state file of stage ``pp_rank``: the counters, degrees,
    ``param_shapes``, ``universal_checkpoint_info`` and our metadata."""
    topo = meta.topology
    assert topo is not None
    return {"iteration": meta.iteration, "global_steps": meta.iteration, "skipped_steps": 0,
            "dp_world_size": topo.dp, "mp_world_size": topo.tp * topo.pp,
            "checkpoint_parallel_dimensions": {"tp_degree": topo.tp, "pp_degree": topo.pp},
            "param_shapes": [{n: torch.Size(s) for n, s in g.items()} for g in param_shapes(meta, pp_rank)],
            "universal_checkpoint_info": universal_checkpoint_info(meta.model_config, meta.padded_vocab_size),
            METADATA_KEY: meta.to_dict()}


def _file_offsets(sizes: list[int], itemsize: int) -> Iterator[int]:
    """Made-up byte offsets of consecutive flat tensors of ``sizes`` elements in one file (the pickle first)."""
    pos = 4 * _RECORD
    for n in sizes:
        pos += _RECORD  # the record's local header
        yield pos
        pos += math.ceil(n * itemsize / _RECORD) * _RECORD


def shard_headers(meta: CheckpointMetadata, folder: str) -> dict[str, ShardHeader]:
    """Every optimizer shard's header, by path, as DeepSpeed would have written them."""
    topo = meta.topology
    assert topo is not None
    step = torch.tensor(float(meta.iteration))
    out = {}
    for pp in range(topo.pp):
        numels = [{n: math.prod(s) for n, s in g.items()} for g in param_shapes(meta, pp)]
        parts = [partition(g, topo.dp) for g in numels]
        for tp in range(topo.tp):
            mp = pp * topo.tp + tp
            for dp in range(topo.dp):
                path = os.path.join(folder, optim_states_name(mp, dp, meta.dtype == "bf16"))
                sizes = [p.size for p in parts for _ in STATE_KEYS]
                offsets = iter(_file_offsets(sizes, 4))
                refs = tuple({key: FlatRef(path, next(offsets), p.size, torch.float32) for key in STATE_KEYS}
                             for p in parts)
                mappings = tuple({name: (start, n) for name, frags in p.fragments.items()
                                  for r, start, n in frags if r == dp} for p in parts)
                out[path] = ShardHeader(1, tuple({"name": g, "moe": False} for g in GROUP_NAMES), mappings, refs,
                                        (step, step))
    return out


def synthetic_checkpoint(meta: CheckpointMetadata, folder: str = "/synthetic/global_step0") -> ZeroCheckpoint:
    """The index ``open_zero_checkpoint`` would build for a ZeRO-1/2 checkpoint of ``meta``'s model saved at
    ``meta.topology`` (dense models: no experts), its files named under ``folder`` (which need not exist)."""
    topo = meta.topology
    if topo is None or meta.pipeline_parts is None or meta.zero_stage not in (1, 2):
        raise ValueError("a synthetic checkpoint needs a training checkpoint's topology, pipeline parts and "
                         "ZeRO stage 1 or 2")
    if meta.model_config.is_moe or topo.degree("sp") != 1:
        raise ValueError("a synthetic checkpoint models dense models without sequence parallelism")
    folder = os.path.normpath(folder)
    n_mp = topo.tp * topo.pp
    model_files = [os.path.join(folder, model_states_name(mp)) for mp in range(n_mp)]
    states = [model_state(meta, mp // topo.tp) for mp in range(n_mp)]
    headers = shard_headers(meta, folder)
    bf16 = meta.dtype == "bf16"
    optim = {(dp, mp): (os.path.join(folder, optim_states_name(mp, dp, bf16)), bf16)
             for mp in range(n_mp) for dp in range(topo.dp)}
    return index_zero_checkpoint(folder, model_files, states, optim, False, headers.__getitem__, "synthetic headers")
