#!/usr/bin/env python
"""Tokenize a corpus into Megatron ``.bin``/``.idx`` files (thin CLI over ``preprocess``).

    python tools/preprocess_data.py --input data/austen/austen-novels.txt.xz \
        --output-prefix data/austen/austen --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model data/tokenizer/austen-bpe-8k.model --append-eod --workers 2

writes ``data/austen/austen_text_document.bin/.idx`` and ``.tokenizer.json`` (which tokenizer
wrote it).  ``--tokenizer-type HFTokenizer --tokenizer-model DIR`` reads a local Hugging Face
tokenizer folder.  The flags are Megatron-LM's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from megatron_ucp.cli import run_tool
from megatron_ucp.data.preprocess import preprocess
from megatron_ucp.data.tokenizer import SUPPORTED_TOKENIZERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help=".txt, .txt.xz (paragraph = document) or .jsonl/.json, or a folder of them "
                        "(sorted, not recursive)")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from JSON lines")
    parser.add_argument("--tokenizer-type", required=True, choices=SUPPORTED_TOKENIZERS)
    parser.add_argument("--tokenizer-model", help="SentencePiece .model file, or the folder of a "
                        "Hugging Face tokenizer for HFTokenizer")
    parser.add_argument("--vocab-file", help="GPT-2 vocab.json")
    parser.add_argument("--merge-file", help="GPT-2 merges.txt")
    parser.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--log-interval", type=int, default=10000,
                        help="documents between progress lines when stderr is not a terminal (0: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        report = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
        )
        for key, prefix in report.outputs.items():
            print(f"{key}: {prefix}.bin/.idx/.tokenizer.json")
        print(
            f"{report.documents} documents, {report.tokens} tokens"
            f" ({report.skipped} empty skipped) in {report.seconds:.2f} s"
        )
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
