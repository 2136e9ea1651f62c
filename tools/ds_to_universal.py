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
summary and any error, and every process exits with the same status.
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@contextlib.contextmanager
def processes() -> Iterator[Partition]:
    """This process's ``Partition``: alone without torchrun's environment (``WORLD_SIZE`` unset or 1);
    else its rank in the default gloo group (initialised here from that environment unless it already is)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield Partition()
        return
    # DeepSpeed first: imported once a group exists (as reading the optimizer files' classes does), it keeps a
    # reference to the group, whose threads then outlive destroy_process_group and now and then abort the
    # interpreter's exit ("terminate called without an active exception").
    import deepspeed  # noqa: F401
    import torch.distributed as dist

    if dist.is_initialized():
        yield Partition.of_process_group()
        return
    dist.init_process_group("gloo", timeout=SYNC_TIMEOUT)
    try:
        yield Partition.of_process_group()
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

    with processes() as part:
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
