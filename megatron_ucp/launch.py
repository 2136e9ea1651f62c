"""Local launches: a free port, N spawned ranks, and a command run in a process group of its own.

Tests, the benchmarks and the logits check all start processes on this one machine. They share three
needs, each with a trap that is easy to get wrong in one copy:

* ``free_port()`` - a rendezvous port nobody listens on (the OS picks it; a fixed port collides when
  two runs share the machine).
* ``spawn_ranks(fn, world_size, *args)`` - ``torch.multiprocessing`` processes with the environment
  ``torchrun`` would set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``/``MASTER_PORT``); a failure on any rank is re-raised in the caller with that rank's
  traceback. The ranks talk through torch.distributed and DeepSpeed; this module only starts them.
* ``run_in_group(cmd, ...)`` - a command (``torchrun``, the trainer, a converter) in its own session.
  Killing only the direct child leaves its ranks running and holding ports and memory, so on a
  timeout, an interrupt or an exception the whole process group is ended, grandchildren included;
  ``start_in_group`` / ``end_group`` are the two halves for callers that watch the process while it
  runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from typing import Any, Callable, Sequence

LOCALHOST = "127.0.0.1"
DEFAULT_GRACE_S = 15.0  # SIGTERM -> SIGKILL: torchrun needs a moment to forward SIGTERM to its ranks


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picked it for a socket we closed)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int, host: str = LOCALHOST) -> dict[str, str]:
    """The variables ``torchrun`` sets for one local rank; ``init_process_group("env://")`` reads them."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": host, "MASTER_PORT": str(port)}


def _rank_main(rank: int, world_size: int, port: int, env: dict[str, str], fn: Callable[..., Any],
               args: tuple) -> None:
    """Body of one started rank (module level: it is pickled by name). ``env`` is the caller's
    environment at the call: a fork server's children would otherwise see the server's."""
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(rank_env(rank, world_size, port))
    fn(rank, world_size, *args)


# What the CPU fork server imports once, so that each rank starts in a fraction of a second instead of
# importing torch and DeepSpeed again (seconds per rank, and most of a small test's time).
# Beyond the top-level packages, what a training run imports lazily: torch.optim's AdamW imports
# torch._dynamo, DeepSpeed's optimizer check imports its Muon optimizer (torch.compile), and the
# engine its ZeRO stages and expert-parallel layers; seconds per rank otherwise, on every launch.
# The fork server skips a name that does not import (another DeepSpeed version).
FORKSERVER_PRELOAD = (
    "torch", "torch.distributed", "torch._dynamo", "torch._inductor", "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.superoffload.superoffload_stage3",
    "deepspeed.module_inject.auto_ep_layer", "deepspeed.runtime.pipe.engine", "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.bf16_optimizer",
    "megatron_ucp.training.trainer", "megatron_ucp.model.pipe", "megatron_ucp.model.sequential",
    "megatron_ucp.families",
)


def start_method() -> str:
    """``forkserver`` on CPU-only runs (``DS_ACCELERATOR=cpu``), ``spawn`` otherwise.

    The fork server is a fresh interpreter that imports ``FORKSERVER_PRELOAD`` and forks one child per
    rank; nothing of the caller's state is inherited. It never touches CUDA, but a rank forked from a
    process that imported CUDA-aware libraries is a risk not worth taking on GPUs, so those spawn.
    """
    return "forkserver" if os.environ.get("DS_ACCELERATOR") == "cpu" else "spawn"


_PRELOAD_SET = False


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, port: int | None = None) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh local processes and wait for all.

    ``fn`` must be picklable (a module-level function). It sets up its own process group (the
    environment above is ready for ``env://``). ``torch.multiprocessing`` stops the other ranks when
    one fails and re-raises that rank's error here, so a broken rank cannot leave its peers waiting
    forever in a collective.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    global _PRELOAD_SET
    method = start_method()
    if method == "forkserver" and not _PRELOAD_SET:
        multiprocessing.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # read when the server starts
        _PRELOAD_SET = True
    context = mp.start_processes(_rank_main, args=(world_size, free_port() if port is None else port,
                                                   dict(os.environ), fn, args),
                                 nprocs=world_size, join=False, start_method=method)
    assert context is not None  # join=False returns the processes' context
    try:
        while not context.join():
            pass
    finally:  # a rank that raised left its traceback in a temporary file, which torch never removes
        for path in context.error_files:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def start_in_group(cmd: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd)`` as the leader of a new session (and process group) of its own.

    Everything the command starts (torchrun's ranks, their helpers) inherits that group unless it
    leaves it on purpose, so ``end_group`` reaches all of it with one signal.
    """
    return subprocess.Popen(list(cmd), start_new_session=True, **popen_kwargs)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user (not ours to kill): nothing we can do
        return False
    return True


def end_group(proc: subprocess.Popen, grace_s: float = DEFAULT_GRACE_S) -> None:
    """End the group ``proc`` leads: SIGTERM, up to ``grace_s`` for the leader, then SIGKILL all of it.

    The final SIGKILL goes to the group even when the leader already exited: a rank that ignored
    SIGTERM, or was orphaned by its launcher, still carries the group id. ``grace_s=0`` kills at once.
    Returns once the leader is reaped.
    """
    if grace_s > 0 and _signal_group(proc.pid, signal.SIGTERM):
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def run_in_group(cmd: Sequence[str], *, timeout_s: float | None = None, grace_s: float = DEFAULT_GRACE_S,
                 **popen_kwargs: Any) -> int | None:
    """Run ``cmd`` in its own process group; its exit status, or None when it ran past ``timeout_s``.

    On a timeout, and on any exception while waiting (KeyboardInterrupt, a SIGTERM turned into
    SystemExit), the whole group is ended before returning or re-raising. After a normal exit whatever
    the command left running in its group is killed too: nothing it started outlives it.
    ``popen_kwargs`` go to ``subprocess.Popen`` (``env``, ``cwd``, ``stdout``, ...).
    """
    proc = start_in_group(cmd, **popen_kwargs)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        end_group(proc, grace_s)
        return None
    except BaseException:
        end_group(proc, grace_s)
        raise
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers only: the leader is gone
    return rc
