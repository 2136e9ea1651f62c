"""Our converter's safety: clear errors naming the bad file, nothing on disk lost, thin CLI wiring.

The input is a real DeepSpeed checkpoint written by our trainer (TP1 PP1 DP2, ZeRO-1, fp32)."""

import math
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from megatron_ucp.checkpoint import atoms, plan, universal, verify
from megatron_ucp.checkpoint.plan import Read, ReadPlan
from megatron_ucp.checkpoint.universal import convert_zero_to_universal, verify_universal
from megatron_ucp.checkpoint.zero import CheckpointError, open_zero_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoints):
    """The session's tiny GPT checkpoint folder (ZeRO-1, TP1 PP1 DP2): global_step1 and global_step2."""
    return tiny_checkpoints(1)[0].parent


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_converts_and_verifies(ckpt, tmp_path):
    out = tmp_path / "u" / "global_step2_universal"
    report = convert_zero_to_universal(str(ckpt / "global_step2"), str(out) + "/", verify=True)
    assert report.verified and report.params == 2 * 12 + 4 and report.topology == {"tp": 1, "pp": 1, "dp": 2}
    # A trailing slash on the output still puts latest_universal in the parent, naming the folder.
    assert (tmp_path / "u" / "latest_universal").read_text() == "global_step2_universal"
    assert sorted(os.listdir(tmp_path / "u")) == ["global_step2_universal", "latest_universal"]
    atom = torch.load(out / "zero" / "tied_modules.embed.word_embeddings.weight" / "fp32.pt", weights_only=False)
    assert list(atom) == ["cat_dim", "vocab_tensor", "param"] and atom["param"].shape == (50, 32)
    assert torch.equal(torch.load(out / "zero" / "1.input_layernorm.weight" / "step.pt", weights_only=False),
                       torch.tensor(2.0))


@pytest.mark.parametrize("name,index", [
    ("2.mlp.dense_h_to_4h.weight", (3, 1)),  # column-parallel
    ("2.self_attention.dense.weight", (5, 31)),  # row-parallel: its last column
    ("tied_modules.embed.word_embeddings.weight", (49, 0)),  # the vocabulary's last kept row
    ("2.post_attention_layernorm.bias", (7,)),  # replicated
])
def test_verify_catches_a_changed_atom(ckpt, tmp_path, name, index):
    out = tmp_path / "global_step2_universal"
    convert_zero_to_universal(str(ckpt / "global_step2"), str(out))
    zc = open_zero_checkpoint(str(ckpt / "global_step2"))
    rules = {n: universal.rules_from_table(zc.metadata)(n) for n in zc.param_sources}
    verify_universal(zc, str(out), rules)  # the control: unchanged, it passes
    path = out / "zero" / name / "exp_avg_sq.pt"
    atom = torch.load(path, weights_only=False)
    atom["param"][index] = atom["param"][index] * 1.5 + 1.0
    torch.save(atom, path)
    with pytest.raises(CheckpointError, match=rf"{name}/exp_avg_sq\.pt: does not match TP rank 0"):
        verify_universal(zc, str(out), rules)


def test_verify_maps_atoms_of_a_confirmed_layout_and_still_catches_changed_bytes(ckpt, tmp_path, monkeypatch):
    """Verification unpickles the first atom of each layout; a later atom whose bytes around the data
    equal it is mapped from the file instead. A byte changed in place in its data is still caught."""
    out = tmp_path / "global_step2_universal"
    convert_zero_to_universal(str(ckpt / "global_step2"), str(out))
    zc = open_zero_checkpoint(str(ckpt / "global_step2"))
    rules = {n: universal.rules_from_table(zc.metadata)(n) for n in zc.param_sources}
    first, second = (zc.param_sources[f"{i}.self_attention.dense.weight"] for i in (1, 2))  # one layout
    path = out / "zero" / second.name / "exp_avg_sq.pt"
    unpickled = []
    real_load = atoms.load_file
    monkeypatch.setattr(atoms, "load_file", lambda p, **kw: unpickled.append(os.path.basename(
        os.path.dirname(p))) or real_load(p, **kw))
    universal.verify_atoms(zc, str(out), rules, [first, second])  # the control: unchanged, it passes
    assert unpickled == [first.name]  # its fp32 atom; its moments and all the second's atoms are mapped
    offset = universal.skeleton_bytes({"cat_dim": 1}, (32, 32))[2]
    data = bytearray(path.read_bytes())
    data[offset + 4 * 7 + 3] ^= 0x40  # one element's exponent, in place: the file's framing is unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"2\.self_attention\.dense\.weight/exp_avg_sq\.pt: does not match"):
        universal.verify_atoms(zc, str(out), rules, [first, second])


