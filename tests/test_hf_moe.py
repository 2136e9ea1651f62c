"""Mixture-of-experts models through Hugging Face: Mixtral and Qwen3-MoE, import, export, logits.

Each model is a real ``transformers`` model built from a local config (vocabulary 256, 2 layers, GQA 4
heads / 2 key-value heads, 8 experts of width 32, top-2), its weights perturbed so every tensor and every
routing decision counts, saved by ``save_pretrained`` in shards. Against it:
- HF -> universal -> HF is bitwise, tensor by tensor and name by name, with the config.json entries kept,
  and ``from_pretrained`` loads the export; a fused checkpoint (transformers 5's module layout, as
  safetensors shards and as ``pytorch_model.bin``) imports to the same atoms reading only each expert's
  slice, and exports fused bitwise;
- a Qwen3-MoE with ``norm_topk_prob`` false imports as ``moe_renormalize`` False and exports it back;
- our fp32 logits are within 1e-5 of transformers' at EP1 and EP2 for both families and at TP2 PP2 EP2
  for Mixtral; a Mixtral whose routers skip the renormalisation (a test hook) and a Qwen3-MoE imported
  without it fail that check by more than 1e-3;
- what is not modelled is refused by the field's name.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import assert_equal
from megatron_ucp.checkpoint.atoms import atom_tensor
from megatron_ucp.checkpoint.format import atom_path
from megatron_ucp.checkpoint.zero import CheckpointError, load_file
from megatron_ucp.families import model_config_from_hf
from megatron_ucp.hf.from_universal import convert_universal_to_hf, read_universal_metadata
from megatron_ucp.hf.logits import compare, hf_logits, our_logits_many, random_tokens
from megatron_ucp.hf.reader import HFCheckpoint
from megatron_ucp.hf.to_universal import convert_hf_to_universal
from megatron_ucp.layout.hf import UnsupportedConfig
from megatron_ucp.layout.params import model_params

VOCAB, BATCH, SEQ, ATOL, CONTROL_GAP = 256, 2, 16, 1e-5, 1e-3
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, num_experts_per_tok=2)
MODELS = ("mixtral", "qwen3_moe", "qwen3_moe_unnormalized")
SHARD = "60KB"  # several shards each way


def _hf_config(kind: str):
    from transformers import MixtralConfig, Qwen3MoeConfig

    if kind == "mixtral":
        return MixtralConfig(**SIZES, intermediate_size=32, num_local_experts=8, router_aux_loss_coef=0.02)
    return Qwen3MoeConfig(**SIZES, intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=32,
                          norm_topk_prob=kind == "qwen3_moe")


def _hf_model(kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(MODELS.index(kind) + 21)
    model = AutoModelForCausalLM.from_config(_hf_config(kind))
    with torch.no_grad():  # HF sets norms to one and may start routers at zero: make every tensor count
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("mlp.gate.weight") else 0.05))
    return model.float().eval()


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as load_safetensors

    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_safetensors(os.path.join(folder, f)).items()}


def _config(folder) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _atoms(folder) -> dict[str, torch.Tensor]:
    cfg = read_universal_metadata(str(folder))["model_config"]
    from megatron_ucp.config import ModelConfig

    return {p.name: atom_tensor(load_file(atom_path(str(folder), p.name, "fp32")))
            for p in model_params(ModelConfig.from_dict(cfg))}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    for kind in MODELS:
        _hf_model(kind).save_pretrained(root / kind, max_shard_size=SHARD)
    return root


@pytest.fixture(scope="module")
def universal(hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe_universal")
    out = {kind: root / kind / "hf_universal" for kind in MODELS}
    for kind in MODELS:
        convert_hf_to_universal(str(hf / kind), str(out[kind]))
    # negative control: a Qwen3-MoE that renormalises, imported as one that does not
    out["qwen3_moe_renormalization_dropped"] = root / "control" / "hf_universal"
    convert_hf_to_universal(str(hf / "qwen3_moe"), str(out["qwen3_moe_renormalization_dropped"]),
                            _override_config={"moe_renormalize": False})
    return out


# --- HF layouts, round trips, config ----------------------------------------------------------------


def test_save_pretrained_writes_experts_one_tensor_each(hf):
    """What transformers 5.23 writes (its modules hold fused [E, ...] tensors): the per-expert names."""
    names = set(_tensors(hf / "mixtral"))
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in names
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert not any(".mlp." in n for n in names)
    names = set(_tensors(hf / "qwen3_moe"))
    assert {"model.layers.1.mlp.experts.7.gate_proj.weight", "model.layers.1.mlp.gate.weight"} <= names
    assert not any("gate_up_proj" in n for n in names)


@pytest.mark.parametrize("kind", MODELS)
def test_round_trip_is_bitwise_and_loads(hf, universal, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    src, back = hf / kind, tmp_path / "back"
    report = convert_universal_to_hf(str(universal[kind]), str(back), max_shard_size=SHARD)
    assert report.shards > 1 and (back / "model.safetensors.index.json").is_file()
    want, got = _tensors(src), _tensors(back)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert_equal(got[name], want[name], name)
    src_cfg, back_cfg = _config(src), _config(back)
    for key, value in src_cfg.items():
        if key == "transformers_version":
            continue
        if key == "head_dim" and value is None:  # transformers' hidden / heads, written out
            value = src_cfg["hidden_size"] // src_cfg["num_attention_heads"]
        assert back_cfg.get(key) == value, key
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert type(model) is type(reference)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, t in reference.state_dict().items():
        assert_equal(model.state_dict()[name], t, f"from_pretrained {name}")


def test_norm_topk_prob_survives_import_and_export(universal, tmp_path):
    for kind, renormalize in (("qwen3_moe", True), ("qwen3_moe_unnormalized", False), ("mixtral", True)):
        cfg = read_universal_metadata(str(universal[kind]))["model_config"]
        assert (cfg["moe_renormalize"], cfg["num_experts"], cfg["moe_top_k"]) == (renormalize, 8, 2), kind
    convert_universal_to_hf(str(universal["qwen3_moe_unnormalized"]), str(tmp_path / "back"))
    back = _config(tmp_path / "back")
    assert back["norm_topk_prob"] is False and back["num_experts"] == back["num_local_experts"] == 8
    assert back["moe_intermediate_size"] == 32 and back["intermediate_size"] == 96  # the unused dense width kept


def test_fused_checkpoints_import_by_expert_slice_and_export_fused(hf, universal, tmp_path, monkeypatch):
    """transformers 5's module layout (one [E, ...] tensor per layer and projection), as safetensors
    shards (our fused export) and as ``pytorch_model.bin``: both import to the per-expert import's atoms
    bitwise, reading no fused tensor whole; the fused export is the modules' state dict bitwise."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(hf / "mixtral", dtype=torch.float32)
    state = reference.state_dict()
    fused = tmp_path / "fused"
    convert_universal_to_hf(str(universal["mixtral"]), str(fused), max_shard_size=SHARD, experts="fused")
    got = _tensors(fused)
    assert "model.layers.0.mlp.experts.gate_up_proj" in got and sorted(got) == sorted(state)
    for name, t in state.items():
        assert_equal(got[name], t, f"fused export {name}")
    loaded = AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32)
    for name, t in state.items():
        assert_equal(loaded.state_dict()[name], t, f"from_pretrained of the fused export {name}")

    binary = tmp_path / "fused_bin"
    binary.mkdir()
    (binary / "config.json").write_text((fused / "config.json").read_text())
    torch.save({k: v.contiguous() for k, v in state.items()}, binary / "pytorch_model.bin")

    whole_reads = []
    read = HFCheckpoint.read

    def read_whole(self, name):
        if ".mlp.experts." in name:
            whole_reads.append(name)
        return read(self, name)

    monkeypatch.setattr(HFCheckpoint, "read", read_whole)
    want = _atoms(universal["mixtral"])
    for source in (fused, binary):
        out = tmp_path / f"u_{source.name}" / "hf_universal"
        convert_hf_to_universal(str(source), str(out))
        atoms = _atoms(out)
        assert atoms.keys() == want.keys()
        for name in want:
            assert_equal(atoms[name], want[name], f"{source.name}: {name}")
    assert whole_reads == []

    back = tmp_path / "fused_back"
    convert_universal_to_hf(str(tmp_path / "u_fused_bin" / "hf_universal"), str(back), experts="fused")
    again = _tensors(back)
    for name, t in state.items():
        assert_equal(again[name], t, f"fused .bin -> universal -> fused {name}")


