"""The Llama family (RMSNorm, rotary, SwiGLU fused per TP rank, GQA 8 heads / 2 KV heads, untied
head, no biases) through universal checkpoints: our converter equals DeepSpeed's, state fidelity
after TP2 -> TP1 and TP1 -> TP2 loads, fp32 loss continuity, and a wrong SwiGLU interleave fails."""

import shutil

import pytest
import torch

from dist_utils import run_distributed
from helpers import vouch_for
from megatron_ucp.checkpoint.inspect import compare_universal
from megatron_ucp.checkpoint.universal import convert_zero_to_universal
from test_universal import _assemble, _ds_args, _train_and_dump

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LLAMA = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, ffn_hidden_size=96,
             max_position_embeddings=16, make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0,
             swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True, tie_embeddings=False,
             add_bias_linear=False)
ITERS, RESUME_AT = 12, 4


def _cfg(tp, pp, **kw):
    base = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, micro_batch_size=1,
                global_batch_size=4, seq_length=16, train_iters=ITERS, lr=1e-3, min_lr=1e-4, lr_warmup_iters=2,
                lr_decay_iters=ITERS,  # the same schedule whether a run stops at RESUME_AT or at ITERS
                dtype="fp32", mock_data=True, vocab_size=50, log_interval=1, eval_interval=0)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A TP2 PP2 DP2 and a TP1 PP1 DP2 source, each dumped at RESUME_AT and converted."""
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for tp, pp, dp in [(2, 2, 2), (1, 1, 2)]:
        name = f"tp{tp}pp{pp}dp{dp}"
        dump = root / f"{name}_dump"
        dump.mkdir()
        cfg = _cfg(tp, pp, train_iters=RESUME_AT, save=str(root / name), save_interval=RESUME_AT)
        run_distributed(_train_and_dump, tp * pp * dp, cfg, str(dump), LLAMA)
        universal = root / f"{name}_universal" / f"global_step{RESUME_AT}_universal"
        assert convert_zero_to_universal(str(root / name / f"global_step{RESUME_AT}"), str(universal),
                                         verify=True).verified
        out[name] = {"zero": root / name / f"global_step{RESUME_AT}", "universal": universal, "dump": dump}
    return root, out


def test_llama_conversion_equals_deepspeeds(llama):
    from deepspeed.checkpoint import ds_to_universal

    root, src = llama
    ds_out = root / "ds" / f"global_step{RESUME_AT}_universal"
    ds_to_universal.main(_ds_args(src["tp2pp2dp2"]["zero"], ds_out))
    result = compare_universal(str(src["tp2pp2dp2"]["universal"]), str(ds_out))
    assert result.equal, result.summary()
    atom = torch.load(ds_out / "zero" / "1.mlp.dense_h_to_4h.weight" / "fp32.pt", weights_only=False)
    assert atom["param_n_sub_params"] == 2 and atom["param"].shape == (192, 64)


@pytest.mark.parametrize("source,target", [("tp2pp2dp2", (1, 4, 1)), ("tp1pp1dp2", (2, 2, 1))])
def test_llama_state_fidelity(llama, tmp_path, source, target):
    root, src = llama
    tp, pp, dp = target
    dump = tmp_path / "dump"
    dump.mkdir()
    cfg = _cfg(tp, pp, train_iters=RESUME_AT, load=str(src[source]["universal"].parent), universal_checkpoint=True)
    run_distributed(_train_and_dump, tp * pp * dp, cfg, str(dump), LLAMA)
    want, _, _, _ = _assemble(src[source]["dump"], LLAMA)
    got, padding, steps, _ = _assemble(dump, LLAMA)
    assert want.keys() == got.keys() and steps == RESUME_AT
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert all(not pad.any() for pad in padding.values())


def _train(rank, world_size, cfg_dict):
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import train

    train(LLAMA, TrainConfig(**cfg_dict))


def test_llama_loss_continuity_and_wrong_swiglu_interleave(llama, tmp_path):
    from megatron_ucp.evidence.loss_curves import compare, load_curves

    root, src = llama
    base = tmp_path / "base.jsonl"
    run_distributed(_train, 8, _cfg(2, 2, loss_log=str(base)))
    universal = src["tp2pp2dp2"]["universal"]
    resumed = tmp_path / "resumed.jsonl"
    run_distributed(_train, 4, _cfg(1, 4, load=str(universal.parent), universal_checkpoint=True, loss_log=str(resumed)))
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
    run_distributed(_train, 4, _cfg(1, 4, load=str(broken.parent), universal_checkpoint=True, loss_log=str(bad)))
    assert not compare(load_curves(str(base)), load_curves(str(bad)), resume_iteration=RESUME_AT, atol=1e-5,
                       rtol_first=1e-5).passed
