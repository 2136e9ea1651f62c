"""fp16 with dynamic loss scaling, and resuming an fp16 run in fp16, bf16 and fp32 through its
universal checkpoint (Llama, fp16 TP2 PP2 -> other layouts and precisions).

DeepSpeed's CPU accelerator reports fp16 unsupported; the trainer enables it (half-precision storage,
GEMMs in fp32 on the exact fp16 inputs), so these are real fp16 DeepSpeed runs and files.
"""

import json
import os

import pytest
import torch

from dist_utils import run_distributed
from helpers import LLAMA_ITERS, LLAMA_RESUME_AT, TINY_LLAMA, llama_cfg
from megatron_ucp.checkpoint.universal import convert_zero_to_universal

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ITERS, RESUME_AT = LLAMA_ITERS, LLAMA_RESUME_AT


def _train_and_record_scaler(rank, world_size, cfg_dict, out_path):
    """Train (or resume) with the trainer's explicit steps, then record the engine's loss scaler."""
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import Trainer

    with Trainer(TINY_LLAMA, TrainConfig(**cfg_dict)) as trainer:
        trainer.build()
        trainer.load()
        trainer.run()
        optimizer = trainer.engine.optimizer
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"class": type(optimizer.loss_scaler).__name__,
                           "cur_scale": float(optimizer.loss_scaler.cur_scale),
                           "dynamic": bool(getattr(optimizer, "dynamic_loss_scale", False))}, f)


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    run_distributed(_train_and_record_scaler, 4,
                    llama_cfg(2, 2, dtype="fp16", save=str(root / "ckpt"), save_interval=RESUME_AT,
                         loss_log=str(root / "baseline.jsonl")), str(root / "baseline_scaler.json"))
    zero = root / "ckpt" / f"global_step{RESUME_AT}"
    universal = root / "universal" / f"global_step{RESUME_AT}_universal"
    assert convert_zero_to_universal(str(zero), str(universal), verify=True).verified
    return root, zero, universal


def _resume(root, universal, name, tp, pp, dp, dtype, zero_stage=1):
    cfg = llama_cfg(tp, pp, dtype=dtype, zero_stage=zero_stage, load=str(universal.parent), universal_checkpoint=True,
               loss_log=str(root / f"{name}.jsonl"))
    run_distributed(_train_and_record_scaler, tp * pp * dp, cfg, str(root / f"{name}_scaler.json"))
    with open(root / f"{name}_scaler.json") as f:
        return json.load(f)


def _verdict(root, name, **tol):
    from megatron_ucp.evidence.loss_curves import compare, load_curves

    return compare(load_curves(str(root / "baseline.jsonl")), load_curves(str(root / f"{name}.jsonl")),
                   resume_iteration=RESUME_AT, **tol)


def test_fp16_checkpoint_is_a_loss_scaled_fp16_run(fp16_run):
    root, zero, universal = fp16_run
    names = sorted(os.listdir(zero))
    assert [n for n in names if n.endswith("optim_states.pt")] == [
        f"zero_pp_rank_0_mp_rank_{m:02d}_optim_states.pt" for m in range(4)]  # no bf16_ prefix
    with open(root / "baseline_scaler.json") as f:
        scaler = json.load(f)
    assert scaler["class"] == "DynamicLossScaler" and scaler["dynamic"]
    saved = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False)
    assert saved["dynamic_loss_scale"] and saved["loss_scaler"].cur_scale == scaler["cur_scale"]


def test_fp16_resumes_in_fp16_keeping_the_loss_scale(fp16_run, tmp_path):
    root, _, universal = fp16_run
    (tmp_path / "baseline.jsonl").write_bytes((root / "baseline.jsonl").read_bytes())
    _resume(tmp_path, universal, "fp16", 1, 4, 1, "fp16")
    verdict = _verdict(tmp_path, "fp16", atol=1e-3, rtol_first=1e-4)
    assert verdict.passed, verdict.reasons
    # The scale DeepSpeed saved carries on (same precision): the run continues, it does not restart at 2^16.
    with open(root / "baseline_scaler.json") as f:
        base_scale = json.load(f)["cur_scale"]
    with open(tmp_path / "fp16_scaler.json") as f:
        assert json.load(f)["cur_scale"] == base_scale
    # No overflow happens in these few steps, so the scale above is still DeepSpeed's initial 2^16 and a
    # reset would look the same. A copy whose saved scale is 2^10 tells them apart: the resumed run
    # must continue from 2^10 (the window of 1000 clean steps that doubles it is not reached).
    import shutil

    from helpers import vouch_for

    edited = tmp_path / "edited" / universal.name
    shutil.copytree(universal, edited)
    (edited.parent / "latest_universal").write_text(universal.name)
    state_path = edited / "zero" / "optimizer_state.pt"
    state = torch.load(state_path, weights_only=False)  # written by this test run
    assert state["loss_scaler"].cur_scale == 2.0 ** 16 and base_scale == 2.0 ** 16
    state["loss_scaler"].cur_scale = 2.0 ** 10
    torch.save(state, state_path)
    vouch_for(edited)
    assert _resume(tmp_path, edited, "fp16_scale", 1, 4, 1, "fp16")["cur_scale"] == 2.0 ** 10


@pytest.mark.parametrize("name,layout,dtype,zero_stage,atol", [
    ("to_fp32", (2, 1, 2), "fp32", 1, 1e-3),
    ("to_fp32_zero3", (1, 1, 2), "fp32", 3, 1e-3),
    ("to_bf16", (1, 4, 1), "bf16", 1, 5e-3),
])
def test_fp16_resumes_in_another_precision(fp16_run, tmp_path, name, layout, dtype, zero_stage, atol):
    """The verdict reports the precision change's difference; the old precision's loss scaler is dropped."""
    from megatron_ucp.evidence.loss_curves import load_curves, write_report

    root, _, universal = fp16_run
    (tmp_path / "baseline.jsonl").write_bytes((root / "baseline.jsonl").read_bytes())
    scaler = _resume(tmp_path, universal, name, *layout, dtype, zero_stage)
    assert not scaler["dynamic"] and scaler["cur_scale"] == 1.0  # not fp16's dynamic scaler
    verdict = _verdict(tmp_path, name, atol=atol, rtol_first=1e-3)
    assert verdict.passed, verdict.reasons
    train = verdict.split("train")
    assert 0 < train.max_abs_diff <= atol  # a different precision is not bitwise the same run
    assert dtype in verdict.compared_label and "fp16" in verdict.reference_label
    curves = [load_curves(str(tmp_path / "baseline.jsonl")), load_curves(str(tmp_path / f"{name}.jsonl"))]
    write_report(curves, [verdict], tmp_path / "report")
    with open(tmp_path / "report" / "verdict.json") as f:
        report = json.load(f)
    assert report["comparisons"][0]["splits"]["train"]["max_abs_diff"] == pytest.approx(train.max_abs_diff)
    assert sorted(json.loads(line)["iteration"] for line in open(tmp_path / f"{name}.jsonl")
                  if json.loads(line)["split"] == "train") == list(range(RESUME_AT + 1, ITERS + 1))
