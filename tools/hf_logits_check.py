#!/usr/bin/env python
"""Compare logits of a Hugging Face folder and of our model loaded from a universal checkpoint.

    python tools/hf_logits_check.py --hf_dir HF_DIR --universal RUN/universal/hf_universal --tp 2 --pp 2 \\
        [--ep 2] [--batch 4 --seq 32 --seed 0] [--atol 1e-4]

The same random token batches go through ``transformers`` (fp32) and through our model at the given
TP/PP (fp32, spawned ranks); a mixture-of-experts model also at expert parallel size ``--ep`` (as
many data-parallel ranks, each with its share of the batch: ``--ep`` divides ``--batch``). Prints
max |Δlogit|, the per-sample KL (batchmean over positions) and top-1 agreement; with ``--atol`` exits
1 when max |Δlogit| exceeds it. ``--generate PROMPT`` also runs ``transformers``' ``generate`` on the
HF folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


from megatron_ucp.cli import run_tool
from megatron_ucp.hf.logits import check, generate_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf_dir", required=True, help="a Hugging Face model folder")
    p.add_argument("--universal", required=True,
                   help="a universal checkpoint folder, or the folder holding its latest_universal")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert parallel size of an MoE model (ranks: tp * pp * ep)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=None, help="fail (exit 1) when max |dlogit| exceeds this")
    p.add_argument("--generate", metavar="PROMPT", default=None,
                   help="also print a greedy transformers generate() continuation of PROMPT from --hf_dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def body() -> int:
        result = check(args.hf_dir, args.universal, tp=args.tp, pp=args.pp, ep=args.ep, batch=args.batch,
                       seq=args.seq, seed=args.seed)
        print(f"TP{args.tp} PP{args.pp}{f' EP{args.ep}' if args.ep > 1 else ''}: {result.summary()}")
        if args.generate is not None:
            print(f"generate: {args.generate!r} -> {generate_text(args.hf_dir, args.generate)!r}")
        if args.atol is not None and not result.max_abs <= args.atol:
            print(f"error: max |dlogit| {result.max_abs:.3e} exceeds {args.atol:g}", file=sys.stderr)
            return 1
        return 0

    return run_tool(body)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
