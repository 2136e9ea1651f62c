"""tools/benchmark_tokenize.py: its quick run measures every case and shows what it measured."""

import contextlib
import io
import json

import pytest

from helpers import load_tool

bt = load_tool("benchmark_tokenize")


@pytest.mark.slow
def test_quick_run_shows_the_measured_numbers(tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = bt.main(["--quick", "--json", str(tmp_path / "bench.json")])
    out = printed.getvalue()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert rc == 0 and data["memory_ok"] and "(bound 500 MB): PASS" in out
    cases = {(c["name"], c["workers"]): c["runs"][0] for c in data["cases"]}
    assert sorted(cases) == sorted((n, w) for n in ("HFTokenizer", "GPT2BPETokenizer", "SentencePieceTokenizer")
                                   for w in (1, 2))
    # one corpus: the same documents everywhere; the HF folder and the GPT-2 files hold the same BPE, so the
    # plain-Python GPT-2 path and the tokenizers library must write the same number of tokens
    assert len({r["documents"] for r in cases.values()}) == 1
    assert cases[("HFTokenizer", 1)]["tokens"] == cases[("GPT2BPETokenizer", 1)]["tokens"]
    assert all(cases[(n, 1)]["tokens"] == cases[(n, 2)]["tokens"] for n, _ in cases)
    for (name, workers), r in cases.items():
        row = f"| {name} | {workers} | 1 | {r['documents']} | {r['tokens']} | {r['tokens'] / r['seconds']:,.0f} | "
        assert row in out, row
    assert data["jsonl_bytes"] >= 2e6 and all(c["runs"][0]["peak_mb"] > 0 for c in data["memory"])


def test_memory_verdict_fails_above_the_bound():
    runs = [bt.Case("HFTokenizer", w, [bt.Run(wall=1, seconds=1, tokens=1, documents=1, peak_mb=mb)])
            for w, mb in ((1, 300.0), (2, 501.0))]
    assert bt.memory_verdict(runs, 500) == (501.0, "FAIL")
    assert bt.memory_verdict(runs[:1], 500) == (300.0, "PASS")