def test_mixed_or_partial_expert_layouts_are_refused(hf, tmp_path):
    from safetensors.torch import save_file

    tensors = _tensors(hf / "mixtral")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    folder = tmp_path / "missing"
    folder.mkdir()
    (folder / "config.json").write_text((hf / "mixtral" / "config.json").read_text())
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 tensors a MixtralForCausalLM of this config needs are missing, "
                                              r"e\.g\. \['model\.layers\.1\.block_sparse_moe\.experts\.3\.w2"):
        convert_hf_to_universal(str(folder), str(tmp_path / "u" / "hf_universal"))
    # one fused tensor among per-expert ones: read as a fused checkpoint, which then lacks the others
    tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(64, 32)
    tensors["model.layers.0.mlp.experts.down_proj"] = torch.zeros(8, 64, 32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"5 tensors a MixtralForCausalLM of this config needs are missing, "
                                              r"e\.g\. \['model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        convert_hf_to_universal(str(folder), str(tmp_path / "u" / "hf_universal"))


def _hub_mixtral() -> dict:
    """Mixtral-8x7B's config.json as the Hub has it (transformers 4 era), at tiny sizes."""
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
            "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 1e6, "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2,
            "output_router_logits": False, "router_aux_loss_coef": 0.02, "tie_word_embeddings": False}


