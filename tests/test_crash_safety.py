"""A conversion killed at any instant leaves what was there before or a complete, verified output.

A real subprocess converts a real checkpoint (about 100 MB of optimizer state, a few seconds) and is
SIGKILLed at instants spread over its run, from start-up through copying, verifying and publishing.
After each kill ``latest_universal`` names nothing incomplete or unverified, and rerunning the same
command exits 0 with output equal to an uninterrupted conversion and no temporary folder left.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import run_distributed
from helpers import REPO
from megatron_ucp.checkpoint.inspect import compare_universal
from megatron_ucp.checkpoint.publish import COMPLETE_MARKER, read_marker, require_verified
from megatron_ucp.config import TrainConfig

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# Large enough that copying and verifying take a good part of the run.
MODEL = dict(num_layers=4, hidden_size=512, num_attention_heads=8, max_position_embeddings=16,
             make_vocab_size_divisible_by=128, hidden_dropout=0.0, attention_dropout=0.0)
KILLS = 10


def _train(rank, world_size, cfg_dict):
    from megatron_ucp.training.trainer import train

    train(MODEL, TrainConfig(**cfg_dict))


@pytest.fixture(scope="module")
def zero_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    cfg = dict(micro_batch_size=1, global_batch_size=1, seq_length=16, train_iters=1, dtype="fp32", mock_data=True,
               vocab_size=8000, eval_interval=0, save=str(root / "ckpt"), save_interval=1)
    run_distributed(_train, 1, cfg)
    return root / "ckpt" / "global_step1"


def _command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "ds_to_universal.py"), "--input_folder", str(src),
            "--output_folder", str(out), "--num_extract_workers", "1", "--quiet", *extra]


def _env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _check_state_after_kill(parent: Path, out: Path) -> str:
    """What a reader finds: latest_universal names nothing that is incomplete or unverified."""
    latest = parent / "latest_universal"
    if latest.exists():
        named = parent / latest.read_text()
        require_verified(str(named))  # raises on an incomplete or unverified folder
        return "published"
    assert not out.exists() or read_marker(str(out)) is not None, f"{out} exists without its marker"
    return "nothing published"


def test_killed_conversions_leave_a_complete_output_or_none(zero_checkpoint, tmp_path, capsys):
    from helpers import load_tool

    cli = load_tool("ds_to_universal")  # the reruns run in this process: no interpreter start-up each
    reference = tmp_path / "reference" / "global_step1_universal"
    t0 = time.perf_counter()
    subprocess.run(_command(zero_checkpoint, reference), check=True, env=_env(), capture_output=True)
    duration = time.perf_counter() - t0
    assert duration >= 2.0, f"the conversion took {duration:.2f} s; the kill test needs at least 2 s"

    # Instants spread over the whole run, the last ones close to its end (verification, publishing), as
    # fractions of its duration. Runs vary (the first one pays for a cold page cache), so a run that
    # ends before its instant teaches the estimate its real length and the same fraction is tried again.
    fractions = [(i + 0.5) / KILLS for i in range(KILLS)] + [0.97, 0.99]
    outcomes = []
    attempt = 0
    while fractions and attempt < 3 * (KILLS + 2):
        frac = fractions.pop(0)
        when = frac * duration
        parent = tmp_path / f"kill{attempt}"
        attempt += 1
        out = parent / "global_step1_universal"
        parent.mkdir()
        start = time.perf_counter()
        proc = subprocess.Popen(_command(zero_checkpoint, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and time.perf_counter() - start < when:
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        else:
            duration = min(duration, time.perf_counter() - start)
            fractions.append(frac)  # missed: the same point of the run again, on the shorter estimate
        proc.wait()
        state = _check_state_after_kill(parent, out)
        leftovers = sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)
        # The same command again: succeeds, and cleans up after the dead process.
        capsys.readouterr()
        assert cli.main(_command(zero_checkpoint, out)[2:]) == 0
        rerun_err = capsys.readouterr().err
        assert sorted(p.name for p in parent.iterdir()) == ["global_step1_universal", "latest_universal"]
        for name in leftovers:
            assert f"removed {parent / name}" in rerun_err, rerun_err
        cmp = compare_universal(str(reference), str(out))
        assert cmp.equal and cmp.compared > 100, cmp.summary()
        require_verified(str(out))
        outcomes.append((round(when, 2), killed, state, len(leftovers)))
    # The kills really hit the run in different phases: at least KILLS of them hit a live conversion,
    # some before anything was published (a temporary folder left behind), none of which left a
    # readable-but-incomplete output.
    assert sum(1 for _, killed, _, _ in outcomes if killed) >= KILLS, outcomes
    assert any(n for *_, n in outcomes), f"no kill left a temporary folder: {outcomes}"
    print("kills (instant s, killed, state found, temporary folders left):", outcomes)


def test_overwrite_refuses_what_is_not_a_universal_checkpoint(zero_checkpoint, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    afile = tmp_path / "afile"
    afile.write_text("also precious")
    for target in (folder, afile):
        run = subprocess.run(_command(zero_checkpoint, target, "--overwrite"), env=_env(), capture_output=True,
                             text=True)
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith(f"error: {target}: ")
        assert "Traceback" not in run.stderr
    assert "is not a universal checkpoint folder" in subprocess.run(
        _command(zero_checkpoint, folder, "--overwrite"), env=_env(), capture_output=True, text=True).stderr
    assert os.listdir(folder) == ["thesis.txt"] and (folder / "thesis.txt").read_text() == "years of work"
    assert afile.read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]  # no temporary left either


def test_unverified_output_is_not_published_for_resume(zero_checkpoint, tmp_path):
    out = tmp_path / "u" / "global_step1_universal"
    run = subprocess.run(_command(zero_checkpoint, out, "--no-verify"), env=_env(), capture_output=True, text=True)
    assert run.returncode == 0 and "NOT verified" in run.stdout
    assert not (tmp_path / "u" / "latest_universal").exists()
    assert read_marker(str(out))["verified"] is False
    with pytest.raises(ValueError, match="was not verified"):
        require_verified(str(out))
    # Negative control: the same folder, verified, is accepted.
    out2 = tmp_path / "v" / "global_step1_universal"
    subprocess.run(_command(zero_checkpoint, out2), env=_env(), check=True, capture_output=True)
    assert require_verified(str(out2))["verified"] is True and (out2 / COMPLETE_MARKER).exists()
