"""Bad Hugging Face configs and pickled numpy dtypes: one line naming the file, exit code 2, no traceback.

The HF folders are built here without ``transformers``: our own config export and parameter table give a
tiny Llama and GPT-2 (``config.json`` plus ``model.safetensors``) that import cleanly (the negative
control); each case changes one entry of ``config.json``. No DeepSpeed training runs in this module.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import REPO, load_tool
from megatron_ucp.config import ModelConfig
from megatron_ucp.families import family_of_model, hf_config_from_model
from megatron_ucp.hf.transforms import to_hf
from megatron_ucp.layout.hf import hf_mappings

LLAMA = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=48,
                    vocab_size=64, max_position_embeddings=16, swiglu=True, normalization="rmsnorm",
                    use_rotary_position_embeddings=True, tie_embeddings=False, add_bias_linear=False,
                    model_family="llama")
GPT2 = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=16)


def write_hf_folder(folder, cfg: ModelConfig, seed: int = 0) -> str:
    """``config.json`` and ``model.safetensors`` of the HF model equal to ``cfg``, with random weights."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    family = family_of_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in hf_mappings(cfg, family):
        ours = torch.randn(m.spec.shape(cfg), generator=gen)
        for name, t in zip(m.hf_names, to_hf(m, ours, cfg)):
            tensors[name] = t.contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_from_model(cfg, "float32"), f)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_bad")
    return {"llama": write_hf_folder(root / "llama", LLAMA), "gpt2": write_hf_folder(root / "gpt2", GPT2)}


