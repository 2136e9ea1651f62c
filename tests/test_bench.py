"""megatron_ucp.bench, the helpers the benchmarks in tools/ share: what their own tests do not reach."""

from __future__ import annotations

import argparse

from megatron_ucp import bench


def test_paired_ratio_is_the_median_of_each_rounds_ratio():
    # Round 2 ran under load for both cases: paired, it still says 2x; the ratio of best walls (1.0 / 1.0)
    # or of means would not.
    assert bench.paired_ratio([1.0, 10.0, 3.0], [2.0, 5.0, 1.0]) == 2.0
    assert bench.paired_ratio([2.0, 4.0], [1.0, 0.0]) == 2.0  # a zero reference is no pair
    assert bench.paired_ratio([1.0], [0.0]) is None


def test_help_formatter_shows_only_defaults_that_say_something():
    p = argparse.ArgumentParser(formatter_class=bench.HelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="rounds")
    p.add_argument("--json", default=None, help="write here")
    p.add_argument("--quick", action="store_true", help="tiny sizes")
    text = " ".join(p.format_help().split())
    assert "rounds (default: 3)" in text
    assert "write here (default" not in text and "tiny sizes (default" not in text


def test_unaligned_table_keeps_cells_as_they_are():
    assert bench.markdown_table(["a", "bb"], [["1", "22222"]], right={1}, aligned=False) == \
        "| a | bb |\n|---|---:|\n| 1 | 22222 |"
    aligned = bench.markdown_table(["a", "bb"], [["1", "22222"]], right={1}).splitlines()
    assert aligned == ["| a |    bb |", "|---|------:|", "| 1 | 22222 |"]
