"""Spawn N gloo ranks in fresh processes and run a module-level function on each.

``run_distributed(fn, world_size, *args)`` starts the ranks with ``megatron_ucp.launch.spawn_ranks``
(the environment torchrun would set: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), initialises the
default gloo group and calls ``fn(rank, world_size, *args)``. A failure on any rank fails the caller
with that rank's traceback (``torch.multiprocessing.spawn`` re-raises it). ``free_port`` is
re-exported for the tests that launch ``torchrun`` themselves.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest

from megatron_ucp.launch import free_port, spawn_ranks

__all__ = ["free_port", "run_distributed", "spawned_results", "report_check", "record_checks", "run_tp_checks"]


def _gloo_rank(rank, world_size, fn, args):
    """One spawned rank: CPU DeepSpeed, one thread, the default gloo group around ``fn``."""
    os.environ["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears down while a peer still communicates
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    spawn_ranks(_gloo_rank, world_size, fn, args)


def spawned_results(tmp_path_factory, worker, prefix: str):
    """``get(world_size)`` -> per-rank check results of ``worker``, spawned once per world size.

    ``worker(rank, world_size, out_dir)`` runs many checks and writes ``rank{r}.json`` mapping each
    check name to None (passed) or its traceback; a failed spawn is re-raised by every test that asks.
    """
    cache: dict[int, object] = {}

    def get(world_size: int) -> list[dict]:
        if world_size not in cache:
            out = tmp_path_factory.mktemp(f"{prefix}{world_size}")
            try:
                run_distributed(worker, world_size, str(out))
                cache[world_size] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
            except Exception as e:  # noqa: BLE001 - every test of this world size reports it
                cache[world_size] = e
        if isinstance(cache[world_size], Exception):
            raise cache[world_size]
        return cache[world_size]

    return get


def report_check(results: list[dict], name: str) -> None:
    """Fail with every rank's traceback if check ``name`` failed (or did not run) anywhere."""
    failures = []
    for rank, per_rank in enumerate(results):
        assert name in per_rank, f"check {name!r} did not run on rank {rank}"
        if per_rank[name] is not None:
            failures.append(f"--- rank {rank} ---\n{per_rank[name]}")
    if failures:
        pytest.fail(f"{name} failed on {len(failures)} of {len(results)} ranks:\n" + "\n".join(failures), pytrace=False)


CHECK_TIMEOUT = timedelta(seconds=20)  # a healthy check waits milliseconds on its peers


def record_checks(rank: int, out_dir: str, checks: dict) -> None:
    """Run every ``check()`` on this rank; write ``rank{r}.json`` of name -> None (passed) or its traceback."""
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = None
        except BaseException:  # noqa: BLE001 - pytest.raises failures are BaseException (Failed)
            results[name] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def run_tp_checks(rank: int, world_size: int, out_dir: str, checks: dict) -> None:
    """Run every ``check(ctx)`` on a TP context over all ranks; write ``rank{r}.json`` of name -> traceback.

    One TP group per check, all created up front, with a short timeout; the ranks re-synchronise on
    the default group between checks. A check that fails on one rank before a collective therefore
    strands its peers only in that check's group, for CHECK_TIMEOUT, and the next check starts in
    step on a clean group instead of pairing with stale collectives.
    """
    import torch.distributed as dist

    from megatron_ucp.distributed.groups import TensorParallelContext
    from megatron_ucp.distributed.random import MODEL_PARALLEL_RNG

    groups = [dist.new_group(list(range(world_size)), timeout=CHECK_TIMEOUT) for _ in checks]
    results = {}
    for (name, check), group in zip(checks.items(), groups):
        ctx = TensorParallelContext(size=world_size, rank=rank, group=group)
        ctx.rng.add(MODEL_PARALLEL_RNG, 1234 + 2718 + rank)
        try:
            check(ctx)
            results[name] = None
        except BaseException:  # noqa: BLE001 - pytest.raises failures are BaseException (Failed)
            results[name] = traceback.format_exc()
        dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
