"""Hugging Face models as people use them: Llama 3.x rope scaling, linear scaling, an explicit head_dim,
Mistral's sliding window and Qwen3's q/k norms.

Each model is a real ``transformers`` model built from a local config (vocabulary 256, GQA 4 heads / 2
key-value heads; 4 layers, the fewest TP1 PP4 can split). Against it:
- our fp32 logits are within 1e-5 with 100% top-1 agreement at TP1 PP1, TP2 PP2 and TP1 PP4, and the
  negative controls (scaling ignored, head_dim taken as hidden / heads, q/k norms skipped, window
  ignored) fail that check;
- HF -> universal -> HF is bitwise and ``from_pretrained`` loads the export;
- the first training loss after import, under ZeRO-1 and ZeRO-3, is transformers' loss on that batch;
- a TP2 PP2 DP2 run of a Llama-3-style model converts like DeepSpeed's converter and resumes at TP1 PP4
  with fp32 loss continuity.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dist_utils import run_distributed
from helpers import TINY_LLAMA, assert_equal, ds_args, run_cfg, train_model
from megatron_ucp.checkpoint.zero import CheckpointError
from megatron_ucp.config import ModelConfig
from megatron_ucp.families import family_named, family_of_model, hf_config_from_model, model_config_from_hf
from megatron_ucp.hf.from_universal import convert_universal_to_hf
from megatron_ucp.hf.logits import compare, hf_logits, our_logits_many, random_tokens
from megatron_ucp.hf.to_universal import convert_hf_to_universal
from megatron_ucp.layout.hf import UnsupportedConfig, hf_mappings
from megatron_ucp.layout.params import model_params

VOCAB, BATCH, SEQ, ATOL = 256, 2, 16, 1e-5
TOPOLOGIES = [(1, 1), (2, 2), (1, 4)]
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}  # shorter than SEQ: the scaling changes the logits
MODELS = ("llama3", "linear", "head_dim", "mistral", "qwen3")
# name -> (model, converter control): each must fail the logits check (or the conversion itself)
CONTROLS = {"llama3_scaling_ignored": ("llama3", {"rope_scaling_type": "none"}),
            "linear_scaling_ignored": ("linear", {"rope_scaling_type": "none"}),
            "mistral_window_ignored": ("mistral", {"sliding_window": None}),
            "qwen3_qk_norms_skipped": ("qwen3", {"qk_layernorm": False, "model_family": "llama"})}


def _hf_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    if kind == "llama3":
        return LlamaConfig(**dict(SIZES, rope_theta=None), rope_parameters=dict(LLAMA3_ROPE, rope_theta=10000.0))
    if kind == "linear":
        return LlamaConfig(**dict(SIZES, rope_theta=None),
                           rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    if kind == "head_dim":
        return LlamaConfig(**SIZES, head_dim=32)  # hidden / heads = 16
    if kind == "mistral":
        return MistralConfig(**SIZES, sliding_window=5)  # shorter than SEQ
    if kind == "qwen3":
        return Qwen3Config(**SIZES, head_dim=32, tie_word_embeddings=False)
    raise ValueError(kind)


def _hf_model(kind: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(MODELS.index(kind) + 11)
    model = AutoModelForCausalLM.from_config(_hf_config(kind))
    with torch.no_grad():  # HF sets norms to one: make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


def _hf_json(kind: str, tmp_path) -> dict:
    _hf_config(kind).save_pretrained(tmp_path / kind)
    return json.loads((tmp_path / kind / "config.json").read_text())


# --- config mapping (single process) -------------------------------------------------------------


def test_families_are_told_apart_by_their_configs(tmp_path):
    want = {"llama3": "llama", "linear": "llama", "head_dim": "llama", "mistral": "mistral", "qwen3": "qwen3"}
    for kind, family in want.items():
        fam, cfg = model_config_from_hf(_hf_json(kind, tmp_path))
        assert fam.name == family and family_of_model(cfg).name == family, kind
    _, qwen3 = model_config_from_hf(_hf_json("qwen3", tmp_path))
    assert qwen3.head_dim == 32 and qwen3.kv_channels == 32 and qwen3.qk_layernorm and not qwen3.add_qkv_bias
    names = {p.name: p for p in model_params(qwen3)}
    assert names["1.self_attention.q_layernorm.weight"].full_shape == (32,)
    assert names["1.self_attention.query_key_value.weight"].full_shape == ((4 + 2 * 2) * 32, 64)
    assert names["1.self_attention.dense.weight"].full_shape == (64, 4 * 32)
    (m,) = [m for m in hf_mappings(qwen3, family_named("qwen3")) if m.name == "2.self_attention.k_layernorm.weight"]
    assert m.hf_names == ("model.layers.1.self_attn.k_norm.weight",)
    _, mistral = model_config_from_hf(_hf_json("mistral", tmp_path))
    assert mistral.sliding_window == 5 and mistral.kv_channels is None
    _, same = model_config_from_hf(dict(_hf_json("linear", tmp_path), head_dim=16))  # = hidden / heads
    assert same.kv_channels is None


def test_both_rope_config_forms_are_read_and_written_back(tmp_path):
    v5 = _hf_json("llama3", tmp_path)  # what transformers 5 writes: rope_parameters
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}  # the Hub's transformers 4 form
    v4.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    _, a = model_config_from_hf(v5)
    _, b = model_config_from_hf(v4)
    assert (a.rope_scaling_type, a.rope_scaling_factor, a.rope_original_max_position_embeddings, a.rope_theta) == \
        ("llama3", 8.0, 8, 10000.0)
    assert (b.rope_scaling_type, b.rope_scaling_factor, b.rope_original_max_position_embeddings, b.rope_theta) == \
        ("llama3", 32.0, 8192, 500000.0)
    old_style = dict(v4, rope_scaling={"type": "linear", "factor": 2.0})  # "type": the oldest spelling
    assert model_config_from_hf(old_style)[1].rope_scaling_type == "linear"
    out = hf_config_from_model(b, "float32")
    assert out["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert out["rope_scaling"]["rope_type"] == "llama3" and out["rope_theta"] == 500000.0
    assert model_config_from_hf(out)[1] == b  # and it reads back as the same model


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type='yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_type='linear' needs factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
])
def test_refusals_name_the_field(tmp_path, change, message):
    hf = dict(_hf_json("linear", tmp_path), **change)
    with pytest.raises(UnsupportedConfig, match=message):
        model_config_from_hf(hf)


def test_qwen3_refusals_name_the_field(tmp_path):
    hf = _hf_json("qwen3", tmp_path)
    with pytest.raises(UnsupportedConfig, match="use_sliding_window=True is not supported"):
        model_config_from_hf(dict(hf, use_sliding_window=True))
    with pytest.raises(UnsupportedConfig, match="attention_bias=True is not supported"):
        model_config_from_hf(dict(hf, attention_bias=True))


def test_model_config_checks_the_new_fields():
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=16)
    llama = dict(base, swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True,
                 add_bias_linear=False)
    with pytest.raises(ValueError, match="--kv-channels is for the Llama-shaped families"):
        ModelConfig(**base, kv_channels=32)
    with pytest.raises(ValueError, match="--sliding-window is for the Llama-shaped families"):
        ModelConfig(**base, sliding_window=4)
    with pytest.raises(ValueError, match="rope_scaling_type must be one of none, linear, llama3"):
        ModelConfig(**llama, rope_scaling_type="yarn")
    with pytest.raises(ValueError, match="llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor"):
        ModelConfig(**llama, rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_high_freq_factor=1.0)
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        ModelConfig(**llama, sliding_window=0)
    cfg = ModelConfig(**dict(llama, hidden_size=60, num_attention_heads=4), kv_channels=32)  # 60 % 4 is fine here
    assert cfg.head_dim == 32 and cfg.attention_width == 128
    assert ModelConfig(**llama, qk_layernorm=True).head_dim == 16


@pytest.mark.parametrize("kind", ["llama3", "linear", "head_dim"])
def test_rotary_frequencies_are_transformers_bitwise(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_ucp.families.llama import rotary

    hf_cfg = _hf_config(kind)
    rope_type = hf_cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        want = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)[0]
    else:
        want = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)[0]
    _, cfg = model_config_from_hf(hf_cfg.to_dict())
    got = rotary(cfg).inv_freq(cfg.head_dim)
    assert_equal(got, want, f"{kind} inv_freq")
    if rope_type != "default":  # the control: the same model without its scaling has other frequencies
        plain = rotary(ModelConfig.from_dict(dict(cfg.to_dict(), rope_scaling_type="none"))).inv_freq(cfg.head_dim)
        assert not torch.equal(plain, want)


def test_family_flags_build_each_family_from_scratch():
    from megatron_ucp.training.arguments import model_kwargs, parse_args

    sizes = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
             "--mock-data", "--vocab-size", "256", "--train-iters", "1"]
    for name in ("mistral", "qwen3"):
        family = family_named(name)
        flags = list(family.model_flags) + ["--num-key-value-heads", "2", "--ffn-hidden-size", "96"]
        args = parse_args(sizes + flags)
        cfg = ModelConfig(vocab_size=256, **model_kwargs(args))
        assert family_of_model(cfg) is family, name
    args = parse_args(sizes + list(family_named("llama").model_flags) + [
        "--kv-channels", "32", "--rope-scaling-type", "llama3", "--rope-scaling-factor", "8",
        "--rope-original-max-position-embeddings", "8"])
    cfg = ModelConfig(vocab_size=256, **model_kwargs(args))
    assert (cfg.head_dim, cfg.rope_scaling_type, cfg.rope_original_context) == (32, "llama3", 8)


# --- logits, round trip, first loss --------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_families")
    for kind in MODELS:
        _hf_model(kind).save_pretrained(root / kind, max_shard_size="100KB")
    return root


@pytest.fixture(scope="module")
def universal(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_families_universal")
    out = {}
    for kind in MODELS:
        out[kind] = root / kind / "hf_universal"
        convert_hf_to_universal(str(hf / kind), str(out[kind]))
    for name, (kind, override) in CONTROLS.items():
        out[name] = root / name / "hf_universal"
        convert_hf_to_universal(str(hf / kind), str(out[name]), _override_config=override)
    return out


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(VOCAB, BATCH, SEQ, seed=3)


@pytest.fixture(scope="module")
def reference(hf, tokens):
    return {kind: hf_logits(str(hf / kind), tokens) for kind in MODELS}


@pytest.fixture(scope="module")
def ours(universal, tokens):
    cache = {}

    def get(tp, pp):
        if (tp, pp) not in cache:
            names = list(MODELS) + (list(CONTROLS) if (tp, pp) == (1, 1) else [])
            cache[(tp, pp)] = dict(zip(names, our_logits_many([str(universal[n]) for n in names], tokens, tp, pp)))
        return cache[(tp, pp)]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [pytest.param(t, p, id=f"tp{t}pp{p}", marks=[pytest.mark.slow] if p > 1 else [])
                                   for t, p in TOPOLOGIES])
def test_logits_match_transformers(reference, ours, tp, pp):
    got = ours(tp, pp)
    for kind in MODELS:
        result = compare(reference[kind], got[kind])
        print(f"{kind} TP{tp} PP{pp}: {result.summary()}")
        assert result.max_abs <= ATOL and result.top1 == 1.0, f"{kind} TP{tp} PP{pp}: {result.summary()}"


@pytest.mark.dist
def test_negative_controls_fail_the_logits_check(reference, ours):
    got = ours(1, 1)
    for name, (kind, _) in CONTROLS.items():
        result = compare(reference[kind], got[name])
        print(f"{name}: {result.summary()}")
        assert result.max_abs > 100 * ATOL, f"{name} passes the check: {result.summary()}"


@pytest.mark.parametrize("kind", ["head_dim", "qwen3"])
def test_head_dim_taken_as_hidden_over_heads_fails_the_conversion(hf, tmp_path, kind):
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \(128, 64\), but config\.json implies "
                                              r"\(64, 64\)"):
        convert_hf_to_universal(str(hf / kind), str(tmp_path / "u" / "hf_universal"),
                                _override_config={"kv_channels": None})
    assert not (tmp_path / "u" / "hf_universal").exists()


@pytest.mark.parametrize("kind,dtype", [(k, torch.float32) for k in MODELS] + [("qwen3", torch.bfloat16)])
def test_round_trip_is_bitwise_and_loads(tmp_path, kind, dtype):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = _hf_model(kind, dtype)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    convert_hf_to_universal(str(tmp_path / "src"), str(tmp_path / "u" / "hf_universal"))
    convert_universal_to_hf(str(tmp_path / "u" / "hf_universal"), str(tmp_path / "back"))
    want = {k: v for f in (tmp_path / "src").glob("*.safetensors") for k, v in load_file(f).items()}
    got = {k: v for f in (tmp_path / "back").glob("*.safetensors") for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == dtype, name
        assert_equal(got[name], want[name], name)
    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    back_cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("architectures", "model_type", "head_dim", "rope_parameters", "sliding_window"):
        assert back_cfg.get(key) == src_cfg.get(key), key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=dtype)
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.config.rope_parameters == model.config.rope_parameters
    for name, t in model.state_dict().items():
        assert_equal(loaded.state_dict()[name], t, f"from_pretrained {name}")


def _first_losses(rank, world_size, folders, stage, out):
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.hf.logits import model_kwargs_of
    from megatron_ucp.training.trainer import train

    losses = {}
    for kind, load in folders.items():
        kwargs, vocab = model_kwargs_of(os.path.join(load, "hf_universal"))
        # One --finetune step at learning rate 0: the loss printed for it is the loaded model's.
        cfg = TrainConfig(zero_stage=stage, no_pipeline_parallel=stage > 1, micro_batch_size=BATCH,
                          global_batch_size=BATCH, seq_length=SEQ, train_iters=1, lr=0.0, min_lr=0.0,
                          weight_decay=0.0, finetune=True, dtype="fp32", mock_data=True, vocab_size=vocab, load=load,
                          universal_checkpoint=True, eval_interval=0, log_interval=1)
        losses[kind] = train(kwargs, cfg).last_loss
    if rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_first_training_loss_is_transformers_loss(hf, universal, tmp_path, stage):
    import numpy as np

    from megatron_ucp.training.data import MockDataset

    data = MockDataset(VOCAB, SEQ, 1234)  # the trainer's mock samples 0 and 1 (its default seed)
    batch = torch.from_numpy(np.stack([data[0], data[1]]))
    out = tmp_path / "losses.json"
    run_distributed(_first_losses, 1, {k: str(universal[k].parent) for k in MODELS}, stage, str(out))
    got = json.loads(out.read_text())
    for kind in MODELS:
        logits = hf_logits(str(hf / kind), batch[:, :-1])
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()
        print(f"{kind} ZeRO-{stage}: first loss {got[kind]:.8f}, transformers {want:.8f}")
        assert math.isfinite(got[kind]) and abs(got[kind] - want) <= 1e-5, kind


# --- a Llama-3-style model trained from scratch, converted and resumed at another topology ---------------

LLAMA3 = dict(TINY_LLAMA, rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_original_max_position_embeddings=8)
ITERS, RESUME_AT = 6, 3


def _train_cfg(tp, pp, **kw):
    return run_cfg(tp, pp, **{"train_iters": ITERS, "lr_warmup_iters": 1, "lr_decay_iters": ITERS,
                              "vocab_size": VOCAB, **kw})


@pytest.mark.dist
@pytest.mark.slow
def test_llama3_run_converts_like_deepspeed_and_resumes_at_tp1pp4(tmp_path):
    from deepspeed.checkpoint import ds_to_universal

    from megatron_ucp.checkpoint.inspect import compare_universal
    from megatron_ucp.checkpoint.universal import convert_zero_to_universal
    from megatron_ucp.evidence.loss_curves import compare as compare_curves
    from megatron_ucp.evidence.loss_curves import load_curves

    base = tmp_path / "base.jsonl"
    run_distributed(train_model, 8, _train_cfg(2, 2, save=str(tmp_path / "ckpt"), save_interval=RESUME_AT,
                                               loss_log=str(base)), LLAMA3)
    zero = tmp_path / "ckpt" / f"global_step{RESUME_AT}"
    ours = tmp_path / "ours" / f"global_step{RESUME_AT}_universal"
    assert convert_zero_to_universal(str(zero), str(ours), verify=True).verified
    ds_out = tmp_path / "ds" / f"global_step{RESUME_AT}_universal"
    ds_to_universal.main(ds_args(zero, ds_out))
    result = compare_universal(str(ours), str(ds_out))
    assert result.equal and result.compared > 100, result.summary()

    resumed = tmp_path / "resumed.jsonl"
    run_distributed(train_model, 4, _train_cfg(1, 4, load=str(ours.parent), universal_checkpoint=True,
                                               loss_log=str(resumed)), LLAMA3)
    verdict = compare_curves(load_curves(str(base)), load_curves(str(resumed)), resume_iteration=RESUME_AT,
                             atol=1e-5, rtol_first=1e-5)
    assert verdict.passed, verdict.reasons
    assert sorted(load_curves(str(resumed)).train) == list(range(RESUME_AT + 1, ITERS + 1))
    # The control: the same checkpoint resumed as a model without the scaling does not continue the curve.
    plain = tmp_path / "plain.jsonl"
    run_distributed(train_model, 1, _train_cfg(1, 1, load=str(ours.parent), universal_checkpoint=True,
                                               loss_log=str(plain)),
                    dict(LLAMA3, rope_scaling_type="none"))
    assert not compare_curves(load_curves(str(base)), load_curves(str(plain)), resume_iteration=RESUME_AT,
                              atol=1e-5, rtol_first=1e-5).passed
