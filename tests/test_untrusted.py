"""Checkpoints from elsewhere: no code runs from a file we read, nothing is written outside the output,
sizes are checked before memory is taken, and every tool says what is wrong in one line.

The bad inputs are built here from a real checkpoint of our trainer (``tools/untrusted_inputs.py``
crafts them); each pickle payload creates a marker file when unpickled, and the negative control
shows it does so under ``torch.load(..., weights_only=False)``.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO, load_tool

pytestmark = [pytest.mark.dist, pytest.mark.slow]

@pytest.fixture(scope="module")
def real(tiny_checkpoints):
    """A real ZeRO-1 checkpoint (TP1 PP1 DP2, fp32) and its universal conversion (shared by the session;
    every crafted input is a copy)."""
    zero, universal = tiny_checkpoints(1)
    return zero.parent.parent, zero, universal


@pytest.fixture(scope="module")
def craft():
    return load_tool("untrusted_inputs")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A real transformers GPT-2 saved with save_pretrained (safetensors)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    return folder


def _run_tool(name: str, argv: list[str], capsys) -> tuple[int, str]:
    rc = load_tool(name).main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_refused(rc: int, err: str, crafted, global_name: str | None = "posix.system") -> None:
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {crafted.bad_file}: "), err
    if global_name:
        assert global_name in lines[0], err
    if crafted.marker:
        assert not os.path.exists(crafted.marker), "the payload ran"


# --- pickle payloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["zero_model_states", "zero_optimizer_shard", "universal_atom",
                                  "universal_model_states", "hf_bin"])
def test_every_payload_is_live(real, craft, hf_folder, tmp_path, case):
    """Negative control: full pickle of each crafted file runs its payload."""
    crafted = _crafted(case, real, craft, hf_folder, tmp_path)
    assert craft.payload_is_live(crafted.bad_file, crafted.marker)


def _crafted(case, real, craft, hf_folder, work):
    _, zero, universal = real
    return {
        "zero_model_states": lambda: craft.craft_zero_payload_in_model_states(str(zero), str(work)),
        "zero_optimizer_shard": lambda: craft.craft_zero_payload_in_optimizer_shard(str(zero), str(work)),
        "universal_atom": lambda: craft.craft_universal_payload_in_atom(str(universal), str(work)),
        "universal_model_states": lambda: craft.craft_universal_payload_in_model_states(str(universal), str(work)),
        "hf_bin": lambda: craft.craft_hf_bin_payload(str(hf_folder), str(work)),
    }[case]()


@pytest.mark.parametrize("case", ["zero_model_states", "zero_optimizer_shard"])
def test_converter_runs_no_payload(real, craft, tmp_path, capsys, case):
    crafted = _crafted(case, real, craft, None, tmp_path)
    out = tmp_path / "out" / "global_step2_universal"
    rc, err = _run_tool("ds_to_universal", ["--input_folder", crafted.path, "--output_folder", str(out)], capsys)
    _assert_refused(rc, err, crafted)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("case", ["zero_model_states", "universal_model_states"])
def test_inspect_runs_no_payload(real, craft, tmp_path, capsys, case):
    crafted = _crafted(case, real, craft, None, tmp_path)
    rc, err = _run_tool("inspect_checkpoint", [crafted.path], capsys)
    _assert_refused(rc, err, crafted)


def test_hf_importer_runs_no_payload(real, craft, hf_folder, tmp_path, capsys):
    crafted = _crafted("hf_bin", real, craft, hf_folder, tmp_path)
    out = tmp_path / "u" / "x"
    rc, err = _run_tool("hf_to_universal", ["--hf_checkpoint_dir", crafted.path, "--save_dir", str(out)], capsys)
    _assert_refused(rc, err, crafted)
    assert not out.exists()


@pytest.mark.parametrize("case", ["universal_atom", "universal_model_states"])
def test_hf_exporter_runs_no_payload(real, craft, tmp_path, capsys, case):
    crafted = _crafted(case, real, craft, None, tmp_path)
    out = tmp_path / "hf_out"
    rc, err = _run_tool("universal_to_hf", ["--input_folder", crafted.path, "--output_dir", str(out)], capsys)
    _assert_refused(rc, err, crafted)
    assert not out.exists()


def test_trust_flag_is_the_only_way_around(real, craft, tmp_path, capsys):
    """With --trust-checkpoint-code the same file is unpickled in full: the payload runs (documented)."""
    crafted = _crafted("universal_model_states", real, craft, None, tmp_path)
    from megatron_ucp.checkpoint import trust

    try:
        rc, _ = _run_tool("inspect_checkpoint", [crafted.path, "--trust-checkpoint-code"], capsys)
    finally:
        trust.trust_checkpoint_code(False)
    assert rc == 0 and os.path.exists(crafted.marker)


def _trainer_load(load: str, universal: bool, tmp_path, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m megatron_ucp.train --load ...`` as one rank, the environment torchrun would set."""
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--max-position-embeddings",
            "16", "--make-vocab-size-divisible-by", "8", "--seq-length", "16", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--train-iters", "3", "--fp32", "--mock-data", "--vocab-size", "50",
            "--eval-interval", "0", "--load", load]
    if universal:
        args.append("--universal-checkpoint")
    args += extra or []
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_ucp.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _trainer_load_2ranks(load: str) -> list[tuple[int, str]]:
    """``--load`` on two ranks (the checkpoint's own TP1 PP1 DP2: DeepSpeed's native loader reads the shards):
    each rank's (exit code, stderr)."""
    args = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--max-position-embeddings",
            "16", "--make-vocab-size-divisible-by", "8", "--seq-length", "16", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--train-iters", "3", "--fp32", "--mock-data", "--vocab-size", "50",
            "--eval-interval", "0", "--load", load]
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_ucp.train", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        out.append((proc.returncode, err))
    return out


