"""Smoke test of tools/benchmark_loading.py: ``main(["--quick", "--json", ...])`` once, end to end.

The quick benchmark (a tiny GPT; one TP2 PP2 DP2 ZeRO-1 source; three targets x three loaders; one
timing round) runs once per module. The tests check that the printed tables show the numbers of the
JSON (recomputed here from the per-rank measurements, formatted independently), that the direct
reshard and the sliced universal loader meet the bytes criterion, and that the measurement can see
amplification at all: DeepSpeed's loader, which reads whole atoms, must come out above 1x at the
ZeRO-3 target and at the targets that change TP.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time

import pytest

from helpers import load_tool

pytestmark = [pytest.mark.dist, pytest.mark.slow]

bl = load_tool("benchmark_loading")
MiB = 1 << 20
SOURCE_TP = 2
ZERO3 = "TP1 PP1 DP4 ZeRO-3"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(exit status, printed report, JSON, wall seconds) of one quick run."""
    out = tmp_path_factory.mktemp("bench_loading") / "bench.json"
    printed = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(printed):
        rc = bl.main(["--quick", "--json", str(out)])
    wall = time.monotonic() - start
    print(f"quick loading benchmark: {wall:.1f} s")
    return rc, printed.getvalue(), json.loads(out.read_text()), wall


def _section(printed: str, title: str) -> dict[str, list[str]]:
    """Rows of the markdown table under the ``### title...`` heading, keyed by their first cells."""
    lines = printed.split(f"### {title}", 1)[1].split("\n### ", 1)[0].splitlines()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")]
    return {" / ".join(r[:2]) if title.startswith("Bytes") else r[0]: r for r in rows[1:]}  # rows[0]: header


def _mib(n: float) -> str:
    return f"{n / MiB:,.2f}"


def _passes(row: dict) -> bool:
    return all(r <= 1.1 * o + MiB for r, o in zip(row["read"], row["owned"]))


def test_bytes_table_shows_the_measured_numbers(quick):
    rc, printed, data, _ = quick
    rows = data["bytes"]["rows"]
    table = _section(printed, "Bytes read per rank")
    assert [(r["target"], r["loader"]) for r in rows] == [
        (t, loader) for t in ("TP2 PP2 DP2 ZeRO-1", "TP1 PP1 DP4 ZeRO-1", ZERO3)
        for loader in (("native",) if t == "TP2 PP2 DP2 ZeRO-1" else ("direct",)) + ("sliced", "deepspeed")]
    assert len(table) == len(rows)
    for r in rows:
        assert r["status"] == "ok"
        ranks = 8 if r["target"].startswith("TP2") else 4
        assert len(r["read"]) == len(r["owned"]) == len(r["baseline"]) == ranks
        # read = the load window's rchar minus the no-load baseline; owned = 3 fp32 states of the partition
        assert all(0 < b < 4096 for b in r["baseline"]), r["baseline"]
        assert all(o > 0 and o % 12 == 0 for o in r["owned"]), r["owned"]
        ratios = [rd / o for rd, o in zip(r["read"], r["owned"])]
        verdict = "PASS" if _passes(r) else "FAIL"
        required = r["loader"] in ("direct", "sliced")
        crit = verdict if required else "n/a (native)" if r["loader"] == "native" else f"({verdict})"
        assert r["criterion"] == (verdict if required else None)
        assert table[f"{r['target']} / {r['loader']}"] == [
            r["target"], r["loader"], _mib(max(r["read"])), _mib(sum(r["read"])), _mib(max(r["owned"])),
            _mib(sum(r["owned"])), f"{max(ratios):.2f}x", f"{sum(r['read']) / sum(r['owned']):.2f}x", crit]
        assert (r["read_max"], r["read_sum"], r["owned_max"], r["owned_sum"]) == (
            max(r["read"]), sum(r["read"]), max(r["owned"]), sum(r["owned"]))
    assert rc == (0 if data["ok"] else 1)


def test_measurement_sees_what_it_must(quick):
    """Socket traffic is not in rchar, every loader loaded the same state, the loaders' own count of
    state bytes fits in what rchar measured, and the resumed first step is the same on every route."""
    _, printed, data, _ = quick
    b = data["bytes"]
    assert all(p < MiB for ps in b["socket_probe_rchar"].values() for p in ps), b["socket_probe_rchar"]
    assert b["same_state_ok"], b["same_state"]
    for row in b["rows"]:
        if row["loader"] in ("direct", "sliced"):
            assert row["plan"] and all(p <= rd for p, rd in zip(row["plan"], row["read"])), row
    assert not any(row["window_imports"] for row in b["rows"])
    t = data["time"]
    assert t["same_first_loss"] and "first resumed step's loss identical across routes: yes" in printed
    assert [r["route"] for r in t["runs"]] == ["direct", "ds-convert", "ours-convert"]  # round 0's order


