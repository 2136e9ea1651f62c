#!/usr/bin/env python
"""Convert a DeepSpeed ZeRO-1/2/3 checkpoint into DeepSpeed's universal checkpoint format.

A drop-in for ``python -m deepspeed.checkpoint.ds_to_universal``: the same flags and the same output
layout, in one pass with no temporary copy, plus the few files that let one output load at every
ZeRO stage (see ``megatron_ucp/checkpoint/universal.py``). ``--num_extract_workers`` and ``--num_merge_workers``
are both accepted; the larger sets the number of worker threads. ``--keep_temp_folder`` is accepted
and has nothing to keep.

    python tools/ds_to_universal.py --input_folder RUN/checkpoints/global_step100 \\
        --output_folder RUN/checkpoints_universal/global_step100_universal

The output is verified against the input before it appears under its name, and rerunning a finished
conversion keeps it. Verifying includes reading a sample of each input file's tensor bytes both where
our reader located them and through ``torch.load`` (they must be equal); ``--certify`` compares every
byte so. Checkpoint files are unpickled with an allowlist (``--trust-checkpoint-code``
lifts it, for files you trust). A progress bar is drawn when stderr is a terminal (not with ``--quiet``).

Under ``torchrun`` the parameters are split between all its processes, by size, on one node or many
(the input and the output's parent must then be on a file system every node sees); the output is the
same, bit for bit, as one process's:

    torchrun --nnodes 1 --nproc_per_node 4 tools/ds_to_universal.py --input_folder ... --output_folder ...

The processes only synchronise (gloo, from the environment ``torchrun`` sets); process 0 prints the
summary and any error, and every process exits with the same status. Only processes that torchrun
itself started join together: a converter started from inside a running job (as a job script does at
rank 0 between phases) inherits that job's ``WORLD_SIZE`` and ``RANK`` and converts alone.
``--distributed`` joins the group the environment describes whatever started the process (the
``deepspeed`` launcher, srun); joining waits at most ``--join-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from datetime import timedelta
from typing import Iterator, Sequence

from megatron_ucp.checkpoint.universal import Partition, certify_universal, convert_zero_to_universal
from megatron_ucp.cli import add_trust_flag, apply_trust_flag, run_tool

# How long a process waits for the others at one synchronisation point: the slowest process's whole
# share of copying or verifying (hours for a very large checkpoint). A process that dies does not
# leave the others waiting that long: torchrun stops them.
SYNC_TIMEOUT = timedelta(hours=24)
# How long joining the others may take (the default of --join-timeout): every process of a launch starts
# within seconds of the others; a process that waits for peers that will never come stops after this.
JOIN_TIMEOUT_S = 300.0
# The variables a process group is described by, named in messages about joining it.
GROUP_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# How torchrun shows in its agent's command line: the script, or the module run with -m.
TORCHRUN_NAMES = (b"torchrun", b"torch.distributed.run", b"torch.distributed.launch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_folder", required=True, help="a ZeRO checkpoint folder, e.g. <save>/global_step100")
    p.add_argument("--output_folder", required=True, help="the universal checkpoint folder to create")
    p.add_argument("--num_extract_workers", type=int, default=2, help="worker threads (default 2)")
    p.add_argument("--num_merge_workers", type=int, default=1, help="accepted for compatibility; see --num_extract_workers")
    p.add_argument("--keep_temp_folder", action="store_true", help="accepted for compatibility; no temporary folder is made")
    p.add_argument("--no_strict", dest="strict", action="store_false", help="do not require every pattern to match")
    p.add_argument("--inject_missing_state", action="store_true",
                   help="convert a checkpoint without universal_checkpoint_info using DeepSpeed's defaults")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing universal checkpoint folder (nothing else) at the output")
    p.add_argument("--verify", action="store_true", help="accepted for compatibility: verification is the default")
    p.add_argument("--no-verify", "--no_verify", dest="no_verify", action="store_true",
                   help="skip re-reading the output against the input; the output is then marked unverified, "
                        "latest_universal is not written and the trainer refuses it")
    p.add_argument("--certify", action="store_true",
                   help="write nothing new: verify an existing output folder (e.g. DeepSpeed's converter's) "
                        "against the input, every input byte also read through torch.load, and mark it verified")
    add_trust_flag(p)
    p.add_argument("--distributed", action="store_true",
                   help="join the process group that WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT describe, even "
                        "if torchrun did not start this process (default: only torchrun's own processes join)")
    p.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long joining the other processes may take (default {JOIN_TIMEOUT_S:.0f})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def started_by_torchrun() -> bool:
    """Whether torchrun's agent started this very process: its variables are set and the parent process
    is torchrun. A process that one of torchrun's workers started inherits the variables, not the parent.
    Without /proc to read the parent's command line, the variables decide."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return True
    return any(os.path.basename(a) in TORCHRUN_NAMES or a in TORCHRUN_NAMES for a in argv)