@pytest.mark.parametrize("victim", [
    "2.mlp.dense_h_to_4h.weight",  # column-parallel: copied file to file
    "2.self_attention.dense.weight",  # row-parallel: gathered, then written
    "tied_modules.embed.word_embeddings.weight",  # vocabulary: padding rows dropped
])
def test_verification_does_not_trust_the_plans_that_wrote_the_atoms(ckpt, tiny_checkpoints, tmp_path, monkeypatch,
                                                                     victim):
    """The converter writes each sharded atom by a plan of the plan engine (``plan.read_plan`` at a TP 1
    target); verification reads each source TP rank's tensor as saved (``plan.local_plan``) and compares it
    in the source's layout. The engine broken on purpose, so that the victim's plan puts every element one
    place over, makes the converter write wrong bytes; verification refuses to publish, naming the
    parameter's atom."""
    real = plan.read_plan

    def broken(zc, src, rule, key, tp, tp_rank, target_extent=None, window=None):
        good = real(zc, src, rule, key, tp, tp_rank, target_extent, window)
        if src.name != victim:
            return good
        n, size = math.prod(good.local_shape), good.dtype.itemsize
        moved = [Read(r.path, r.offset + i * size, (r.dst + i + 1) % n, 1) for r in good.reads for i in range(r.numel)]
        return ReadPlan(good.local_shape, good.dtype, tuple(sorted(moved, key=lambda r: r.dst)))

    monkeypatch.setattr(plan, "read_plan", broken)
    unverified = tmp_path / "unverified" / "global_step2_universal"  # the break reaches the written bytes
    convert_zero_to_universal(str(ckpt / "global_step2"), str(unverified), verify=False)
    right = torch.load(tiny_checkpoints(1)[1] / "zero" / victim / "fp32.pt", weights_only=True)["param"]
    wrong = torch.load(unverified / "zero" / victim / "fp32.pt", weights_only=True)["param"]
    assert wrong.shape == right.shape and torch.equal(wrong.view(-1), right.view(-1).roll(1))
    assert not torch.equal(wrong, right)

    out = tmp_path / "u" / "global_step2_universal"
    with pytest.raises(CheckpointError, match=rf"{re.escape(victim)}/fp32\.pt: does not match TP rank 0"):
        convert_zero_to_universal(str(ckpt / "global_step2"), str(out))
    assert not out.exists() and not (tmp_path / "u" / "latest_universal").exists()  # nothing published


def _poke(zc, name: str, key: str, element: int, value: float) -> None:
    """Overwrite element ``element`` of ``name``'s ``key`` state (TP rank 0's first DP fragment) in its
    ZeRO shard file, in place."""
    src = zc.param_sources[name]
    frag = src.fragments[0][0]
    ref = zc.flat_ref(src.pp, 0, frag.dp, src.group, key)
    with open(ref.path, "r+b") as f:
        f.seek(ref.offset + 4 * (frag.start + element))
        f.write(struct.pack("<f", value))