def _with_config(src: str, dst, change) -> str:
    """A copy of the HF folder ``src`` whose config.json is ``change(config)`` (a dict or the file's text)."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    new = change(config)
    with open(path, "w") as f:
        f.write(new if isinstance(new, str) else json.dumps(new if new is not None else config))
    return str(dst)


def _import(folder: str, out, capsys) -> tuple[int, str]:
    rc = load_tool("hf_to_universal").main(["--hf_checkpoint_dir", folder, "--save_dir", str(out)])
    return rc, capsys.readouterr().err


def _assert_one_line(rc: int, err: str, line: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines() == [line], err


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_built_folders_import(folders, tmp_path, capsys, family):
    """Negative control: the folders every case is cut from import cleanly."""
    rc, err = _import(folders[family], tmp_path / "u" / "x", capsys)
    assert rc == 0, err


def _set(**entries):
    def change(config: dict) -> dict:
        config.update(entries)
        return config
    return change


# case -> (the family's folder, the change to config.json, what follows "error: <config.json>: ")
CONFIG_CASES = {
    "architectures_int": ("llama", _set(architectures=5),
                          "architectures: expected a list of class names, found int 5"),
    "config_is_a_list": ("llama", lambda c: [c], "expected a JSON object, found list"),
    "nested_100000_deep": ("llama", lambda c: "[" * 100_000 + "]" * 100_000,
                           "nested deeper than 32 levels; not a Hugging Face config.json"),
    "rope_theta_infinity": ("llama", _set(rope_theta=float("inf"), rope_parameters=None),
                            "rope_theta: expected a positive finite number, found float inf"),
    "rope_theta_zero": ("llama", _set(rope_theta=0.0, rope_parameters=None),
                        "rope_theta: expected a positive finite number, found float 0.0"),
    "rope_factor_negative": ("llama", _set(rope_parameters={"rope_type": "linear", "factor": -2.0,
                                                            "rope_theta": 10000.0}),
                             "rope_parameters.factor: expected a positive finite number, found float -2.0"),
    "rope_scaling_nan": ("llama", _set(rope_parameters=None, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                          "low_freq_factor": float("nan"),
                                                                          "high_freq_factor": 4.0}),
                         "rope_scaling.low_freq_factor: expected a positive finite number, found float nan"),
    "rms_norm_eps_negative": ("llama", _set(rms_norm_eps=-1),
                              "rms_norm_eps: expected a positive finite number, found int -1"),
    "layer_norm_epsilon_infinity": ("gpt2", _set(layer_norm_epsilon=float("-inf")),
                                    "layer_norm_epsilon: expected a positive finite number, found float -inf"),
    "dropout_one": ("gpt2", _set(attn_pdrop=1.0),
                    "attn_pdrop: expected a dropout probability in [0, 1), found float 1.0"),
    "dropout_string": ("llama", _set(attention_dropout="0.1"),
                       "attention_dropout: expected a dropout probability in [0, 1), found str '0.1'"),
    "layers_a_string": ("llama", _set(num_hidden_layers="2"),
                        "num_hidden_layers: expected a positive integer, found str '2'"),
    "vocab_larger_than_the_embedding": ("llama", _set(vocab_size=10 ** 9),
                                        "vocab_size x hidden_size: 1000000000 x 32 declared, but "
                                        "model.embed_tokens.weight is (64, 32)"),
    "layers_fewer_than_held": ("gpt2", _set(n_layer=1),
                               "n_layer: 1 layers declared, but the weights hold 2 (layers 0-1)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_one_line(folders, tmp_path, capsys, case):
    family, change, message = CONFIG_CASES[case]
    folder = _with_config(folders[family], tmp_path / "hf", change)
    out = tmp_path / "u" / "x"
    rc, err = _import(folder, out, capsys)
    _assert_one_line(rc, err, f"error: {os.path.join(folder, 'config.json')}: {message}")
    assert not out.exists()


# Runs the importer in a child and reports that child's peak RSS: this launcher has no other child, so
# RUSAGE_CHILDREN is the importer's own.
_PEAK_RSS = textwrap.dedent("""
    import json, resource, subprocess, sys
    run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    print(json.dumps({"rc": run.returncode, "stderr": run.stderr,
                      "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
""")

# case -> (the change, what follows "error: <config.json>: ")
DECLARED_CASES = {
    "a_million_layers": (_set(num_hidden_layers=1_000_000),
                         "num_hidden_layers: 1000000 layers declared, but the weights hold 2 (layers 0-1)"),
    "a_million_heads": (_set(num_attention_heads=2 ** 20, num_key_value_heads=2, head_dim=8),
                        "num_attention_heads: 1048576 is larger than every dimension of every tensor in the "
                        "weights (at most 64)"),
    "a_billion_wide_mlp": (_set(intermediate_size=10 ** 9),
                           "intermediate_size: 1000000000 is larger than every dimension of every tensor in the "
                           "weights (at most 64)"),
}


@pytest.mark.parametrize("case", sorted(DECLARED_CASES))
def test_declared_sizes_are_checked_before_any_table_is_built(folders, tmp_path, case):
    """A 646-byte config.json declaring a million layers once took 3.4 GB before failing: the sizes it
    declares are now checked against the tensors the weights hold first, at the memory of an import."""
    change, message = DECLARED_CASES[case]
    folder = _with_config(folders["llama"], tmp_path / "hf", change)
    tool = [sys.executable, str(REPO / "tools" / "hf_to_universal.py"), "--hf_checkpoint_dir", folder,
            "--save_dir", str(tmp_path / "u" / "x")]
    run = subprocess.run([sys.executable, "-S", "-c", _PEAK_RSS, *tool], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, DS_ACCELERATOR="cpu"))
    result = json.loads(run.stdout)
    _assert_one_line(result["rc"], result["stderr"], f"error: {os.path.join(folder, 'config.json')}: {message}")
    print(f"{case}: peak RSS {result['peak_kb'] / 1024:.0f} MB")
    assert result["peak_kb"] <= 300 * 1024, f"peak RSS {result['peak_kb'] / 1024:.0f} MB"


# --- numpy dtypes with hidden fields --------------------------------------------------------------------

_REFUSED = ("error: {path}: holds pickled content the restricted unpickler refuses ({reason}; only plain numeric "
            "dtypes are accepted), which is not on the allowlist of checkpoint contents; refused, nothing in the file "
            "ran (pass --trust-checkpoint-code only for a file you trust)")
NUMPY_REASONS = {
    "dtype_object_field": "numpy dtype 'O' is not plain (kind 'O')",
    "dtype_float_field": "numpy dtype state (3, '|', None, ('a',), {'a': (dtype('float64'), 0)}, 8, 1, 0) adds "
                         "fields, a sub-array or flags",
    "dtype_object_flags": "numpy dtype state (3, '|', None, None, None, 8, 1, 63) adds fields, a sub-array or flags",
    "scalar_object_field": "numpy dtype 'O' is not plain (kind 'O')",
    "array_object_field": "numpy dtype 'O' is not plain (kind 'O')",
    "array_from_buffer": "numpy ndarray called with a buffer, offset or strides",
}

# Loads a file as every tool does (restricted unpickling, errors through run_tool) and touches every value.
_LOAD = textwrap.dedent("""
    import json, sys
    from megatron_ucp.checkpoint.trust import load_file
    from megatron_ucp.cli import run_tool

    def body():
        state = load_file(sys.argv[1])
        print(json.dumps({k: [type(v).__name__, str(v.dtype), repr(v.tolist())] for k, v in state.items()}))
        return 0

    sys.exit(run_tool(body))
""")


def _load_in_child(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LOAD, path], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))


def test_plain_numpy_values_still_load(tmp_path):
    """Negative control: numpy scalars and a uint32 array (as our model-state files hold) load as before,
    values and dtypes as numpy's own unpickling gives them (a big-endian array comes back in native order)."""
    path = tmp_path / "state.pt"
    torch.save({"np_float": np.float64(1.5), "np_int": np.int64(-3), "np_bool": np.bool_(True),
                "np_complex": np.complex64(1 - 2j), "np_array": np.arange(4, dtype=np.uint32),
                "np_big_endian": np.arange(3).astype(">i4")}, path)
    run = _load_in_child(str(path))
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {"np_float": ["float64", "float64", "1.5"], "np_int": ["int64", "int64", "-3"],
                   "np_bool": ["bool", "bool", "True"], "np_complex": ["complex64", "complex64", "(1-2j)"],
                   "np_array": ["CheckedArray", "uint32", "[0, 1, 2, 3]"],
                   "np_big_endian": ["CheckedArray", "int32", "[0, 1, 2]"]}  # numpy unpickles to native order


@pytest.mark.parametrize("case", sorted(NUMPY_REASONS))
def test_numpy_dtype_with_hidden_fields_is_refused(tmp_path, case):
    """In a child process, so that a crash reading the value would show as its exit status."""
    craft = load_tool("untrusted_inputs")
    path = craft.craft_numpy_hidden_field(str(tmp_path / "state.pt"), case)
    if case.startswith("dtype_"):  # negative control: full pickle gives the dtype its hidden field or flags
        hidden = torch.load(path, weights_only=False)["hidden"]
        assert hidden.hasobject or hidden.fields is not None
    run = _load_in_child(path)
    _assert_one_line(run.returncode, run.stderr, _REFUSED.format(path=path, reason=NUMPY_REASONS[case]))


# --- optimizer state: the checks every reader of ZeRO and universal files runs ---------------------------

GOOD_GROUP = {"lr": 3e-05, "betas": (0.9, 0.95), "eps": 1e-08, "weight_decay": 0.1, "amsgrad": False,
              "params": [0], "name": "decay", "foreach": None}


def _zero3_shard(flat_dtype=torch.float32, **group) -> dict:
    """The entries of a ZeRO-3 optimizer file that our readers use, as DeepSpeed 0.19.8 writes them."""
    flat = torch.zeros(8, dtype=flat_dtype)
    state = {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(8), "exp_avg_sq": torch.zeros(8)}}
    return {"optimizer_state_dict": {"zero_stage": 3, "fp32_flat_groups": [flat],
                                     "optimizer_state_dict": {"state": state,
                                                              "param_groups": [dict(GOOD_GROUP, **group)]}}}


_INNER = "optimizer_state_dict.optimizer_state_dict.param_groups[0]"
PARAM_GROUP_CASES = {  # group entries -> the message after "<file>: "
    "lr_nan": (dict(lr=float("nan")), f"{_INNER}.lr: expected a finite number, found float nan"),
    "lr_negative": (dict(lr=-0.1), f"{_INNER}.lr: -0.1 is outside [0, inf)"),
    "beta_one": (dict(betas=(0.9, 1.0)), f"{_INNER}.betas[1]: 1.0 is outside [0, 1)"),
    "three_betas": (dict(betas=[0.9, 0.99, 0.999]), f"{_INNER}.betas: expected 2 numbers, found 3"),
    "eps_zero": (dict(eps=0.0), f"{_INNER}.eps: 0.0 is outside (0, inf)"),
    "weight_decay_string": (dict(weight_decay="0.1"), f"{_INNER}.weight_decay: expected a finite number, found str "
                                                      "'0.1'"),
    "amsgrad_string": (dict(amsgrad="no"), f"{_INNER}.amsgrad: expected a bool, found str 'no'"),
    "step_negative": (dict(step=-1), f"{_INNER}.step: -1 is outside [0, inf)"),
    "params_not_indices": (dict(params=["w"]), f"{_INNER}.params[0]: expected an int, found str 'w'"),
}


def test_a_real_shaped_zero3_shard_passes():
    """Negative control for the cases below, and tensor hyperparameters (torch accepts a tensor lr) pass."""
    from megatron_ucp.checkpoint.format import check_optimizer_shard

    check_optimizer_shard(_zero3_shard(), "f.pt", stage3=True)
    check_optimizer_shard(_zero3_shard(lr=torch.tensor(1e-3)), "f.pt", stage3=True)


@pytest.mark.parametrize("case", sorted(PARAM_GROUP_CASES))
def test_bad_hyperparameters_are_named(case):
    from megatron_ucp.checkpoint.format import check_optimizer_shard
    from megatron_ucp.checkpoint.trust import CheckpointError

    group, message = PARAM_GROUP_CASES[case]
    with pytest.raises(CheckpointError) as e:
        check_optimizer_shard(_zero3_shard(**group), "f.pt", stage3=True)
    assert str(e.value) == f"f.pt: {message}"


def test_zero3_flat_partition_must_be_a_tensor():
    """(Its dtype is checked by the ZeRO-3 index, against DP rank 0's fp32 master: tests/test_torchzip.py.)"""
    from megatron_ucp.checkpoint.format import check_optimizer_shard
    from megatron_ucp.checkpoint.trust import CheckpointError

    shard = _zero3_shard()
    shard["optimizer_state_dict"]["fp32_flat_groups"][0] = "flat"
    with pytest.raises(CheckpointError) as e:
        check_optimizer_shard(shard, "f.pt", stage3=True)
    assert str(e.value) == "f.pt: optimizer_state_dict.fp32_flat_groups[0]: expected a tensor, found str 'flat'"


def test_a_deeply_nested_completion_marker_is_one_line(tmp_path, capsys):
    """The completion marker of a universal folder is JSON from an untrusted folder too: json.loads would
    recurse once per level of a marker nested 100,000 deep."""
    from megatron_ucp.checkpoint.publish import COMPLETE_MARKER

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "zero").mkdir(parents=True)
    (a / COMPLETE_MARKER).write_text("[" * 100_000 + "]" * 100_000)
    rc = load_tool("inspect_checkpoint").main(["--compare", str(a), str(b)])
    err = capsys.readouterr().err
    _assert_one_line(rc, err, f"error: {a / COMPLETE_MARKER}: nested deeper than 32 levels; not a completion marker")
