"""Tests of the loss-curve comparison (megatron_ucp.evidence.loss_curves, tools/plot_loss_curves.py).

Losses are dyadic rationals (8 - i/64) and the injected differences powers of two, so every sum and
difference is exact in float64 and float32 and the verdict numbers can be asserted with ``==``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
from pathlib import Path

import pytest

from megatron_ucp.evidence.loss_curves import (
    DEFAULT_ATOL,
    Curves,
    LossCurveError,
    compare,
    format_table,
    load_curves,
    write_report,
)
from megatron_ucp.training.logger import TAG_TRAIN_LOSS, TAG_VALID_LOSS

REPO = Path(__file__).resolve().parents[1]
BASE_TOPO = {"tp": 2, "pp": 2, "dp": 2, "zero_stage": 0, "dtype": "bf16"}
RESUME_TOPO = {"tp": 1, "pp": 2, "dp": 4, "zero_stage": 1, "dtype": "bf16"}
VALID_EVERY = 10
OUTPUTS = {"training_loss.png", "validation_loss.png", "training_loss.csv", "validation_loss.csv", "verdict.json"}


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return load_tool("plot_loss_curves")


def train_loss(i: int) -> float:
    return 8.0 - i / 64


def valid_loss(i: int) -> float:
    return 8.25 - i / 64


def records(its, topo, delta=None, valid_delta=None):
    delta = delta or {}
    valid_delta = valid_delta or {}
    out = []
    for i in its:
        out.append({"split": "train", "iteration": i, "loss": train_loss(i) + delta.get(i, 0.0), "lr": 1e-3,
                    "grad_norm": 1.0, "consumed_samples": 8 * i, "topology": topo})
        if i % VALID_EVERY == 0:
            out.append({"split": "valid", "iteration": i, "loss": valid_loss(i) + valid_delta.get(i, 0.0),
                        "topology": topo})
    return out


def write_run(folder: Path, recs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "loss.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return folder


@pytest.fixture
def baseline(tmp_path):
    return write_run(tmp_path / "baseline", records(range(1, 41), BASE_TOPO))


def resumed(tmp_path, name="resumed", **kw):
    return write_run(tmp_path / name, records(range(21, 41), RESUME_TOPO, **kw))


def verdict(out: Path) -> dict:
    return json.loads((out / "verdict.json").read_text())


def split(v: dict, name: str, k: int = 0) -> dict:
    return v["comparisons"][k]["splits"][name]


# ------------------------------------------------------------------------------------- verdicts


def test_exact_resume_passes_assert_equal(tool, tmp_path, baseline, capsys):
    run = resumed(tmp_path)
    out = tmp_path / "out"
    assert tool.main([str(baseline), str(run), "--output-dir", str(out), "--assert-equal"]) == 0
    v = verdict(out)
    assert v["pass"] is True and v["asserted"] is True
    c = v["comparisons"][0]
    assert c["reference"] == "TP2 PP2 DP2 bf16" and c["compared"] == "TP1 PP2 DP4 ZeRO-1 bf16"
    assert c["resume_iteration"] == 20 and c["resume_iteration_source"].startswith("first logged iteration (21)")
    t = split(v, "train")
    assert t["compared_iterations"] == {"count": 20, "first": 21, "last": 40}
    assert t["resume_iteration"] == 20
    assert (t["first_step_abs_diff"], t["first_step_rel_diff"], t["max_abs_diff"], t["mean_abs_diff"]) == (0, 0, 0, 0)
    assert t["exactly_equal"] is True and t["pass"] is True
    assert t["tolerance"] == {"mode": "assert-equal", "asserted": True, "atol": None, "rtol_first": None,
                              "exact": True}
    assert split(v, "valid")["compared_iterations"] == {"count": 2, "first": 30, "last": 40}
    assert set(os.listdir(out)) == OUTPUTS  # no temporary files left behind
    for png in ("training_loss.png", "validation_loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "Step" in text and "Reference" in text and "Compared" in text and "Difference" in text
    assert f"{21:>8}  {train_loss(21):>12.6f}  {train_loss(21):>12.6f}  {'+0.000000':>12}" in text
    assert "overall: PASS" in text


def test_small_differences_exact_numbers(tool, tmp_path, baseline):
    d1, d2 = 2.0 ** -12, -(2.0 ** -11)
    run = resumed(tmp_path, delta={21: d1, 35: d2}, valid_delta={30: 2.0 ** -13})
    out = tmp_path / "out"
    assert tool.main([str(baseline), str(run), "--output-dir", str(out), "--assert-close", "1e-3",
                      "--rtol-first", "1e-4"]) == 0
    t = split(verdict(out), "train")
    assert t["first_step_abs_diff"] == d1
    assert t["first_step_rel_diff"] == d1 / train_loss(21)
    assert t["max_abs_diff"] == 2.0 ** -11 and t["max_abs_diff_iteration"] == 35
    assert t["mean_abs_diff"] == (2.0 ** -12 + 2.0 ** -11) / 20
    assert t["unequal_count"] == 2 and t["pass"] is True
    assert t["tolerance"]["atol"] == 1e-3 and t["tolerance"]["rtol_first"] == 1e-4
    val = split(verdict(out), "valid")
    assert val["max_abs_diff"] == 2.0 ** -13 and val["first_step_abs_diff"] == 2.0 ** -13

    # Tighter than the injected difference: fails, exit code 1, and the verdict says why.
    assert tool.main([str(baseline), str(run), "--output-dir", str(out), "--assert-close", "1e-4"]) == 1
    v = verdict(out)
    assert v["pass"] is False
    assert any("iteration 35" in r and "exceeds atol 0.0001" in r for r in v["comparisons"][0]["reasons"])
    assert tool.main([str(baseline), str(run), "--output-dir", str(out), "--assert-equal"]) == 1
    reasons = verdict(out)["comparisons"][0]["reasons"]
    assert any("2 of 20 iterations differ; first at iteration 21" in r for r in reasons)
    assert any("validation loss: 1 of 2" in r for r in reasons)
    # The first step's relative difference is d1 / 7.671875 ~ 3.2e-5 (library call: no plots needed).
    ref, cmp = load_curves(baseline), load_curves(run)
    c = compare(ref, cmp, atol=1e-3, rtol_first=1e-5)
    assert not c.passed and len(c.reasons) == 1 and "rtol-first" in c.reasons[0]
    assert compare(ref, cmp, rtol_first=1e-4).passed


def test_negative_control_step_jump_fails(tool, tmp_path, baseline, capsys):
    """A resumed curve that jumps by 0.5 at its first iteration (and stays shifted) must fail."""
    run = resumed(tmp_path, delta={i: 0.5 for i in range(21, 41)}, valid_delta={30: 0.5, 40: 0.5})
    out = tmp_path / "out"
    assert tool.main([str(baseline), str(run), "--output-dir", str(out), "--assert-close", "1e-3"]) == 1
    v = verdict(out)
    t = split(v, "train")
    assert v["pass"] is False and t["pass"] is False
    assert t["first_step_abs_diff"] == 0.5 and t["max_abs_diff"] == 0.5 and t["mean_abs_diff"] == 0.5
    assert t["max_abs_diff_iteration"] == 21
    assert split(v, "valid")["pass"] is False
    assert "Verdict: FAIL" in capsys.readouterr().out
    assert set(os.listdir(out)) == OUTPUTS


def test_without_assertion_exit_zero_and_default_tolerance(tool, tmp_path, baseline):
    run = resumed(tmp_path, delta={i: 0.5 for i in range(21, 41)})
    out = tmp_path / "out"
    assert tool.main([str(baseline), str(run), "--output-dir", str(out)]) == 0
    v = verdict(out)
    tol = v["comparisons"][0]["tolerance"]
    assert v["asserted"] is False and tol["mode"] == "default" and tol["atol"] == DEFAULT_ATOL
    assert "no assertion requested" in tol["note"]
    assert v["pass"] is False  # recorded under the default tolerance, yet exit code 0

    exact = compare(load_curves(baseline), load_curves(resumed(tmp_path, name="exact")))
    assert exact.passed and exact.to_dict()["tolerance"]["mode"] == "default"


# ------------------------------------------------------------------------------------- always failing


def test_truncated_compared_run_fails(tool, tmp_path, baseline, capsys):
    """A resumed run that stopped early (21..22 of the reference's 21..40) is no evidence of a good resume."""
    short = write_run(tmp_path / "short", records(range(21, 23), RESUME_TOPO))
    ref, cmp = load_curves(baseline), load_curves(short)
    for kw in ({"atol": 1e-3}, {"exact": True}, {}):  # {}: no assertion, judged with the default tolerance
        c = compare(ref, cmp, resume_iteration=20, **kw)
        assert c.passed is False and c.train.passed is False and c.valid.passed is False
        assert c.reasons == [
            "training loss: the compared run lacks 18 of the 20 reference iteration(s) after the resume "
            "iteration 20 (iterations 23..40)",
            "validation loss: the compared run lacks 2 of the 2 reference iteration(s) after the resume "
            "iteration 20 (iterations 30, 40)"]
        assert c.train.reference_only == list(range(23, 41)) and c.valid.reference_only == [30, 40]

    out = tmp_path / "out"
    assert tool.main([str(baseline), str(short), "--output-dir", str(out), "--assert-close", "1e-3"]) == 1
    v = verdict(out)
    assert v["pass"] is False and split(v, "train")["reference_only_iterations"] == list(range(23, 41))
    assert any("lacks 18 of the 20" in r for r in v["comparisons"][0]["reasons"])
    text = capsys.readouterr().out
    assert "Verdict: FAIL" in text and "(iterations 23..40)" in text and "overall: FAIL" in text
    # Without an assertion the failure is recorded, never fatal.
    assert tool.main([str(baseline), str(short), "--output-dir", str(out)]) == 0
    assert verdict(out)["pass"] is False


def test_gap_fails_and_running_past_the_reference_passes(tmp_path, baseline):
    ref = load_curves(baseline)
    gap = load_curves(write_run(tmp_path / "gap", [r for r in records(range(21, 41), RESUME_TOPO)
                                                   if r["iteration"] != 33]))
    c = compare(ref, gap, atol=1e-3)
    assert not c.passed and c.reasons == ["training loss: the compared run lacks 1 of the 20 reference "
                                          "iteration(s) after the resume iteration 20 (iteration 33)"]
    no_eval = load_curves(write_run(tmp_path / "no_eval", [r for r in records(range(21, 41), RESUME_TOPO)
                                                           if r["split"] == "train"]))
    c = compare(ref, no_eval, atol=1e-3)
    assert c.train.passed and not c.valid.passed and not c.passed
    assert c.reasons == ["validation loss: the compared run lacks 2 of the 2 reference iteration(s) after the "
                         "resume iteration 20 (iterations 30, 40)"]
    # Iterations past the reference's end have nothing to be compared with; the overlap is judged.
    longer = load_curves(write_run(tmp_path / "longer", records(range(21, 51), RESUME_TOPO)))
    c = compare(ref, longer, atol=1e-3)
    assert c.passed and c.reasons == [] and c.train.compared_only == list(range(41, 51))
    assert c.train.iterations == list(range(21, 41)) and c.valid.iterations == [30, 40]


def test_nan_in_compared_run_fails(tool, tmp_path, baseline, capsys):
    ref = load_curves(baseline)
    nan = load_curves(resumed(tmp_path, name="nan", delta={25: math.nan}))
    for kw in ({"atol": 1e-3}, {"exact": True}, {"rtol_first": 1e-4}, {}):
        c = compare(ref, nan, **kw)
        assert c.passed is False and c.valid.passed is True
        assert c.reasons[0] == "training loss: non-finite loss in the compared run after the resume iteration " \
                               "20: nan at iteration 25"
    assert compare(ref, nan, rtol_first=1e-4).reasons == [c.reasons[0]]  # the first step itself is fine

    # Validation losses, and iterations past the reference's end, are held to the same rule.
    valid_inf = load_curves(resumed(tmp_path, name="valid_inf", valid_delta={40: -math.inf}))
    c = compare(ref, valid_inf, atol=1e-3)
    assert c.train.passed and not c.valid.passed
    assert c.valid.reasons[0] == ("validation loss: non-finite loss in the compared run after the resume "
                                  "iteration 20: -inf at iteration 40")
    late_nan = load_curves(write_run(tmp_path / "late_nan", records(range(21, 46), RESUME_TOPO,
                                                                    delta={44: math.nan, 45: math.inf})))
    c = compare(ref, late_nan, atol=1e-3)
    assert c.train.max_abs_diff == 0 and not c.passed
    assert c.reasons == ["training loss: non-finite loss in the compared run after the resume iteration 20: "
                         "iterations 44..45; first nan at iteration 44"]

    out = tmp_path / "out"
    assert tool.main([str(baseline), nan.source, "--output-dir", str(out), "--assert-close", "1e-3"]) == 1
    v = verdict(out)
    assert v["pass"] is False and split(v, "train")["non_finite_iterations"] == {"reference": [], "compared": [25]}
    assert "nan at iteration 25" in capsys.readouterr().out


def test_inf_in_reference_fails(tmp_path):
    ref = load_curves(write_run(tmp_path / "inf_base", records(range(1, 41), BASE_TOPO, delta={30: math.inf})))
    run = load_curves(resumed(tmp_path))
    c = compare(ref, run, atol=1e-3)
    assert not c.passed and c.reasons[0] == ("training loss: non-finite loss in the reference run after the "
                                             "resume iteration 20: inf at iteration 30")
    assert c.train.reference_non_finite == [30] and c.train.compared_non_finite == []
    # The same non-finite value in both runs is bitwise equal, and still fails.
    both = load_curves(resumed(tmp_path, name="both_inf", delta={30: math.inf}))
    c = compare(ref, both, exact=True)
    assert c.train.unequal_iterations == [] and not c.passed and len(c.reasons) == 2
    assert "reference run" in c.reasons[0] and "compared run" in c.reasons[1]
    # Before the resume the reference's losses are not part of the comparison.
    early = load_curves(write_run(tmp_path / "early_inf", records(range(1, 41), BASE_TOPO,
                                                                  delta={10: math.inf}, valid_delta={20: math.nan})))
    c = compare(early, run, exact=True)
    assert c.passed and c.reasons == []


def test_nothing_compared_fails(tool, tmp_path, baseline, capsys):
    ref = load_curves(baseline)
    late = load_curves(write_run(tmp_path / "late", records(range(41, 51), RESUME_TOPO)))
    expected = (r"nothing to compare: no training iteration after the resume iteration 40 "
                r".*\(compared run logged 41\.\.50, reference 1\.\.40\)")
    for kw in ({"atol": 1e-3}, {}):
        with pytest.raises(LossCurveError, match=expected):
            compare(ref, late, **kw)
    with pytest.raises(LossCurveError, match="nothing to compare"):
        compare(ref, load_curves(resumed(tmp_path)), resume_iteration=40)
    # The command fails too, with or without an assertion: exit 2, one line naming the compared run.
    out = tmp_path / "out"
    assert tool.main([str(baseline), late.source, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {late.source}: nothing to compare") and err.count("\n") == 1
    assert not out.exists()


def _curves(label: str, train: dict[int, float], valid: dict[int, float] | None = None) -> Curves:
    return Curves(label=label, source=f"{label}/loss.jsonl", kind="loss.jsonl", train=train, valid=valid or {})


def test_difference_equal_to_tolerance_passes_and_just_above_fails():
    above = math.nextafter(2.5, math.inf)
    assert above - 2.0 > 0.5 and 2.5 - 2.0 == 0.5
    ref = _curves("ref", {20: 1.0, 21: 2.0, 22: 2.0}, {22: 2.0})
    at = compare(ref, _curves("at", {21: 2.5, 22: 2.0}, {22: 2.5}), resume_iteration=20, atol=0.5, rtol_first=0.25)
    assert at.passed and at.reasons == [] and at.train.max_abs_diff == 0.5 and at.valid.max_abs_diff == 0.5
    assert at.train.first_step_rel_diff == 0.25

    c = compare(ref, _curves("above", {21: above, 22: 2.0}, {22: 2.0}), resume_iteration=20, atol=0.5)
    assert not c.passed and c.reasons == ["training loss: max |diff| 0.5 at iteration 21 exceeds atol 0.5"]
    c = compare(ref, _curves("above", {21: 2.5, 22: 2.0}, {22: above}), resume_iteration=20, atol=0.5)
    assert not c.passed and c.reasons == ["validation loss: max |diff| 0.5 at iteration 22 exceeds atol 0.5"]
    c = compare(ref, _curves("above", {21: above, 22: 2.0}, {22: 2.0}), resume_iteration=20, rtol_first=0.25)
    assert not c.passed and c.reasons == ["training loss: first compared iteration 21 relative |diff| 0.25 "
                                          "exceeds rtol-first 0.25"]
    # A difference below the reference is measured the same way.
    assert compare(ref, _curves("below", {21: 1.5, 22: 2.0}), resume_iteration=20, atol=0.5).train.passed
    assert not compare(ref, _curves("below", {21: math.nextafter(1.5, 0.0), 22: 2.0}), resume_iteration=20,
                       atol=0.5).train.passed


def test_tolerance_boundary_through_the_command(tool, tmp_path, capsys):
    def run(name, loss):
        return write_run(tmp_path / name, [{"split": "train", "iteration": i, "loss": loss if i == 21 else 2.0}
                                           for i in (21, 22)])

    base = write_run(tmp_path / "base", [{"split": "train", "iteration": i, "loss": 2.0} for i in range(1, 23)])
    out = tmp_path / "out"
    assert tool.main([str(base), str(run("at", 2.5)), "--output-dir", str(out), "--assert-close", "0.5"]) == 0
    assert verdict(out)["pass"] is True and split(verdict(out), "train")["max_abs_diff"] == 0.5
    above = run("above", math.nextafter(2.5, math.inf))
    assert tool.main([str(base), str(above), "--output-dir", str(out), "--assert-close", "0.5"]) == 1
    v = verdict(out)
    assert v["pass"] is False
    assert v["comparisons"][0]["reasons"] == ["training loss: max |diff| 0.5 at iteration 21 exceeds atol 0.5"]
    assert "overall: FAIL" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- alignment


def test_alignment_by_iteration_with_shuffled_and_duplicated_records(tool, tmp_path, baseline):
    base_recs = records(range(1, 41), BASE_TOPO)
    random.Random(0).shuffle(base_recs)
    # Earlier, wrong records for iterations 25 and 30 (train and valid), replaced by later ones.
    stale = [{"split": "train", "iteration": 25, "loss": 99.0, "topology": RESUME_TOPO},
             {"split": "valid", "iteration": 30, "loss": 99.0, "topology": RESUME_TOPO}]
    res_recs = stale + list(reversed(records(range(21, 41), RESUME_TOPO)))
    base = write_run(tmp_path / "shuffled_base", base_recs)
    run = write_run(tmp_path / "shuffled_resumed", res_recs)
    out = tmp_path / "out"
    assert tool.main([str(base), str(run / "loss.jsonl"), "--output-dir", str(out), "--assert-equal"]) == 0
    t = split(verdict(out), "train")
    assert t["compared_iterations"] == {"count": 20, "first": 21, "last": 40} and t["max_abs_diff"] == 0
    assert split(verdict(out), "valid")["max_abs_diff"] == 0

    # Reversed: the later (wrong) record wins, and is found at its iteration.
    bad = write_run(tmp_path / "later_wrong", records(range(21, 41), RESUME_TOPO)
                    + [{"split": "train", "iteration": 25, "loss": train_loss(25) + 0.25, "topology": RESUME_TOPO}])
    assert tool.main([str(baseline), str(bad), "--output-dir", str(out), "--assert-close", "0.1"]) == 1
    t = split(verdict(out), "train")
    assert t["max_abs_diff"] == 0.25 and t["max_abs_diff_iteration"] == 25 and t["unequal_count"] == 1


def test_resume_iteration_option_and_inherited_records(tmp_path, baseline):
    # A resumed run whose loss.jsonl kept the 1..20 records it inherited (at the baseline topology).
    inherited = write_run(tmp_path / "inherited",
                          records(range(1, 21), BASE_TOPO) + records(range(21, 41), RESUME_TOPO))
    ref, cmp = load_curves(baseline), load_curves(inherited)
    c = compare(ref, cmp)
    assert c.resume_iteration == 20 and "topology change" in c.resume_iteration_source
    assert c.train.iterations == list(range(21, 41))
    c = compare(ref, cmp, resume_iteration=30)
    assert c.resume_iteration_source == "given" and c.train.iterations == list(range(31, 41))
    assert c.valid.iterations == [40]


def test_csv_contents_are_exact(tool, tmp_path, baseline):
    d = 2.0 ** -12
    run = resumed(tmp_path, delta={22: d})
    out = tmp_path / "out"
    assert tool.main([str(baseline), str(run), "--output-dir", str(out), "--labels", "base", "res"]) == 0
    with open(out / "training_loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["iteration", "base", "res", "res - base"]
    expected = [[str(i), repr(train_loss(i)), "", ""] for i in range(1, 21)]
    expected += [[str(i), repr(train_loss(i)), repr(train_loss(i) + (d if i == 22 else 0.0)),
                  repr(d if i == 22 else 0.0)] for i in range(21, 41)]
    assert rows[1:] == expected
    with open(out / "validation_loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["iteration", "base", "res", "res - base"],
                    ["10", repr(valid_loss(10)), "", ""], ["20", repr(valid_loss(20)), "", ""],
                    ["30", repr(valid_loss(30)), repr(valid_loss(30)), "0.0"],
                    ["40", repr(valid_loss(40)), repr(valid_loss(40)), "0.0"]]


def test_several_compared_runs(tool, tmp_path, baseline):
    good = resumed(tmp_path, name="good")
    jump = resumed(tmp_path, name="jump", delta={i: 0.5 for i in range(21, 41)})
    out = tmp_path / "out"
    assert tool.main([str(baseline), str(good), str(jump), "--output-dir", str(out), "--assert-close", "1e-3"]) == 1
    v = verdict(out)
    # Same topology twice: labels are made distinct with the folder names.
    assert [c["compared"] for c in v["comparisons"]] == ["TP1 PP2 DP4 ZeRO-1 bf16 (good)",
                                                          "TP1 PP2 DP4 ZeRO-1 bf16 (jump)"]
    assert [c["pass"] for c in v["comparisons"]] == [True, False] and v["pass"] is False
    header = (out / "training_loss.csv").read_text().splitlines()[0]
    assert header.count(" - TP2 PP2 DP2 bf16") == 2


# ------------------------------------------------------------------------------------- TensorBoard


def write_events(folder: Path, its, delta=None):
    from torch.utils.tensorboard import SummaryWriter

    delta = delta or {}
    w = SummaryWriter(log_dir=str(folder))
    for i in its:
        w.add_scalar(TAG_TRAIN_LOSS, train_loss(i) + delta.get(i, 0.0), i)
        if i % VALID_EVERY == 0:
            w.add_scalar(TAG_VALID_LOSS, valid_loss(i), i)
    w.flush()
    w.close()
    return folder


def test_tensorboard_runs(tool, tmp_path, baseline):
    tb_run = tmp_path / "tb_resumed"
    write_events(tb_run / "tensorboard", range(21, 41), delta={23: 2.0 ** -10})
    cv = load_curves(tb_run)
    assert cv.kind == "tensorboard" and cv.label == "tb_resumed"
    assert cv.train == {i: train_loss(i) + (2.0 ** -10 if i == 23 else 0.0) for i in range(21, 41)}
    assert cv.valid == {30: valid_loss(30), 40: valid_loss(40)}
    events_file = next((tb_run / "tensorboard").glob("*tfevents*"))
    assert load_curves(events_file).train == cv.train

    out = tmp_path / "out"
    assert tool.main([str(baseline), str(tb_run), "--output-dir", str(out), "--assert-close", "1e-3"]) == 0
    t = split(verdict(out), "train")
    assert t["max_abs_diff"] == 2.0 ** -10 and t["max_abs_diff_iteration"] == 23
    assert verdict(out)["comparisons"][0]["compared_source"] == str(tb_run)

    # A folder with both: loss.jsonl is preferred over the events.
    both = write_run(tmp_path / "both", records(range(21, 41), RESUME_TOPO))
    write_events(both / "tb", range(21, 41), delta={i: 1.0 for i in range(21, 41)})
    cv = load_curves(both)
    assert cv.kind == "loss.jsonl" and cv.train[21] == train_loss(21)


# ------------------------------------------------------------------------------------- errors


def test_errors_name_the_file(tool, tmp_path, baseline, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope"
    assert tool.main([str(baseline), str(missing), "--output-dir", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    lines = [json.dumps(r) for r in records(range(21, 24), RESUME_TOPO)]
    lines.insert(2, '{"split": "train", "iteration": 23, "loss": ')
    (bad / "loss.jsonl").write_text("\n".join(lines) + "\n")
    assert tool.main([str(baseline), str(bad), "--output-dir", str(out)]) == 2
    assert f"{bad / 'loss.jsonl'}:3" in capsys.readouterr().err

    late = write_run(tmp_path / "late", records(range(41, 51), RESUME_TOPO))
    assert tool.main([str(baseline), str(late), "--output-dir", str(out), "--assert-close", "1"]) == 2
    err = capsys.readouterr().err
    assert str(late / "loss.jsonl") in err and "no training iteration after" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert tool.main([str(baseline), str(empty), "--output-dir", str(out)]) == 2
    assert str(empty) in capsys.readouterr().err

    assert tool.main([str(baseline), str(resumed(tmp_path)), "--output-dir", str(out), "--labels", "a"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert not out.exists()  # nothing written on an input error

    with pytest.raises(LossCurveError, match="no numeric 'loss'"):
        write_run(tmp_path / "noloss", [{"split": "train", "iteration": 1, "loss": None}])
        load_curves(tmp_path / "noloss")


BAD_LINES = {
    "not_json": '{"split": "train", "iteration": 21, "loss": ',
    "not_a_record": "[1, 2]",
    "list_split": '{"split": ["train"], "iteration": 21, "loss": 1.0}',
    "infinite_iteration": '{"split": "train", "iteration": Infinity, "loss": 1.0}',
    "huge_loss": '{"split": "train", "iteration": 21, "loss": 1' + "0" * 400 + "}",
    "bool_loss": '{"split": "train", "iteration": 21, "loss": true}',
    "string_loss": '{"split": "train", "iteration": 21, "loss": "1.0"}',
    "too_deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_input_is_one_error_line_exit_2(tool, tmp_path, baseline, capsys, name):
    run = tmp_path / name
    run.mkdir()
    (run / "loss.jsonl").write_text(json.dumps(records([21], RESUME_TOPO)[0]) + "\n" + BAD_LINES[name] + "\n")
    out = tmp_path / "out"
    assert tool.main([str(baseline), str(run), "--output-dir", str(out), "--assert-close", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {run / 'loss.jsonl'}") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and captured.out == "" and not out.exists()


def test_unreadable_inputs_are_one_error_line_exit_2(tool, tmp_path, baseline, capsys):
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "loss.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    corrupt = tmp_path / "corrupt_tb"
    corrupt.mkdir()
    (corrupt / "events.out.tfevents.1.host").write_bytes(b"\x00garbage" * 8)
    for run, what in ((tmp_path / "missing" / "loss.jsonl", "no such file or folder"),
                      (binary, "not a text file"), (corrupt, "no TensorBoard scalars")):
        assert tool.main([str(baseline), str(run), "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(run) in err and what in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------- library


def test_library_round_trip(tmp_path, baseline):
    ref = load_curves(baseline)
    cmp = load_curves(resumed(tmp_path, delta={21: 0.5}), label="jumped")
    c = compare(ref, cmp, atol=1e-3)
    assert not c.passed and c.train.first_step_abs_diff == 0.5 and c.to_dict()["pass"] is False
    table = format_table(c, max_rows=3)
    assert f"{21:>8}  {train_loss(21):>12.6f}  {train_loss(21) + 0.5:>12.6f}  {'+0.500000':>12}" in table
    assert "(17 more)" in table and "Verdict: FAIL" in table and "max |diff| = 5.000000e-01" in table
    paths = write_report([ref, cmp], [c], tmp_path / "report", title="UCP resume")
    assert {os.path.basename(p) for p in paths.values()} == OUTPUTS
    assert json.loads(Path(paths["verdict.json"]).read_text())["title"] == "UCP resume"


# ------------------------------------------------------------------ the load-balancing loss of MoE runs

MOE_LAYERS = 4  # the MoE layers whose unweighted load-balancing losses the logged moe_loss sums
MOE_BASE_TOPO = dict(BASE_TOPO, ep=2, dtype="fp32")
MOE_RESUME_TOPO = {"tp": 1, "pp": 4, "dp": 2, "zero_stage": 1, "dtype": "fp32"}
MOE_OUTPUTS = OUTPUTS | {"moe_loss.png", "moe_loss.csv"}


def moe_loss(i: int) -> float:
    return MOE_LAYERS * (2.0 + 1 / 8) - i / 256  # top-2 routing: a balanced layer gives 2 (E x sum f_i P_i)


def moe_records(its, topo, moe_scale=None, moe_delta=None, drop_moe=False):
    """``records`` with each training record's moe_loss: scaled by ``moe_scale[i]``, shifted by ``moe_delta[i]``,
    or left out (``drop_moe``: a resumed run that logged no load-balancing loss at all)."""
    out = records(its, topo)
    for rec in out:
        i = rec["iteration"]
        if rec["split"] == "train" and not drop_moe:
            rec["moe_loss"] = moe_loss(i) * (moe_scale or {}).get(i, 1.0) + (moe_delta or {}).get(i, 0.0)
    return out


@pytest.fixture
def moe_baseline(tmp_path):
    return write_run(tmp_path / "moe_baseline", moe_records(range(1, 41), MOE_BASE_TOPO))


def moe_resumed(tmp_path, name="moe_resumed", **kw):
    return write_run(tmp_path / name, moe_records(range(21, 41), MOE_RESUME_TOPO, **kw))


# The continuity acceptance in fp32: the first resumed step within 1e-5 relative, every step within 1e-4.
MOE_BOUNDS = ["--assert-close", "1e-4", "--rtol-first", "1e-5"]


def test_moe_loss_is_read_plotted_and_judged(tool, tmp_path, moe_baseline, capsys):
    run = moe_resumed(tmp_path, moe_delta={25: 2.0 ** -16})
    cv = load_curves(run)
    assert cv.moe == {i: moe_loss(i) + (2.0 ** -16 if i == 25 else 0.0) for i in range(21, 41)}
    assert load_curves(moe_baseline).label == "TP2 PP2 DP2 EP2 fp32"
    out = tmp_path / "out"
    assert tool.main([str(moe_baseline), str(run), "--output-dir", str(out), *MOE_BOUNDS]) == 0
    v = verdict(out)
    m = split(v, "moe")
    assert v["pass"] is True and m["pass"] is True and m["reasons"] == []
    assert m["compared_iterations"] == {"count": 20, "first": 21, "last": 40}
    assert (m["first_step_abs_diff"], m["max_abs_diff"], m["max_abs_diff_iteration"]) == (0, 2.0 ** -16, 25)
    assert m["tolerance"]["atol"] == 1e-4 and m["tolerance"]["rtol_first"] == 1e-5
    assert v["runs"][0]["moe"] == {"count": 40, "first": 1, "last": 40}
    assert set(os.listdir(out)) == MOE_OUTPUTS
    assert (out / "moe_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "moe_loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["iteration", "TP2 PP2 DP2 EP2 fp32", "TP1 PP4 DP2 ZeRO-1 fp32",
                       "TP1 PP4 DP2 ZeRO-1 fp32 - TP2 PP2 DP2 EP2 fp32"]
    assert rows[25] == ["25", repr(moe_loss(25)), repr(moe_loss(25) + 2.0 ** -16), repr(2.0 ** -16)]
    assert rows[1] == ["1", repr(moe_loss(1)), "", ""]
    text = capsys.readouterr().out
    assert "Load-balancing loss (20 compared iterations, 21..40)" in text and "overall: PASS" in text


def test_moe_loss_dropped_on_one_stage_fails_while_the_lm_loss_passes(tool, tmp_path, moe_baseline, capsys):
    """Negative control: the resumed run's aux loss misses one of the 4 layers (as if one pipeline stage's
    part were dropped): scaled by (L - 1) / L from the first resumed step. The LM loss is untouched."""
    scale = (MOE_LAYERS - 1) / MOE_LAYERS
    run = moe_resumed(tmp_path, moe_scale={i: scale for i in range(21, 41)})
    out = tmp_path / "out"
    assert tool.main([str(moe_baseline), str(run), "--output-dir", str(out), *MOE_BOUNDS]) == 1
    v = verdict(out)
    m = split(v, "moe")
    assert v["pass"] is False and m["pass"] is False
    assert split(v, "train")["pass"] is True and split(v, "valid")["pass"] is True
    assert m["first_step_abs_diff"] == moe_loss(21) / MOE_LAYERS
    assert m["first_step_rel_diff"] == 1 / MOE_LAYERS
    assert m["max_abs_diff"] == moe_loss(21) / MOE_LAYERS and m["max_abs_diff_iteration"] == 21
    reasons = v["comparisons"][0]["reasons"]
    assert len(reasons) == 2
    assert reasons[0].startswith("load-balancing loss: max |diff| ") and "exceeds atol 0.0001" in reasons[0]
    assert reasons[1] == "load-balancing loss: first compared iteration 21 relative |diff| 0.25 exceeds rtol-first 1e-05"
    assert "Verdict: FAIL" in capsys.readouterr().out


def test_moe_first_step_is_held_to_rtol_first(tmp_path, moe_baseline):
    # 2^-12 at the first resumed step: within atol 1e-3, but ~2.9e-5 relative to 8.42, above 1e-5.
    ref, cmp = load_curves(moe_baseline), load_curves(moe_resumed(tmp_path, moe_delta={21: 2.0 ** -12}))
    c = compare(ref, cmp, atol=1e-3, rtol_first=1e-5)
    assert not c.passed and c.train.passed and len(c.reasons) == 1
    assert c.reasons[0].startswith("load-balancing loss: first compared iteration 21 relative |diff| ")
    assert compare(ref, cmp, atol=1e-3, rtol_first=1e-4).passed
    # The same difference at a later step is only held to atol.
    assert compare(ref, load_curves(moe_resumed(tmp_path, "later", moe_delta={22: 2.0 ** -12})), atol=1e-3,
                   rtol_first=1e-5).passed


def test_resumed_run_without_moe_loss_fails(tmp_path, moe_baseline):
    c = compare(load_curves(moe_baseline), load_curves(moe_resumed(tmp_path, drop_moe=True)), atol=1e-4)
    assert not c.passed and c.train.passed and c.moe is not None and c.moe.count == 0
    assert c.reasons == ["load-balancing loss: the compared run lacks 20 of the 20 reference iteration(s) after "
                         "the resume iteration 20 (iterations 21..40)"]


def test_dense_runs_have_no_moe_split(tmp_path, baseline):
    c = compare(load_curves(baseline), load_curves(resumed(tmp_path)), atol=1e-4)
    assert c.moe is None and [sc.split for sc in c.splits] == ["train", "valid"]
    with pytest.raises(KeyError):
        c.split("moe")
    assert set(c.to_dict()["splits"]) == {"train", "valid"}
    assert "Load-balancing" not in format_table(c)


def test_moe_loss_from_tensorboard(tmp_path, moe_baseline):
    from torch.utils.tensorboard import SummaryWriter

    from megatron_ucp.training.logger import TAG_MOE_LOSS

    folder = tmp_path / "tb_moe"
    writer = SummaryWriter(log_dir=str(folder))
    for i in range(21, 41):
        writer.add_scalar(TAG_TRAIN_LOSS, train_loss(i), i)
        writer.add_scalar(TAG_MOE_LOSS, moe_loss(i), i)
        if i % VALID_EVERY == 0:
            writer.add_scalar(TAG_VALID_LOSS, valid_loss(i), i)
    writer.close()
    cv = load_curves(folder)
    assert cv.moe == {i: moe_loss(i) for i in range(21, 41)}  # dyadic: exact in float32 too
    assert compare(load_curves(moe_baseline), cv, atol=1e-4, rtol_first=1e-5).passed
