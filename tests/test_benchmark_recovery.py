"""Smoke test of tools/benchmark_recovery.py: ``main(["--quick", "--repeats", "1", ...])`` once, end to end.

What the node-loss case itself must do (re-form, resume at 8 at DP2, continue the uninterrupted run's
losses) is ``tests/test_elastic.py``'s; here only the benchmark's own claims are checked: its table has a
row per phase and a column per route, each route resumed at iteration 8, and the first resumed losses of
the elastic run and of DeepSpeed's route, printed in the table, agree.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from helpers import load_tool

br = load_tool("benchmark_recovery")


def _table(printed: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, rows keyed by their first cell) of the printed markdown table."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in printed.splitlines() if line.startswith("| ")]
    return rows[0], {r[0]: r[1:] for r in rows[1:]}


@pytest.mark.slow
@pytest.mark.dist
def test_quick_benchmark_prints_each_phase_beside_deepspeeds_route_and_the_same_first_loss(tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = br.main(["--quick", "--repeats", "1", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    runs = {r["route"]: r for r in json.loads((tmp_path / "r.json").read_text())["runs"]}
    header, rows = _table(printed.getvalue())
    assert rc == 0, printed.getvalue()
    assert header == ["seconds from the kill", br.ROUTE_TEXT["elastic"], br.ROUTE_TEXT["deepspeed"]]
    phases = dict(br.PHASES)
    for key, route in (("failed", "elastic"), ("convert", "deepspeed"), ("rendezvous", "elastic"),
                       ("loaded", "elastic"), ("first", "elastic"), ("rendezvous", "deepspeed"),
                       ("loaded", "deepspeed"), ("first", "deepspeed")):
        column = 0 if route == "elastic" else 1
        assert rows[phases[key]][column] == f"{runs[route]['times'][key]:.1f}", (key, route)
    assert rows[phases["failed"]][1] == rows[phases["convert"]][0] == "—"
    assert rows["resumed at iteration"] == ["8", "8"]
    elastic, deepspeed = runs["elastic"]["loss"], runs["deepspeed"]["loss"]
    assert rows[f"loss of iteration {br.RESUMED_AT + 1}"] == [f"{elastic:.6e}", f"{deepspeed:.6e}"]
    assert abs(deepspeed - elastic) <= 1e-5 * abs(elastic)
    assert "first resumed losses agree within 1e-05 relative: yes" in printed.getvalue()


def test_a_first_loss_off_by_more_than_the_tolerance_is_reported():
    runs = [br.RouteRun("elastic", 0, loss=3.0), br.RouteRun("deepspeed", 0, loss=3.0 * (1 + 2e-5))]
    assert len(br.loss_disagreements(runs)) == 1
    runs[1].loss = 3.0 * (1 + 0.5e-5)
    assert br.loss_disagreements(runs) == []
