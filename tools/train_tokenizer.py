#!/usr/bin/env python
"""Train the project's SentencePiece BPE tokenizer (thin CLI over ``train_sentencepiece``).

    python tools/train_tokenizer.py --input data/austen/austen-novels.txt.xz \
        --model-prefix data/tokenizer/austen-bpe-8k --vocab-size 8000

Reproducible: two runs on the same input give byte-identical ``.model`` files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from megatron_ucp.data.tokenizer import train_sentencepiece


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="UTF-8 corpus, .txt or .txt.xz")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, seed=args.seed)
    print(f"wrote {model} (vocab {args.vocab_size}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
