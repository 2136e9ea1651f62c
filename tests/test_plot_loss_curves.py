"""Tests of the loss-curve comparison (megatron_ucp.evidence.loss_curves, tools/plot_loss_curves.py).

Losses are dyadic rationals (8 - i/64) and the injected differences powers of two, so every sum and
difference is exact in float64 and float32 and the verdict numbers can be asserted with ``==``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

from megatron_ucp.evidence.loss_curves import (
    DEFAULT_ATOL,
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