def _free_port() -> int:
    from dist_utils import free_port

    return free_port()


@pytest.mark.parametrize("case", ["zero_model_states", "universal_atom"])
def test_trainer_load_runs_no_payload(real, craft, tmp_path, case):
    crafted = _crafted(case, real, craft, None, tmp_path)
    universal = case.startswith("universal")
    if universal:  # the folder is vouched for, so the loader reaches the crafted atom itself
        from helpers import vouch_for

        vouch_for(crafted.path)
    run = _trainer_load(crafted.root, universal, tmp_path)
    assert run.returncode != 0
    assert f"error: {crafted.bad_file}: holds the pickled global posix.system" in run.stderr, run.stderr[-3000:]
    assert not os.path.exists(crafted.marker), "the payload ran"


# --- names, paths, sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True])
def test_traversal_names_are_refused_with_nothing_written(real, craft, tmp_path, capsys, absolute):
    crafted = craft.craft_zero_traversal(str(real[1]), str(tmp_path / "work"), absolute=absolute)
    out_parent = tmp_path / "work" / f"{crafted.name}_out"
    out = out_parent / "global_step2_universal"
    before = _tree(tmp_path)
    rc, err = _run_tool("ds_to_universal", ["--input_folder", crafted.path, "--output_folder", str(out),
                                            "--inject_missing_state", "--no_strict"], capsys)
    _assert_refused(rc, err, crafted, global_name=None)
    assert "refusing to use it as a file name" in err
    assert not os.path.lexists(crafted.escape)
    assert _tree(tmp_path) == before  # nothing written anywhere


def _tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def test_fragment_past_its_partition_is_refused_without_verify(real, craft, tmp_path, capsys):
    crafted = craft.craft_zero_fragment_past_partition(str(real[1]), str(tmp_path / "work"))
    out = tmp_path / "out" / "global_step2_universal"
    rc, err = _run_tool("ds_to_universal", ["--input_folder", crafted.path, "--output_folder", str(out),
                                            "--no-verify"], capsys)
    _assert_refused(rc, err, crafted, global_name=None)
    assert "lies outside its" in err and not (tmp_path / "out").exists()


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.argv = sys.argv[1:]
    from megatron_ucp.checkpoint.universal import convert_zero_to_universal  # noqa: F401 - imports in the baseline
    from megatron_ucp.cli import run_tool
    import importlib.util
    spec = importlib.util.spec_from_file_location("cli", sys.argv[0])
    cli = importlib.util.module_from_spec(spec); spec.loader.exec_module(cli)
    import deepspeed  # noqa: F401 - imported by any successful conversion; part of the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc = cli.main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rc": rc, "base_kb": base, "peak_kb": peak}))
