"""Checkpoint metadata and file names (``checkpoint/format.py``): JSON round trips, format-1 dicts as the
code before format 2 wrote them and format-2 files (``fixtures/metadata_v2``) read to the same objects the
writers build now, and what is wrong with
bad metadata is refused in one line naming the key (and the file); the names match DeepSpeed's globs."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_ucp.checkpoint import format as fmt
from megatron_ucp.checkpoint.format import (
    METADATA_FORMAT_VERSION,
    METADATA_KEY,
    CheckpointMetadata,
    PipeEntryRecord,
    Versions,
)
from megatron_ucp.checkpoint.trust import CheckpointError
from megatron_ucp.config import ModelConfig, TrainConfig
from megatron_ucp.families import model_config_from_hf
from megatron_ucp.layout.topology import ParallelLayout

# Format 1, copied from the model-state files the code before format 2 wrote (a TP1 PP1 DP1 ZeRO-1 run
# of 1 iteration, and an HF import of a 2-layer GPT-2); only the two folder paths are shortened.
V1_TRAINING = {
    "format_version": 1,
    "model_config": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "vocab_size": 50,
                     "max_position_embeddings": 16, "ffn_hidden_size": 64, "make_vocab_size_divisible_by": 8,
                     "layernorm_epsilon": 1e-05, "hidden_dropout": 0.1, "attention_dropout": 0.1,
                     "init_method_std": 0.02, "tie_embeddings": True, "swiglu": False, "normalization": "layernorm",
                     "use_rotary_position_embeddings": False, "rope_theta": 10000.0, "add_bias_linear": True,
                     "num_key_value_heads": 2},
    "train_config": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "zero_stage": 1,
                     "micro_batch_size": 1, "global_batch_size": 1, "seq_length": 8, "train_iters": 1, "lr": 0.0003,
                     "min_lr": 3e-05, "lr_warmup_iters": 0, "lr_decay_iters": 1, "lr_decay_style": "cosine",
                     "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-08, "clip_grad": 1.0,
                     "dtype": "fp32", "seed": 1234, "data_path": None, "mock_data": True, "split": "969,30,1",
                     "tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": None, "vocab_file": None,
                     "merge_file": None, "vocab_size": 50, "log_interval": 1, "eval_interval": 0, "eval_iters": 4,
                     "tensorboard_dir": None, "loss_log": None, "save": "/runs/ckpt", "save_interval": 1,
                     "load": None, "universal_checkpoint": False, "no_load_rng": False,
                     "trust_checkpoint_code": False, "finetune": False, "no_pipeline_parallel": False,
                     "deepspeed_config": None, "ds_config_out": None},
    "topology": {"tp": 1, "pp": 1, "dp": 1},
    "original_vocab_size": 50,
    "padded_vocab_size": 56,
    "pipeline_parts": [0, 5],
    "pipe_entries": [{"index": 0, "role": "embed", "layer_number": None, "tied_key": "embed"},
                     {"index": 1, "role": "block", "layer_number": 0, "tied_key": None},
                     {"index": 2, "role": "block", "layer_number": 1, "tied_key": None},
                     {"index": 3, "role": "final_norm", "layer_number": None, "tied_key": None},
                     {"index": 4, "role": "head", "layer_number": None, "tied_key": "embed"}],
    "dtype": "fp32",
    "zero_stage": 1,
    "versions": {"megatron_ucp": "0.1.0", "deepspeed": "0.19.8", "torch": "2.13.0+cpu"},
    "iteration": 1,
    "consumed_train_samples": 1,
}

V1_HF_IMPORT = {
    "format_version": 1,
    "model_config": {"num_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "vocab_size": 96,
                     "max_position_embeddings": 32, "ffn_hidden_size": 64, "make_vocab_size_divisible_by": 128,
                     "layernorm_epsilon": 1e-05, "hidden_dropout": 0.1, "attention_dropout": 0.1,
                     "init_method_std": 0.02, "tie_embeddings": True, "swiglu": False, "normalization": "layernorm",
                     "use_rotary_position_embeddings": False, "rope_theta": 10000.0, "add_bias_linear": True,
                     "num_key_value_heads": 2},
    "original_vocab_size": 96,
    "padded_vocab_size": 128,
    "dtype": "fp32",
    "iteration": 0,
    "consumed_train_samples": 0,
    "source": "huggingface",
    "hf_source": {"architecture": "GPT2LMHeadModel", "dtype": "float32",
                  "config": {"activation_function": "gelu_new", "add_cross_attention": False,
                             "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 0,
                             "dtype": "float32", "embd_pdrop": 0.1, "eos_token_id": 0, "initializer_range": 0.02,
                             "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_embd": 16, "n_head": 2,
                             "n_inner": None, "n_layer": 2, "n_positions": 32, "pad_token_id": None,
                             "reorder_and_upcast_attn": False, "resid_pdrop": 0.1,
                             "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
                             "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
                             "summary_type": "cls_index", "summary_use_proj": True, "tie_word_embeddings": True,
                             "transformers_version": "5.23.0", "use_cache": True, "vocab_size": 96},
                  "path": "/models/gpt2-tiny"},
    "versions": {"megatron_ucp": "0.1.0", "torch": "2.13.0+cpu"},
}


def _training_metadata() -> CheckpointMetadata:
    """What the trainer's writer builds today for the run V1_TRAINING came from, at its iteration."""
    from megatron_ucp.training.checkpointing import build_metadata

    model = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=50, max_position_embeddings=16,
                        make_vocab_size_divisible_by=8)
    train = TrainConfig(micro_batch_size=1, global_batch_size=1, seq_length=8, train_iters=1, dtype="fp32",
                        mock_data=True, vocab_size=50, eval_interval=0, save="/runs/ckpt", save_interval=1,
                        log_interval=1)
    meta = build_metadata(model, train, SimpleNamespace(layout=ParallelLayout(1, 1, 1)), 56, [0, 5])
    # The train config is a record of the run: flags added since that run are simply not in it.
    assert meta.train_config is not None
    record = {k: v for k, v in meta.train_config.items() if k not in TRAIN_FLAGS_SINCE_V1}
    return dataclasses.replace(meta, iteration=1, consumed_train_samples=1, train_config=record,
                               versions=Versions(megatron_ucp="0.1.0", torch="2.13.0+cpu", deepspeed="0.19.8"))