def _hub_qwen3_moe() -> dict:
    """Qwen3-30B-A3B's config.json as the Hub has it (``num_experts``), at tiny sizes."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
            "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": VOCAB,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "attention_bias": False,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
            "output_router_logits": False, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False}


def test_hub_configs_map_onto_model_configs():
    family, cfg = model_config_from_hf(_hub_mixtral())
    assert family.name == "mixtral"
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_renormalize, cfg.moe_loss_coeff) == (8, 2, True, 0.02)
    assert (cfg.ffn_hidden_size, cfg.sliding_window, cfg.rope_theta) == (32, None, 1e6)
    _, cfg = model_config_from_hf(dict(_hub_mixtral(), sliding_window=5))
    assert cfg.sliding_window == 5
    hub = _hub_mixtral()
    del hub["router_aux_loss_coef"]
    assert model_config_from_hf(hub)[1].moe_loss_coeff == 0.001  # MixtralConfig's default
    assert model_config_from_hf(dict(_hub_mixtral(), output_router_logits=True))[1].num_experts == 8  # a forward option

    family, cfg = model_config_from_hf(_hub_qwen3_moe())
    assert family.name == "qwen3_moe"
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_renormalize, cfg.moe_loss_coeff) == (8, 2, True, 0.001)
    assert (cfg.ffn_hidden_size, cfg.kv_channels, cfg.qk_layernorm) == (32, 32, True)
    hub = _hub_qwen3_moe()
    del hub["norm_topk_prob"]
    assert model_config_from_hf(hub)[1].moe_renormalize is False  # Qwen3MoeConfig's default
    hub = _hub_qwen3_moe()
    hub["num_local_experts"] = hub.pop("num_experts")  # transformers 5's name
    assert model_config_from_hf(hub)[1].num_experts == 8


@pytest.mark.parametrize("base,change,message", [
    ("mixtral", {"router_jitter_noise": 0.1}, r"router_jitter_noise=0\.1 is not supported \(the router adds no noise"),
    ("mixtral", {"router_jitter_noise": -1}, r"router_jitter_noise: expected a finite number >= 0"),
    ("mixtral", {"num_local_experts": 0}, r"num_local_experts: expected a positive integer, found int 0"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, r"decoder_sparse_step=2 is not supported \(every layer is sparse"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\] is not supported \(dense layers among sparse"),
    ("qwen3_moe", {"mlp_only_layers": "all"}, r"mlp_only_layers: expected a list of layer numbers"),
    ("qwen3_moe", {"num_local_experts": 16}, r"num_experts=8 and num_local_experts=16 disagree"),
    ("qwen3_moe", {"use_sliding_window": True}, r"use_sliding_window=True is not supported"),
    ("qwen3_moe", {"norm_topk_prob": "yes"}, r"norm_topk_prob: expected true or false"),
])
def test_refusals_name_the_field(base, change, message):
    hf_cfg = dict(_hub_mixtral() if base == "mixtral" else _hub_qwen3_moe(), **change)
    with pytest.raises(UnsupportedConfig, match=message):
        model_config_from_hf(hf_cfg)


def test_a_config_declaring_more_experts_than_the_weights_is_refused_before_sizing(hf, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for f in os.listdir(hf / "mixtral"):
        if f != "config.json":
            os.symlink(hf / "mixtral" / f, folder / f)
    (folder / "config.json").write_text(json.dumps(dict(_config(hf / "mixtral"), num_local_experts=10**6)))
    with pytest.raises(CheckpointError, match=r"num_local_experts: 1000000 is larger than every dimension"):
        convert_hf_to_universal(str(folder), str(tmp_path / "u" / "hf_universal"))


# --- logits ------------------------------------------------------------------------------------------


TOKENS = random_tokens(VOCAB, BATCH, SEQ, seed=5)


@pytest.fixture(scope="module")
def reference(hf):
    return {kind: hf_logits(str(hf / kind), TOKENS) for kind in MODELS}


SKIPPED = "mixtral_renormalization_skipped"  # our Mixtral, its routers told to skip the renormalisation (a test hook)
CONTROLS = {SKIPPED: "mixtral", "qwen3_moe_renormalization_dropped": "qwen3_moe"}  # control -> its reference


@pytest.fixture(scope="module")
def ours(universal):
    cache = {}

    def get(tp, pp, ep, kinds=MODELS):
        if (tp, pp, ep) not in cache:
            names = list(kinds) + (list(CONTROLS) if (tp, pp, ep) == (1, 1, 1) else [])
            folders = [str(universal["mixtral" if n == SKIPPED else n]) for n in names]
            skip = [i for i, n in enumerate(names) if n == SKIPPED]
            cache[(tp, pp, ep)] = dict(zip(names, our_logits_many(folders, TOKENS, tp, pp, ep,
                                                                   _skip_renormalization=skip)))
        return cache[(tp, pp, ep)]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp,ep,kinds", [
    pytest.param(1, 1, 1, MODELS, id="tp1pp1ep1"),
    pytest.param(1, 1, 2, MODELS, id="tp1pp1ep2", marks=pytest.mark.slow),
    pytest.param(2, 2, 2, ("mixtral",), id="tp2pp2ep2", marks=pytest.mark.slow),
])
def test_logits_match_transformers(reference, ours, tp, pp, ep, kinds):
    got = ours(tp, pp, ep, kinds)
    results = {kind: compare(reference[kind], got[kind]) for kind in kinds}
    lines = [f"{kind} TP{tp} PP{pp} EP{ep}: {r.summary()}" for kind, r in results.items()]
    print("\n".join(lines))
    assert all(r.max_abs <= ATOL and r.top1 == 1.0 for r in results.values()), "\n".join(lines)


@pytest.mark.dist
def test_skipping_the_renormalization_fails_the_logits_check(reference, ours):
    got = ours(1, 1, 1)
    for name, kind in CONTROLS.items():
        result = compare(reference[kind], got[name])
        print(f"{name}: {result.summary()}")
        assert result.max_abs > CONTROL_GAP, f"{name} passes the check: {result.summary()}"
