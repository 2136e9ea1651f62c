"""Universal checkpoints end to end on gloo: our converter vs DeepSpeed's, state fidelity across
topologies, loss continuity, and negative controls that must fail.

All checkpoints here come from real DeepSpeed training runs of our trainer (tiny GPT, mock data).
"""

import json
import shutil

import pytest
import torch

from dist_utils import run_distributed
from helpers import (GPT4, assemble, ds_args, gpt_cfg, load_tool, read_losses, train_and_dump, train_model,
                     vouch_for)
from megatron_ucp.checkpoint.inspect import compare_universal
from megatron_ucp.checkpoint.universal import certify_universal, convert_zero_to_universal
from megatron_ucp.checkpoint.zero import open_zero_checkpoint
from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import Kind, model_params
from megatron_ucp.layout.slicing import bitwise_equal

pytestmark = [pytest.mark.dist, pytest.mark.slow]

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Real ZeRO-1 checkpoints at four source layouts, their dumped states and universal conversions."""
    root = tmp_path_factory.mktemp("ucp")
    out = {}
    # bf16 and fp32 optimizer files (bf16_zero_* and zero_* names). DeepSpeed refuses fp16 on CPU.
    for tp, pp, dp, dtype in [(2, 2, 2, "bf16"), (1, 1, 2, "fp32"), (2, 1, 1, "bf16"), (4, 1, 1, "bf16")]:
        name = f"tp{tp}pp{pp}dp{dp}"
        dump = root / f"{name}_dump"
        dump.mkdir()
        cfg = gpt_cfg(tp, pp, dtype=dtype, save=str(root / name), save_interval=2)
        run_distributed(train_and_dump, tp * pp * dp, cfg, str(dump), GPT4)
        universal = root / f"{name}_universal" / "global_step2_universal"
        report = convert_zero_to_universal(str(root / name / "global_step2"), str(universal), verify=True)
        assert report.verified and report.iteration == 2
        out[name] = {"zero": root / name / "global_step2", "universal": universal, "dump": dump}
    return root, out


def test_our_output_equals_deepspeeds(sources):
    from deepspeed.checkpoint import ds_to_universal

    root, src = sources
    ds_out = root / "ds_universal" / "global_step2_universal"
    ds_to_universal.main(ds_args(src["tp2pp2dp2"]["zero"], ds_out))
    result = compare_universal(str(src["tp2pp2dp2"]["universal"]), str(ds_out))
    assert result.equal, result.summary()
    assert result.compared == 4 + 1 + 4 * 52  # mp files, optimizer_state.pt, 52 params x 4 states
    # Negative control: one changed element of one atom is reported.
    tampered = root / "tampered" / "global_step2_universal"
    shutil.copytree(ds_out, tampered)
    atom_path = tampered / "zero" / "3.mlp.dense_4h_to_h.weight" / "exp_avg.pt"
    atom = torch.load(atom_path, weights_only=False)
    atom["param"][0, 0] += 1e-7
    torch.save(atom, atom_path)
    bad = compare_universal(str(src["tp2pp2dp2"]["universal"]), str(tampered))
    assert bad.different == ["zero/3.mlp.dense_4h_to_h.weight/exp_avg.pt"]


@pytest.mark.parametrize("source,target,converter", [
    ("tp2pp2dp2", (1, 4, 1), "ours"),
    ("tp2pp2dp2", (1, 1, 1), "deepspeed"),
    ("tp1pp1dp2", (2, 2, 1), "ours"),
    ("tp2pp1dp1", (1, 2, 2), "ours"),
    ("tp4pp1dp1", (2, 2, 1), "ours"),
])
def test_state_fidelity_after_universal_load(sources, tmp_path, source, target, converter):
    """Gathered fp32 master weights and Adam moments after loading equal the source's, bitwise."""
    root, src = sources
    universal = src[source]["universal"]
    if converter == "deepspeed":  # each trainer resume accepts the other converter's output too
        from deepspeed.checkpoint import ds_to_universal

        universal = tmp_path / "ds" / "global_step2_universal"
        ds_to_universal.main(ds_args(src[source]["zero"], universal))
        certify_universal(str(src[source]["zero"]), str(universal))  # the trainer loads verified folders only
    tp, pp, dp = target
    dump = tmp_path / "dump"
    dump.mkdir()
    cfg = gpt_cfg(tp, pp, load=str(universal.parent), universal_checkpoint=True)
    run_distributed(train_and_dump, tp * pp * dp, cfg, str(dump), GPT4)
    want, _, _, _ = assemble(src[source]["dump"], GPT4)
    got, padding, global_steps, lr_steps = assemble(dump, GPT4)
    assert want.keys() == got.keys()
    for key in want:
        assert bitwise_equal(want[key], got[key]), key
    for key, pad in padding.items():
        assert not pad.any(), f"vocab padding rows of {key} are not zero"
    assert global_steps == 2 and lr_steps == 2