TRAIN_FLAGS_SINCE_V1 = ("ckpt_step", "universal_loader", "allow_vocab_extension", "eval_at_start",
                        "moe_expert_parallel_size", "create_moe_param_group", "sequence_parallel",
                        "ds_sequence_parallel_size", "report_memory", "save_interval_minutes",
                        "exit_signal_handler", "elastic_layout", "distributed_timeout_minutes")
# ModelConfig fields added after format 2 (MoE): an older file reads them as their defaults and writes them back.
MODEL_FIELDS_SINCE_V2 = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                         if f.name == "num_experts" or f.name.startswith("moe_")}


def _import_metadata() -> CheckpointMetadata:
    """What the HF import's writer builds today for the model V1_HF_IMPORT came from."""
    from megatron_ucp.hf.to_universal import import_metadata

    hf_config = copy.deepcopy(V1_HF_IMPORT["hf_source"]["config"])
    family, cfg = model_config_from_hf(hf_config)
    meta = import_metadata(cfg, family, hf_config, "/models/gpt2-tiny")
    return dataclasses.replace(meta, versions=Versions(megatron_ucp="0.1.0", torch="2.13.0+cpu", deepspeed=None))


def _refused(data, where: str = METADATA_KEY) -> str:
    with pytest.raises(CheckpointError) as e:
        CheckpointMetadata.from_dict(data, where=where)
    message = str(e.value)
    assert "\n" not in message
    return message


def _changed(base: dict, **changes) -> dict:
    d = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = d
        for p in parents:
            target = target[p]
        if value is _DROP:
            del target[last]
        else:
            target[last] = value
    return d


_DROP = object()


