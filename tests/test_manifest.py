"""Complete checkpoints (``checkpoint/manifest.py``) and the layout an elastic job takes (``training/elastic.py``).

The checkpoints are the session's real tiny GPT run (``tiny_checkpoints``: TP1 PP1 DP2, fp32, saved at
iterations 1 and 2, each with the manifest rank 0 wrote after every rank had saved). Each broken case works
on a copy and changes one thing: a shard deleted or cut short, the manifest removed or tampered with.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from helpers import TINY_FLAGS
from megatron_ucp.checkpoint.manifest import (
    MANIFEST_FILE,
    MANIFEST_KEY,
    checkpoint_problem,
    listing,
    newest_complete,
    read_manifest,
)
from megatron_ucp.checkpoint.trust import CheckpointError

SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


@pytest.fixture
def run(tiny_checkpoints, tmp_path):
    """A copy of the tiny run's save folder (global_step1, global_step2, trackers)."""
    src = tiny_checkpoints(1)[0].parent
    return shutil.copytree(src, tmp_path / "ckpt")


@pytest.mark.slow  # the session's tiny run (trained on first use)
def test_the_manifest_lists_every_file_the_save_wrote_with_its_size(run):
    step = run / "global_step2"
    files = read_manifest(str(step))
    assert files == {p.name: p.stat().st_size for p in step.iterdir() if p.name != MANIFEST_FILE}
    assert {MODEL, SHARD, "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(files)
    doc = json.loads((step / MANIFEST_FILE).read_text())
    assert doc["iteration"] == 2 and doc["topology"] == {"tp": 1, "pp": 1, "dp": 2}
    assert checkpoint_problem(str(step)) is None
    # the model states promise it: a folder of this writer without one did not finish its save
    assert torch.load(step / MODEL, weights_only=False)[MANIFEST_KEY] == MANIFEST_FILE


@pytest.mark.parametrize("damage,expected", [
    ("delete", f"missing {SHARD}"),
    ("truncate", f"changed since the save: {SHARD} (1000 bytes, the manifest says"),
    ("no-manifest", f"no {MANIFEST_FILE} (the save did not finish)"),
])
@pytest.mark.slow  # the session's tiny run (trained on first use)
def test_an_incomplete_checkpoint_is_skipped_naming_what_is_missing(run, damage, expected):
    step = run / "global_step2"
    if damage == "delete":
        (step / SHARD).unlink()
    elif damage == "truncate":
        os.truncate(step / SHARD, 1000)
    else:
        (step / MANIFEST_FILE).unlink()
    problem = checkpoint_problem(str(step))
    assert problem is not None and problem.startswith(f"{step}: {expected}"), problem
    said: list[str] = []
    assert newest_complete(str(run), said.append) == str(run / "global_step1")
    assert said == [f"skipping incomplete checkpoint {problem}"]


@pytest.mark.slow  # the session's tiny run (trained on first use)
def test_without_manifest_a_checkpoint_is_checked_by_presence_and_readability(run):
    """What older checkpoints and DeepSpeed's own have: the files the saved layout implies, each one opening."""
    step = run / "global_step2"
    (step / MANIFEST_FILE).unlink()
    state = torch.load(step / MODEL, weights_only=False)
    del state[MANIFEST_KEY]  # written before manifests existed
    (step / MODEL).unlink()
    torch.save(state, step / MODEL)
    assert checkpoint_problem(str(step)) is None  # negative control: complete
    shard = (step / SHARD).read_bytes()
    (step / SHARD).write_bytes(shard[: len(shard) // 2])  # cut short: its zip directory is gone
    problem = checkpoint_problem(str(step))
    assert problem is not None and problem.startswith(str(step / SHARD)), problem
    (step / SHARD).unlink()
    assert checkpoint_problem(str(step)) == f"{step}: missing {SHARD}"
    (step / MODEL).unlink()
    assert checkpoint_problem(str(step)) == f"{step / MODEL}: missing file"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["files"].update({"../escape.pt": 1}), "file name '../escape.pt' contains a path separator"),
    (lambda d: d["files"].update({MODEL: -1}), f"files['{MODEL}']: expected a size >= 0, found -1"),
    (lambda d: d.update(version=99), "manifest version 99, this megatron_ucp reads 1"),
    (lambda d: d.update(kind="other"), "not a checkpoint manifest"),
])
@pytest.mark.slow  # the session's tiny run (trained on first use)
def test_a_tampered_manifest_is_one_line_and_the_checkpoint_incomplete(run, edit, message):
    step = run / "global_step2"
    doc = json.loads((step / MANIFEST_FILE).read_text())
    edit(doc)
    (step / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as e:
        read_manifest(str(step))
    assert str(e.value).startswith(f"{step / MANIFEST_FILE}: ") and message in str(e.value), str(e.value)
    assert checkpoint_problem(str(step)) == str(e.value)


@pytest.mark.slow  # the session's tiny run (trained on first use)
def test_no_checkpoint_is_a_fresh_start_but_only_broken_ones_are_an_error(run, tmp_path):
    assert newest_complete(str(tmp_path / "absent")) is None
    (tmp_path / "empty").mkdir()
    assert newest_complete(str(tmp_path / "empty")) is None
    assert newest_complete(str(run)) == str(run / "global_step2")  # negative control: the newest complete one
    for step in ("global_step1", "global_step2"):
        (run / step / SHARD).unlink()
    with pytest.raises(CheckpointError, match=f"^{run / 'global_step2'}: missing {SHARD}; nothing to resume from"):
        newest_complete(str(run))


@pytest.mark.slow  # the session's tiny run (trained on first use)
def test_resume_folder_takes_the_newest_complete_and_refuses_an_incomplete_step(run):
    from megatron_ucp.training.checkpointing import check_load_folder, resume_folder

    assert resume_folder(str(run), universal=False) == str(run / "global_step2")
    (run / "global_step2" / SHARD).unlink()
    folder, meta = check_load_folder(str(run), universal=False)
    assert folder == str(run / "global_step1") and meta is not None and meta.iteration == 1
    with pytest.raises(CheckpointError, match=rf"missing {SHARD} \(--ckpt-step 2\)$"):
        resume_folder(str(run), universal=False, step=2)
    assert check_load_folder(str(run.parent / "nothing-here"), universal=False) == (None, None)


def test_listing_leaves_out_links_and_the_manifest(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"12345")
    (tmp_path / MANIFEST_FILE).write_text("{}")
    os.symlink(tmp_path / "a.pt", tmp_path / "link.pt")
    (tmp_path / "sub").mkdir()
    assert listing(str(tmp_path)) == {"a.pt": 5}


# --- the layout at the world size a job gets ----------------------------------------------------------


def _flags(*extra: str) -> list[str]:
    flags = list(TINY_FLAGS)
    flags[flags.index("--num-layers") + 1] = "2"
    flags[flags.index("--global-batch-size") + 1] = "8"
    return flags + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", *extra]


@pytest.mark.parametrize("world,elastic,expected", [
    (8, False, (2, 2, 2)),  # fits: TP and PP kept, DP = world / (TP x PP)
    (4, False, (2, 2, 1)),
    (2, True, (2, 1, 1)),  # lowered: the most model-parallel ranks that fit, the larger TP on a tie
    (3, True, (1, 1, None)),  # 3 ranks: TP1 PP1 DP3 does not divide the global batch of 8 either: refused
])
def test_the_layout_keeps_tp_and_pp_and_lowers_them_only_when_asked(world, elastic, expected):
    from megatron_ucp.training.arguments import configs_from_flags

    argv = _flags(*(["--elastic-layout"] if elastic else []))
    if expected[2] is None:
        with pytest.raises(ValueError, match="world sizes that would work at TP2 PP2 .*: 4, 8, 16, 32; no smaller"):
            configs_from_flags(argv, environ={"WORLD_SIZE": str(world)})
        return
    _, cfg = configs_from_flags(argv, environ={"WORLD_SIZE": str(world)})
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    assert (tp, pp, world // (tp * pp)) == expected
    assert cfg.gradient_accumulation_steps(world // (tp * pp)) == 8 // (world // (tp * pp))  # the global batch kept


def test_an_impossible_world_is_one_line_naming_the_worlds_that_work_and_nothing_is_written(tmp_path, capsys):
    from megatron_ucp import train

    save = tmp_path / "ckpt"
    os.environ["WORLD_SIZE"] = "2"
    try:
        rc = train.main(_flags("--save", str(save), "--load", str(save), "--save-interval", "4"))
    finally:
        del os.environ["WORLD_SIZE"]
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        "error: world size 2 does not fit this run (world size 2 is not divisible by tensor parallel 2 x pipeline "
        "parallel 2); world sizes that would work at TP2 PP2 with global batch 8 and micro batch 1: 4, 8, 16, 32; "
        "or pass --elastic-layout to lower TP or PP to fit"]
    assert not save.exists() and os.listdir(tmp_path) == []