# ---------------------------------------------------------------------------------------------
# Loss continuity (fp32): baseline 25 iterations at TP2 PP2, universal checkpoint of iteration 5.

LOSS_ITERS, RESUME_AT = 25, 5


@pytest.fixture(scope="module")
def fp32_baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp32")
    cfg = gpt_cfg(2, 2, dtype="fp32", train_iters=LOSS_ITERS, save=str(root / "ckpt"), save_interval=RESUME_AT,
               loss_log=str(root / "baseline.jsonl"), lr_warmup_iters=5)
    run_distributed(train_model, 4, cfg, GPT4)
    universal = root / "universal" / f"global_step{RESUME_AT}_universal"
    convert_zero_to_universal(str(root / "ckpt" / f"global_step{RESUME_AT}"), str(universal))
    return root, read_losses(root / "baseline.jsonl"), universal


def _resume(root, universal, tp, pp, dp, name):
    cfg = gpt_cfg(tp, pp, dtype="fp32", train_iters=LOSS_ITERS, load=str(universal.parent), universal_checkpoint=True,
               loss_log=str(root / f"{name}.jsonl"), lr_warmup_iters=5)
    run_distributed(train_model, tp * pp * dp, cfg, GPT4)
    return read_losses(root / f"{name}.jsonl")


def _verdict(root, name, **tolerance):
    """The plot tool's verdict on baseline vs a resumed run (training and validation losses)."""
    from megatron_ucp.evidence.loss_curves import compare, load_curves

    resumed = load_curves(str(root / f"{name}.jsonl"))
    assert sorted(resumed.train) == list(range(RESUME_AT + 1, LOSS_ITERS + 1))
    return compare(load_curves(str(root / "baseline.jsonl")), resumed, resume_iteration=RESUME_AT, **tolerance)


def test_same_topology_universal_resume_is_exact(fp32_baseline):
    root, base, universal = fp32_baseline
    resumed = _resume(root, universal, 2, 2, 1, "same")
    assert [resumed[i] for i in sorted(resumed)] == [base[i] for i in sorted(resumed)]
    assert _verdict(root, "same", exact=True).passed


def test_topology_change_resume_is_continuous(fp32_baseline):
    root, base, universal = fp32_baseline
    _resume(root, universal, 1, 1, 2, "tp1pp1dp2")
    verdict = _verdict(root, "tp1pp1dp2", atol=1e-5, rtol_first=1e-5)  # measured: max 4.8e-7
    assert verdict.passed, verdict.reasons
    train = verdict.split("train")
    assert train.first_step_rel_diff <= 1e-5 and train.max_abs_diff <= 1e-5