# --- round trips and format 1 ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [_training_metadata, _import_metadata], ids=["training", "hf_import"])
def test_to_dict_is_json_and_reads_back_to_the_same_object(build):
    meta = build()
    text = json.dumps(meta.to_dict())  # plain JSON: no tensors, tuples or dataclasses left
    data = json.loads(text)
    assert data["format_version"] == METADATA_FORMAT_VERSION
    assert CheckpointMetadata.from_dict(data) == meta
    # every key is written, null where it does not apply
    assert set(data) == {"format_version"} | {f.name for f in dataclasses.fields(CheckpointMetadata)}
    # negative control: one changed value reads to another object
    assert CheckpointMetadata.from_dict(_changed(data, iteration=7)) != meta


def test_format_1_training_dict_reads_to_what_the_trainer_writes_now():
    old = CheckpointMetadata.from_dict(copy.deepcopy(V1_TRAINING))
    assert old == _training_metadata()
    assert old.source == fmt.SOURCE_TRAINING and old.topology == ParallelLayout(1, 1, 1) and old.hf_source is None
    assert old.to_dict()["format_version"] == METADATA_FORMAT_VERSION
    assert CheckpointMetadata.from_dict(_changed(V1_TRAINING, padded_vocab_size=64)) != _training_metadata()


def test_format_1_hf_import_dict_reads_to_what_the_import_writes_now():
    old = CheckpointMetadata.from_dict(copy.deepcopy(V1_HF_IMPORT))
    assert old == _import_metadata()
    assert old.versions.deepspeed is None and old.topology is None and old.zero_stage is None
    assert old.hf_source is not None and old.hf_source.config["n_embd"] == 16
    assert CheckpointMetadata.from_dict(_changed(V1_HF_IMPORT, hf_source__dtype="bfloat16")) != _import_metadata()


def test_format_1_is_checked_too():
    assert _refused(_changed(V1_TRAINING, extra=1)) == "megatron_ucp: unknown key 'extra'"
    assert _refused(_changed(V1_HF_IMPORT, iteration=_DROP)) == "megatron_ucp: missing key 'iteration'"
    # a format-1 training dict never had hf_source; with one, it is neither of format 1's key sets
    assert (_refused(_changed(V1_TRAINING, hf_source=V1_HF_IMPORT["hf_source"]))
            == "megatron_ucp.hf_source: must be null in a training checkpoint")


# --- refusals ---------------------------------------------------------------------------------------


def test_versions_are_refused_when_unknown_or_not_versions():
    new = _training_metadata().to_dict()
    assert (_refused(_changed(new, format_version=METADATA_FORMAT_VERSION + 1))
            == f"megatron_ucp.format_version: {METADATA_FORMAT_VERSION + 1} is newer than this megatron_ucp reads "
               f"({METADATA_FORMAT_VERSION}); upgrade megatron_ucp to read this checkpoint")
    assert (_refused(_changed(new, format_version=0))
            == "megatron_ucp.format_version: expected a positive int, found int 0")
    assert (_refused(_changed(new, format_version="2"))
            == "megatron_ucp.format_version: expected a positive int, found str '2'")
    assert _refused(_changed(new, format_version=_DROP)) == "megatron_ucp: missing key 'format_version'"


