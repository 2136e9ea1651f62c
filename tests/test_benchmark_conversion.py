"""Tests of tools/benchmark_conversion.py: table and targets on fixed numbers, the process-tree sampler,
the wchar-based temporary-bytes measurement, checkpoint caching and CLI wiring. No real checkpoint is built."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import load_tool




bc = load_tool("benchmark_conversion")
GiB = 1 << 30
NUMEL = 50432 * 1024  # GPT-2 vocabulary padded to a multiple of 128 x TP2, hidden 1024


def _results():
    return {
        "ours": bc.CaseResult("ours", walls=[5.0, 6.0], peak_pss=int(1.5 * GiB), peak_rss=2 * GiB, temp_bytes=1000,
                              peak_tmp_bytes=0, output_bytes=4_000_000_000, cpu_s=15.5),
        "deepspeed": bc.CaseResult("deepspeed", walls=[60.0, 54.0], peak_pss=3 * GiB, peak_rss=6 * GiB,
                                   temp_bytes=4_000_000_000, peak_tmp_bytes=4_100_000_000,
                                   output_bytes=4_100_000_000, cpu_s=100.25),
        "cp": bc.CaseResult("cp", walls=[4.0, 3.6], peak_pss=GiB // 256, peak_rss=GiB // 128, temp_bytes=0,
                            peak_tmp_bytes=0, output_bytes=5_000_000_000, cpu_s=3.0),
    }


def test_table_on_fixed_numbers():
    assert bc.format_table(_results(), input_bytes=5_000_000_000) == textwrap.dedent("""\
        | case | wall s (best) | wall s (mean) | CPU s (best) | GB/s | peak PSS GiB | peak RSS GiB | temp GB (wchar - output) | peak OUT/tmp GB | output GB | ratio vs DeepSpeed (median, paired) | ratio vs cp -r (median, paired) |
        |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
        | ours (tools/ds_to_universal.py) | 5.00 | 5.50 | 15.50 | 1.000 | 1.500 | 2.000 | 0.000 | 0.000 | 4.000 | 0.10x | 1.46x |
        | DeepSpeed ds_to_universal | 54.00 | 57.00 | 100.25 | 0.093 | 3.000 | 6.000 | 4.000 | 4.100 | 4.100 | 1.00x | 15.00x |
        | cp -r | 3.60 | 3.80 | 3.00 | 1.389 | 0.004 | 0.008 | 0.000 | 0.000 | 5.000 | 0.07x | 1.00x |""")  # noqa: E501


def test_table_without_references_says_na():
    only = {"ours": _results()["ours"]}
    last = bc.format_table(only, input_bytes=5_000_000_000).splitlines()[-1]
    assert last.endswith("| 4.000 | n/a | n/a |")


def test_targets_on_fixed_numbers():
    targets = bc.evaluate_targets(_results(), NUMEL)
    assert [t.holds for t in targets] == [True, True, True, True, True]
    assert bc.format_targets(targets) == textwrap.dedent("""\
        - [PASS] ours >= 10x faster than DeepSpeed (median of paired rounds): 10.50x over 2 round(s) (best walls: DeepSpeed 54.00 s, ours 5.00 s)
        - [PASS] ours <= 1.5x cp -r (median of paired rounds): 1.46x over 2 round(s) (best walls: ours 5.00 s, cp -r 3.60 s)
        - [PASS] ours peak memory (Σ PSS) <= 1 GiB + 3 x S, S = 4 B x numel x 3 (fp32 + exp_avg + exp_avg_sq): 1.500 GiB vs 2.731 GiB (numel 51642368, S = 0.577 GiB, budget 2.731 GiB)
        - [PASS] (reference, stricter) ours peak Σ PSS <= 1 GiB + 3 x 4 B x numel: 1.500 GiB vs 1.577 GiB
        - [PASS] ours writes no temporary bytes (wchar - output <= 1 MiB + 0.1% of output; no OUT/tmp): wchar - output = 1000 B (tolerance 5048576 B), peak OUT/tmp = 0 B""")  # noqa: E501


def test_targets_that_fail_and_missing_cases():
    r = _results()
    r["ours"].walls = [20.0]  # paired with round 1 only: 3x faster than DeepSpeed, 5x cp -r
    r["ours"].peak_pss = 3 * GiB
    r["ours"].temp_bytes = 6_000_000
    targets = bc.evaluate_targets(r, NUMEL)
    assert [t.holds for t in targets] == [False, False, False, False, False]
    assert targets[0].detail == ("3.00x over 1 round(s) (best walls: DeepSpeed 54.00 s, ours 20.00 s); "
                                 "misses: 3.33x too slow")
    assert targets[1].detail.startswith("5.00x over 1 round(s)") and targets[1].detail.endswith("3.33x too slow")
    assert targets[2].detail.endswith("; misses by 0.269 GiB")
    r["ours"].temp_bytes, r["ours"].peak_tmp_bytes = 0, 4096  # an OUT/tmp folder fails it too
    assert bc.evaluate_targets(r, NUMEL)[-1].holds is False
    none = bc.evaluate_targets({"ours": r["ours"]}, NUMEL)
    assert [t.holds for t in none[:2]] == [None, None]
    assert none[0].line() == "- [n/a] ours >= 10x faster than DeepSpeed (median of paired rounds): needs cases ours and deepspeed"
    assert [t.holds for t in bc.evaluate_targets({}, NUMEL)] == [None, None, None, None]


def test_memory_budgets_and_temp_bytes():
    assert bc.fp32_state_bytes(NUMEL) == 12 * NUMEL
    assert bc.memory_budget(NUMEL) == GiB + 36 * NUMEL
    assert bc.strict_memory_budget(NUMEL) == GiB + 12 * NUMEL
    assert bc.temp_bytes(100, 40) == 60
    assert bc.temp_bytes(40, 100) == 0  # clipped
    assert bc.full_numel([(4, 3), (4, 3)], replicated=False) == 24
    assert bc.full_numel([(5,), (5,)], replicated=True) == 5


def test_case_result_from_runs():
    runs = [bc.RunMeasurement(wall_s=3.0, returncode=0, peak_pss=10, peak_rss=20, wchar=150, output_bytes=100,
                              peak_tmp_bytes=7, cpu_s=2.5),
            bc.RunMeasurement(wall_s=1.0, returncode=0, peak_pss=30, peak_rss=15, wchar=100, output_bytes=100,
                              cpu_s=0.5)]
    r = bc.CaseResult.from_runs("ours", runs)
    assert (r.best_wall, r.mean_wall, r.peak_pss, r.peak_rss, r.temp_bytes, r.peak_tmp_bytes, r.output_bytes,
            r.cpu_s) == (1.0, 2.0, 30, 20, 50, 7, 100, 0.5)
    json.dumps(r.to_dict())
    # Unsampled timed runs (memory 0) and one sampled memory run: walls and CPU from the timed runs only,
    # memory and the folder's peak from the memory run, temp bytes the worst of all.
    timed = [dataclasses.replace(x, peak_pss=0, peak_rss=0, peak_tmp_bytes=0) for x in runs]
    mem = bc.RunMeasurement(wall_s=9.0, returncode=0, peak_pss=40, peak_rss=45, wchar=400, output_bytes=100,
                            peak_tmp_bytes=3, cpu_s=0.1)
    r = bc.CaseResult.from_runs("ours", timed, [mem])
    assert (r.walls, r.cpu_s, r.peak_pss, r.peak_rss, r.peak_tmp_bytes, r.temp_bytes) == ([3.0, 1.0], 0.5, 40, 45, 3, 300)
    assert json.loads(json.dumps(r.to_dict()))["memory_runs"][0]["wall_s"] == 9.0


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_sampler_sees_an_allocation():
    m = bc.run_measured(_py("import numpy, time; a = numpy.ones(200_000_000 // 8); time.sleep(0.5)"), interval=0.02)
    assert m.returncode == 0
    assert m.peak_pss >= 190e6, m
    assert m.peak_rss >= m.peak_pss * 0.9
    assert m.samples >= 10  # about every 20 ms over > 0.5 s
    assert 0 < m.cpu_s < m.wall_s * 2  # the child's CPU time, from getrusage of reaped children


def test_sampler_covers_grandchildren():
    # The child allocates almost nothing; the grandchild holds 200 MB while the child waits for it.
    code = """
        import subprocess, sys
        subprocess.run([sys.executable, "-c",
                        "import numpy, time; a = numpy.ones(200_000_000 // 8); time.sleep(0.5)"], check=True)
    """
    m = bc.run_measured(_py(code), interval=0.02)
    assert m.returncode == 0
    assert m.peak_processes >= 2
    assert m.peak_pss >= 190e6, m


def test_temp_bytes_of_a_deleted_file(tmp_path):
    out = tmp_path / "out"
    code = f"""
        import os
        with open({str(tmp_path / 'scratch.bin')!r}, "wb") as f:
            f.write(b"t" * 30_000_000)
        os.remove({str(tmp_path / 'scratch.bin')!r})
        os.makedirs({str(out)!r})
        with open({str(out / 'final.bin')!r}, "wb") as f:
            f.write(b"o" * 10_000_000)
    """
    m = bc.run_measured(_py(code), log_path=str(tmp_path / "log.txt"), interval=0.02, watch_dir=str(out / "tmp"))
    m.output_bytes = bc.folder_bytes(str(out))
    assert m.returncode == 0
    assert m.output_bytes == 10_000_000
    assert 30_000_000 <= m.temp_bytes <= 30_000_000 + (1 << 20), m
    assert m.peak_tmp_bytes == 0


def test_wchar_of_reaped_workers_is_counted_once(tmp_path):
    # The kernel folds a reaped child's I/O counters into its parent's: the tree total must not double them.
    target = tmp_path / "scratch.bin"
    code = f"""
        import os, subprocess, sys, time
        subprocess.run([sys.executable, "-c", "open({str(target)!r}, 'wb').write(b'w' * 20_000_000)"], check=True)
        os.remove({str(target)!r})
        time.sleep(0.3)  # let the sampler see the parent after it reaped the worker
    """
    m = bc.run_measured(_py(code), interval=0.02)
    assert m.returncode == 0
    assert 20_000_000 <= m.wchar <= 20_000_000 + (1 << 20), m
    assert m.wchar_sampled_sum >= m.wchar  # the naive per-pid sum (kept for the JSON) may double count


def test_watch_dir_peak(tmp_path):
    tmp = tmp_path / "out" / "tmp"
    code = f"""
        import os, shutil, time
        os.makedirs({str(tmp)!r})
        open(os.path.join({str(tmp)!r}, "frag.pt"), "wb").write(b"f" * 3_000_000)
        time.sleep(0.4)
        shutil.rmtree({str(tmp)!r})
    """
    m = bc.run_measured(_py(code), interval=0.02, watch_dir=str(tmp))
    assert m.peak_tmp_bytes == 3_000_000
    assert 3_000_000 <= m.temp_bytes <= 3_000_000 + (1 << 20)  # nothing of it is output


def test_help_and_argv_wiring(capsys):
    with pytest.raises(SystemExit) as e:
        bc.main(["--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--small", "--workdir", "--cases", "--repeats", "--workers", "--json", "--input"):
        assert flag in usage
    args = bc.build_parser().parse_args(["--small", "--cases", "ours,cp", "--workers", "3", "--hidden-size", "128"])
    assert args.cases == ["ours", "cp"] and args.workers == 3 and args.repeats == 1
    cfg = bc.config_from_args(args)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (4, 128, 8, 8000)
    assert (cfg.tp, cfg.pp, cfg.dp, cfg.ranks) == (2, 2, 2, 8)
    default = bc.config_from_args(bc.build_parser().parse_args([]))
    assert (default.num_layers, default.hidden_size, default.num_attention_heads, default.vocab_size,
            default.seq_length) == (24, 1024, 16, 50257, 64)
    with pytest.raises(SystemExit):
        bc.build_parser().parse_args(["--cases", "ours,rsync"])


def test_trainer_and_case_commands():
    cfg = bc.CheckpointConfig()
    cmd = bc.build_command(cfg, "/x/checkpoints", 1234)
    joined = " ".join(cmd)
    assert "-m torch.distributed.run --nproc_per_node 8" in joined and "-m megatron_ucp.train" in joined
    for piece in ("--num-layers 24", "--hidden-size 1024", "--num-attention-heads 16", "--vocab-size 50257",
                  "--seq-length 64", "--max-position-embeddings 64", "--tensor-model-parallel-size 2",
                  "--pipeline-model-parallel-size 2", "--zero-stage 1", "--bf16", "--train-iters 1",
                  "--save /x/checkpoints", "--save-interval 1", "--micro-batch-size 1", "--global-batch-size 2",
                  "--eval-interval 0", "--mock-data", "--hidden-dropout 0", "--attention-dropout 0"):
        assert piece in joined
    ours = bc.case_command("ours", "/in", "/out", workers=3)
    assert ours[1].endswith("tools/ds_to_universal.py") and ours[-2:] == ["--num_extract_workers", "3"]
    assert "--no-verify" in ours  # timed like DeepSpeed's converter, which does not re-read its output
    assert "--num_extract_workers" not in bc.case_command("ours", "/in", "/out")
    verified = bc.case_command("ours-verified", "/in", "/out", workers=3)
    assert verified == [x for x in ours if x != "--no-verify"]  # the tool as a user runs it: it verifies
    assert bc.build_parser().parse_args([]).cases == list(bc.DEFAULT_CASES) == ["ours", "deepspeed", "cp"]
    assert bc.build_parser().parse_args(["--cases", "ours,ours-verified"]).cases == ["ours", "ours-verified"]
    assert bc.case_command("deepspeed", "/in", "/out")[1:] == [
        "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", "/in", "--output_folder", "/out"]
    assert bc.case_command("cp", "/in", "/out") == ["cp", "-r", "/in", "/out"]


def test_build_checkpoint_cache(tmp_path, monkeypatch):
    cfg = bc.CheckpointConfig(**bc.SMALL)
    calls = []

    def fake_build_command(cfg_, save_dir, port):  # a "trainer" that just makes the folder
        calls.append(save_dir)
        return [sys.executable, "-c", f"import os; os.makedirs({os.path.join(save_dir, 'global_step1')!r})"]

    monkeypatch.setattr(bc, "build_command", fake_build_command)
    logs = []
    first = bc.build_checkpoint(cfg, str(tmp_path), log=logs.append)
    assert os.path.isdir(first) and first.endswith(os.path.join(cfg.name, "checkpoints", "global_step1"))
    assert bc.build_checkpoint(cfg, str(tmp_path), log=logs.append) == first and len(calls) == 1  # reused
    assert any("reusing" in line for line in logs)
    other = bc.CheckpointConfig(**dict(bc.SMALL, seq_length=32))
    bc.build_checkpoint(other, str(tmp_path), log=logs.append)
    assert len(calls) == 2  # another config, another folder
    marker = Path(first).parents[1] / bc.MARKER
    doc = json.loads(marker.read_text())
    doc["config"]["seed"] = 7  # a stale marker forces a rebuild
    marker.write_text(json.dumps(doc))
    bc.build_checkpoint(cfg, str(tmp_path), log=logs.append)
    assert len(calls) == 3


def test_main_with_cp_only(tmp_path, monkeypatch, capsys):
    src = tmp_path / "ckpt" / "global_step1"
    src.mkdir(parents=True)
    (src / "a.pt").write_bytes(b"a" * 1_000_000)
    (src / "b.pt").write_bytes(b"b" * 500_000)
    facts = bc.CheckpointFacts(folder=str(src), bytes=1_500_000, files=2, parameters=10, largest_param="w",
                               largest_numel=6, tp=1, pp=1, dp=1)
    monkeypatch.setattr(bc, "checkpoint_facts", lambda folder: facts)
    monkeypatch.setattr(bc, "warm_imports", lambda env: None)
    out_json = tmp_path / "bench.json"
    assert bc.main(["--input", str(src), "--cases", "cp", "--repeats", "2", "--workdir", str(tmp_path / "work"),
                    "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| cp -r |" in text and "[n/a] ours >= 10x faster than DeepSpeed" in text
    doc = json.loads(out_json.read_text())
    cp = doc["cases"]["cp"]
    assert len(cp["walls"]) == 2 and cp["output_bytes"] == 1_500_000 and cp["temp_bytes"] <= (1 << 20)
    # The timed runs are not sampled; one sampled run after them measures memory (cp -r of 1.5 MB may end
    # before the first sample finds it, so only that the sampler ran is certain).
    assert [m["samples"] for m in cp["runs"]] == [0, 0] and len(cp["memory_runs"]) == 1
    assert cp["memory_runs"][0]["samples"] >= 1 and cp["peak_rss"] < (64 << 20)
    assert "timed cp r1" in text and "not sampled" in text and "memory cp mem1" in text
    assert doc["outputs_equal"] is None
    assert not os.listdir(tmp_path / "work" / "runs")  # outputs deleted after each run
