"""Spawn N gloo ranks in fresh processes and run a module-level function on each.

``run_distributed(fn, world_size, *args)`` sets the environment torchrun would (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT), initialises the default gloo group and calls
``fn(rank, world_size, *args)``. A failure on any rank fails the caller with that rank's traceback
(``torch.multiprocessing.spawn`` re-raises it).
"""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
    })
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
