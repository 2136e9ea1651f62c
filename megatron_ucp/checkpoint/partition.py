"""Several processes converting one checkpoint together: who converts what, and agreeing on every step.

They only synchronise (a few small ``all_gather_object`` calls over gloo); a failure in any of them
stops all of them before anything is published.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from dataclasses import dataclass
from typing import Any, Iterator

from megatron_ucp.checkpoint.format import zero_dir
from megatron_ucp.checkpoint.publish import staged_folder
from megatron_ucp.checkpoint.trust import one_line
from megatron_ucp.checkpoint.zero import CheckpointError
from megatron_ucp.pacing import point


@dataclass(frozen=True)
class Partition:
    """This process's place among the processes that convert one checkpoint together.

    The default, ``world_size`` 1, is one process on its own (no ``torch.distributed`` needed). With more,
    every process calls ``convert_zero_to_universal`` with the same arguments and its own ``rank``; they
    coordinate over ``group`` (default: the default group, which must be initialised; gloo is enough)
    with a few small ``all_gather_object`` calls only: no tensor travels, every process reads its share
    from the input and writes it into the one staging folder (a file system all of them see).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of {self.world_size} processes")

    @classmethod
    def of_process_group(cls, group: Any = None) -> "Partition":
        """This process's rank and the size of ``group`` (default: the default group)."""
        import torch.distributed as dist

        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def all_gather(self, obj: Any) -> list:
        """Every process's ``obj`` (small, picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: BaseException | None, payload: Any = None) -> list:
        """Every process's ``payload``, once all of them got here. When any process failed (``error``), every
        process raises: the failed ones their own error, the others a ``CheckpointError`` repeating the first
        failure's one-line message, so that no process goes on (or waits forever) alone."""
        gathered = self.all_gather((None if error is None else _one_line(error), None if error else payload))
        if error is not None:
            raise error
        for r, (msg, _) in enumerate(gathered):
            if msg is not None:
                raise CheckpointError(f"{msg} (in conversion process {r} of {self.world_size})")
        return [p for _, p in gathered]

    def together(self) -> "_Together":
        """``with part.together() as step: ...; step.share = x``: the block runs here, then every process
        agrees (``agree``): a failure in any process's block raises in every process; else ``step.gathered``
        holds every process's ``share``."""
        return _Together(self)


class _Together:
    def __init__(self, part: Partition) -> None:
        self.part = part
        self.share: Any = None
        self.gathered: list = []

    def __enter__(self) -> "_Together":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # never swallows the block's exception
        if exc is not None and not isinstance(exc, Exception):
            return  # KeyboardInterrupt, SystemExit: the launcher stops the other processes
        self.gathered = self.part.agree(exc, self.share)  # raises exc itself when this block failed


def _one_line(e: BaseException) -> str:
    msg = one_line(e)
    return msg if isinstance(e, CheckpointError) else f"{type(e).__name__}: {msg}"


def assign_params(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Split parameters between ``world_size`` processes, balanced by size (``sizes``: name -> elements).

    Largest first, each to the process with the least so far (ties: the lower rank); names order equal
    sizes, so every process computes the same split. Each share is in that order, largest first. No
    process gets more than an even share plus the largest parameter (greedy list scheduling).
    """
    if world_size < 1:
        raise ValueError(f"world_size {world_size}: need at least one process")
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [(0, r) for r in range(world_size)]  # a heap of (elements so far, rank)
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, r = heapq.heappop(loads)
        shares[r].append(name)
        heapq.heappush(loads, (load + sizes[name], r))
    return shares


@contextlib.contextmanager
def shared_staging(part: Partition, out: str) -> Iterator[str]:
    """``staged_folder(out)`` made by process 0 (with its ``zero/``), its name given to every process.

    The block's steps must be agreed (``Partition.together``), so that it raises in every process or in
    none. When it completes, process 0 publishes (the marker must be there) and every process returns
    once that is done, or raises if publishing failed; when it raises, process 0 removes the folder.
    """
    completed = False
    publish_error: Exception | None = None
    try:
        with contextlib.ExitStack() as stack:
            with part.together() as step:
                if part.rank == 0:
                    tmp = stack.enter_context(staged_folder(out))
                    os.makedirs(zero_dir(tmp))
                    point("staged")
                    step.share = tmp
            yield step.gathered[0]
            completed = True
    except Exception as e:
        if not completed:
            raise  # the block's failure, which every process raises
        publish_error = e  # process 0's publishing
    part.agree(publish_error)
