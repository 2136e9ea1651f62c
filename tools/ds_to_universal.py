#!/usr/bin/env python
"""Convert a DeepSpeed ZeRO-1/2/3 checkpoint into DeepSpeed's universal checkpoint format.

A drop-in for ``python -m deepspeed.checkpoint.ds_to_universal``: the same flags and the same output
layout, in one pass with no temporary copy, plus the few files that let one output load at every
ZeRO stage (see ``megatron_ucp/checkpoint/universal.py``). ``--num_extract_workers`` and ``--num_merge_workers``
are both accepted; the larger sets the number of worker threads. ``--keep_temp_folder`` is accepted
and has nothing to keep.

    python tools/ds_to_universal.py --input_folder RUN/checkpoints/global_step100 \\
        --output_folder RUN/checkpoints_universal/global_step100_universal [--verify]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ucp.checkpoint.universal import convert_zero_to_universal  # noqa: E402
from megatron_ucp.checkpoint.zero import CheckpointError  # noqa: E402


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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--verify", action="store_true", help="re-read the output and check it against the input")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert_zero_to_universal(
            args.input_folder, args.output_folder,
            workers=max(args.num_extract_workers, args.num_merge_workers), overwrite=args.overwrite,
            strict=args.strict, inject_missing_state=args.inject_missing_state, verify=args.verify,
            progress=not args.quiet)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
