#!/usr/bin/env python
"""Benchmark planning a direct reshard at Llama-70B scale, by simulation (no checkpoint is written or read).

    python tools/benchmark_planning.py                    # Llama-70B shape, TP8 PP8 DP16 -> DP12 and -> TP4 PP8 DP32
    python tools/benchmark_planning.py --tiny             # a 4-layer model at TP2 PP2 DP2 (the smoke test)
    python tools/benchmark_planning.py --json plan.json --repeats 5

The source is the index a ZeRO-1 bf16 checkpoint of the model saved at ``--source`` would have
(``checkpoint.synthetic``: DeepSpeed's partitioning of our parameter table, built by the same indexing
code as ``open_zero_checkpoint``; ``tests/test_planning_sim.py`` checks it against real checkpoints).
For each target layout, the busiest target rank (the most bytes owned, which a plan reads), the median one
and the one with the most parameter pieces (``ranks_to_plan``: a pass over the target's index) are planned with the loader's own ``sliced_load._plans``
(``training.simulate``). Reported per rank, planning seconds are the median of ``--repeats`` runs on
this machine; files, ``preadv`` calls and bytes are what executing the plans would take
(``executors.preadv_runs``). The index a rank reads before it can plan is reported both ways: every
model-state file and every optimizer shard's header (the pickles DeepSpeed and our trainer write,
built with empty tensors and measured; seconds: one header of each kind timed, times their number),
or the compact index ``zero_index.json`` alone (written, then read and validated against sparse
stand-ins of the files).

Goals at this scale: planning <= 5 s and index reads <= 64 MB per rank, bytes read <= 1.1x owned.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ucp import bench  # noqa: E402
from megatron_ucp.config import ModelConfig  # noqa: E402
from megatron_ucp.layout.topology import ParallelLayout  # noqa: E402
from megatron_ucp.training.simulate import LLAMA_70B, Case, CaseResult, run_case  # noqa: E402

TINY = dict(LLAMA_70B, num_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
            ffn_hidden_size=96, vocab_size=50, max_position_embeddings=16, make_vocab_size_divisible_by=8)
GOAL_SECONDS, GOAL_INDEX_BYTES, GOAL_READ_RATIO = 5.0, 64 << 20, 1.1
MB = 1 << 20


def layout(text: str) -> ParallelLayout:
    """``TP8,PP8,DP16`` (any order, case-insensitive) -> a layout."""
    degrees = {}
    for part in text.lower().replace("-", ",").split(","):
        axis, value = part[:2], part[2:]
        if axis not in ("tp", "pp", "dp") or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. TP8,PP8,DP16")
        degrees[axis] = int(value)
    return ParallelLayout(**degrees)


def _name(lay: ParallelLayout) -> str:
    return f"TP{lay.tp} PP{lay.pp} DP{lay.dp}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=bench.HelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny Llama at TP2 PP2 DP2 -> TP2 PP2 DP1 and TP1 PP2 DP2")
    p.add_argument("--source", type=layout, default=None, help="the saved layout (default TP8,PP8,DP16)")
    p.add_argument("--target", type=layout, action="append", default=None,
                   help="a target layout (repeatable; default TP8,PP8,DP12 and TP4,PP8,DP32)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the source's training precision")
    p.add_argument("--repeats", type=int, default=3, help="planning runs per rank (the median is reported)")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


def table(results: list[CaseResult]) -> str:
    rows = []
    for r in results:
        for label, plan in r.ranks:
            ratio = plan.read_bytes / plan.owned_bytes if plan.owned_bytes else 0.0
            rows.append([r.case.name, f"{label} {plan.rank}", f"{plan.seconds:.3f}", f"{plan.pieces}",
                         f"{plan.files}", f"{plan.preads}", f"{plan.read_bytes / MB:,.1f}",
                         f"{plan.owned_bytes / MB:,.1f}", f"{ratio:.3f}"])
    plans = bench.markdown_table(["case", "target rank", "planning s", "pieces", "files", "preadv", "read MB",
                                  "owned MB", "read / owned"], rows, right=range(2, 9))
    index_rows = []
    for r in results:
        ix = r.index
        (before, before_s), (after, after_s) = ix.total(compact=False), ix.total(compact=True)
        index_rows.append([r.case.name, f"{ix.model_files} + {ix.shard_files} headers", f"{before / MB:,.2f}",
                           f"{before_s:.2f}", "1 index", f"{after / MB:,.2f}", f"{after_s:.2f}",
                           f"{r.index_seconds:.2f}"])
    index = bench.markdown_table(["case", "before: files", "MB", "s (est.)", "after: files", "MB", "s",
                                  "build index s"], index_rows, right=(2, 3, 5, 6, 7))
    return plans + "\n\n" + index


def verdicts(results: list[CaseResult]) -> list[str]:
    lines = []
    for r in results:
        worst = max(p.seconds for _, p in r.ranks) + r.index_seconds
        ratio = max(p.read_bytes / p.owned_bytes for _, p in r.ranks if p.owned_bytes)
        before, after = r.index.total(compact=False)[0], r.index.total(compact=True)[0]
        for what, value, goal, ok in [
            ("planning s (index build + plans, slowest rank)", f"{worst:.2f}", f"<= {GOAL_SECONDS:g}",
             worst <= GOAL_SECONDS),
            ("index MB per rank, with headers", f"{before / MB:.2f}", f"<= {GOAL_INDEX_BYTES // MB}",
             before <= GOAL_INDEX_BYTES),
            ("index MB per rank, with the compact index", f"{after / MB:.2f}", f"<= {GOAL_INDEX_BYTES // MB}",
             after <= GOAL_INDEX_BYTES),
            ("read / owned (max)", f"{ratio:.3f}", f"<= {GOAL_READ_RATIO}", ratio <= GOAL_READ_RATIO)]:
            lines.append(f"{r.case.name}: {what} {value} ({goal}): {'met' if ok else 'NOT met'}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        cfg = ModelConfig(**TINY)
        source = args.source or ParallelLayout(tp=2, pp=2, dp=2)
        targets = args.target or [ParallelLayout(tp=2, pp=2, dp=1), ParallelLayout(tp=1, pp=2, dp=2)]
        what = "tiny Llama (4 layers, hidden 64)"
    else:
        cfg = ModelConfig(**LLAMA_70B)
        source = args.source or ParallelLayout(tp=8, pp=8, dp=16)
        targets = args.target or [ParallelLayout(tp=8, pp=8, dp=12), ParallelLayout(tp=4, pp=8, dp=32)]
        what = "Llama-70B shape (80 layers, hidden 8192, GQA 64/8, SwiGLU 28672, vocabulary 128256)"
    results = [run_case(cfg, Case(f"{_name(source)} -> {_name(t)}", source, t), args.dtype, args.repeats)
               for t in targets]
    print(f"## Planning a direct reshard by simulation: {what}, ZeRO-1 {args.dtype}, "
          f"{source.tp * source.pp * source.dp} source ranks")
    print()
    print(table(results))
    print()
    for line in verdicts(results):
        print(line)
    if args.json:
        bench.write_json(args.json, {
            "command": bench.command_line(argv, __file__), "machine": bench.machine_info(),
            "cases": [{"case": r.case.name, "index_seconds": r.index_seconds, "index": dataclasses.asdict(r.index),
                       "ranks": [dict(dataclasses.asdict(p), label=label) for label, p in r.ranks]} for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
