"""Rank arithmetic for a parallel layout whose axes are named: ``pp``, ``dp``, ``sp``, ``ep``, ``tp``.

The ranks form a grid over ``GRID_AXES`` = (pp, dp, sp, tp), slowest first. This is DeepSpeed's
``ProcessTopology(axes=['pipe', 'data', 'sequence', 'model'])`` (``PipeModelDataParallelTopology`` when
sp = 1) with ``model`` (tensor parallel) fastest, so

    rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

Tensor-parallel groups are therefore contiguous ranks, which keeps the chattiest collectives inside a node.

Expert parallelism (``ep``) is not a dimension of the grid: as in DeepSpeed's MoE, expert-parallel groups
are carved out of the data-and-sequence-parallel ranks. With ``i = dp_rank * sp + sp_rank`` a rank's place
among the dp x sp ranks of its (pp, tp) slice, its expert-parallel coordinate is ``i % ep`` and the ranks
of one expert-parallel group share ``i // ep``; so ``ep`` must divide ``dp * sp``.

Every process group is asked for by axis name (``groups('tp')``, ``groups('dp', 'sp')``, ...).
``tests/test_axes.py`` checks them against DeepSpeed's topology and MoE groups and Megatron's ordering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

AXES = ("pp", "dp", "sp", "ep", "tp")  # every named axis, in the grid's order (slowest first)
GRID_AXES = ("pp", "dp", "sp", "tp")  # the axes whose degrees multiply to the world size
CARVED_AXES = {"ep": ("dp", "sp")}  # an axis carved out of others' ranks -> those axes
DEEPSPEED_AXES = {"pp": "pipe", "dp": "data", "sp": "sequence", "tp": "model"}  # ProcessTopology's names
LEGACY_AXES = ("tp", "pp", "dp")  # what ``to_dict`` always writes, in this order (sp, ep only when > 1)


def _check_axes(axes: Iterable[str]) -> tuple[str, ...]:
    axes = tuple(axes)
    for axis in axes:
        if axis not in AXES:
            raise ValueError(f"unknown parallel axis {axis!r}; the axes are {', '.join(AXES)}")
    return axes


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the layout: its coordinate along every named axis."""

    pp: int
    dp: int
    tp: int
    sp: int = 0
    ep: int = 0

    def __getitem__(self, axis: str) -> int:
        return getattr(self, _check_axes((axis,))[0])


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of pipeline (``pp``), data (``dp``), sequence (``sp``), expert (``ep``) and tensor (``tp``)
    parallelism; ask by name with ``degree``, ``coords(rank)[axis]`` and ``groups(*axes)``."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for axis in LEGACY_AXES + tuple(a for a in AXES if a not in LEGACY_AXES):
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel degree {axis} must be a positive integer, got {value!r}")
        for axis, within in CARVED_AXES.items():
            room = math.prod(self.degree(a) for a in within)
            if room % self.degree(axis):
                raise ValueError(f"parallel degree {axis} {self.degree(axis)} does not divide "
                                 f"{' x '.join(within)} = {room}")

    @classmethod
    def from_world_size(cls, world_size: int, tp: int = 1, pp: int = 1, sp: int = 1,
                        ep: int = 1) -> "ParallelLayout":
        """The layout whose data-parallel degree fills ``world_size`` ranks."""
        if world_size % (tp * pp * sp):
            sequence = f" x sequence parallel {sp}" if sp != 1 else ""
            raise ValueError(f"world size {world_size} is not divisible by tensor parallel {tp} x pipeline "
                             f"parallel {pp}{sequence}")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp * sp), sp=sp, ep=ep)

    # -- by name ------------------------------------------------------------------------------------

    def degree(self, axis: str) -> int:
        return getattr(self, _check_axes((axis,))[0])

    @property
    def degrees(self) -> dict[str, int]:
        """Every axis's degree, in ``AXES`` order."""
        return {axis: self.degree(axis) for axis in AXES}

    @property
    def world_size(self) -> int:
        return math.prod(self.degree(a) for a in GRID_AXES)

    @property
    def model_parallel_size(self) -> int:
        """Ranks in one pipe x tensor slice; the number of ``mp_rank_XX`` files DeepSpeed writes."""
        return self.degree("tp") * self.degree("pp")

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        c: dict[str, int] = {}
        rest = rank
        for axis in reversed(GRID_AXES):  # fastest first
            rest, c[axis] = divmod(rest, self.degree(axis))
        for axis, within in CARVED_AXES.items():
            c[axis] = self._carved_index(c, within) % self.degree(axis)
        return RankCoords(**c)

    def rank_of(self, coords: Mapping[str, int]) -> int:
        """The rank at ``coords`` (grid axes by name; an axis left out is at 0; carved axes are ignored)."""
        _check_axes(coords)
        rank = 0
        for axis in GRID_AXES:
            value = coords.get(axis, 0)
            if not 0 <= value < self.degree(axis):
                raise ValueError(f"{axis} coordinate {value} outside degree {self.degree(axis)}")
            rank = rank * self.degree(axis) + value
        return rank

    def rank(self, pp: int, dp: int, tp: int, sp: int = 0) -> int:
        return self.rank_of({"pp": pp, "dp": dp, "sp": sp, "tp": tp})

    def checkpoint_mp_rank(self, pp: int, tp: int) -> int:
        """DeepSpeed's ``mp_rank_XX`` index under a PipelineModule: pp-major, then tp."""
        return pp * self.degree("tp") + tp

    def _carved_index(self, c: Mapping[str, int], within: tuple[str, ...]) -> int:
        """A rank's place among the ranks of the ``within`` axes (row-major in grid order)."""
        index = 0
        for axis in within:
            index = index * self.degree(axis) + c[axis]
        return index

    def _group_key(self, c: RankCoords, axes: tuple[str, ...]) -> tuple[int, ...]:
        """What the ranks of one group along ``axes`` share: their coordinates on every other axis."""
        fixed = [a for a in GRID_AXES if a not in axes]
        key = []
        for axis, within in CARVED_AXES.items():
            if axis in axes:
                mixed = [a for a in within if a in axes]
                if mixed:
                    raise ValueError(f"axis {axis} is carved out of {' x '.join(within)}; "
                                     f"a group cannot run along both {axis} and {mixed[0]}")
                fixed = [a for a in fixed if a not in within]
                key.append(self._carved_index({a: c[a] for a in within}, within) // self.degree(axis))
        return tuple(c[a] for a in fixed) + tuple(key)

    def groups(self, *axes: str) -> list[list[int]]:
        """The process groups along ``axes``: the rank lists whose members differ only in their coordinates
        on those axes, each ascending, ordered by first rank (the order every rank must create them in)."""
        axes = _check_axes(axes)
        if not axes:
            raise ValueError("a process group runs along at least one axis")
        members: dict[tuple[int, ...], list[int]] = {}
        for rank in range(self.world_size):
            members.setdefault(self._group_key(self.coords(rank), axes), []).append(rank)
        return list(members.values())

    def group_of(self, rank: int, *axes: str) -> list[int]:
        """The ranks of ``rank``'s group along ``axes``."""
        return next(g for g in self.groups(*axes) if rank in g)

    # Process-group membership under the names the rest of the code used before axes had names.
    def tp_groups(self) -> list[list[int]]:
        return self.groups("tp")

    def dp_groups(self) -> list[list[int]]:
        return self.groups("dp")

    def pp_groups(self) -> list[list[int]]:
        return self.groups("pp")

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups: all pipe x tensor ranks that share one data-parallel index."""
        return self.groups("pp", "tp")

    # -- records ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """``{"tp", "pp", "dp"}`` (as before axes had names), plus each other axis whose degree is not 1."""
        d = {axis: self.degree(axis) for axis in LEGACY_AXES}
        d.update({axis: self.degree(axis) for axis in AXES if axis not in d and self.degree(axis) != 1})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> "ParallelLayout":
        """Read ``to_dict`` or ``degrees``: tp, pp and dp required, an absent other axis has degree 1."""
        return cls(**{axis: int(d[axis]) for axis in LEGACY_AXES},
                   **{axis: int(d[axis]) for axis in AXES if axis not in LEGACY_AXES and axis in d})

    def __str__(self) -> str:
        extra = "".join(f"-{axis.upper()}{self.degree(axis)}" for axis in ("sp", "ep") if self.degree(axis) != 1)
        return f"TP{self.degree('tp')}-PP{self.degree('pp')}-DP{self.degree('dp')}{extra}"
