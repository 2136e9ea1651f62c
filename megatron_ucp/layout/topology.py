"""Rank arithmetic for a (pipeline, data, tensor) parallel layout.

The axis order is DeepSpeed's ``PipeModelDataParallelTopology``: axes ``['pipe', 'data', 'model']``
with ``model`` (tensor parallel) fastest, so

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Tensor-parallel groups are therefore contiguous ranks, which keeps the chattiest collectives
inside a node. ``tests/test_layout.py`` checks every method against DeepSpeed's own topology.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the layout."""

    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of tensor (``tp``), pipeline (``pp``) and data (``dp``) parallelism."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for axis in ("tp", "pp", "dp"):
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel degree {axis} must be a positive integer, got {value!r}")

    @classmethod
    def from_world_size(cls, world_size: int, tp: int = 1, pp: int = 1) -> "ParallelLayout":
        """The layout whose data-parallel degree fills ``world_size`` ranks."""
        if world_size % (tp * pp):
            raise ValueError(
                f"world size {world_size} is not divisible by tensor parallel {tp} x pipeline parallel {pp}"
            )
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def model_parallel_size(self) -> int:
        """Ranks in one pipe x tensor slice; the number of ``mp_rank_XX`` files DeepSpeed writes."""
        return self.tp * self.pp

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        tp_rank = rank % self.tp
        dp_rank = (rank // self.tp) % self.dp
        pp_rank = rank // (self.tp * self.dp)
        return RankCoords(pp=pp_rank, dp=dp_rank, tp=tp_rank)

    def rank(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def checkpoint_mp_rank(self, pp: int, tp: int) -> int:
        """DeepSpeed's ``mp_rank_XX`` index under a PipelineModule: pp-major, then tp."""
        return pp * self.tp + tp

    # Process-group membership, each a list of rank lists in a deterministic order.
    def tp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups: all pipe x tensor ranks that share one data-parallel index."""
        return [[self.rank(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}

    @classmethod
    def from_dict(cls, d: dict) -> "ParallelLayout":
        return cls(tp=int(d["tp"]), pp=int(d["pp"]), dp=int(d["dp"]))

    def __str__(self) -> str:
        return f"TP{self.tp}-PP{self.pp}-DP{self.dp}"
