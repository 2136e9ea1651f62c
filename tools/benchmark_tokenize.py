#!/usr/bin/env python
"""Tokenisation throughput and memory of ``tools/preprocess_data.py``: a side-by-side table.

    python tools/benchmark_tokenize.py                 # the bundled corpus, 3 paired rounds, a 200 MB jsonl
    python tools/benchmark_tokenize.py --quick         # a slice of it, one round, a 2 MB jsonl (the test)

Every tokenizer is built here, locally (no download):

* ``HFTokenizer``: a byte-level BPE trained with ``tokenizers`` on the corpus (``--vocab`` tokens),
  saved as a Hugging Face folder (``tokenizer.json``, ``tokenizer_config.json``);
* ``GPT2BPETokenizer``: the same BPE's ``vocab.json`` + ``merges.txt`` through our plain-Python GPT-2
  path, the one Megatron's ``--vocab-file/--merge-file`` users run;
* ``SentencePieceTokenizer``: the bundled 8k model.

Each case is ``tools/preprocess_data.py --append-eod`` on the corpus with 1 and 2 ``--workers``, run as
its own process; the rounds are paired (every case once per round, in the same order) and the table
shows medians. **tokens/s** counts the tokens written over the tool's own time (what it prints: after
its imports, with building the tokenizer and writing the dataset); **wall** is the whole process. **peak RSS** is the largest resident set of any one
process of the run (the tool or a worker), from ``getrusage(RUSAGE_CHILDREN)`` of a launcher that has
no other child. The memory case tokenises a jsonl of ``--memory-mb`` MB (the corpus's paragraphs
repeated) with the HF tokenizer, to show that preprocessing streams: its peak RSS must stay within
``--memory-limit-mb`` (500 MB), however large the input.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_ucp.bench import HelpFormatter, child_env, markdown_table, write_json

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "austen" / "austen-novels.txt.xz"
SP_MODEL = REPO / "data" / "tokenizer" / "austen-bpe-8k.model"

# Runs a command in a child and reports the child's exit code and the largest resident set among it and
# its descendants: this launcher has no other child, so RUSAGE_CHILDREN is theirs alone.
_LAUNCH = textwrap.dedent("""
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    print(json.dumps({"rc": run.returncode, "wall": time.perf_counter() - start, "stdout": run.stdout,
                      "stderr": run.stderr, "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")
_SUMMARY = re.compile(r"(\d+) documents, (\d+) tokens .* in ([0-9.]+) s")


@dataclass
class Run:
    wall: float
    seconds: float  # the tool's own tokenising time
    tokens: int
    documents: int
    peak_mb: float


@dataclass
class Case:
    name: str
    workers: int
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens / r.seconds for r in self.runs)


def build_tokenizers(corpus_text: str, folder: Path, vocab: int) -> dict[str, list[str]]:
    """The three tokenizers of the table, as ``tools/preprocess_data.py`` flags."""
    from megatron_ucp.data.tokenizer import train_byte_level_bpe

    hf = folder / "hf-bpe"
    bpe = train_byte_level_bpe(corpus_text.split("\n\n"), vocab, hf, bos_token="<|endoftext|>",
                               eos_token="<|endoftext|>", show_progress=True).backend_tokenizer
    gpt2 = folder / "gpt2-bpe"
    gpt2.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(gpt2))  # vocab.json and merges.txt
    return {"HFTokenizer": ["--tokenizer-type", "HFTokenizer", "--tokenizer-model", str(hf)],
            "GPT2BPETokenizer": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2 / "vocab.json"),
                                 "--merge-file", str(gpt2 / "merges.txt")],
            "SentencePieceTokenizer": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                                       str(SP_MODEL)]}


def run_case(flags: list[str], source: Path, out: Path, workers: int) -> Run:
    tool = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(source), "--output-prefix",
            str(out), "--append-eod", "--workers", str(workers), "--log-interval", "0", *flags]
    launched = subprocess.run([sys.executable, "-S", "-c", _LAUNCH, *tool], capture_output=True, text=True,
                              env=dict(child_env(REPO, cuda=False), TOKENIZERS_PARALLELISM="false"))
    result = json.loads(launched.stdout)
    if result["rc"] != 0:
        raise RuntimeError(f"preprocess_data failed ({result['rc']}): {result['stderr'].strip()[-2000:]}")
    m = _SUMMARY.search(result["stdout"])
    if m is None:
        raise RuntimeError(f"no summary line in: {result['stdout']!r}")
    shutil.rmtree(out.parent, ignore_errors=True)
    return Run(wall=result["wall"], seconds=float(m.group(3)), tokens=int(m.group(2)), documents=int(m.group(1)),
               peak_mb=result["peak_kb"] / 1024)


