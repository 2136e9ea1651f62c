#!/usr/bin/env python
"""List a ZeRO or universal checkpoint, or compare two universal checkpoints tensor by tensor.

    python tools/inspect_checkpoint.py RUN/checkpoints/global_step100          # a ZeRO checkpoint
    python tools/inspect_checkpoint.py RUN/universal/global_step100_universal  # a universal one
    python tools/inspect_checkpoint.py --compare A_universal B_universal       # exit 1 if they differ
    python tools/inspect_checkpoint.py --compare --values-only A B             # atom values only
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


from megatron_ucp.checkpoint.inspect import compare_universal, describe_universal, describe_zero
from megatron_ucp.cli import add_trust_flag, apply_trust_flag, run_tool


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="checkpoint folder(s)")
    p.add_argument("--compare", action="store_true", help="compare two universal checkpoints")
    p.add_argument("--zero-only", action="store_true", help="with --compare: ignore the copied mp_rank files")
    p.add_argument("--values-only", action="store_true",
                   help="with --compare: only the atoms' values, flattened (e.g. against DeepSpeed's raw ZeRO-3 atoms)")
    add_trust_flag(p)
    args = p.parse_args(argv)
    apply_trust_flag(args)
    if args.compare and len(args.folders) != 2:
        p.error("--compare takes exactly two folders")

    def body() -> int:
        if args.compare:
            result = compare_universal(*args.folders, include_model_states=not args.zero_only,
                                       values_only=args.values_only)
            print(result.summary())
            return 0 if result.equal else 1
        for folder in args.folders:
            universal = os.path.isdir(os.path.join(folder, "zero"))
            print("\n".join(describe_universal(folder) if universal else describe_zero(folder)))
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