@pytest.mark.parametrize("change, message", [
    (dict(extra=1), "megatron_ucp: unknown key 'extra'"),
    (dict(dtype=_DROP), "megatron_ucp: missing key 'dtype'"),
    (dict(topology=_DROP), "megatron_ucp: missing key 'topology'"),  # format 2 writes every key
    (dict(iteration="1"), "megatron_ucp.iteration: expected int, found str '1'"),
    (dict(iteration=1.0), "megatron_ucp.iteration: expected int, found float 1.0"),
    (dict(zero_stage=True), "megatron_ucp.zero_stage: expected int or null, found bool True"),
    (dict(model_config__hidden_size="16"), "megatron_ucp.model_config.hidden_size: expected int, found str '16'"),
    (dict(model_config__hidden_sizes=16), "megatron_ucp.model_config: unknown key 'hidden_sizes'"),
    (dict(model_config__num_layers=_DROP), "megatron_ucp.model_config: missing key 'num_layers'"),
    (dict(model_config__hidden_size=15),
     "megatron_ucp.model_config: hidden_size 15 is not divisible by num_attention_heads 2"),
    (dict(topology__dp=0), "megatron_ucp.topology: parallel degree dp must be a positive integer, got 0"),
    (dict(topology__dp=None), "megatron_ucp.topology.dp: expected int, found null"),
    (dict(topology__sp=_DROP), "megatron_ucp.topology: missing key 'sp'"),  # format 3 names every axis
    (dict(topology__cp=1), "megatron_ucp.topology: unknown key 'cp'"),
    (dict(topology__ep="1"), "megatron_ucp.topology.ep: expected int, found str '1'"),
    (dict(topology__ep=2), "megatron_ucp.topology: parallel degree ep 2 does not divide dp x sp = 1"),
    (dict(pipeline_parts=[0, "5"]), "megatron_ucp.pipeline_parts[1]: expected int, found str '5'"),
    (dict(pipeline_parts=[0, 3, 5]),
     "megatron_ucp.pipeline_parts: [0, 3, 5] are not PP 1's 2 ascending stage boundaries from 0"),
    (dict(pipe_entries=[{"index": 0}]), "megatron_ucp.pipe_entries[0]: missing key 'role'"),
    (dict(train_config__tokenizer_model=5),
     "megatron_ucp.train_config.tokenizer_model: expected str or null, found int 5"),
    (dict(train_config=None), "megatron_ucp.train_config: a training checkpoint needs it, found null"),
    (dict(versions__torch=None), "megatron_ucp.versions.torch: expected str, found null"),
    (dict(versions__jax="0.4"), "megatron_ucp.versions: unknown key 'jax'"),
    (dict(source="megatron"), "megatron_ucp.source: 'megatron' is not one of training, huggingface"),
    (dict(dtype="fp8"), "megatron_ucp.dtype: 'fp8' is not one of bf16, fp16, fp32"),
    (dict(original_vocab_size=49), "megatron_ucp.original_vocab_size: 49, but model_config has vocab_size 50"),
    (dict(padded_vocab_size=48), "megatron_ucp.padded_vocab_size: 48 is smaller than the original vocabulary of 50"),
    (dict(consumed_train_samples=-1), "megatron_ucp.consumed_train_samples: -1 is negative"),
    (dict(zero_stage=4), "megatron_ucp.zero_stage: 4 is not 0-3"),
])
def test_bad_metadata_is_refused_in_one_line_naming_the_key(change, message):
    new = _training_metadata().to_dict()
    assert CheckpointMetadata.from_dict(copy.deepcopy(new)) == _training_metadata()  # the control reads
    assert _refused(_changed(new, **change)) == message


def test_train_config_is_a_record_of_any_version_of_the_trainer():
    """Keys a later (or earlier) TrainConfig has are kept as they are: only known keys are type-checked."""
    new = _changed(_training_metadata().to_dict(), train_config__future_flag=[1, 2], train_config__seed=_DROP)
    meta = CheckpointMetadata.from_dict(new)
    assert meta.train_config is not None and meta.train_config["future_flag"] == [1, 2]
    assert "seed" not in meta.train_config


def test_only_json_data_is_accepted():
    """A restricted unpickle still builds tensors; metadata must stay plain data (to_dict is JSON)."""
    imported = _import_metadata().to_dict()
    assert (_refused(_changed(imported, hf_source__config__n_embd=torch.tensor(16)))
            == "megatron_ucp.hf_source.config.n_embd: expected JSON data, found Tensor")
    assert (_refused(_changed(_training_metadata().to_dict(), train_config__split=("969", "30", "1")))
            == "megatron_ucp.train_config.split: expected JSON data, found tuple")
    deep: list = []
    for _ in range(100):
        deep = [deep]
    assert (_refused(_changed(imported, hf_source__config__x=deep))
            == "megatron_ucp.hf_source.config.x" + "[0]" * 31 + ": nested deeper than 32 levels")
    assert _refused(["format_version", 2]) == "megatron_ucp: expected an object, found list ['format_version', 2]"
    assert _refused({1: 2}) == "megatron_ucp: a key is not a string (found int 1)"