def write_jsonl(paragraphs: list[str], path: Path, megabytes: float) -> int:
    """A jsonl of at least ``megabytes`` MB, one paragraph per line, repeated; its size in bytes."""
    target, size = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            for p in paragraphs:
                line = json.dumps({"text": p}) + "\n"
                f.write(line)
                size += len(line.encode())
                if size >= target:
                    break
    return size


def table(cases: list[Case]) -> str:
    header = ["tokenizer", "workers", "rounds", "documents", "tokens", "tokens/s", "tool s", "wall s", "peak RSS MB"]
    rows = [[c.name, str(c.workers), str(len(c.runs)), str(c.runs[0].documents), str(c.runs[0].tokens),
             f"{c.tokens_per_s:,.0f}", f"{c.median('seconds'):.2f}", f"{c.median('wall'):.2f}",
             f"{c.median('peak_mb'):.0f}"] for c in cases]
    return markdown_table(header, rows, aligned=False)


def memory_verdict(memory: list[Case], limit_mb: float) -> tuple[float, str]:
    """(the largest peak RSS of the memory case's runs, PASS or FAIL against ``limit_mb``)."""
    worst = max(r.peak_mb for c in memory for r in c.runs)
    return worst, "PASS" if worst <= limit_mb else "FAIL"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--corpus", default=str(CORPUS), help="text corpus (.txt or .txt.xz, paragraph = document)")
    p.add_argument("--repeats", type=int, default=3, help="paired rounds (medians are shown)")
    p.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary trained for the HF and GPT-2 cases")
    p.add_argument("--memory-mb", type=float, default=200.0, help="size of the jsonl of the memory case")
    p.add_argument("--memory-limit-mb", type=float, default=500.0, help="the memory case's bound on peak RSS")
    p.add_argument("--quick", action="store_true", help="a 200 kB slice, one round, a 2 MB jsonl, a 1000-token BPE")
    p.add_argument("--json", help="also write the measurements here")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed after)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ucp.data.preprocess import split_paragraphs
    from megatron_ucp.data.tokenizer import read_text

    if args.quick:
        args.repeats, args.memory_mb, args.vocab = 1, min(args.memory_mb, 2.0), min(args.vocab, 1000)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    try:
        text = read_text(args.corpus)
        if args.quick:
            text = text[:200_000]
        source = work / "corpus.txt"
        work.mkdir(parents=True, exist_ok=True)
        source.write_text(text, encoding="utf-8")
        flags = build_tokenizers(text, work / "tokenizers", args.vocab)
        cases = [Case(name, workers) for name in flags for workers in (1, 2)]
        for r in range(args.repeats):
            for c in cases:
                c.runs.append(run_case(flags[c.name], source, work / f"out{r}" / "data", c.workers))
        jsonl = work / "memory.jsonl"
        size = write_jsonl(split_paragraphs(text), jsonl, args.memory_mb)
        memory = [Case("HFTokenizer", w, [run_case(flags["HFTokenizer"], jsonl, work / "outm" / "data", w)])
                  for w in (1, 2)]
        jsonl.unlink()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print(f"### Tokenisation of {args.corpus}{' (first 200 kB)' if args.quick else ''}, --append-eod, "
          f"medians of {args.repeats} paired round(s)\n")
    print(table(cases))
    print(f"\n### Memory: a {size / 1e6:.0f} MB jsonl, HFTokenizer (one run each)\n")
    print(table(memory))
    worst, verdict = memory_verdict(memory, args.memory_limit_mb)
    print(f"\npeak RSS of the memory case: {worst:.0f} MB (bound {args.memory_limit_mb:.0f} MB): {verdict}")
    if args.json:
        write_json(args.json, {"cases": [asdict(c) for c in cases], "memory": [asdict(c) for c in memory],
                               "jsonl_bytes": size, "memory_peak_mb": worst, "memory_ok": verdict == "PASS"})
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
