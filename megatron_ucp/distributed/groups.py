"""The one registry of process groups (the only module-level mutable state in the project).

``initialize(layout)`` creates every process group in ``GROUP_AXES`` by name from the pure
``ParallelLayout`` (one loop: name -> the axes the group runs along) and returns a ``ParallelState``.
That object also answers DeepSpeed's ``mpu`` interface, so it can be handed to
``deepspeed.initialize(mpu=...)`` for a non-pipeline engine. Under a PipelineModule DeepSpeed refuses an
explicit mpu and uses the module's own grid, which GPTPipe builds from the same topology, so both see
identical groups (checked in tests/test_distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_ucp.distributed.random import RNGStatesTracker
from megatron_ucp.layout.topology import ParallelLayout, RankCoords


@dataclass
class UlyssesContext:
    """DeepSpeed-Ulysses sequence parallelism as a layer sees it: each of ``size`` ranks of ``group`` holds
    the sequence slice ``[rank * s / size, (rank + 1) * s / size)``; attention all-to-alls to whole
    sequences of ``1 / size`` of the heads and back (DeepSpeed's ``DistributedAttention``)."""

    size: int = 1
    rank: int = 0
    group: object = None

    def offset(self, local_length: int) -> int:
        """The position of this rank's first token in the whole sequence."""
        return self.rank * local_length


@dataclass
class TensorParallelContext:
    """What a tensor-parallel layer needs: its group, its place in it, and the per-rank RNG; and whether the
    activations between its regions are split along the sequence (Megatron's sequence parallelism,
    ``tensor_parallel/mappings.py``; set by the trainer from ``--sequence-parallel`` before it builds the model)."""

    size: int = 1
    rank: int = 0
    group: object = None
    rng: RNGStatesTracker = field(default_factory=RNGStatesTracker)
    sequence_parallel: bool = False
    ulysses: UlyssesContext = field(default_factory=UlyssesContext)  # the sp axis (``--ds-sequence-parallel-size``)


# Every process group we build, by name -> the axes it runs along (``ParallelLayout.groups``). One loop in
# ``initialize`` creates them all, in this order on every rank; ``mp`` is the pipe x tensor slice whose ranks
# DeepSpeed numbers ``mp_rank_XX``.
GROUP_AXES: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "mp": ("pp", "tp"),
    "sp": ("sp",),
    "ep": ("ep",),
    "sdp": ("dp", "sp"),  # sequence-data-parallel: the ranks DeepSpeed averages gradients over and ZeRO partitions
}


@dataclass
class ParallelState:
    layout: ParallelLayout
    global_rank: int
    coords: RankCoords
    groups: dict[str, object]  # GROUP_AXES name -> this rank's group (None in a single process)
    tp: TensorParallelContext

    def group(self, name: str):
        """This rank's process group ``name`` (a key of ``GROUP_AXES``)."""
        if name not in GROUP_AXES:
            raise KeyError(f"unknown process group {name!r}; the groups are {', '.join(GROUP_AXES)}")
        return self.groups.get(name)

    def rank_in(self, axis: str) -> int:
        """This rank's coordinate along ``axis``."""
        return self.coords[axis]

    def size_of(self, axis: str) -> int:
        """The degree of ``axis``."""
        return self.layout.degree(axis)

    # The groups under the attribute names the model and training code read.
    tp_group = property(lambda self: self.group("tp"))
    dp_group = property(lambda self: self.group("dp"))
    pp_group = property(lambda self: self.group("pp"))
    mp_group = property(lambda self: self.group("mp"))

    # DeepSpeed / Megatron mpu interface.
    def get_tensor_model_parallel_rank(self) -> int:
        return self.rank_in("tp")

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.size_of("tp")

    def get_tensor_model_parallel_group(self):
        return self.group("tp")

    def get_model_parallel_rank(self) -> int:
        return self.layout.checkpoint_mp_rank(self.rank_in("pp"), self.rank_in("tp"))

    def get_model_parallel_world_size(self) -> int:
        return self.layout.model_parallel_size

    def get_model_parallel_group(self):
        return self.group("mp")

    # DeepSpeed sees the sequence-parallel (Ulysses) ranks as data-parallel ones: it averages gradients and
    # ZeRO partitions over dp x sp (what its own Ulysses support does with the sequence-data-parallel group),
    # and each rank's loss is the mean over its slice of the sequence. With sp = 1 these are the dp group.
    def get_data_parallel_rank(self) -> int:
        return self.zero_rank

    def get_data_parallel_world_size(self) -> int:
        return self.size_of("dp") * self.size_of("sp")

    def get_data_parallel_group(self):
        return self.group("sdp")

    @property
    def zero_rank(self) -> int:
        """This rank's place among the dp x sp ranks: its ZeRO partition and optimizer file (``zero_pp_rank_N``)."""
        return self.rank_in("dp") * self.size_of("sp") + self.rank_in("sp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.rank_in("pp")

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.size_of("pp")

    def get_pipeline_model_parallel_group(self):
        return self.group("pp")

    @property
    def is_first_stage(self) -> bool:
        return self.rank_in("pp") == 0

    @property
    def is_last_stage(self) -> bool:
        return self.rank_in("pp") == self.size_of("pp") - 1


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
    mine = {name: _my_group(layout.groups(*axes), rank) for name, axes in GROUP_AXES.items()}
    ulysses = UlyssesContext(size=layout.degree("sp"), rank=coords["sp"], group=mine["sp"])
    _STATE = ParallelState(layout=layout, global_rank=rank, coords=coords, groups=mine,
                           tp=TensorParallelContext(size=layout.degree("tp"), rank=coords["tp"], group=mine["tp"],
                                                    ulysses=ulysses))
    return _STATE


def single_process_state() -> ParallelState:
    """One process at TP 1 / PP 1 / DP 1 with no process groups, outside the registry.

    With no group every tensor-parallel op and the vocab-parallel loss are the identity, so a model built
    on it runs in this process without torch.distributed (no rendezvous, nothing left initialised).
    """
    layout = ParallelLayout()
    return ParallelState(layout=layout, global_rank=0, coords=layout.coords(0),
                         groups={name: None for name in GROUP_AXES}, tp=TensorParallelContext())


def get() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("process groups are not initialised; call megatron_ucp.distributed.groups.initialize")
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None


def destroy() -> None:
    global _STATE
    _STATE = None