def test_a_training_or_import_checkpoint_has_its_own_fields():
    imported = _import_metadata().to_dict()
    assert (_refused(_changed(imported, hf_source=None))
            == "megatron_ucp.hf_source: a huggingface checkpoint needs it, found null")
    assert (_refused(_changed(imported, zero_stage=1))
            == "megatron_ucp.zero_stage: must be null in a huggingface checkpoint")
    with pytest.raises(CheckpointError, match=r"^megatron_ucp.topology: a training checkpoint needs it, found null$"):
        dataclasses.replace(_training_metadata(), topology=None)  # writers are held to the same rules


def test_errors_name_the_file(tmp_path):
    path = str(tmp_path / fmt.model_states_name(0))
    bad = _changed(_training_metadata().to_dict(), model_config__hidden_size="16")
    torch.save({"iteration": 1, METADATA_KEY: bad}, path)
    with pytest.raises(CheckpointError) as e:
        fmt.read_metadata(path)
    assert str(e.value) == f"{path}: megatron_ucp.model_config.hidden_size: expected int, found str '16'"
    torch.save({"iteration": 1, METADATA_KEY: _training_metadata().to_dict()}, path)
    assert fmt.read_metadata(path) == _training_metadata()  # control: the good metadata reads
    torch.save({"iteration": 1}, path)
    assert fmt.read_metadata(path) is None  # a checkpoint we did not write has none


def test_a_zero_checkpoint_with_bad_metadata_is_refused_when_opened(tmp_path):
    """``open_zero_checkpoint`` reads the metadata through ``from_dict`` before anything else of its files."""
    from megatron_ucp.checkpoint.zero import open_zero_checkpoint

    model_file = str(tmp_path / fmt.model_states_name(0))
    (tmp_path / fmt.optim_states_name(0, 0, bf16=False)).write_bytes(b"")
    torch.save({"param_shapes": [{}], METADATA_KEY: _changed(_training_metadata().to_dict(), dtype=16)}, model_file)
    with pytest.raises(CheckpointError) as e:
        open_zero_checkpoint(str(tmp_path))
    assert str(e.value) == f"{model_file}: megatron_ucp.dtype: expected str, found int 16"
    torch.save({"param_shapes": [{}], METADATA_KEY: _training_metadata().to_dict()}, model_file)
    optim_file = str(tmp_path / fmt.optim_states_name(0, 0, bf16=False))
    with pytest.raises(CheckpointError, match=f"^{re.escape(optim_file)}: unreadable or truncated"):
        open_zero_checkpoint(str(tmp_path))  # control: the metadata passes, the empty optimizer file does not


# --- client state and names -------------------------------------------------------------------------


def test_client_state_carries_metadata_and_checkpoint_version_once():
    meta = _training_metadata()
    state = fmt.client_state(meta, tokens=8, rng_state=[{"a": 1}])
    assert list(state) == ["iteration", "consumed_train_samples", "tokens", "checkpoint_version", "rng_state",
                           "universal_checkpoint_info", METADATA_KEY]
    assert state["checkpoint_version"] == fmt.CHECKPOINT_VERSION == 3.0
    assert (state["iteration"], state["consumed_train_samples"], state["tokens"]) == (1, 1, 8)
    assert state["universal_checkpoint_info"]["padded_vocab_size"] == 56
    assert fmt.metadata_from_state(state, "f.pt") == meta
    assert "rng_state" not in fmt.client_state(_import_metadata(), tokens=0)