def test_verify_compares_bits_not_values(ckpt, tmp_path, monkeypatch):
    """A NaN in the state (a run that diverged) converts and verifies: it equals its copy bit for bit.
    A zero whose sign bit flipped in the output is caught, though -0.0 == 0.0 as values. The negative
    control compares values (``torch.equal``, as verification once did): the NaN then fails."""
    source = _copy(ckpt / "global_step2", tmp_path / "in" / "global_step2")
    zc = open_zero_checkpoint(str(source))
    name = "2.mlp.dense_h_to_4h.weight"  # column-parallel [128, 32]; TP 1, so element k is full element k
    _poke(zc, name, "exp_avg", 0, float("nan"))
    _poke(zc, name, "exp_avg_sq", 1, 0.0)
    out = tmp_path / "global_step2_universal"
    convert_zero_to_universal(str(source), str(out), verify=True)
    flat = {k: torch.load(out / "zero" / name / f"{k}.pt", weights_only=True)["param"].view(-1)
            for k in ("exp_avg", "exp_avg_sq")}
    assert torch.isnan(flat["exp_avg"][0]) and flat["exp_avg_sq"][1].item() == 0.0

    rules = {n: universal.rules_from_table(zc.metadata)(n) for n in zc.param_sources}
    path = out / "zero" / name / "exp_avg_sq.pt"
    data = bytearray(path.read_bytes())
    data[universal.skeleton_bytes({"cat_dim": 0}, (128, 32))[2] + 4 * 1 + 3] ^= 0x80  # element 1's sign bit
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["param"].view(-1)[1].item() == 0.0  # -0.0: the same value
    with pytest.raises(CheckpointError, match=rf"{name}/exp_avg_sq\.pt: does not match TP rank 0"):
        verify_universal(zc, str(out), rules)

    monkeypatch.setattr(verify, "bitwise_equal", lambda a, b: a.shape == b.shape and torch.equal(a, b))
    with pytest.raises(CheckpointError, match=rf"{name}/exp_avg\.pt: does not match TP rank 0"):
        convert_zero_to_universal(str(source), str(tmp_path / "values" / "global_step2_universal"))


def test_verify_catches_a_reshaped_atom(ckpt, tmp_path):
    out = tmp_path / "global_step2_universal"
    convert_zero_to_universal(str(ckpt / "global_step2"), str(out))
    zc = open_zero_checkpoint(str(ckpt / "global_step2"))
    rules = {n: universal.rules_from_table(zc.metadata)(n) for n in zc.param_sources}
    path = out / "zero" / "2.self_attention.dense.weight" / "fp32.pt"
    atom = torch.load(path, weights_only=False)
    atom["param"] = atom["param"].t().contiguous()  # the same elements, the other shape
    torch.save(atom, path)
    with pytest.raises(CheckpointError, match=r"dense\.weight/fp32\.pt: does not match TP rank 0"):
        verify_universal(zc, str(out), rules)


