"""The Llama family (RMSNorm, rotary, SwiGLU fused per TP rank, GQA 8 heads / 2 KV heads, untied
head, no biases) through universal checkpoints: our converter equals DeepSpeed's, state fidelity
after TP2 -> TP1 and TP1 -> TP2 loads, fp32 loss continuity, and a wrong SwiGLU interleave fails."""

import shutil

import pytest
import torch

from dist_utils import run_distributed
from helpers import (LLAMA_ITERS, LLAMA_RESUME_AT, TINY_LLAMA, assemble, ds_args, llama_cfg, train_and_dump,
                     train_model, vouch_for)
from megatron_ucp.checkpoint.inspect import compare_universal

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ITERS, RESUME_AT = LLAMA_ITERS, LLAMA_RESUME_AT


@pytest.fixture(scope="module")
def llama(llama_runs):
    """A TP2 PP2 DP2 and a TP1 PP1 DP2 source (the session's ``llama_runs``), each dumped at RESUME_AT
    and converted."""
    return {"tp2pp2dp2": llama_runs(2, 2, 2), "tp1pp1dp2": llama_runs(1, 1, 2)}


def test_llama_conversion_equals_deepspeeds(llama, tmp_path):
    from deepspeed.checkpoint import ds_to_universal

    ds_out = tmp_path / "ds" / f"global_step{RESUME_AT}_universal"
    ds_to_universal.main(ds_args(llama["tp2pp2dp2"]["zero"], ds_out))
    result = compare_universal(str(llama["tp2pp2dp2"]["universal"]), str(ds_out))
    assert result.equal, result.summary()
    atom = torch.load(ds_out / "zero" / "1.mlp.dense_h_to_4h.weight" / "fp32.pt", weights_only=False)
    assert atom["param_n_sub_params"] == 2 and atom["param"].shape == (192, 64)


@pytest.mark.parametrize("source,target", [("tp2pp2dp2", (1, 4, 1)), ("tp1pp1dp2", (2, 2, 1))])
def test_llama_state_fidelity(llama, tmp_path, source, target):
    tp, pp, dp = target
    dump = tmp_path / "dump"
    dump.mkdir()
    cfg = llama_cfg(tp, pp, train_iters=RESUME_AT, load=str(llama[source]["universal"].parent),
                    universal_checkpoint=True)
    run_distributed(train_and_dump, tp * pp * dp, cfg, str(dump), TINY_LLAMA)
    want, _, _, _ = assemble(llama[source]["dump"], TINY_LLAMA)
    got, padding, steps, _ = assemble(dump, TINY_LLAMA)
    assert want.keys() == got.keys() and steps == RESUME_AT
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert all(not pad.any() for pad in padding.values())


def test_llama_loss_continuity_and_wrong_swiglu_interleave(llama, tmp_path):
    from megatron_ucp.evidence.loss_curves import compare, load_curves

    base = llama["tp2pp2dp2"]["losses"]  # the source run carried on to ITERS without a stop
    universal = llama["tp2pp2dp2"]["universal"]
    resumed = tmp_path / "resumed.jsonl"
    run_distributed(train_model, 4, llama_cfg(1, 4, load=str(universal.parent), universal_checkpoint=True,
                                              loss_log=str(resumed)), TINY_LLAMA)
    verdict = compare(load_curves(str(base)), load_curves(str(resumed)), resume_iteration=RESUME_AT, atol=1e-5,
                      rtol_first=1e-5)  # measured: max 4.8e-7
    assert verdict.passed, verdict.reasons
    assert sorted(load_curves(str(resumed)).train) == list(range(RESUME_AT + 1, ITERS + 1))

    # Negative control: the SwiGLU atoms rewritten as the TP2 per-rank concatenation [g0; u0; g1; u1]
    # (what a plain cat without the sub-parameter rule gives) must break the resume.
    broken = tmp_path / "broken" / universal.name
    shutil.copytree(universal, broken)
    (broken.parent / "latest_universal").write_text(universal.name)
    for layer in range(1, 5):
        path = broken / "zero" / f"{layer}.mlp.dense_h_to_4h.weight" / "fp32.pt"
        atom = torch.load(path, weights_only=False)
        gate, up = atom["param"].chunk(2)
        atom["param"] = torch.cat([gate.chunk(2)[0], up.chunk(2)[0], gate.chunk(2)[1], up.chunk(2)[1]])
        torch.save(atom, path)
    vouch_for(broken)
    bad = tmp_path / "bad.jsonl"
    run_distributed(train_model, 4, llama_cfg(1, 4, load=str(broken.parent), universal_checkpoint=True,
                                              loss_log=str(bad)), TINY_LLAMA)
    assert not compare(load_curves(str(base)), load_curves(str(bad)), resume_iteration=RESUME_AT, atol=1e-5,
                       rtol_first=1e-5).passed