def group_variables() -> str:
    """The process-group variables of this environment, for a message: ``WORLD_SIZE=2 RANK=0 ...``."""
    return " ".join(f"{k}={os.environ[k]}" for k in GROUP_VARIABLES if k in os.environ)


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[io.StringIO]:
    """Hold what is written to file descriptor 2 in the block (torch's C++ side logs each failed connection
    attempt there, with a stack): a failed join is then the one line it should be. The text is in the
    yielded buffer once the block has ended, whether or not it raised."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    held = io.StringIO()
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            held.write(f.read().decode(errors="replace"))


class JoinError(ValueError):
    """This process could not join the others (a one-line message naming the environment it read)."""


@contextlib.contextmanager
def processes(distributed: bool = False, join_timeout_s: float = JOIN_TIMEOUT_S) -> Iterator[Partition]:
    """This process's ``Partition``.

    * In a process whose default group is already initialised (a caller inside a job), its rank there.
    * Started by torchrun (``started_by_torchrun``), or ``distributed``, with ``WORLD_SIZE`` > 1: its rank
      in a gloo group joined from the environment within ``join_timeout_s``, then synchronised with
      ``SYNC_TIMEOUT``. Failing to join is a ``JoinError`` naming the variables found.
    * Otherwise alone, also when a job's ``WORLD_SIZE`` and ``RANK`` were merely inherited (a note says so).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield Partition.of_process_group()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Partition()
        return
    if not (distributed or started_by_torchrun()):
        print(f"note: {group_variables()} inherited, but torchrun did not start this process: converting in this "
              "process alone (--distributed joins the group they describe)", file=sys.stderr)
        yield Partition()
        return
    # DeepSpeed first: imported once a group exists (as reading the optimizer files' classes does), it keeps a
    # reference to the group, whose threads then outlive destroy_process_group and now and then abort the
    # interpreter's exit ("terminate called without an active exception").
    import deepspeed  # noqa: F401

    try:
        with _native_stderr_held() as held:
            dist.init_process_group("gloo", timeout=timedelta(seconds=join_timeout_s))
            group = dist.new_group(timeout=SYNC_TIMEOUT)  # every later wait may last a whole share of the work
        sys.stderr.write(held.getvalue())  # joined: what torch's C++ side said, as it would have said it
    except Exception as e:  # noqa: BLE001 - a store or peer that never answers, a port in use, bad variables
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JoinError(f"could not join the other conversion processes within {join_timeout_s:g} s "
                        f"({group_variables()}): {first}") from None
    try:
        yield Partition.of_process_group(group)
    finally:
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_trust_flag(args)

    def body(part: Partition) -> int:
        if args.certify:
            if part.rank == 0:  # reads every atom once; the other processes have nothing to do
                certify_universal(args.input_folder, args.output_folder, strict=args.strict,
                                  inject_missing_state=args.inject_missing_state)
                print(f"{args.output_folder}: verified against {args.input_folder}")
            return 0
        report = convert_zero_to_universal(
            args.input_folder, args.output_folder,
            workers=max(args.num_extract_workers, args.num_merge_workers), overwrite=args.overwrite,
            strict=args.strict, inject_missing_state=args.inject_missing_state, verify=not args.no_verify,
            progress=not args.quiet, partition=part)
        if part.rank == 0:
            print(report.summary())
        return 0

    with contextlib.ExitStack() as stack:
        try:
            part = stack.enter_context(processes(args.distributed, args.join_timeout))
        except JoinError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if part.world_size == 1:
            return run_tool(lambda: body(part))
        if part.rank == 0:
            rc = run_tool(lambda: body(part))
        else:  # every failure is raised in every process; process 0 reports it
            with contextlib.redirect_stderr(io.StringIO()):
                rc = run_tool(lambda: body(part))
        return max(part.all_gather(rc))  # --certify fails in process 0 only


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, which here only frees the modules of torch and DeepSpeed
    (about half a second on 2 cores, a tenth of a conversion of 5 GB). By now the output is published
    or removed, every file is closed and a process group is destroyed; the streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