""")


def test_huge_declared_parameter_is_refused_before_allocation(real, craft, tmp_path):
    crafted = craft.craft_zero_huge_declared(str(real[1]), str(tmp_path / "work"), numel=2 ** 40)
    out = tmp_path / "out" / "global_step2_universal"
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(REPO / "tools" / "ds_to_universal.py"),
                          "--input_folder", crafted.path, "--output_folder", str(out)],
                         cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["rc"] == 2 and f"error: {crafted.bad_file}: " in run.stderr, run.stderr
    grew_mb = (result["peak_kb"] - result["base_kb"]) / 1024
    print(f"2^40 declared elements: peak RSS grew {grew_mb:.1f} MB over a {result['base_kb'] / 1024:.0f} MB baseline")
    assert grew_mb < 32, f"peak memory grew {grew_mb:.1f} MB"
    assert not (tmp_path / "out").exists()


# --- Hugging Face folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("absolute", [False, True])
def test_hf_index_entries_must_be_plain_names(real, craft, hf_folder, tmp_path, capsys, absolute):
    crafted = craft.craft_hf_index_traversal(str(hf_folder), str(tmp_path / "work"), absolute=absolute)
    rc, err = _run_tool("hf_to_universal", ["--hf_checkpoint_dir", crafted.path, "--save_dir",
                                            str(tmp_path / "u" / "x")], capsys)
    assert rc == 2 and err.startswith(f"error: {crafted.bad_file}"), err
    assert "shard file name" in err and not (tmp_path / "u").exists()


def test_hf_linked_extra_file_is_not_copied(real, craft, hf_folder, tmp_path, capsys):
    crafted = craft.craft_hf_symlinked_extra(str(hf_folder), str(tmp_path / "work"))
    out = tmp_path / "u" / "x"
    rc, err = _run_tool("hf_to_universal", ["--hf_checkpoint_dir", crafted.path, "--save_dir", str(out)], capsys)
    assert rc == 2 and err.startswith(f"error: {crafted.bad_file}: links to "), err
    assert not out.exists()


# --- malformed structure: one line naming the file and the key path ------------------------------------

_GROUPS = "optimizer_state_dict.base_optimizer_state.param_groups[0]"
MALFORMED_MESSAGES = {  # after "error: <bad file>: "
    "bf16_partition": "optimizer_state_dict.single_partition_of_fp32_groups[0]: expected a torch.float32 tensor, "
                      "found torch.bfloat16",
    "optimizer_state_not_dict": "optimizer_state_dict: expected a dict, found list [1, 2]",
    "base_state_missing": "optimizer_state_dict: missing key 'base_optimizer_state'",
    "group_state_not_dict": "optimizer_state_dict.base_optimizer_state.state[0]: expected a dict, found list "
                            "['exp_avg', 'exp_avg_sq']",
    "slice_mapping_not_address": "optimizer_state_dict.param_slice_mappings[0]['1.mlp.dense_4h_to_h.weight']: "
                                 "expected a fragment address (start, numel), found int 7",
    "lr_string": f"{_GROUPS}.lr: expected a finite number, found str '0.001'",
    "betas_number": f"{_GROUPS}.betas: expected a list, found float 0.9",
    "eps_negative": f"{_GROUPS}.eps: -1.0 is outside (0, inf)",
    "negative_topology": "checkpoint_parallel_dimensions.tp_degree: -1 is less than 1",
    "param_shapes_not_list": "param_shapes: expected a list, found dict {'a': 1}",
    "negative_dp_world_size": "dp_world_size: -2 is less than 1",
    "negative_metadata_topology": "megatron_ucp.topology: parallel degree tp must be a positive integer, got -1",
    "pattern_not_a_regex": "universal_checkpoint_info.pipeline_replicated_parameter_patterns[0]: '(' is not a "
                           "regular expression (missing ), unterminated subpattern at position 0)",
    "missing_model_states": "missing file (the folder holds 2 optimizer shards but no model-state file)",
}


def _malformed(real, craft, tmp_path, case):
    if case == "missing_model_states":
        return craft.craft_zero_missing_model_states(str(real[1]), str(tmp_path / "work"))
    return craft.craft_zero_malformed(str(real[1]), str(tmp_path / "work"), case)


def _assert_one_line(rc: int, err: str, bad_file: str, message: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: {bad_file}: {message}"], err


def test_real_checkpoint_passes_the_structure_checks(real, capsys):
    """Negative control: the checkpoint every malformed case is cut from is read without complaint."""
    rc, err = _run_tool("inspect_checkpoint", [str(real[1])], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("case", sorted(MALFORMED_MESSAGES))
def test_malformed_zero_files_are_one_line(real, craft, tmp_path, capsys, case):
    crafted = _malformed(real, craft, tmp_path, case)
    out = tmp_path / "out" / "global_step2_universal"
    rc, err = _run_tool("ds_to_universal", ["--input_folder", crafted.path, "--output_folder", str(out)], capsys)
    _assert_one_line(rc, err, crafted.bad_file, MALFORMED_MESSAGES[case])
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    rc, err = _run_tool("inspect_checkpoint", [crafted.path], capsys)
    _assert_one_line(rc, err, crafted.bad_file, MALFORMED_MESSAGES[case])


TRAINER_MESSAGES = {
    "missing_model_states": "missing file; nothing to resume from",
    "no_iteration": "not written by megatron_ucp (no 'iteration' in its client state)",
    "bf16_partition": MALFORMED_MESSAGES["bf16_partition"],
    "lr_string": MALFORMED_MESSAGES["lr_string"],
}


@pytest.mark.parametrize("case", sorted(TRAINER_MESSAGES))
def test_trainer_refuses_malformed_zero_with_one_line(real, craft, tmp_path, case):
    """``--load`` at one rank (DP 1, the checkpoint is DP 2: the direct reshard reads the shards). The
    model-state file is checked by the entry point, before distributed start-up (no pipeline is built)."""
    crafted = _malformed(real, craft, tmp_path, case)
    run = _trainer_load(crafted.root, False, tmp_path)
    _assert_one_line(run.returncode, run.stderr, crafted.bad_file, TRAINER_MESSAGES[case])
    started = "Using topology" in run.stdout + run.stderr
    assert started == (case not in ("missing_model_states", "no_iteration")), run.stdout[-2000:]


UNIVERSAL_MESSAGES = {
    "bf16_atom": "param: expected a torch.float32 tensor, found torch.bfloat16",
    "atom_without_param": "missing key 'param'",
    "lr_string": "param_groups[0].lr: expected a finite number, found str '0.001'",
    "step_string": "expected a finite number, found str '2'",
}


@pytest.mark.parametrize("case,loader", [("bf16_atom", "ours"), ("bf16_atom", "deepspeed"), ("lr_string", "ours"),
                                         ("lr_string", "deepspeed"), ("atom_without_param", "deepspeed"),
                                         ("step_string", "ours"), ("step_string", "deepspeed")])
def test_trainer_refuses_malformed_universal_with_one_line(real, craft, tmp_path, case, loader):
    """The sliced loader and DeepSpeed's own (its files pass through our check as it unpickles them)."""
    from helpers import vouch_for

    crafted = craft.craft_universal_malformed(str(real[2]), str(tmp_path / "work"), case)
    vouch_for(crafted.path)
    run = _trainer_load(crafted.root, True, tmp_path, ["--universal-loader", loader])
    _assert_one_line(run.returncode, run.stderr, crafted.bad_file, UNIVERSAL_MESSAGES[case])


