"""What every command-line tool shares: the trust opt-in flag and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from megatron_ucp.checkpoint.trust import TRUST_FLAG, CheckpointError, one_line, trust_checkpoint_code


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(TRUST_FLAG, dest="trust_checkpoint_code", action="store_true",
                        help="unpickle checkpoint files with full pickle, which runs any code they carry; only "
                             "for files you trust (default: a restricted unpickler with an allowlist)")


def apply_trust_flag(args: argparse.Namespace) -> None:
    if getattr(args, "trust_checkpoint_code", False):
        trust_checkpoint_code(True)


def run_tool(body: Callable[[], int]) -> int:
    """Run a tool's body; bad input becomes ``error: <file>: <what>`` on stderr and exit code 2."""
    try:
        return body()
    except (CheckpointError, ValueError, OSError, MemoryError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
