"""Tests of tools/benchmark_training.py: parsing, statistics, table, CLI wiring, and one tiny plain-loop run."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import pytest

from helpers import load_tool




bt = load_tool("benchmark_training")

# Real output of `torchrun ... -m megatron_ucp.train ... --log-interval 1 --eval-interval 0` (TP2-PP2-DP2 run),
# with the noise a log holds between progress lines.
SAMPLE_LOG = """\
[2026-11-23 05:24:01,123] [INFO] [real_accelerator.py:213:get_accelerator] Setting ds_accelerator to cpu
training TP2-PP2-DP2 ZeRO-1 bf16: vocab 8000 (padded 8192), 1905408 parameters on rank 0, stage parts [0, 3, 7], \
global batch 8 = micro 4 x accumulation 1 x DP 2
 iteration      1/6 | consumed samples        8 | elapsed time per iteration (ms): 2251.0 | tokens/s: 910 | \
learning rate: 3.0000E-04 | lm loss: 9.036200E+00 | grad norm: 1.6202 |
  return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass
 iteration      2/6 | consumed samples       16 | elapsed time per iteration (ms): 1498.9 | tokens/s: 1366 | \
learning rate: 2.8191E-04 | lm loss: 9.023615E+00 | grad norm: 1.2236 |
 iteration      3/6 | consumed samples       24 | elapsed time per iteration (ms): 1203.8 | tokens/s: 1701 | \
learning rate: 2.3250E-04 | lm loss: 9.043400E+00 | grad norm: 1.0094 |
 validation at iteration 3 | lm loss: 9.040000E+00 |
[default0]: iteration      4/6 | consumed samples       32 | elapsed time per iteration (ms): 1421.8 | tokens/s: 1440 | \
learning rate: 1.6500E-04 | lm loss: 9.039972E+00 | grad norm: n/a |
 iteration      5/6 | consumed samples       40 | elapsed time per iteration (ms): 2959.5 | tokens/s: 692 | \
learning rate: 9.7500E-05 | lm loss: 9.036706E+00 | grad norm: 0.7208 |
 iteration      6/6 | consumed samples       48 | elapsed time per iteration (ms): 2557.4 | tokens/s: 801 | \
