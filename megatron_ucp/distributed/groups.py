"""The one registry of process groups (the only module-level mutable state in the project).

``initialize(layout)`` creates tensor, data, pipeline and model-parallel groups from the pure
``ParallelLayout`` and returns a ``ParallelState``. That object also answers DeepSpeed's ``mpu``
interface, so it can be handed to ``deepspeed.initialize(mpu=...)`` for a non-pipeline engine. Under a
PipelineModule DeepSpeed refuses an explicit mpu and uses the module's own grid, which GPTPipe builds
from the same topology, so both see identical groups (checked in tests/test_distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_ucp.distributed.random import RNGStatesTracker
from megatron_ucp.layout.topology import ParallelLayout, RankCoords


@dataclass
class TensorParallelContext:
    """What a tensor-parallel layer needs: its group, its place in it, and the per-rank RNG."""

    size: int = 1
    rank: int = 0
    group: object = None
    rng: RNGStatesTracker = field(default_factory=RNGStatesTracker)


@dataclass
class ParallelState:
    layout: ParallelLayout
    global_rank: int
    coords: RankCoords
    tp_group: object
    dp_group: object
    pp_group: object
    mp_group: object
    tp: TensorParallelContext

    # DeepSpeed / Megatron mpu interface.
    def get_tensor_model_parallel_rank(self) -> int:
        return self.coords.tp

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.layout.checkpoint_mp_rank(self.coords.pp, self.coords.tp)

    def get_model_parallel_world_size(self) -> int:
        return self.layout.model_parallel_size

    def get_model_parallel_group(self):
        return self.mp_group

    def get_data_parallel_rank(self) -> int:
        return self.coords.dp

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.coords.pp

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.layout.pp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.layout.pp - 1


_STATE: ParallelState | None = None


def _my_group(all_groups: list[list[int]], rank: int):
    """Create every group (all ranks must call new_group in the same order) and keep ours."""
    mine = None
    for ranks in all_groups:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = group
    return mine


def initialize(layout: ParallelLayout) -> ParallelState:
    """Build the groups for ``layout`` on an initialised default process group."""
    global _STATE
    if _STATE is not None:
        raise RuntimeError("process groups are already initialised; call destroy() first")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised")
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"layout {layout} needs {layout.world_size} ranks, the world has {dist.get_world_size()}")
    rank = dist.get_rank()
    coords = layout.coords(rank)
    tp_group = _my_group(layout.tp_groups(), rank)
    _STATE = ParallelState(
        layout=layout,
        global_rank=rank,
        coords=coords,
        tp_group=tp_group,
        dp_group=_my_group(layout.dp_groups(), rank),
        pp_group=_my_group(layout.pp_groups(), rank),
        mp_group=_my_group(layout.mp_groups(), rank),
        tp=TensorParallelContext(size=layout.tp, rank=coords.tp, group=tp_group),
    )
    return _STATE


def single_process_state() -> ParallelState:
    """One process at TP 1 / PP 1 / DP 1 with no process groups, outside the registry.

    With no group every tensor-parallel op and the vocab-parallel loss are the identity, so a model built
    on it runs in this process without torch.distributed (no rendezvous, nothing left initialised).
    """
    layout = ParallelLayout()
    return ParallelState(layout=layout, global_rank=0, coords=layout.coords(0), tp_group=None, dp_group=None,
                         pp_group=None, mp_group=None, tp=TensorParallelContext())


def get() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("process groups are not initialised; call megatron_ucp.distributed.groups.initialize")
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None


def destroy() -> None:
    global _STATE
    _STATE = None
