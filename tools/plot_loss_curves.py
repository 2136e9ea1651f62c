#!/usr/bin/env python
"""Plot and compare loss curves: a baseline run against runs resumed from its checkpoints.

    python tools/plot_loss_curves.py runs/baseline runs/resumed --output-dir evidence/ \\
        --resume-iteration 100 --assert-close 1e-3 --rtol-first 1e-4

Each RUN is a run folder (its ``loss.jsonl``, else TensorBoard events below it), a ``loss.jsonl`` or an
events file/folder. The first RUN is the reference; every other RUN is aligned with it by iteration
and compared on the iterations after the resume (default: its first logged iteration - 1). Writes
training_loss.png/.csv, validation_loss.png/.csv and verdict.json into --output-dir and prints a
step table. A mixture-of-experts run's load-balancing loss (loss.jsonl's ``moe_loss``) is a third curve,
moe_loss.png/.csv, held to the same --assert-close, --rtol-first and --assert-equal as the training loss. Exit code: 0 pass (or no assertion requested), 1 an assertion failed (including a resumed
run missing reference iterations after the resume, or a NaN/inf loss), 2 bad input (one line
``error: <file>: <what is wrong>`` on stderr; also when the runs share no training iteration after the resume).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from megatron_ucp.evidence.loss_curves import (
    LossCurveError,
    compare_runs,
    format_table,
    write_report,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folder, loss.jsonl, or TensorBoard events file/folder; the first is the reference")
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs, CSVs and verdict.json")
    parser.add_argument("--labels", nargs="+", help="one label per RUN (default: topology from loss.jsonl, "
                        "else the folder name)")
    parser.add_argument("--resume-iteration", type=int, help="the iteration the compared runs resumed after "
                        "(default: each compared run's first logged iteration - 1)")
    parser.add_argument("--assert-close", type=float, metavar="ATOL",
                        help="fail (exit 1) unless every |compared - reference| after the resume is <= ATOL")
    parser.add_argument("--rtol-first", type=float, metavar="R",
                        help="fail (exit 1) unless the first compared iteration's relative difference is <= R")
    parser.add_argument("--assert-equal", action="store_true",
                        help="fail (exit 1) unless every compared loss equals the reference exactly")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--rows", type=int, default=10, help="training iterations shown in the step table")
    return parser


def _one_line(message: str) -> str:
    # Messages quote exceptions (TensorBoard's, JSON's) that may span lines; the error stays one line.
    return " ".join(message.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (argparse already printed it)
        return int(e.code or 0)
    for name in ("assert_close", "rtol_first"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            print(f"error: --{name.replace('_', '-')} must be a non-negative number, got {value}", file=sys.stderr)
            return 2
    try:
        curves_list, comparisons = compare_runs(args.runs, labels=args.labels,
                                                resume_iteration=args.resume_iteration, atol=args.assert_close,
                                                rtol_first=args.rtol_first, exact=args.assert_equal)
        for i, comparison in enumerate(comparisons):
            if i:
                print("\n" + "=" * 72 + "\n")
            print(format_table(comparison, max_rows=args.rows))
        paths = write_report(curves_list, comparisons, args.output_dir, title=args.title)
    except LossCurveError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.output_dir}: {_one_line(str(e.strerror or e))}", file=sys.stderr)
        return 2
    print()
    for path in paths.values():
        print(f"wrote {path}")
    if not comparisons:
        print("one run: plotted, nothing compared")
        return 0
    passed = all(c.passed for c in comparisons)
    asserted = any(c.asserted for c in comparisons)
    if not asserted:
        print(f"overall: {'PASS' if passed else 'FAIL'} under the default tolerance (no assertion requested)")
        return 0
    print(f"overall: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