def test_file_names_match_deepspeeds_and_each_other():
    assert fmt.model_states_name(3) == "mp_rank_03_model_states.pt"
    assert fmt.zero3_model_states_name(3) == "zero_pp_rank_0_mp_rank_03_model_states.pt"
    assert fmt.zero3_model_states_name(12, dp_rank=5) == "zero_pp_rank_5_mp_rank_12_model_states.pt"
    assert fmt.optim_states_name(2, 1, bf16=True) == "bf16_zero_pp_rank_1_mp_rank_02_optim_states.pt"
    assert fmt.step_folder_name(30) == "global_step30"
    assert fmt.atom_path("/u", "1.mlp.weight", "exp_avg") == os.path.join("/u", "zero", "1.mlp.weight", "exp_avg.pt")
    assert fmt.optimizer_state_path("/u") == os.path.join("/u", "zero", "optimizer_state.pt")
    assert fmt.ATOM_KEYS == ("fp32", "exp_avg", "exp_avg_sq", "step")
    for mp in (0, 7, 123):
        assert fmt.MODEL_STATES_RE.match(fmt.model_states_name(mp)).group(1) == f"{mp:02d}"
        assert fmt.ZERO3_MODEL_STATES_RE.match(fmt.zero3_model_states_name(mp, 4)).groups() == ("4", f"{mp:02d}")
        assert fmt.OPTIM_STATES_RE.match(fmt.optim_states_name(mp, 4, bf16=False)).groups() == (None, "4", f"{mp:02d}")
    # negative controls: each pattern takes only its own kind of file
    assert not fmt.MODEL_STATES_RE.match(fmt.zero3_model_states_name(0))
    assert not fmt.ZERO3_MODEL_STATES_RE.match(fmt.optim_states_name(0, 0, bf16=False))
    assert not fmt.OPTIM_STATES_RE.match(fmt.model_states_name(0) + ".tmp")


def test_modules_use_the_definitions_here():
    """zero.py re-exports them (universal.py imports them from there); universal.py's own copy of the
    model-state names agrees; the names are made of DeepSpeed's own prefixes and suffixes."""
    from deepspeed.checkpoint import constants as ds

    from megatron_ucp.checkpoint import universal, zero

    assert zero.MODEL_FILE_RE is fmt.MODEL_STATES_RE and zero.OPTIM_FILE_RE is fmt.OPTIM_STATES_RE
    assert zero.ZERO3_MODEL_FILE_RE is fmt.ZERO3_MODEL_STATES_RE and zero.STATE_KEYS is fmt.STATE_KEYS
    for mp in (0, 5, 100):
        assert universal.model_state_names(mp) == fmt.model_state_names(mp)
        assert fmt.model_states_name(mp) == f"{ds.MODEL_FILE_PREFIX}{mp:02d}{ds.MODEL_FILE_SUFFIX}"
        assert fmt.zero3_model_states_name(mp).startswith(ds.ZERO_FILE_PREFIX)
        assert fmt.zero3_model_states_name(mp).endswith(fmt.model_states_name(mp))
        bf16 = fmt.optim_states_name(mp, 3, bf16=True)
        assert bf16.startswith(ds.BF16_ZERO_FILE_PREFIX + "3_") and bf16.endswith(ds.OPTIM_FILE_SUFFIX)
        assert fmt.optim_states_name(mp, 3, bf16=False) == bf16[len("bf16_"):]


def test_a_training_checkpoint_records_its_tokenizer():
    record = {"type": "HFTokenizer", "sha256": "ab" * 32, "vocab_size": 50}
    meta = dataclasses.replace(_training_metadata(), tokenizer=record)
    assert CheckpointMetadata.from_dict(meta.to_dict()) == meta
    assert meta.to_dict()["tokenizer"] == record
    # written before the key existed: reads as None
    old = meta.to_dict()
    del old["tokenizer"]
    assert CheckpointMetadata.from_dict(old).tokenizer is None
    bad = meta.to_dict()
    bad["tokenizer"] = dict(record, sha256="x")
    assert _refused(bad) == "megatron_ucp.tokenizer.sha256: expected 64 lowercase hex digits, found str 'x'"
    imported = _import_metadata().to_dict()
    imported["tokenizer"] = record  # an import's tokenizer is hf_source.tokenizer
    assert _refused(imported) == ("megatron_ucp.tokenizer: must be null in a huggingface checkpoint (its tokenizer "
                                  "is hf_source.tokenizer)")