learning rate: 4.8087E-05 | lm loss: 9.039930E+00 | grad norm: 0.6944 |
"""


def test_parse_progress_lines_exact_numbers():
    recs = bt.parse_progress_lines(SAMPLE_LOG)
    assert [r.iteration for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(r.train_iters == 6 for r in recs)
    assert [r.consumed_samples for r in recs] == [8, 16, 24, 32, 40, 48]
    assert [r.ms for r in recs] == [2251.0, 1498.9, 1203.8, 1421.8, 2959.5, 2557.4]
    assert [r.tokens_per_s for r in recs] == [910.0, 1366.0, 1701.0, 1440.0, 692.0, 801.0]
    assert recs[0].loss == 9.0362 and recs[3].loss == 9.039972 and recs[-1].loss == 9.03993


def test_parse_progress_lines_ignores_other_lines_and_keeps_the_last_duplicate():
    assert bt.parse_progress_lines("nothing here\n validation at iteration 3 | lm loss: 9.0 |\n") == []
    line = (" iteration {i:6d}/20 | consumed samples {c:8d} | elapsed time per iteration (ms): {ms} | "
            "tokens/s: nan | learning rate: 3.0000E-04 | lm loss: 9.000000E+00 | grad norm: 1.0 |")
    text = "\n".join([line.format(i=2, c=16, ms="5.0"), line.format(i=1, c=8, ms="7.5"),
                      line.format(i=2, c=16, ms="6.0")])
    recs = bt.parse_progress_lines(text)
    assert [(r.iteration, r.ms) for r in recs] == [(1, 7.5), (2, 6.0)]
    assert math.isnan(recs[0].tokens_per_s)


def test_warmup_exclusion_and_mean():
    times = {r.iteration: r.ms for r in bt.parse_progress_lines(SAMPLE_LOG)}
    assert bt.measured(times, 2) == [1203.8, 1421.8, 2959.5, 2557.4]
    s = bt.summarize(times, 2, tokens_per_iteration=2048)
    assert s.n == 4
    assert s.mean_ms == pytest.approx((1203.8 + 1421.8 + 2959.5 + 2557.4) / 4)
    assert s.min_ms == 1203.8 and s.max_ms == 2959.5
    assert s.median_ms == pytest.approx((1421.8 + 2557.4) / 2)
    assert s.tokens_per_s == pytest.approx(2048 / (s.mean_ms / 1000))
    assert bt.summarize(times, 0, 2048).n == 6
    # Exclusion is by iteration number, not position: a missing iteration 1 does not shift the cut.
    assert bt.measured({2: 1.0, 3: 2.0, 4: 3.0}, 2) == [2.0, 3.0]
    with pytest.raises(ValueError, match="no iterations left"):
        bt.summarize(times, 6, 2048)


def _result(name, mean_ms, min_ms, ranks=1, layout="TP1/PP1/DP1"):
    r = bt.CaseResult(name, layout, ranks)
    r.summary = bt.Summary(10, mean_ms, min_ms, mean_ms, 2048 / (mean_ms / 1000))
    r.first_loss, r.last_loss = 9.0362, 9.0301
    return r


def test_format_table():
    results = [_result("plain", 500.0, 480.0), _result("tp1-pp1-dp1", 1000.0, 900.25),
               bt.CaseResult("tp2-pp2-dp2", "TP2/PP2/DP2", 8, status="skipped: needs 8 GPUs, have 1")]
    table = bt.format_table(results)
    lines = table.splitlines()
    assert len(lines) == 5
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "case", "layout", "ranks", "ms/iteration (mean, min)", "tokens/s", "vs plain", "lm loss (first, last)"]
    assert set(lines[1]) <= set("|-:")
    assert len({len(line) for line in lines}) == 1  # aligned columns
    plain = [c.strip() for c in lines[2].strip("|").split("|")]
    assert plain == ["plain", "TP1/PP1/DP1", "1", "500.0, 480.0", "4,096", "1.00x", "9.0362, 9.0301"]
    tp1 = [c.strip() for c in lines[3].strip("|").split("|")]
    assert tp1[3:6] == ["1000.0, 900.2", "2,048", "0.50x"]
    assert "skipped: needs 8 GPUs, have 1" in lines[4]
    # Without a baseline the ratio is "n/a".
    assert "n/a" in bt.format_table([_result("tp1-pp1-dp1", 1000.0, 900.0)])


def test_pick_micro_batch():
    assert bt.pick_micro_batch(8, 1, 4) == 4
    assert bt.pick_micro_batch(8, 2, 4) == 4
    assert bt.pick_micro_batch(8, 4, 4) == 2
    assert bt.pick_micro_batch(12, 2, 4) == 3
    assert bt.pick_micro_batch(8, 8, 4) == 1
    with pytest.raises(ValueError):
        bt.pick_micro_batch(8, 3, 4)


def test_trainer_command_is_accepted_by_the_trainer_parser():
    from megatron_ucp.training.arguments import parse_args, train_config

    cfg = bt.BenchConfig()
    case = bt.CASES["tp2-pp2-dp2"]
    cmd = bt.trainer_command(cfg, case, port=29555)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and cmd[cmd.index("--master_port") + 1] == "29555"
    i = cmd.index("megatron_ucp.train")
    assert cmd[i - 1] == "-m"
    values = parse_args(cmd[i + 1:])
    tc = train_config(values)
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (2, 2)
    assert (tc.log_interval, tc.eval_interval, tc.train_iters) == (1, 0, 20)
    assert (tc.global_batch_size, tc.micro_batch_size, tc.dtype, tc.vocab_size) == (8, 4, "bf16", 8000)
    assert tc.mock_data and values["hidden_dropout"] == 0 and values["attention_dropout"] == 0
    assert (values["num_layers"], values["hidden_size"], values["num_attention_heads"]) == (4, 256, 8)
    fp32 = parse_args(bt.trainer_args(bt.BenchConfig(dtype="fp32"), bt.CASES["tp1-pp1-dp1"]))
    assert fp32["dtype"] == "fp32"


def test_trainer_env_threads_and_accelerator():
    base = {"PATH": "/bin", "PYTHONPATH": "/x"}
    env = bt.trainer_env(bt.CASES["tp2-pp2-dp2"], cuda=False, base=base, cpus=2)
    assert env["OMP_NUM_THREADS"] == "1" and env["DS_ACCELERATOR"] == "cpu"
    assert env["PYTHONPATH"].split(":")[-1] == "/x"
    env = bt.trainer_env(bt.CASES["tp1-pp1-dp1"], cuda=False, base=base, cpus=16)
    assert env["OMP_NUM_THREADS"] == "16"
    assert bt.trainer_env(bt.CASES["tp2-pp2-dp2"], cuda=False, base=base, cpus=16)["OMP_NUM_THREADS"] == "2"
    assert "DS_ACCELERATOR" not in bt.trainer_env(bt.CASES["tp1-pp1-dp1"], cuda=True, base=base, cpus=16)


def test_case_needing_more_gpus_is_skipped_without_launching(monkeypatch, tmp_path):
    monkeypatch.setattr(bt, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(bt, "run_in_group", lambda *a, **k: pytest.fail("must not launch"))
    r = bt.run_trainer_case(bt.BenchConfig(), bt.CASES["tp2-pp2-dp2"], tmp_path)
    assert not r.ok and r.status == "skipped: needs 8 GPUs, have 1"


def test_run_process_group_status_and_timeout(tmp_path):
    with open(tmp_path / "log", "w") as log:
        assert bt.run_process_group(["sh", "-c", "echo hi; exit 3"], dict(os.environ), log, 10) == 3
        marker = tmp_path / "child_survived"
        finished = tmp_path / "parent_finished"
        # A child that would outlive its parent: the whole group must be ended on the timeout, without
        # waiting for the parent to finish by itself (it would leave its own marker).
        cmd = ["sh", "-c", f"(sleep 1; touch {marker}) & sleep 30; touch {finished}"]
        assert bt.run_process_group(cmd, dict(os.environ), log, 0.3) is None
        assert not finished.exists()
    assert (tmp_path / "log").read_text().startswith("hi")
    time.sleep(1.5)
    assert not marker.exists()


def test_main_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        bt.main(["--help"])
    assert e.value.code == 0
    assert "--cases" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--cases", "tp3"], ["--cases", "plain,nope"], ["--dtype", "fp16"],
                                  ["--train-iters", "5", "--warmup-iters", "5"],
                                  ["--threads", "0"]])
def test_main_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bt.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_case_selection_parsing():
    args = bt.build_parser().parse_args(["--cases", "tp2-pp2-dp2,plain", "tp1-pp1-dp1"])
    assert bt.selected_cases(args) == ["tp2-pp2-dp2", "plain", "tp1-pp1-dp1"]
    assert bt.selected_cases(bt.build_parser().parse_args([])) == ["plain", "tp1-pp1-dp1", "tp2-pp2-dp2",
                                                                    "dense-active", "moe-ep2"]


# lm loss of iterations 1-4 printed by the trainer at TP1/PP1/DP1 for TINY_ARGS
# (`torchrun --nproc_per_node 1 -m megatron_ucp.train` with these flags, --hidden-dropout 0 --attention-dropout 0).
TINY_ARGS = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
             "--vocab-size", "100", "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "4"]
TRAINER_LOSSES = {"bf16": [4.636213, 4.603053, 4.598003, 4.608783],
                  "fp32": [4.636142, 4.602936, 4.598030, 4.608850]}
TINY = dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16, vocab_size=100,
            global_batch_size=4, micro_batch_size=2, train_iters=4)


def _assert_matches_trainer(losses, dtype):
    # Same weights, samples, schedule, clipping and precision policy: the plain loop trains like the trainer.
    # If this fails after a change to the trainer or model, the plain-loop baseline is no longer like-for-like.
    assert losses == pytest.approx(TRAINER_LOSSES[dtype], abs=2e-5)


def test_plain_loop_end_to_end_through_main(tmp_path, capsys):
    """A real, tiny run of the plain PyTorch loop via the CLI, with the JSON output."""
    out = tmp_path / "bench.json"
    rc = bt.main(["--cases", "plain", *TINY_ARGS, "--warmup-iters", "1", "--dtype", "bf16", "--device", "cpu",
                  "--threads", "1", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| plain " in printed and "command:" in printed and "machine:" in printed
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert case["case"] == "plain" and case["status"] == "ok"
    assert (case["micro_batch_size"], case["gradient_accumulation_steps"]) == (2, 2)
    assert sorted(case["iteration_ms"], key=int) == ["1", "2", "3", "4"]
    s = case["summary"]
    assert s["n"] == 3
    for key in ("mean_ms", "min_ms", "tokens_per_s"):
        assert math.isfinite(s[key]) and s[key] > 0
    _assert_matches_trainer(case["losses"], "bf16")
    assert case["omp_num_threads"] == 1
    assert data["config"]["dtype"] == "bf16" and data["machine"]["torch"]


def test_plain_loop_fp32_trains_like_the_trainer():
    r = bt.run_plain_case(bt.BenchConfig(**TINY, warmup_iters=1, dtype="fp32", device="cpu"), threads=1)
    assert r.ok and r.summary.n == 3 and r.summary.min_ms > 0
    _assert_matches_trainer(r.losses, "fp32")


@pytest.mark.slow
@pytest.mark.dist
def test_every_case_end_to_end_small(tmp_path, capsys):
    """The benchmark's real cases once, small: the plain loop and both trainer layouts through main.

    The printed table shows the numbers measured (the JSON's summaries and losses), and the three runs
    train alike: the same weights, samples and schedule give the same fp32 losses at every layout."""
    out = tmp_path / "bench.json"
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
            "--vocab-size", "100", "--global-batch-size", "4", "--micro-batch-size", "2", "--train-iters", "3",
            "--warmup-iters", "1", "--dtype", "fp32", "--device", "cpu", "--threads", "1"]
    assert bt.main(["--cases", "plain", "tp1-pp1-dp1", "tp2-pp2-dp2", *args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    cases = {c["case"]: c for c in data["cases"]}
    assert sorted(cases) == ["plain", "tp1-pp1-dp1", "tp2-pp2-dp2"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in printed.splitlines() if line.startswith("| ") and "ms/iteration" not in line}
    base = cases["plain"]["summary"]["mean_ms"]
    for name, case in cases.items():
        assert case["status"] == "ok", case["status"]
        s, row = case["summary"], rows[name]
        assert s["n"] == 2 and sorted(case["iteration_ms"], key=int) == ["1", "2", "3"]
        assert row[2] == f"{bt._fmt_ms(s['mean_ms'])}, {bt._fmt_ms(s['min_ms'])}"
        assert row[3] == bt._fmt_int(s["tokens_per_s"]) and row[4] == f"{base / s['mean_ms']:.2f}x"
        assert row[5] == f"{case['losses'][0]:.4f}, {case['losses'][-1]:.4f}"
        assert len(case["losses"]) == 3
        assert case["losses"] == pytest.approx(cases["plain"]["losses"], abs=2e-5), name
    # Negative control: the losses do change over the run, so agreeing is not a constant.
    assert abs(cases["plain"]["losses"][0] - cases["plain"]["losses"][-1]) > 1e-3


# ------------------------------------------------------------------------------------ the MoE pair


def test_moe_pair_trains_equal_active_parameters():
    """moe-ep2 and its dense twin: the same attention, the dense MLP top-k x an expert wide, so a token
    passes through as many parameters in both (the router's E x h per layer aside)."""
    from megatron_ucp.training.arguments import check_run, model_kwargs, parse_args, train_config

    cfg = bt.BenchConfig()
    flags = {name: parse_args(bt.trainer_args(cfg, bt.CASES[name])) for name in bt.MOE_PAIR}
    dense, moe = flags["dense-active"], flags["moe-ep2"]
    assert (dense["model_family"], moe["model_family"]) == ("llama", "mixtral")
    assert (dense["num_experts"], moe["num_experts"], moe["moe_top_k"]) == (None, 8, 2)
    assert (dense["ffn_hidden_size"], moe["ffn_hidden_size"]) == (688, 344)
    attention = ("num_attention_heads", "num_key_value_heads", "hidden_size", "num_layers",
                 "use_rotary_position_embeddings", "normalization")
    assert [dense[k] for k in attention] == [moe[k] for k in attention] == [8, 4, 256, 4, True, "rmsnorm"]
    for name, values in flags.items():  # the trainer's own whole-run checks accept both at 2 ranks
        tc = train_config(values)
        assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (1, 1)
        assert tc.moe_expert_parallel_size == bt.CASES[name].ep
        check_run(model_kwargs(values), tc, bt.CASES[name].ranks, vocab_size=cfg.vocab_size)
    (d_active, d_total), (m_active, m_total) = (bt.parameter_counts(cfg, bt.CASES[n]) for n in bt.MOE_PAIR)
    assert d_active == d_total
    assert m_active - d_active == cfg.num_layers * cfg.num_experts * cfg.hidden_size  # the routers
    # Negative control: the total counts every expert: 6 of the 8 experts' 3 x h x f weights on top.
    assert m_total - m_active == cfg.num_layers * 6 * 3 * cfg.hidden_size * cfg.expert_ffn_hidden_size


def _pair_result(name, round_ms):
    case = bt.CASES[name]
    r = bt.CaseResult(name, case.layout, case.ranks)
    r.rounds = [bt.Summary(5, ms, ms, ms, 2048 / (ms / 1000)) for ms in round_ms]
    r.summary = r.rounds[0]
    r.first_loss, r.last_loss = 9.0362, 9.0301
    r.active_parameters, r.parameters = 1000, 2000 if case.moe else 1000
    return r


def test_format_moe_table_medians_and_paired_ratio():
    # Round 2 ran under load for both: the paired ratio (median of 1.0, 0.5, 1.0) is 1.0x, where the ratio
    # of the medians (400 / 200 ms) would say 0.50x.
    dense = _pair_result("dense-active", [400.0, 100.0, 200.0])
    moe = _pair_result("moe-ep2", [400.0, 200.0, 200.0])
    lines = bt.format_moe_table([dense, moe]).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "case", "model", "layout", "ranks", "parameters (active / total)", "rounds", "ms/iteration (median)",
        "tokens/s (median)", "vs dense-active (paired)", "lm loss (first, last)"]
    row = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert row["dense-active"] == ["dense-active", "llama, dense", "TP1/PP1/DP2", "2", "1,000 / 1,000", "3",
                                   "200.0", "10,240", "1.00x", "9.0362, 9.0301"]
    assert row["moe-ep2"] == ["moe-ep2", "mixtral, experts", "TP1/PP1/DP2/EP2", "2", "1,000 / 2,000", "3",
                              "200.0", "10,240", "1.00x", "9.0362, 9.0301"]
    failed = bt.CaseResult("dense-active", "TP1/PP1/DP2", 2, status="failed: exit 1")
    lines = bt.format_moe_table([failed, moe]).splitlines()
    assert "failed: exit 1" in lines[2] and lines[3].split("|")[9].strip() == "n/a"


def test_run_moe_pair_alternates_the_order_and_keeps_every_round(monkeypatch, tmp_path):
    calls = []
    ms = {"dense-active": iter([300.0, 310.0, 320.0]), "moe-ep2": iter([500.0, 510.0, 520.0])}

    def fake(cfg, case, log_dir, timeout_s=0, cpus=None):
        calls.append((case.name, os.path.basename(log_dir)))
        r = bt.CaseResult(case.name, case.layout, case.ranks)
        t = next(ms[case.name])
        r.summary = bt.Summary(1, t, t, t, 1.0 / t)
        return r

    monkeypatch.setattr(bt, "run_trainer_case", fake)
    dense, moe = bt.run_moe_pair(bt.BenchConfig(moe_rounds=3), list(bt.MOE_PAIR), tmp_path)
    assert calls == [("dense-active", "round1"), ("moe-ep2", "round1"), ("moe-ep2", "round2"),
                     ("dense-active", "round2"), ("dense-active", "round3"), ("moe-ep2", "round3")]
    assert [s.mean_ms for s in dense.rounds] == [300.0, 310.0, 320.0] and dense.median_ms == 310.0
    assert [s.mean_ms for s in moe.rounds] == [500.0, 510.0, 520.0] and moe.ok
    assert moe.parameters > moe.active_parameters > 0

    # A failed round fails its case, and the case is not run again.
    calls.clear()
    ms = {"dense-active": iter([300.0, 310.0, 320.0]), "moe-ep2": iter([500.0])}

    def fail_second(cfg, case, log_dir, timeout_s=0, cpus=None):
        if case.name == "moe-ep2" and os.path.basename(log_dir) == "round2":
            calls.append((case.name, "round2"))
            return bt.CaseResult(case.name, case.layout, case.ranks, status="failed: exit 1")
        return fake(cfg, case, log_dir)

    monkeypatch.setattr(bt, "run_trainer_case", fail_second)
    dense, moe = bt.run_moe_pair(bt.BenchConfig(moe_rounds=3), list(bt.MOE_PAIR), tmp_path)
    assert [c for c in calls if c[0] == "moe-ep2"] == [("moe-ep2", "round1"), ("moe-ep2", "round2")]
    assert not moe.ok and moe.status == "failed: exit 1" and len(dense.rounds) == 3


@pytest.mark.slow
@pytest.mark.dist
def test_moe_pair_end_to_end_small(tmp_path, capsys):
    """The MoE pair for real, tiny, one round: its table shows what was measured (never a speed)."""
    out = tmp_path / "bench.json"
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-key-value-heads", "2",
            "--expert-ffn-hidden-size", "16", "--seq-length", "16", "--vocab-size", "100", "--global-batch-size",
            "4", "--micro-batch-size", "2", "--train-iters", "3", "--warmup-iters", "1", "--dtype", "fp32",
            "--threads", "1", "--moe-rounds", "1"]
    assert bt.main(["--cases", "dense-active", "moe-ep2", *args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "### Mixture of experts vs dense at equal active parameters" in printed
    cases = {c["case"]: c for c in json.loads(out.read_text())["cases"]}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in printed.splitlines() if line.startswith("| ") and "tokens/s" not in line}
    assert sorted(cases) == sorted(rows) == ["dense-active", "moe-ep2"]
    ref = [s["tokens_per_s"] for s in cases["dense-active"]["rounds"]]
    for name, case in cases.items():
        assert case["status"] == "ok", case["status"]
        assert len(case["rounds"]) == 1 and len(case["losses"]) == 3
        tps = [s["tokens_per_s"] for s in case["rounds"]]
        assert all(math.isfinite(t) and t > 0 for t in tps)
        row = rows[name]
        assert row[4] == "1" and row[6] == bt._fmt_int(tps[0])  # the median of one round is that round
        assert row[7] == f"{tps[0] / ref[0]:.2f}x"
    assert cases["moe-ep2"]["parameters"] > cases["moe-ep2"]["active_parameters"]


# ------------------------------------------------------------------- activation memory (--memory)

# Real output of the trainer with --report-memory at Ulysses SP2 (seq 4096): the two ranks share one stdout,
# so two records can run together on one line.
MEMORY_LOG = """\
training TP1-PP1-DP1-SP2 ZeRO-1 fp32 (pipeline engine): vocab 8000 (padded 8064), 5580032 parameters on rank 0
 memory | rank 0 | iteration 1 | held MiB: 406.5 | peak MiB: 864.0 | added MiB: 457.6 | source: cpu rss | \
 memory | rank 1 | iteration 1 | held MiB: 406.5 | peak MiB: 876.0 | added MiB: 469.5 | source: cpu rss |
 iteration      1/3 | consumed samples        1 | elapsed time per iteration (ms): 2581.4 | tokens/s: 1587 |
 memory | rank 1 | iteration 2 | held MiB: 515.8 | peak MiB: 913.5 | added MiB: 397.8 | source: cpu rss | \
 memory | rank 0 | iteration 2 | held MiB: 536.9 | peak MiB: 924.3 | added MiB: 387.4 | source: cpu rss |
 memory | rank 0 | iteration 3 | held MiB: 539.0 | peak MiB: 923.4 | added MiB: 384.4 | source: cpu rss |
 memory | rank 1 | iteration 3 | held MiB: 537.2 | peak MiB: 920.3 | added MiB: 383.1 | source: cpu rss |
"""


def test_parse_memory_lines_reads_records_that_run_together():
    recs = bt.parse_memory_lines(MEMORY_LOG)
    assert [(r.rank, r.iteration) for r in recs] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert recs[0] == bt.MemoryRecord(0, 1, 406.5, 864.0, 457.6, "cpu rss")
    assert [r.added_mib for r in recs] == [457.6, 387.4, 384.4, 469.5, 397.8, 383.1]
    assert bt.parse_memory_lines("iteration 1/3 | lm loss: 9.0 |\n memory | rank 0 | nothing |") == []


def test_summarize_memory_drops_warmup_and_takes_per_rank_medians():
    r = bt.MemoryResult("ulysses2", "TP1/PP1/DP1/SP2", 2)
    bt.summarize_memory(r, bt.parse_memory_lines(MEMORY_LOG), train_iters=3, warmup_iters=1)
    assert r.ok and r.source == "cpu rss"
    assert r.added_mib == {0: pytest.approx((387.4 + 384.4) / 2), 1: pytest.approx((397.8 + 383.1) / 2)}
    assert r.held_mib == {0: pytest.approx((536.9 + 539.0) / 2), 1: pytest.approx((515.8 + 537.2) / 2)}
    assert r.per_rank_mib == pytest.approx(390.45)
    # Negative controls: a rank missing an iteration, or a rank missing altogether, fails the run.
    partial = [rec for rec in bt.parse_memory_lines(MEMORY_LOG) if (rec.rank, rec.iteration) != (1, 3)]
    r = bt.MemoryResult("ulysses2", "TP1/PP1/DP1/SP2", 2)
    bt.summarize_memory(r, partial, train_iters=3, warmup_iters=1)
    assert not r.ok and r.status.startswith("failed: expected memory records of ranks 0..1 for iterations 1..3")
    r = bt.MemoryResult("ulysses4", "TP1/PP1/DP1/SP4", 4)
    bt.summarize_memory(r, bt.parse_memory_lines(MEMORY_LOG), train_iters=3, warmup_iters=1)
    assert not r.ok


def test_memory_cases_and_their_trainer_flags():
    """Every memory run is a Llama model at PP 1 DP 1 that the trainer's own whole-run checks accept at its
    world size; Megatron SP n is TP n plus --sequence-parallel, Ulysses SP n is TP 1 over n ranks."""
    from megatron_ucp.training.arguments import check_run, model_kwargs, parse_args, train_config

    assert bt.memory_cases([1, 2, 4]) == ["tp1", "tp2", "tp2-seqpar", "tp4", "tp4-seqpar", "ulysses2", "ulysses4"]
    assert bt.memory_cases([2]) == ["tp1", "tp2", "tp2-seqpar", "ulysses2"]
    with pytest.raises(ValueError, match="memory degrees must be among"):
        bt.memory_cases([3])
    cfg = bt.BenchConfig(**bt.MEMORY_DEFAULTS)
    expect = {"tp1": (1, False, 1), "tp2": (2, False, 1), "tp2-seqpar": (2, True, 1), "tp4": (4, False, 1),
              "tp4-seqpar": (4, True, 1), "ulysses2": (1, False, 2), "ulysses4": (1, False, 4)}
    for name, case in bt.MEMORY_CASES.items():
        values = parse_args(bt.memory_trainer_args(cfg, case))
        tc = train_config(values)
        assert (tc.tensor_model_parallel_size, tc.sequence_parallel, tc.ds_sequence_parallel_size) == expect[name]
        assert tc.pipeline_model_parallel_size == 1 and tc.report_memory
        assert case.ranks == tc.tensor_model_parallel_size * tc.ds_sequence_parallel_size
        assert (tc.seq_length, tc.micro_batch_size, tc.global_batch_size, tc.dtype) == (4096, 1, 1, "fp32")
        assert (values["model_family"], values["num_attention_heads"], values["num_key_value_heads"]) == ("llama", 8, 4)
        assert (values["num_layers"], values["hidden_size"]) == (2, 256)
        check_run(model_kwargs(values), tc, case.ranks, vocab_size=cfg.vocab_size)


def _memory_result(name, mib_by_rank, status="ok"):
    case = bt.MEMORY_CASES[name]
    r = bt.MemoryResult(name, case.layout, case.ranks, status=status, source="cpu rss")
    if status == "ok":
        r.added_mib = dict(enumerate(mib_by_rank))
        r.held_mib = r.peak_mib = {i: 500.0 for i in range(len(mib_by_rank))}
    return r


def test_format_memory_table_side_by_side_with_ratios():
    results = [_memory_result("tp1", [400.0]), _memory_result("tp2", [250.0, 240.0]),
               _memory_result("tp2-seqpar", [190.0, 200.0]), _memory_result("ulysses2", [210.0, 205.0]),
               _memory_result("tp4", [], status="failed: exit 1")]
    lines = bt.format_memory_table(results, [2, 4]).splitlines()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "SP n", "TP n alone (MiB)", "Megatron SP: TP n +seqpar (MiB)", "vs SP 1", "vs TP n alone",
        "Ulysses SP n (MiB)", "vs SP 1"]
    assert rows[0] == ["1", "400.0", "400.0", "1.00x", "1.00x", "400.0", "1.00x"]
    assert rows[1] == ["2", "250.0", "200.0", "0.50x", "0.80x", "210.0", "0.53x"]
    assert rows[2] == ["4", "failed: exit 1", "not run", "n/a", "n/a", "not run", "n/a"]
    runs = bt.format_memory_runs(results)
    assert "| tp2-seqpar | Megatron SP 2: TP 2 with --sequence-parallel" in runs and "190.0, 200.0" in runs