def test_time_table_shows_the_medians(quick):
    _, printed, data, _ = quick
    runs = data["time"]["runs"]
    table = _section(printed, "Time to the end of the first resumed step")
    assert len(table) == len(bl.ROUTES)
    direct_total = {r["round"]: r["convert_s"] + r["resume_s"] for r in runs if r["route"] == "direct"}
    for route in bl.ROUTES:
        mine = [r for r in runs if r["route"] == route]
        med = {k: statistics.median(r[k] for r in mine) for k in ("convert_s", "startup_build_s", "load_s", "step_s")}
        total = statistics.median(r["convert_s"] + r["resume_s"] for r in mine)
        ratio = statistics.median((r["convert_s"] + r["resume_s"]) / direct_total[r["round"]] for r in mine)
        assert table[bl.ROUTE_TEXT[route]] == [
            bl.ROUTE_TEXT[route], str(len(mine)), f"{med['convert_s']:.2f}", f"{med['startup_build_s']:.2f}",
            f"{med['load_s']:.2f}", f"{med['step_s']:.2f}", f"{total:.2f}", f"{ratio:.2f}x", f"{mine[0]['loss']:.6f}"]
        for r in mine:
            assert r["resume_s"] > r["load_s"] > 0 and r["step_s"] > 0
            assert (r["convert_s"] == 0) == (route == "direct")
            assert (r["certify_s"] is not None) == (route == "ds-convert")


def test_deepspeed_loader_reads_more_than_it_owns(quick):
    """The method check: whole-atom reads must show up (about DP x at ZeRO-3, above 1x where TP changes)."""
    _, printed, data, _ = quick
    ds = {r["target"]: r for r in data["bytes"]["rows"] if r["loader"] == "deepspeed"}
    tp_changing = [t for t in ds if bl.Layout.parse(t).tp != SOURCE_TP]
    assert ZERO3 in tp_changing and len(tp_changing) == 2
    for target in {ZERO3, *tp_changing}:
        assert ds[target]["ratio_max"] > 1 and ds[target]["ratio_sum"] > 1, (target, ds[target]["ratio_max"])
    assert ds[ZERO3]["ratio_sum"] > 0.75 * 4  # every rank reads every whole atom: about DP = 4
    assert data["bytes"]["method_check_holds"]
    assert "method check - DeepSpeed's loader reads more than it owns" in printed and "-> holds" in printed


def test_direct_and_sliced_rows_pass(quick):
    _, _, data, _ = quick
    rows = [r for r in data["bytes"]["rows"] if r["loader"] in ("direct", "sliced")
            and not (r["loader"] == "sliced" and r["target"] == ZERO3)]
    assert len(rows) == 4  # direct at both DP4 targets, sliced at TP2 PP2 DP2 and DP4 ZeRO-1
    for r in rows:
        assert _passes(r) and r["criterion"] == "PASS", (r["target"], r["loader"], r["read"], r["owned"])


def test_sliced_zero3_row_passes(quick):
    _, _, data, _ = quick
    (r,) = [r for r in data["bytes"]["rows"] if r["loader"] == "sliced" and r["target"] == ZERO3]
    assert _passes(r) and r["criterion"] == "PASS", (r["read"], r["owned"])


def test_layout_parsing_and_round_rotation():
    assert bl.Layout.parse("tp1-pp4-dp1") == bl.Layout(1, 4, 1, 1)
    assert bl.Layout.parse("TP1 PP1 DP4 ZeRO-3") == bl.Layout.parse("tp1-pp1-dp4-z3") == bl.Layout(1, 1, 4, 3)
    with pytest.raises(Exception, match="expected like"):
        bl.Layout.parse("tp1-dp4")
    orders = [bl.round_order(r) for r in range(3)]
    assert [o[0] for o in orders] == list(bl.ROUTES) and all(sorted(o) == sorted(bl.ROUTES) for o in orders)
    line = ("resumed from /x/mp_rank_00_model_states.pt at iteration 1 (saved at {'tp': 2, 'pp': 2, 'dp': 2}, now "
            "{'tp': 1, 'pp': 1, 'dp': 4}); direct reshard TP2 PP2 DP2 ZeRO-1 fp32 -> TP1 PP1 DP4 ZeRO-3 fp32; "
            "state bytes read per rank: 1,234, 5,678, 9, 10")
    assert bl.route_of(line) == "direct reshard TP2 PP2 DP2 ZeRO-1 fp32 -> TP1 PP1 DP4 ZeRO-3 fp32"
    assert bl.parse_plan_bytes(line) == [1234, 5678, 9, 10]
    assert bl.parse_plan_bytes("resumed from x (saved at {}, now {}); same layout") is None