# --- format 2 and 3: the topology names every axis --------------------------------------------------

# Written by the code at 86a1a79 (format 2: topology tp, pp, dp only), from its trainer's and HF import's
# metadata writers: a TP2 PP2 DP2 training run with a tokenizer record, and an HF import of a tiny GPT-2.
V2_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "metadata_v2")


def _fixture_json(name: str) -> dict:
    with open(os.path.join(V2_FIXTURES, name), encoding="utf-8") as f:
        return json.load(f)


def test_format_2_files_upgrade_to_format_3():
    data = _fixture_json("training.json")
    assert data["format_version"] == 2 and data["topology"] == {"tp": 2, "pp": 2, "dp": 2}
    meta = CheckpointMetadata.from_dict(copy.deepcopy(data))
    assert meta.topology == ParallelLayout(tp=2, pp=2, dp=2, sp=1, ep=1)
    assert meta.tokenizer == data["tokenizer"] and meta.iteration == 3 and meta.pipeline_parts == (0, 3, 5)
    new = meta.to_dict()
    assert new["format_version"] == METADATA_FORMAT_VERSION == 3
    assert new["topology"] == {"tp": 2, "pp": 2, "dp": 2, "sp": 1, "ep": 1}
    assert {k: v for k, v in new.items() if k not in ("format_version", "topology", "model_config")} == {
        k: v for k, v in data.items() if k not in ("format_version", "topology", "model_config")}  # nor the rest
    # the model config gains the family it was derived as (files before families were recorded): nothing else
    assert new["model_config"] == dict(data["model_config"], model_family="gpt", **MODEL_FIELDS_SINCE_V2)
    assert CheckpointMetadata.from_dict(new) == meta
    # the model-state file the same writer produced (client state, read through the restricted unpickler)
    assert fmt.read_metadata(os.path.join(V2_FIXTURES, "training_" + fmt.model_states_name(0))) == meta
    # a format-2 topology is checked as format 2 wrote it: sp and ep did not exist
    assert _refused(_changed(data, topology__sp=1)) == "megatron_ucp.topology: unknown key 'sp'"
    assert _refused(_changed(data, topology__dp=_DROP)) == "megatron_ucp.topology: missing key 'dp'"
    assert (_refused(_changed(data, topology=[2, 2, 2]))
            == "megatron_ucp.topology: expected an object, found list [2, 2, 2]")
    imported = _fixture_json("hf_import.json")
    assert imported["format_version"] == 2 and imported["topology"] is None
    meta = CheckpointMetadata.from_dict(copy.deepcopy(imported))
    assert meta.topology is None and meta.hf_source is not None and meta.hf_source.tokenizer is not None
    assert meta.to_dict() == dict(imported, format_version=3,
                                  model_config=dict(imported["model_config"], model_family="gpt",
                                                    **MODEL_FIELDS_SINCE_V2))


def test_format_1_reads_with_sp_and_ep_of_1():
    old = CheckpointMetadata.from_dict(copy.deepcopy(V1_TRAINING))
    assert old.topology is not None and old.topology.degrees == {"pp": 1, "dp": 1, "sp": 1, "ep": 1, "tp": 1}
    assert old.to_dict()["topology"] == {"tp": 1, "pp": 1, "dp": 1, "sp": 1, "ep": 1}


def test_format_3_round_trips_every_axis():
    layout = ParallelLayout(tp=2, pp=2, dp=2, sp=2, ep=4)
    meta = dataclasses.replace(_training_metadata(), topology=layout, pipeline_parts=(0, 3, 5))
    data = json.loads(json.dumps(meta.to_dict()))
    assert data["topology"] == {"tp": 2, "pp": 2, "dp": 2, "sp": 2, "ep": 4}
    assert CheckpointMetadata.from_dict(data) == meta and CheckpointMetadata.from_dict(data).topology == layout
    assert CheckpointMetadata.from_dict(_changed(data, topology__sp=1, topology__ep=2)).topology != layout
