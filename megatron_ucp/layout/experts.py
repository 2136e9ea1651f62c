"""Where each expert of a mixture-of-experts layer lives, as data (pure: no torch, no process groups).

An MoE block's experts are DeepSpeed's ``deepspeed.moe.layer.MoE``: every rank holds ``E / ep`` of the
``E`` experts of each layer, as ``mlp.deepspeed_moe.experts.deepspeed_experts.{local}.<param>``, where
``local`` counts from 0 on every expert-parallel rank. DeepSpeed's own expert files
(``layer_*_expert_{global}_mp_rank_*``) number them globally: expert-parallel rank ``r`` holds global experts
``[r * E/ep, (r + 1) * E/ep)``, local ``i`` being global ``r * E/ep + i``. Everything that must not
depend on the layout (initialisation, universal atoms, the HF mapping, the parameter table) speaks of
the *global* name; a module's own ``named_parameters`` give the *local* one. This module converts
between the two. The expert-parallel rank of a global rank is ``ParallelLayout.coords(rank).ep``
(``layout.topology``), DeepSpeed's expert-parallel group order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXPERTS = "mlp.deepspeed_moe.experts.deepspeed_experts."  # DeepSpeed's path to a layer's experts (ours: ``mlp``)
GATE = "mlp.deepspeed_moe.gate.wg.weight"  # the router's weight, [E, h], on every rank
# Any DeepSpeed MoE layer's expert parameter, whatever the model calls the MoE module (``mlp`` here; a model
# no project code built names it as it likes): ``<path>.deepspeed_moe.experts.deepspeed_experts.<index>.<param>``.
_EXPERT_RE = re.compile(r"^(.*?(?:^|\.)deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)\.(.+)$")


@dataclass(frozen=True)
class ExpertName:
    """A parameter name split at its expert index: ``{prefix}{index}.{suffix}``."""

    prefix: str  # up to the index: ``3.mlp.deepspeed_moe.experts.deepspeed_experts.``
    index: int
    suffix: str  # ``dense_h_to_4h.weight``

    def with_index(self, index: int) -> str:
        return f"{self.prefix}{index}.{self.suffix}"


def expert_name(name: str) -> ExpertName | None:
    """``name`` split at its expert index, or None for a parameter that is not an expert's."""
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    return ExpertName(m.group(1), int(m.group(2)), m.group(3))


@dataclass(frozen=True)
class ExpertPlacement:
    """``num_experts`` experts per layer over ``ep`` expert-parallel ranks, in contiguous blocks."""

    num_experts: int
    ep: int

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.ep < 1 or self.num_experts % self.ep:
            raise ValueError(f"expert parallel size {self.ep} does not divide the number of experts "
                             f"{self.num_experts}")

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep

    def experts_of(self, ep_rank: int) -> range:
        """The global experts expert-parallel rank ``ep_rank`` holds, in local order."""
        if not 0 <= ep_rank < self.ep:
            raise ValueError(f"expert parallel rank {ep_rank} outside expert parallel size {self.ep}")
        return range(ep_rank * self.num_local, (ep_rank + 1) * self.num_local)

    def owner(self, expert: int) -> tuple[int, int]:
        """(expert-parallel rank, local index) of global expert ``expert``."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} outside {self.num_experts} experts")
        return divmod(expert, self.num_local)

    def global_name(self, name: str, ep_rank: int) -> str:
        """A module's local parameter name on expert-parallel rank ``ep_rank`` -> its global name
        (unchanged for a parameter that is not an expert's)."""
        e = expert_name(name)
        if e is None:
            return name
        if not 0 <= e.index < self.num_local:
            raise ValueError(f"{name}: local expert {e.index} outside the {self.num_local} experts of a rank")
        return e.with_index(self.experts_of(ep_rank)[e.index])

    def local_name(self, name: str) -> tuple[int, str]:
        """A global parameter name -> (the expert-parallel rank holding it, its local name there);
        rank 0 and the name itself for a parameter that is not an expert's (every rank holds those)."""
        e = expert_name(name)
        if e is None:
            return 0, name
        rank, local = self.owner(e.index)
        return rank, e.with_index(local)