@pytest.mark.parametrize("case", ["bf16_atom", "atom_without_param"])
def test_inspect_refuses_malformed_universal_atoms_with_one_line(real, craft, tmp_path, capsys, case):
    crafted = craft.craft_universal_malformed(str(real[2]), str(tmp_path / "work"), case)
    rc, err = _run_tool("inspect_checkpoint", [crafted.path], capsys)
    _assert_one_line(rc, err, crafted.bad_file, UNIVERSAL_MESSAGES[case])


def test_native_resume_of_the_real_checkpoint_trains_on(real):
    """Negative control: at its own layout the checkpoint resumes and trains its third step."""
    for rc, err in _trainer_load_2ranks(str(real[0] / "ckpt")):
        assert rc == 0, err[-3000:]


@pytest.mark.parametrize("case", ["lr_string", "bf16_partition"])
def test_native_resume_refuses_malformed_shards_with_one_line(real, craft, tmp_path, case):
    """At the checkpoint's own layout DeepSpeed's loader reads the shards itself, each rank only its own:
    every rank checks its files first and all share the verdict, so a string lr in DP rank 1's shard is
    refused on both ranks at load, not at the optimizer's next step."""
    crafted = _malformed(real, craft, tmp_path, case)
    for rc, err in _trainer_load_2ranks(crafted.root):
        _assert_one_line(rc, err, crafted.bad_file, MALFORMED_MESSAGES[case])