def test_missing_shard_is_named(ckpt, tmp_path):
    bad = _copy(ckpt / "global_step2", tmp_path / "global_step2")
    os.remove(bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing file"):
        convert_zero_to_universal(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_truncated_shard_is_named(ckpt, tmp_path):
    bad = _copy(ckpt / "global_step2", tmp_path / "global_step2")
    path = bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: (unreadable or truncated|truncated)"):
        convert_zero_to_universal(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_mixed_iterations_are_refused(ckpt, tmp_path):
    bad = _copy(ckpt / "global_step2", tmp_path / "global_step2")
    shutil.copy(ckpt / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", bad)
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: optimizer is at step 1, "
                                              r"but .*mp_rank_00_model_states\.pt is at step 2 \(mixed"):
        convert_zero_to_universal(str(bad), str(tmp_path / "out"))


def test_output_inside_input_is_refused(ckpt, tmp_path):
    src = _copy(ckpt / "global_step2", tmp_path / "global_step2")
    with pytest.raises(CheckpointError, match="may not be inside the input"):
        convert_zero_to_universal(str(src), str(src / "universal"))


def test_non_empty_output_is_kept_unless_overwrite(ckpt, tmp_path):
    out = tmp_path / "global_step2_universal"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        convert_zero_to_universal(str(ckpt / "global_step2"), str(out))
    assert (out / "precious.txt").read_text() == "keep me"
    # --overwrite replaces only a universal checkpoint folder: this one is not, so it stays.
    with pytest.raises(CheckpointError, match="is not a universal checkpoint folder; --overwrite replaces only"):
        convert_zero_to_universal(str(ckpt / "global_step2"), str(out), overwrite=True)
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"
    # A universal folder of another request (here: made by hand from our output) is replaced.
    (out / "precious.txt").unlink()
    convert_zero_to_universal(str(ckpt / "global_step2"), str(out))
    (out / "megatron_ucp_complete.json").unlink()
    (out / "stale.txt").write_text("old output")
    convert_zero_to_universal(str(ckpt / "global_step2"), str(out), overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "zero" / "optimizer_state.pt").exists()
    assert sorted(os.listdir(tmp_path)) == ["global_step2_universal", "latest_universal"]  # nothing left over


def test_interrupted_conversion_leaves_nothing_that_looks_complete(ckpt, tmp_path, monkeypatch):
    done = []

    def failing(src, rule, zc, zero_dir):
        if len(done) == 5:
            raise RuntimeError("disk full (simulated)")
        done.append(src.name)
        return 0

    monkeypatch.setattr(universal, "convert_param", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_zero_to_universal(str(ckpt / "global_step2"), str(tmp_path / "u" / "global_step2_universal"), workers=1)
    assert os.listdir(tmp_path / "u") == []  # no output folder, no temp folder, no latest_universal


def test_indexing_does_not_import_deepspeed(ckpt):
    """Indexing reads only the files' pickles, with DeepSpeed's classes as stand-ins: importing DeepSpeed
    (about half a second) stays off the converter's critical path. The control, in the same fresh
    interpreter: unpickling a model-state file with the real classes does import it."""
    code = ("import sys\n"
            "from megatron_ucp.checkpoint.zero import load_file, open_zero_checkpoint\n"
            f"ckpt = open_zero_checkpoint({str(ckpt / 'global_step2')!r})\n"
            "print(len(ckpt.param_sources), 'deepspeed' in sys.modules)\n"
            "load_file(ckpt.model_files[0])\n"
            "print('deepspeed' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["28", "False", "True"], out


def test_cli_wiring(ckpt, tmp_path, capsys):
    from helpers import load_tool

    cli = load_tool("ds_to_universal")
    out = tmp_path / "global_step2_universal"
    assert cli.main(["--input_folder", str(ckpt / "global_step2"), "--output_folder", str(out),
                     "--num_extract_workers", "1", "--num_merge_workers", "2", "--keep_temp_folder", "--quiet"]) == 0
    assert "converted 28 parameters of iteration 2 (TP1 PP1 DP2)" in capsys.readouterr().out
    assert cli.main(["--input_folder", str(tmp_path / "nope"), "--output_folder", str(tmp_path / "x")]) == 2
    assert "nope: not a checkpoint folder" in capsys.readouterr().err


def test_marker_guards_what_the_trainer_loads(ckpt, tmp_path):
    """The trainer's pre-load checks: latest_universal must name a plain folder inside --load, and that
    folder must carry the marker of a verified conversion with every file at its recorded size."""
    from megatron_ucp.checkpoint.inspect import compare_universal
    from megatron_ucp.checkpoint.publish import require_verified
    from megatron_ucp.training.checkpointing import checkpoint_folder

    out = tmp_path / "u" / "global_step2_universal"
    convert_zero_to_universal(str(ckpt / "global_step2"), str(out))
    folder = checkpoint_folder(str(tmp_path / "u"), universal=True)
    assert folder == str(out) and require_verified(folder)["verified"] is True
    (tmp_path / "u" / "latest_universal").write_text("../elsewhere")
    with pytest.raises(CheckpointError, match="contains a path separator"):
        checkpoint_folder(str(tmp_path / "u"), universal=True)
    # One byte appended to an atom after publishing: the manifest no longer matches.
    atom = out / "zero" / "1.input_layernorm.weight" / "fp32.pt"
    with open(atom, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="records"):
        require_verified(str(out))
    with pytest.raises(CheckpointError, match="records"):
        compare_universal(str(out), str(out))
    # A universal folder without the marker (e.g. DeepSpeed's converter's) is refused until certified.
    plain = tmp_path / "v" / "global_step2_universal"
    shutil.copytree(out, plain)
    (plain / "megatron_ucp_complete.json").unlink()
    (plain / "zero" / "1.input_layernorm.weight" / "fp32.pt").write_bytes(atom.read_bytes()[:-1])  # repaired
    with pytest.raises(CheckpointError, match="is not a finished, verified conversion"):
        require_verified(str(plain))
    universal.certify_universal(str(ckpt / "global_step2"), str(plain))
    assert require_verified(str(plain))["certified"] is True