@pytest.mark.parametrize("damage", ["zero_moments", "swap_qkv_tp_slices"])
def test_negative_controls_fail(fp32_baseline, tmp_path, damage):
    root, base, universal = fp32_baseline
    broken = tmp_path / "broken" / universal.name
    shutil.copytree(universal, broken)
    (tmp_path / "broken" / "latest_universal").write_text(universal.name)
    zero = broken / "zero"
    if damage == "zero_moments":
        for atom_dir in zero.iterdir():
            for key in ("exp_avg", "exp_avg_sq"):
                path = atom_dir / f"{key}.pt"
                if path.exists():
                    atom = torch.load(path, weights_only=False)
                    atom["param"] = torch.zeros_like(atom["param"])
                    torch.save(atom, path)
    else:
        path = zero / "1.self_attention.query_key_value.weight" / "fp32.pt"
        atom = torch.load(path, weights_only=False)
        atom["param"] = torch.cat(atom["param"].chunk(2, dim=0)[::-1]).contiguous()  # the two TP2 slices swapped
        torch.save(atom, path)
    vouch_for(broken)
    _resume(tmp_path, broken, 1, 1, 2, damage)
    shutil.copy(root / "baseline.jsonl", tmp_path / "baseline.jsonl")
    verdict = _verdict(tmp_path, damage, atol=1e-5, rtol_first=1e-5)
    assert not verdict.passed


def test_benchmark_counts_each_parameter_once(sources):
    """The conversion benchmark's parameter count on a real TP2 checkpoint: TP-replicated parameters
    once, sharded ones whole (padded vocabulary rows included), as the model's parameter table says."""
    root, src = sources
    facts = load_tool("benchmark_conversion").checkpoint_facts(str(src["tp2pp2dp2"]["zero"]))
    cfg = ModelConfig.from_dict(open_zero_checkpoint(str(src["tp2pp2dp2"]["zero"])).metadata["model_config"])
    padded = facts.padded_vocab_size
    want = 0
    for info in model_params(cfg):
        shape = list(info.full_shape)
        if info.kind is Kind.VOCAB:
            shape[0] = padded
        numel = 1
        for d in shape:
            numel *= d
        want += numel
    assert facts.tp == 2 and facts.parameters == want, (facts.parameters, want)


def test_conversion_benchmark_runs_its_real_cases(sources, tmp_path, capsys):
    """tools/benchmark_conversion.py end to end, small: our converter, DeepSpeed's and cp -r on a real
    TP2 PP2 DP2 checkpoint. Its printed table must show exactly the numbers it measured (the JSON), and
    its comparison must find our output equal to DeepSpeed's. The timed run is sampled (--memory-runs 0):
    one run per case instead of two (test_benchmark_conversion covers the separate memory runs)."""
    bc = load_tool("benchmark_conversion")
    root, src = sources
    out_json = tmp_path / "bench.json"
    assert bc.main(["--input", str(src["tp2pp2dp2"]["zero"]), "--cases", "ours,deepspeed,cp", "--repeats", "1",
                    "--memory-runs", "0", "--workdir", str(tmp_path / "work"), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out_json.read_text())
    assert doc["outputs_equal"] is True and doc["comparison"]["compared"] > 50
    assert "ours == DeepSpeed (compare_universal().equal): True" in printed
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| case")}
    assert set(rows) == {bc.CASE_LABELS[c] for c in ("ours", "deepspeed", "cp")}
    for case in ("ours", "deepspeed", "cp"):
        r = doc["cases"][case]
        row = rows[bc.CASE_LABELS[case]]
        assert len(r["walls"]) == 1 and r["walls"][0] > 0
        assert row[0] == f"{r['best_wall_s']:.2f}" and row[1] == f"{r['mean_wall_s']:.2f}"
        assert row[8] == f"{r['output_bytes'] / 1e9:.3f}"
        assert r["output_bytes"] > 0
        if case != "cp":  # cp -r of a small folder can end before the memory sampler's first look
            assert r["peak_rss"] > 0
    ratio = doc["cases"]["ours"]["walls"][0] / doc["cases"]["deepspeed"]["walls"][0]  # one round: its pair
    assert rows[bc.CASE_LABELS["ours"]][9] == f"{ratio:.2f}x"
    assert doc["table"] in printed
