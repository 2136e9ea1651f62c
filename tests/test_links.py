"""No write goes through a link, and no link brings outside files into an output.

* ``universal_to_hf`` takes only regular, allowlisted tokenizer files from ``hf_extras`` (never
  ``config.json``, ``generation_config.json`` or code), and nothing at all from an ``hf_extras`` that is
  a link;
* the trainer refuses a ``--save`` folder (also one resumed in place) where a save would write
  through a link, before start-up and again right before each save;
* a stale temporary that is a link is removed itself, its target untouched;
* ``--certify`` writes its marker without following links planted at its temporary names.

Every case plants files outside the folder written to and checks their hashes before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY_GPT, TINY_TRAIN, load_tool, train_model
from megatron_ucp.checkpoint.publish import COMPLETE_MARKER, remove_stale_temporaries, require_verified
from megatron_ucp.config import TrainConfig
from megatron_ucp.training.checkpointing import check_save_folder, save_folder_problem, saved_iterations


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(folder) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed): a link's target, a file's hash, 'dir'."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                out[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                out[rel] = _sha(path)
    return out


@pytest.fixture
def outside(tmp_path):
    """Files and a folder outside every folder written to, as an attacker's links would name them."""
    root = tmp_path / "outside"
    (root / "folder").mkdir(parents=True)
    (root / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----\nMIIEv\n")
    (root / "credentials").write_text("aws_secret_access_key=abc\n")
    (root / "latest_target").write_text("global_step2")
    (root / "folder" / "mp_rank_00_model_states.pt").write_bytes(b"precious")
    before = _tree(root)
    yield root
    assert _tree(root) == before, "a file outside was changed"


# --- universal_to_hf: hf_extras ------------------------------------------------------------------

GENERATED = ["config.json", "generation_config.json", COMPLETE_MARKER, "model.safetensors"]
TOKENIZER = {"tokenizer.json": '{"model": {"type": "BPE"}}', "vocab.json": '{"a": 0}', "merges.txt": "#version\n",
             "special_tokens_map.json": '{"eos_token": "a"}', "tokenizer_config.json": '{"model_max_length": 16}'}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny GPT-2 with tokenizer files, imported as a universal folder (its hf_extras holds them)."""
    transformers = pytest.importorskip("transformers")
    from megatron_ucp.hf.to_universal import convert_hf_to_universal

    root = tmp_path_factory.mktemp("links_hf")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(root / "hf"))
    for name, text in TOKENIZER.items():
        (root / "hf" / name).write_text(text)
    convert_hf_to_universal(str(root / "hf"), str(root / "u" / "x"))
    assert sorted(os.listdir(root / "u" / "x" / "hf_extras")) == sorted([*TOKENIZER, "generation_config.json"])
    return root / "u" / "x"


def _export(universal, tmp_path, capsys) -> tuple[Path, str]:
    out = tmp_path / "export"
    rc = load_tool("universal_to_hf").main(["--input_folder", str(universal), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    require_verified(str(out))
    return out, err


def _generated_config(out: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and "auto_map" not in config
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 0,
                                                                        "_from_model_config": True}


def test_plain_export_takes_the_tokenizer_files(imported, tmp_path, capsys):
    """Negative control for the cases below: the allowlisted regular files are copied byte for byte."""
    out, err = _export(imported, tmp_path, capsys)
    assert sorted(os.listdir(out)) == sorted(GENERATED + list(TOKENIZER))
    for name, text in TOKENIZER.items():
        assert (out / name).read_text() == text, name
    _generated_config(out)
    assert "left out of the export" in err and "generation_config.json" in err  # generated, not the source's


def test_hf_extras_that_is_a_link_gives_nothing(imported, tmp_path, outside, capsys):
    universal = tmp_path / "u" / "x"
    shutil.copytree(imported, universal, symlinks=True)
    extras = universal / "hf_extras"
    shutil.rmtree(extras)
    elsewhere = tmp_path / "elsewhere"  # an outside folder that looks like tokenizer files, and more
    elsewhere.mkdir()
    for name in TOKENIZER:
        (elsewhere / name).write_text("from outside")
    (elsewhere / "config.json").write_text('{"auto_map": {"AutoModel": "modeling_x.X"}}')
    shutil.copy(outside / "id_rsa", elsewhere / "id_rsa")
    before = _tree(elsewhere)
    os.symlink(elsewhere, extras)
    out, err = _export(universal, tmp_path, capsys)
    assert sorted(os.listdir(out)) == sorted(GENERATED)
    _generated_config(out)
    assert f"{extras}: is a symbolic link; no tokenizer file is taken from it" in err
    assert _tree(elsewhere) == before


def test_links_config_and_code_in_hf_extras_are_left_out(imported, tmp_path, outside, capsys):
    universal = tmp_path / "u" / "x"
    shutil.copytree(imported, universal, symlinks=True)
    extras = universal / "hf_extras"
    os.remove(extras / "tokenizer.json")
    os.symlink(outside / "id_rsa", extras / "tokenizer.json")  # an allowlisted name, but a link
    os.remove(extras / "vocab.json")
    os.symlink(outside / "credentials", extras / "vocab.json")
    os.remove(extras / "merges.txt")
    os.symlink(outside / "folder", extras / "merges.txt")  # a link to a folder
    (extras / "config.json").write_text(json.dumps({"architectures": ["Evil"], "auto_map": {
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    (extras / "modeling_evil.py").write_text("import os; os.system('touch pwned')\n")
    (extras / "generation_config.json").write_text('{"eos_token_id": 63, "custom_generate": "x/y"}')
    (extras / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, "auto_map": {
        "AutoTokenizer": ["evil/repo--tokenization_evil.EvilTokenizer", None]}}))
    os.mkfifo(extras / "tokenizer.model")  # not a regular file: must not block the export either
    out, err = _export(universal, tmp_path, capsys)
    assert sorted(os.listdir(out)) == sorted(GENERATED + ["special_tokens_map.json", "tokenizer_config.json"])
    _generated_config(out)
    assert (out / "special_tokens_map.json").read_text() == TOKENIZER["special_tokens_map.json"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 16}
    note = [line for line in err.splitlines() if "left out of the export" in line]
    assert len(note) == 1 and note[0].startswith(f"{extras}: ")
    for left_out in ("config.json", "generation_config.json", "modeling_evil.py", "merges.txt (not a regular file)",
                     "tokenizer.json (not a regular file)", "vocab.json (not a regular file)",
                     "tokenizer.model (not a regular file)", "tokenizer_config.json's auto_map"):
        assert left_out in note[0], left_out


# --- the trainer's save folder ----------------------------------------------------------------------


def _fake_save_folder(folder: Path) -> None:
    """The entries a save writes, as regular files and folders (contents do not matter to the check)."""
    (folder / "global_step2").mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (folder / "global_step2" / name).write_bytes(b"state")
    (folder / "latest").write_text("global_step2")
    (folder / "latest_checkpointed_iteration.txt").write_text("2")
    (folder / "zero_to_fp32.py").write_text("# recovery script\n")


PLANTS = [  # (entry, what it becomes)
    ("latest", "id_rsa"),
    ("zero_to_fp32.py", "credentials"),
    ("zero_to_torch.py", "credentials"),
    ("global_step4", "folder"),
    ("global_step2/mp_rank_00_model_states.pt", "id_rsa"),
    ("latest_checkpointed_iteration.txt", "hard link to credentials"),
    ("latest_checkpointed_iteration.txt", "link inside the folder"),  # refused too: every link is
]


@pytest.mark.parametrize("entry, kind", PLANTS, ids=[f"{e}:{k}" for e, k in PLANTS])
def test_save_folder_check_refuses_what_a_save_would_write_through(tmp_path, outside, entry, kind):
    from megatron_ucp.checkpoint.trust import CheckpointError

    save = tmp_path / "ckpt"
    _fake_save_folder(save)
    assert save_folder_problem(str(save), saved_iterations(4, 2)) is None  # negative control: clean folder
    path = save / entry
    if path.exists():
        path.unlink()
    if kind == "hard link to credentials":
        os.link(outside / "credentials", path)
    elif kind == "link inside the folder":
        os.symlink("global_step2/mp_rank_00_model_states.pt", path)
    else:
        os.symlink(outside / kind, path)
    before = _tree(save)
    problem = save_folder_problem(str(save), saved_iterations(4, 2))
    assert problem is not None and problem.startswith(f"{path}: ")
    assert ("hard links" if kind.startswith("hard") else "is a symbolic link") in problem
    with pytest.raises(CheckpointError) as e:  # the entry point's one line
        check_save_folder(str(save), saved_iterations(4, 2))
    assert "\n" not in str(e.value) and "nothing was written" in str(e.value)
    assert _tree(save) == before


def test_save_folder_check_looks_only_at_what_a_save_writes(tmp_path, outside):
    save = tmp_path / "ckpt"
    _fake_save_folder(save)
    os.symlink(outside / "folder", save / "global_step3")  # never saved by a run to 4 every 2 iterations
    os.symlink(outside / "id_rsa", save / "notes.txt")  # no save writes it
    assert saved_iterations(5, 2) == {2, 4, 5} and saved_iterations(4, None) == {4}
    assert save_folder_problem(str(save), saved_iterations(4, 2)) is None
    assert save_folder_problem(str(save), [3]) is not None  # control: the step folder a save would write
    assert save_folder_problem(str(tmp_path / "missing")) is None
    linked_save = tmp_path / "scratch_link"
    os.symlink(save, linked_save)  # the save folder itself may be a link: the user named it
    assert save_folder_problem(str(linked_save), [4]) is None


TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--max-position-embeddings", "16",
        "--make-vocab-size-divisible-by", "8", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--fp32", "--mock-data", "--vocab-size", "50", "--eval-interval", "0"]


def _trainer(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m megatron_ucp.train`` as one rank, with the environment torchrun would set."""
    from dist_utils import free_port

    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_ucp.train", *TINY, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _plant_resume_links(save: Path, outside: Path) -> None:
    for name, target in (("latest", "latest_target"), ("zero_to_fp32.py", "credentials"),
                         ("global_step4", "folder")):
        if (save / name).exists():
            (save / name).unlink()
        os.symlink(outside / target, save / name)


def test_trainer_refuses_to_resume_in_place_through_links(tmp_path, outside):
    save = tmp_path / "ckpt"
    _fake_save_folder(save)
    _plant_resume_links(save, outside)
    before = _tree(save)
    run = _trainer(["--load", str(save), "--save", str(save), "--train-iters", "4", "--save-interval", "2"])
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr[-3000:]
    assert errors[0].startswith(f"error: {save / 'latest'}: is a symbolic link"), errors
    assert "training" not in run.stdout and "resumed" not in run.stdout  # refused before start-up
    assert _tree(save) == before


# --- stale temporaries ------------------------------------------------------------------------------


def test_stale_temporary_links_are_removed_not_followed(tmp_path, outside):
    from megatron_ucp.atomic import HOST

    out = tmp_path / "global_step2_universal"
    dead = f"{out}.tmp-{HOST}-999999999-r0123456789ab"  # no such process
    live = f"{out}.tmp-{HOST}-{os.getpid()}-r0123456789ab"
    os.symlink(outside / "folder", dead)
    os.symlink(outside / "folder", live)
    notes: list[str] = []
    assert remove_stale_temporaries(str(out), say=notes.append) == [dead]
    assert not os.path.lexists(dead) and os.path.islink(live) and len(notes) == 1


# --- real checkpoints (slow) --------------------------------------------------------------------------

def _resume_then_plant(rank, world_size, cfg_dict, plant_after: int, link: str, target: str, result: str):
    """Resume in place; after the save at ``plant_after`` a link appears at ``link``; the next save must refuse."""
    from megatron_ucp.checkpoint.trust import CheckpointError
    from megatron_ucp.training.trainer import Trainer

    with Trainer(TINY_GPT, TrainConfig(**cfg_dict)) as trainer:
        trainer.build()
        trainer.load()
        save = trainer.save

        def save_then_plant(folder: str) -> str:
            path = save(folder)
            if trainer.iteration == plant_after:
                os.symlink(target, link)
            return path

        trainer.save = save_then_plant  # type: ignore[method-assign]
        try:
            trainer.run()
            outcome = "no error"
        except CheckpointError as e:
            outcome = str(e)
        Path(result).write_text(json.dumps({"error": outcome, "iteration": trainer.iteration}))


@pytest.mark.slow
def test_real_checkpoint_resume_in_place_and_certify(tmp_path, outside, monkeypatch, capsys):
    from dist_utils import run_distributed

    import megatron_ucp.atomic as atomic
    from megatron_ucp.atomic import temporary_name
    from megatron_ucp.checkpoint.universal import convert_zero_to_universal

    save = tmp_path / "ckpt"
    run_distributed(train_model, 1, dict(TINY_TRAIN, train_iters=2, save=str(save), save_interval=2))
    assert (save / "latest").read_text() == "global_step2"

    # --certify into a folder with links planted at the marker's temporary names (the predictable one of
    # earlier versions, and the random one, made predictable here) and at latest_universal's.
    universal = tmp_path / "universal" / "global_step2_universal"
    convert_zero_to_universal(str(save / "global_step2"), str(universal))
    (universal / COMPLETE_MARKER).unlink()
    (universal.parent / "latest_universal").unlink()
    # the marker tries a (taken), then b; latest_universal tries b (taken), then a
    names = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb", "bbbbbbbbbbbb", "aaaaaaaaaaaa"])
    monkeypatch.setattr(atomic, "_random_part", lambda: next(names, "cccccccccccc"))
    planted = [temporary_name(str(universal / COMPLETE_MARKER)),
               temporary_name(str(universal / COMPLETE_MARKER)) + "-raaaaaaaaaaaa",
               temporary_name(str(universal.parent / "latest_universal")) + "-rbbbbbbbbbbbb"]
    for name in planted:
        os.symlink(outside / "credentials", name)
    rc = load_tool("ds_to_universal").main(["--input_folder", str(save / "global_step2"), "--output_folder",
                                            str(universal), "--certify", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert require_verified(str(universal))["certified"] is True  # a correct marker, not through a link
    assert (universal.parent / "latest_universal").read_text() == universal.name
    assert all(os.readlink(p) == str(outside / "credentials") for p in planted)

    # Resuming in place through planted links: the real trainer refuses before start-up, nothing changes.
    keep = {name: (save / name).read_bytes() for name in ("latest", "zero_to_fp32.py")}
    _plant_resume_links(save, outside)
    before = _tree(save)
    argv = ["--load", str(save), "--save", str(save), "--train-iters", "6", "--save-interval", "2"]
    run = _trainer(argv)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 2 and len(errors) == 1 and "is a symbolic link" in errors[0], run.stderr[-3000:]
    assert _tree(save) == before

    # Negative control: without the links the same resume saves (at 4); a link planted during the run is
    # refused by the check right before the next save (at 6), with nothing written there.
    for name in ("latest", "zero_to_fp32.py", "global_step4"):
        (save / name).unlink()
    for name, data in keep.items():
        (save / name).write_bytes(data)
    result = tmp_path / "result.json"
    cfg = dict(TINY_TRAIN, train_iters=6, save=str(save), load=str(save), save_interval=2)
    run_distributed(_resume_then_plant, 1, cfg, 4, str(save / "global_step6"), str(outside / "folder"), str(result))
    outcome = json.loads(result.read_text())
    assert outcome["iteration"] == 6
    assert outcome["error"].startswith(f"{save / 'global_step6'}: is a symbolic link"), outcome
    assert (save / "latest").read_text() == "global_step4" and not (save / "latest").is_symlink()
    assert (save / "global_step4" / "mp_rank_00_model_states.pt").is_file()
    assert not (save / "global_step4").is_symlink()


def test_dataset_builder_never_writes_through_a_planted_temporary(tmp_path, outside, monkeypatch):
    """The tokenized dataset's temporaries are created exclusively: a link already at the name (forced
    here by fixing the random part) is refused, not followed; the control writes the dataset."""
    import numpy as np

    from megatron_ucp import atomic
    from megatron_ucp.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    monkeypatch.setattr(atomic, "_random_part", lambda: "fixed")
    prefix = tmp_path / "data" / "corpus"
    (tmp_path / "data").mkdir()
    planted = Path(f"{prefix}.bin.tmp-{atomic.HOST}-{os.getpid()}-rfixed")
    planted.symlink_to(outside / "id_rsa")
    with pytest.raises(FileExistsError):
        IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    assert planted.is_symlink() and not Path(f"{prefix}.bin").exists()
    planted.unlink()  # control: the same build without the link
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16) as b:
        b.add_document([1, 2, 3])
        b.finalize(f"{prefix}.idx")
    assert list(IndexedDataset(str(prefix))[0]) == [1, 2, 3]
