"""Families are declared, never inferred: chosen by name (``--model-family``, recorded in the metadata)
or by an HF config's ``model_type`` and ``architectures``; the MoE families are read as themselves.

Single process, no training: configs, the listing, the metadata's record and one tiny HF round trip.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import TINY_FLAGS, TINY_LLAMA
from megatron_ucp.checkpoint.format import CheckpointMetadata
from megatron_ucp.config import ModelConfig
from megatron_ucp.families import (FAMILIES, REFUSED, family_named, family_of_hf, family_of_model,
                                   hf_config_from_model, model_config_from_hf)
from megatron_ucp.families.__main__ import main as families_main
from megatron_ucp.layout.hf import UnsupportedConfig

SIZES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_the_listing_names_what_each_family_claims(capsys):
    assert families_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(FAMILIES) + len(REFUSED)
    for line, family in zip(lines, FAMILIES.values()):
        assert line.split()[0] == family.name
        assert family.architecture in line and repr(family.model_type) in line, line
    assert {f.name for f in FAMILIES.values()} == {"gpt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe"}
    assert not REFUSED
    # and a family's trainer flags, as the recipes read them, start with its name
    assert families_main(["qwen3", "--kv-heads", "2", "--ffn-hidden", "96"]) == 0
    flags = capsys.readouterr().out.split()
    assert flags[:2] == ["--model-family", "qwen3"] and "--qk-layernorm" in flags


def test_an_unknown_model_type_is_one_line_naming_it():
    with pytest.raises(UnsupportedConfig) as e:
        family_of_hf({"model_type": "falcon_mamba", "architectures": ["FalconMambaForCausalLM"]})
    message = _one_line(e)
    assert "'falcon_mamba'" in message and "FalconMambaForCausalLM" in message and "supported:" in message
    # a known architecture does not excuse an unknown model_type, nor the other way round
    with pytest.raises(UnsupportedConfig, match="model_type 'llama_moe'"):
        family_of_hf({"model_type": "llama_moe", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(UnsupportedConfig, match="LlamaModel"):
        family_of_hf({"model_type": "llama", "architectures": ["LlamaModel"]})
    # names claimed by two families are ambiguous, named
    with pytest.raises(UnsupportedConfig) as e:
        family_of_hf({"model_type": "llama", "architectures": ["MistralForCausalLM"]})
    assert "ambiguous" in _one_line(e) and "llama, mistral" in str(e.value)
    # either name alone chooses
    assert family_of_hf({"model_type": "qwen2"}).name == "qwen2"
    assert family_of_hf({"architectures": ["Qwen3ForCausalLM"]}).name == "qwen3"
    with pytest.raises(ValueError) as e:
        family_named("mixtral8x7b")
    assert "unknown model family 'mixtral8x7b'" in _one_line(e)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_models_are_read_as_their_family_and_never_as_dense(kind):
    from transformers import MixtralConfig, Qwen3MoeConfig

    make, arch = {"mixtral": (MixtralConfig, "MixtralForCausalLM"),
                  "qwen3_moe": (Qwen3MoeConfig, "Qwen3MoeForCausalLM")}[kind]
    hf = make(**SIZES).to_dict()
    hf["architectures"] = [arch]
    for variant in (hf, {k: v for k, v in hf.items() if k != "architectures"},  # model_type alone
                    {k: v for k, v in hf.items() if k != "model_type"}):  # architectures alone
        family, cfg = model_config_from_hf(variant)
        assert family.name == kind and cfg.is_moe and cfg.num_experts == (hf.get("num_local_experts")
                                                                          or hf.get("num_experts"))
    with pytest.raises(UnsupportedConfig, match="ambiguous"):  # beside a dense name
        model_config_from_hf(dict(hf, architectures=["LlamaForCausalLM", arch]))
    # a dense family refuses experts, and an MoE family a dense config, each in one line naming the other
    with pytest.raises(ValueError) as e:
        family_of_model(ModelConfig(vocab_size=96, **dict(TINY_LLAMA, num_experts=4)))
    assert "--num-experts is for the families mixtral, qwen3_moe" in _one_line(e)
    with pytest.raises(ValueError) as e:
        family_of_model(ModelConfig(vocab_size=96, **dict(TINY_LLAMA, model_family="mixtral")))
    assert "is a mixture of experts: give --num-experts" in _one_line(e)
    assert family_of_model(ModelConfig(vocab_size=96, **TINY_LLAMA)).name == "llama"


def test_a_config_must_have_what_its_family_fixes():
    llama = ModelConfig(vocab_size=96, **TINY_LLAMA)
    for name, change in (("gpt", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"add_qkv_bias": True}),
                         ("llama", {"sliding_window": 8})):
        cfg = dataclasses.replace(llama, model_family=name, **change)
        with pytest.raises(ValueError) as e:
            family_of_model(cfg)
        assert _one_line(e).startswith(f"model family {name!r} has "), str(e.value)
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        family_of_model(dataclasses.replace(llama, model_family="nope"))
    assert family_of_model(dataclasses.replace(llama, model_family="mistral")).name == "mistral"  # window optional
    assert family_of_model(dataclasses.replace(llama, model_family="mistral", sliding_window=8)).name == "mistral"
    # the trainer's flags are checked against the family they name before any start-up
    from megatron_ucp.training.arguments import configs_from_flags

    flags = list(family_named("llama").model_flags)
    with pytest.raises(ValueError) as e:
        configs_from_flags(TINY_FLAGS + flags[2:], environ={})  # the Llama switches without the name: gpt
    assert _one_line(e).startswith("model family 'gpt' has swiglu=False, but the config has True")
    kwargs, _ = configs_from_flags(TINY_FLAGS + flags, environ={})
    assert kwargs["model_family"] == "llama"


def test_the_family_is_recorded_and_read_back():
    from megatron_ucp.hf.to_universal import import_metadata

    from transformers import Qwen3Config

    hf = json.loads(Qwen3Config(**SIZES, head_dim=16).to_json_string())  # as config.json holds it
    family, cfg = model_config_from_hf(hf)
    assert family.name == cfg.model_family == "qwen3"
    data = import_metadata(cfg, family, hf, "/models/qwen3-tiny").to_dict()
    assert data["model_config"]["model_family"] == "qwen3"
    assert CheckpointMetadata.from_dict(json.loads(json.dumps(data))).model_config.model_family == "qwen3"
    # metadata from before the family was recorded: derived once, as the shape-guessing registry did
    for name, extra in (("qwen3", {}), ("qwen2", {"add_qkv_bias": True, "qk_layernorm": False}),
                        ("mistral", {"qk_layernorm": False, "sliding_window": 8}),
                        ("llama", {"qk_layernorm": False})):
        old = json.loads(json.dumps(data))
        old["model_config"].update(extra)
        del old["model_config"]["model_family"]
        assert CheckpointMetadata.from_dict(old).model_config.model_family == name
    gpt = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=96, max_position_embeddings=8)
    old = dict(data, model_config={k: v for k, v in gpt.to_dict().items() if k != "model_family"},
               original_vocab_size=96)
    assert CheckpointMetadata.from_dict(old).model_config == gpt
    # the trainer's flag sets it
    from megatron_ucp.training.arguments import model_kwargs, parse_args

    assert model_kwargs(parse_args(["--model-family", "mistral"]))["model_family"] == "mistral"
    assert model_kwargs(parse_args([]))["model_family"] == "gpt"


def test_a_windowless_mistral_stays_mistral(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_ucp.hf.from_universal import convert_universal_to_hf, read_folder_metadata
    from megatron_ucp.hf.to_universal import convert_hf_to_universal

    hf = MistralConfig(**SIZES, sliding_window=None)
    family, cfg = model_config_from_hf(hf.to_dict())
    assert family.name == cfg.model_family == "mistral" and cfg.sliding_window is None
    out = hf_config_from_model(cfg, "float32")
    assert (out["architectures"], out["model_type"], out["sliding_window"]) == (["MistralForCausalLM"], "mistral", None)
    assert model_config_from_hf(out)[1] == cfg

    torch.manual_seed(0)
    MistralForCausalLM(hf).save_pretrained(tmp_path / "src")
    convert_hf_to_universal(str(tmp_path / "src"), str(tmp_path / "u" / "hf_universal"))
    assert read_folder_metadata(str(tmp_path / "u" / "hf_universal")).model_config.model_family == "mistral"
    convert_universal_to_hf(str(tmp_path / "u" / "hf_universal"), str(tmp_path / "back"))
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["architectures"], back["model_type"], back["sliding_window"]) == \
        (["MistralForCausalLM"], "mistral", None)
