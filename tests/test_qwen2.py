"""Qwen2, the family added as one module (``megatron_ucp/families/qwen2.py``) plus one table entry.

Against real ``transformers`` ``Qwen2ForCausalLM`` models built from local configs: logits at TP1 PP1
and TP2 PP2 within 1e-5, HF -> universal -> HF bitwise; and from a real TP2 PP2 DP2 training run of
ours, our converter's output equals DeepSpeed's and a TP1 load restores every state tensor bitwise.
The QKV biases are what Qwen2 adds, so the negative controls break exactly those.
"""

import json

import pytest
import torch

from dist_utils import run_distributed
from helpers import TINY_LLAMA, assemble, assert_equal, ds_args, run_cfg, train_and_dump
from megatron_ucp.checkpoint.inspect import compare_universal
from megatron_ucp.checkpoint.universal import convert_zero_to_universal
from megatron_ucp.config import ModelConfig
from megatron_ucp.families import family_of_model, family_named, model_config_from_hf
from megatron_ucp.hf.from_universal import convert_universal_to_hf
from megatron_ucp.hf.logits import compare, hf_logits, our_logits_many, random_tokens
from megatron_ucp.hf.to_universal import convert_hf_to_universal
from megatron_ucp.layout.hf import hf_mappings
from megatron_ucp.layout.params import model_params

VOCAB, BATCH, SEQ = 96, 2, 16
ATOL = 1e-5
QWEN2 = dict(TINY_LLAMA, add_qkv_bias=True, model_family="qwen2")


def _hf_qwen2(dtype=torch.float32, seed=5):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rope_theta=1000.0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF zero-initialises the biases and sets norms to one: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def test_the_family_is_llama_plus_qkv_biases():
    cfg = ModelConfig(vocab_size=VOCAB, **QWEN2)
    assert family_of_model(cfg).name == "qwen2"
    llama = ModelConfig(vocab_size=VOCAB, **dict(QWEN2, add_qkv_bias=False, model_family="llama"))
    assert family_of_model(llama).name == "llama"
    extra = {p.name for p in model_params(cfg)} - {p.name for p in model_params(llama)}
    assert extra == {f"{i + 1}.self_attention.query_key_value.bias" for i in range(4)}
    (m,) = [m for m in hf_mappings(cfg, family_named("qwen2")) if m.name == "1.self_attention.query_key_value.bias"]
    assert m.hf_names == tuple(f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv")
    with pytest.raises(ValueError, match="--add-qkv-bias is for the Llama-shaped families"):
        ModelConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_attention_heads=4,
                    max_position_embeddings=16, add_qkv_bias=True)


def test_hf_config_mapping_both_ways(tmp_path):
    model = _hf_qwen2()
    model.config.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    family, cfg = model_config_from_hf(hf)
    assert family.name == "qwen2" and cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.rope_theta == 1000.0
    from megatron_ucp.layout.hf import UnsupportedConfig

    with pytest.raises(UnsupportedConfig, match="use_sliding_window=True is not supported"):
        model_config_from_hf(dict(hf, use_sliding_window=True))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_hf")
    _hf_qwen2().save_pretrained(root / "hf", max_shard_size="30KB")
    convert_hf_to_universal(str(root / "hf"), str(root / "u" / "hf_universal"))
    return root


@pytest.mark.dist
@pytest.mark.slow
def test_logits_match_transformers_at_tp1pp1_and_tp2pp2(hf_folder):
    tokens = random_tokens(VOCAB, BATCH, SEQ, seed=7)
    reference = hf_logits(str(hf_folder / "hf"), tokens)
    # Negative control: the same model with its QKV biases zeroed in the universal atoms.
    broken = hf_folder / "broken" / "hf_universal"
    import shutil

    shutil.copytree(hf_folder / "u" / "hf_universal", broken)
    from helpers import vouch_for

    for atom in broken.glob("zero/*.self_attention.query_key_value.bias/fp32.pt"):
        d = torch.load(atom, weights_only=False)
        d["param"] = torch.zeros_like(d["param"])
        torch.save(d, atom)
    vouch_for(broken)
    (broken.parent / "latest_universal").write_text("hf_universal")
    for tp, pp in [(1, 1), (2, 2)]:
        got, control = our_logits_many([str(hf_folder / "u" / "hf_universal"), str(broken)], tokens, tp, pp)
        result = compare(reference, got)
        print(f"qwen2 TP{tp} PP{pp}: {result.summary()}")
        assert result.max_abs <= ATOL and result.top1 == 1.0, result.summary()
        assert compare(reference, control).max_abs > 100 * ATOL  # the biases matter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise(tmp_path, dtype):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = _hf_qwen2(dtype)
    model.save_pretrained(tmp_path / "src", max_shard_size="30KB")
    convert_hf_to_universal(str(tmp_path / "src"), str(tmp_path / "u" / "hf_universal"))
    convert_universal_to_hf(str(tmp_path / "u" / "hf_universal"), str(tmp_path / "back"))
    want = {k: v for f in (tmp_path / "src").glob("*.safetensors") for k, v in load_file(f).items()}
    got = {k: v for f in (tmp_path / "back").glob("*.safetensors") for k, v in load_file(f).items()}
    assert got.keys() == want.keys() and any(k.endswith("q_proj.bias") for k in got)
    for name in want:
        assert got[name].dtype == dtype, name
        assert_equal(got[name], want[name], name)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=dtype)
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    for name, t in model.state_dict().items():
        assert_equal(loaded.state_dict()[name], t, f"from_pretrained {name}")


def _cfg(tp, pp, **kw):
    return run_cfg(tp, pp, **{"train_iters": 3, "lr_warmup_iters": 1, "lr_decay_iters": 3, **kw})


@pytest.mark.dist
@pytest.mark.slow
def test_trained_tp2pp2dp2_converts_like_deepspeed_and_loads_at_tp1(tmp_path):
    from deepspeed.checkpoint import ds_to_universal

    dump = tmp_path / "dump"
    dump.mkdir()
    run_distributed(train_and_dump, 8, _cfg(2, 2, save=str(tmp_path / "ckpt"), save_interval=3), str(dump), QWEN2)
    zero = tmp_path / "ckpt" / "global_step3"
    ours = tmp_path / "ours" / "global_step3_universal"
    assert convert_zero_to_universal(str(zero), str(ours), verify=True).verified
    ds_out = tmp_path / "ds" / "global_step3_universal"
    ds_to_universal.main(ds_args(zero, ds_out))
    result = compare_universal(str(ours), str(ds_out))
    assert result.equal and result.compared > 100, result.summary()
    bias = torch.load(ours / "zero" / "1.self_attention.query_key_value.bias" / "fp32.pt", weights_only=False)
    assert bias["param"].shape == (8 * 8 + 2 * 2 * 8,) and bias["param"].abs().sum() > 0  # trained, not zeros

    back = tmp_path / "back"
    back.mkdir()
    run_distributed(train_and_dump, 2, _cfg(1, 1, train_iters=3, load=str(ours.parent), universal_checkpoint=True),
                    str(back), QWEN2)
    want, _, _, _ = assemble(dump, QWEN2)
    got, _, steps, _ = assemble(back, QWEN2)
    assert want.keys() == got.keys() and steps == 3
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert any("query_key_value.bias" in str(k) for k in want)
