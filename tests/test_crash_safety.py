"""A conversion killed at any instant leaves what was there before or a complete, verified output.

A real subprocess converts a real checkpoint and is SIGKILLed in every phase of its run: start-up,
indexing, copying (an atom half written, a parameter done), verifying, after the marker and after
publishing. After each kill ``latest_universal`` names nothing incomplete or unverified, and rerunning
the same command exits 0 with output equal to an uninterrupted conversion and no temporary folder left.

The kills do not depend on the machine's speed. Most land on the converter's named points
(``megatron_ucp.pacing``): the converter stops itself there with SIGSTOP and the test kills it, so
each phase is hit however fast it runs. The rest land at instants spread over a measured run, paced
by a sleep at every point (``UCP_KILL_TEST_PACE`` seconds, default 0.01), so that they fall inside the
work rather than in interpreter start-up; ``UCP_KILL_TEST_PACE=0`` runs them unpaced.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import run_distributed
from helpers import REPO, train_model
from megatron_ucp.checkpoint.inspect import compare_universal
from megatron_ucp.checkpoint.publish import COMPLETE_MARKER, read_marker, require_verified
from megatron_ucp.pacing import CONVERTER_POINTS, PACE_ENV, STOP_ENV

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, max_position_embeddings=16,
             make_vocab_size_divisible_by=128, hidden_dropout=0.0, attention_dropout=0.0)
PACE = float(os.environ.get("UCP_KILL_TEST_PACE", "0.01"))
TIMED_KILLS = 4


@pytest.fixture(scope="module")
def zero_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    cfg = dict(micro_batch_size=1, global_batch_size=1, seq_length=16, train_iters=1, dtype="fp32", mock_data=True,
               vocab_size=8000, eval_interval=0, save=str(root / "ckpt"), save_interval=1)
    run_distributed(train_model, 1, cfg, MODEL)
    return root / "ckpt" / "global_step1"


def _command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "ds_to_universal.py"), "--input_folder", str(src),
            "--output_folder", str(out), "--num_extract_workers", "1", "--quiet", *extra]


def _env(**extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    for name in (PACE_ENV, STOP_ENV):
        if name not in extra:
            env.pop(name, None)
    return env


def _check_state_after_kill(parent: Path, out: Path) -> str:
    """What a reader finds: latest_universal names nothing that is incomplete or unverified."""
    latest = parent / "latest_universal"
    if latest.exists():
        named = parent / latest.read_text()
        require_verified(str(named))  # raises on an incomplete or unverified folder
        return "published"
    assert not out.exists() or read_marker(str(out)) is not None, f"{out} exists without its marker"
    return "in place, not named" if out.exists() else "nothing published"


@pytest.fixture(scope="module")
def reference(zero_checkpoint, tmp_path_factory):
    """An uninterrupted conversion, and its number of parameters."""
    out = tmp_path_factory.mktemp("reference") / "global_step1_universal"
    subprocess.run(_command(zero_checkpoint, out), check=True, env=_env(), capture_output=True)
    return out, len([p for p in (out / "zero").iterdir() if p.is_dir()])


def _rerun_and_compare(cli, capsys, zero_checkpoint: Path, reference: Path, parent: Path, out: Path) -> int:
    """Rerun the same command in this process: it succeeds, cleans up after the dead process and gives the
    reference's output. Returns how many temporary folders the kill had left."""
    leftovers = sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)
    capsys.readouterr()
    assert cli.main(_command(zero_checkpoint, out)[2:]) == 0
    rerun_err = capsys.readouterr().err
    assert sorted(p.name for p in parent.iterdir()) == ["global_step1_universal", "latest_universal"]
    for name in leftovers:
        assert f"removed {parent / name}" in rerun_err, rerun_err
    cmp = compare_universal(str(reference), str(out))
    assert cmp.equal and cmp.compared > 100, cmp.summary()
    require_verified(str(out))
    return len(leftovers)


def _stop_then_kill(proc: subprocess.Popen) -> bool:
    """Wait until ``proc`` stops itself at its point and SIGKILL it there; False if it exited first."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def test_killed_in_every_phase_leaves_a_complete_output_or_none(zero_checkpoint, reference, tmp_path, capsys):
    from helpers import load_tool

    cli = load_tool("ds_to_universal")  # the reruns run in this process: no interpreter start-up each
    ref, n_params = reference
    assert n_params > 10
    # (point, arrival, what a reader must find, temporary folders left): every phase, at its first,
    # middle or last arrival; atom-started arrives three times per parameter (fp32, exp_avg, exp_avg_sq).
    stops = [("indexed", 1, "nothing published", 0), ("staged", 1, "nothing published", 1),
             ("atom-started", 1, "nothing published", 1), ("atom-started", 3 * n_params // 2, "nothing published", 1),
             ("param-written", n_params // 2, "nothing published", 1), ("written", 1, "nothing published", 1),
             ("param-verified", 1, "nothing published", 1), ("param-verified", n_params, "nothing published", 1),
             ("marked", 1, "nothing published", 1), ("published", 1, "in place, not named", 0)]
    assert {p for p, *_ in stops} == set(CONVERTER_POINTS)
    for i, (name, arrival, expected, left) in enumerate(stops):
        parent = tmp_path / f"stop{i}"
        parent.mkdir()
        out = parent / "global_step1_universal"
        proc = subprocess.Popen(_command(zero_checkpoint, out), env=_env(**{STOP_ENV: f"{name}:{arrival}"}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _stop_then_kill(proc), f"the conversion ended (rc {proc.returncode}) before {name}:{arrival}"
        assert _check_state_after_kill(parent, out) == expected, (name, arrival)
        if name == "marked":  # the temporary folder is complete, but unpublished: a reader never sees it
            (tmp,) = [p for p in parent.iterdir() if ".tmp-" in p.name]
            assert (tmp / COMPLETE_MARKER).exists()
        assert _rerun_and_compare(cli, capsys, zero_checkpoint, ref, parent, out) == left, (name, arrival)


def test_killed_at_instants_spread_over_a_run(zero_checkpoint, reference, tmp_path, capsys):
    from helpers import load_tool

    cli = load_tool("ds_to_universal")
    ref, _ = reference
    env = _env(**{PACE_ENV: str(PACE)})
    t0 = time.perf_counter()
    subprocess.run(_command(zero_checkpoint, tmp_path / "timed" / "global_step1_universal"), check=True, env=env,
                   capture_output=True)
    duration = time.perf_counter() - t0
    # Instants spread over the whole run, as fractions of its measured duration. Runs vary (the first one
    # pays for a cold page cache), so a run that ends before its instant teaches the estimate its real
    # length and the same fraction is tried again.
    fractions = [(i + 0.5) / TIMED_KILLS for i in range(TIMED_KILLS)] + [0.97]
    outcomes = []
    attempt, attempts = 0, 4 * len(fractions)
    while fractions and attempt < attempts:
        frac = fractions.pop(0)
        when = frac * duration
        parent = tmp_path / f"kill{attempt}"
        attempt += 1
        out = parent / "global_step1_universal"
        parent.mkdir()
        start = time.perf_counter()
        proc = subprocess.Popen(_command(zero_checkpoint, out), env=env, stdout=subprocess.DEVNULL,
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
        left = _rerun_and_compare(cli, capsys, zero_checkpoint, ref, parent, out)
        outcomes.append((round(when, 2), killed, state, left))
    assert sum(1 for _, killed, _, _ in outcomes if killed) >= TIMED_KILLS, outcomes
    print(f"pace {PACE} s; kills (instant s, killed, state found, temporary folders left):", outcomes)


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