@pytest.mark.parametrize("argv, message", [(["--memory", "--cases", "plain"], "--memory runs its own cases"),
                                           (["--memory", "--memory-degrees", "3"], "memory degrees must be among")])
def test_main_memory_rejects_cases_and_bad_degrees(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bt.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_memory_defaults_apply_only_with_memory():
    assert bt.build_parser(bt.BenchConfig(**bt.MEMORY_DEFAULTS)).parse_args(["--memory"]).seq_length == 4096
    assert bt.build_parser().parse_args([]).seq_length == bt.BenchConfig().seq_length == 256


@pytest.mark.slow
@pytest.mark.dist
def test_memory_end_to_end_small(tmp_path, capsys):
    """--memory for real at a tiny sequence, SP 1 and 2: the trainer's --report-memory records reach the
    table; every printed number is one the ranks measured (no claim about their sizes)."""
    out = tmp_path / "memory.json"
    args = ["--memory", "--memory-degrees", "2", "--seq-length", "32", "--hidden-size", "64", "--vocab-size", "100",
            "--threads", "1", "--json", str(out)]
    assert bt.main(args) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    runs = {r["case"]: r for r in data["memory"]}
    assert list(runs) == ["tp1", "tp2", "tp2-seqpar", "ulysses2"]
    for name, run in runs.items():
        assert run["status"] == "ok" and run["source"] == "cpu rss", run["status"]
        ranks = bt.MEMORY_CASES[name].ranks
        assert sorted(run["added_mib"]) == [str(i) for i in range(ranks)]
        assert sorted((rec["rank"], rec["iteration"]) for rec in run["records"]) == [
            (rank, it) for rank in range(ranks) for it in (1, 2, 3)]
        for rank in range(ranks):  # the median of iterations 2 and 3 (1 is warm-up)
            kept = [rec["added_mib"] for rec in run["records"] if rec["rank"] == rank and rec["iteration"] > 1]
            assert run["added_mib"][str(rank)] == pytest.approx(sum(kept) / 2)
            assert run["held_mib"][str(rank)] > 0
    table = [line for line in printed.splitlines() if line.startswith("|") and "---" not in line]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table}
    per_rank = {name: max(run["added_mib"].values()) for name, run in runs.items()}
    assert rows["1"][0] == rows["1"][1] == rows["1"][4] == f"{per_rank['tp1']:,.1f}"
    assert rows["2"][:2] == [f"{per_rank['tp2']:,.1f}", f"{per_rank['tp2-seqpar']:,.1f}"]
    assert rows["2"][4] == f"{per_rank['ulysses2']:,.1f}"
    if per_rank["tp1"] > 0:
        assert rows["2"][2] == f"{per_rank['tp2-seqpar'] / per_rank['tp1']:.2f}x"
        assert rows["2"][5] == f"{per_rank['ulysses2'] / per_rank['tp1']:.2f}x"
    assert "## Activation memory per rank: llama 2 layers, hidden 64" in printed and "seq 32" in printed
