"""Preemption: SIGTERM to every worker of a running job (``--exit-signal-handler``) saves that iteration and
exits 0, and the run resumed from that checkpoint is bitwise the uninterrupted one at the next step.

The job is ``torchrun`` with two CPU ranks of the tiny GPT (fp32); the signal goes to the workers (torchrun's
children), as a cloud's preemption notice does, once the job has logged its third iteration. The job runs
to no fixed point: which iteration the ranks agree to stop at is read from the checkpoint tracker. Also
the flags' one-line refusals.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from dist_utils import free_port
from helpers import TINY_FLAGS, read_losses
from megatron_ucp.checkpoint.manifest import checkpoint_problem
from megatron_ucp.launch import end_group, run_in_group, start_in_group

ITERS = 1000  # never reached: the signal stops the job after a few iterations


def _torchrun(*flags: str) -> list[str]:
    """The trainer on two CPU ranks: the tiny GPT's flags (``helpers.TINY_FLAGS``) with the LR decaying over
    ITERS whatever ``--train-iters`` a run stops at, so every run here has one schedule."""
    base = list(TINY_FLAGS)
    base[base.index("--train-iters") + 1] = str(ITERS)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "megatron_ucp.train", *base, "--lr-decay-iters", str(ITERS), "--log-interval", "1", *flags]


ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_sigterm_saves_the_iteration_exits_zero_and_resumes_bitwise(tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "preempted.jsonl"
    rc, text = _signalled_after_iteration_3(_torchrun("--save", str(save), "--loss-log", str(log),
                                                      "--exit-signal-handler"))
    assert rc == 0, text[-3000:]
    stopped = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped < ITERS and f"exiting after iteration {stopped} on SIGTERM (checkpoint saved)" in text
    assert sorted(read_losses(log)) == list(range(1, stopped + 1))
    assert checkpoint_problem(str(save / f"global_step{stopped}")) is None  # complete: its manifest matches
    # The uninterrupted run and the resumed one, to the next iteration: the same loss, bit for bit.
    nxt = str(stopped + 1)
    for name, extra in (("reference", ()), ("resumed", ("--load", str(save)))):
        cmd = _torchrun("--loss-log", str(tmp_path / f"{name}.jsonl"), *extra)
        cmd[cmd.index("--train-iters") + 1] = nxt
        assert run_in_group(cmd, timeout_s=600, env=ENV, stdout=subprocess.DEVNULL) == 0, name
    reference, resumed = read_losses(tmp_path / "reference.jsonl"), read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [stopped + 1]
    assert resumed[stopped + 1] == reference[stopped + 1]
    assert reference[stopped] == read_losses(log)[stopped]  # the reference is the job the resume stands for


def _signalled_after_iteration_3(cmd: list[str]) -> tuple[int, str]:
    """Run ``cmd``, SIGTERM its trainer processes once iteration 3 is logged; (exit status, output)."""
    import psutil

    job = start_in_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    out = []
    try:
        for line in job.stdout:
            out.append(line)
            if " iteration      3/" in line:
                workers = [p for p in psutil.Process(job.pid).children(recursive=True)
                           if "megatron_ucp.train" in " ".join(p.cmdline())]
                assert len(workers) == 2, workers
                for p in workers:
                    p.send_signal(signal.SIGTERM)
                break
        rest, _ = job.communicate(timeout=600)
        out.append(rest)
    finally:
        end_group(job, grace_s=0)
    return job.returncode, "".join(out)


@pytest.mark.slow
def test_without_the_handler_sigterm_ends_the_job_unsaved(tmp_path):
    """Negative control: the same signal without ``--exit-signal-handler`` ends the workers where they are."""
    rc, text = _signalled_after_iteration_3(_torchrun("--save", str(tmp_path / "ckpt")))
    assert rc != 0, text[-2000:]
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.slow
def test_save_interval_minutes_saves_when_the_last_save_is_that_old(tmp_path):
    from dist_utils import run_distributed
    from helpers import TINY_GPT, run_cfg, train_model

    cfg = run_cfg(1, 1, global_batch_size=2, train_iters=3, save=str(tmp_path / "ckpt"),
                  save_interval_minutes=1e-9)  # always overdue: every iteration is saved
    run_distributed(train_model, 2, cfg, TINY_GPT)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("global_step")) == [
        "global_step1", "global_step2", "global_step3"]
    cfg = dict(cfg, save=str(tmp_path / "ckpt2"), save_interval_minutes=60.0)  # never overdue: the last one only
    run_distributed(train_model, 2, cfg, TINY_GPT)
    assert sorted(p.name for p in (tmp_path / "ckpt2").iterdir() if p.name.startswith("global_step")) == [
        "global_step3"]


def test_save_triggers_refuse_what_cannot_work():
    from megatron_ucp.config import TrainConfig

    with pytest.raises(ValueError, match="--save-interval-minutes needs --save"):
        TrainConfig(mock_data=True, vocab_size=50, save_interval_minutes=1.0)
    with pytest.raises(ValueError, match="save_interval_minutes must be a positive number"):
        TrainConfig(mock_data=True, vocab_size=50, save="s", save_interval_minutes=0.0)
    TrainConfig(mock_data=True, vocab_size=50, save="s", save_interval_minutes=0.5, exit_signal_handler=True)


@pytest.mark.slow
def test_a_peer_already_gone_skips_the_save_and_the_previous_checkpoint_stays(tmp_path):
    """Both workers hold after iteration 3 (``MEGATRON_UCP_HOLD_AT``, released by SIGTERM); one is SIGKILLed there.
    torchrun sends the other SIGTERM, and its agreement with the dead peer fails: it exits 1 at once with one
    line, saves nothing, and the checkpoint of iteration 2 is complete and unchanged."""
    import hashlib

    import psutil

    save = tmp_path / "ckpt"
    cmd = _torchrun("--save", str(save), "--save-interval", "2", "--exit-signal-handler")
    job = start_in_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(ENV, MEGATRON_UCP_HOLD_AT="iteration-3"))
    out, held = [], []
    try:
        for line in job.stdout:  # two workers' lines may share one line of torchrun's output
            out.append(line)
            held += [int(pid) for pid in re.findall(r"holding at iteration-3 \(pid (\d+)\)", line)]
            if len(held) == 2:
                break
        step2 = save / "global_step2"
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in step2.iterdir()}
        psutil.Process(held[1]).kill()
        rest, _ = job.communicate(timeout=600)
        out.append(rest)
    finally:
        end_group(job, grace_s=0)
    text = "".join(out)
    assert job.returncode != 0, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: SIGTERM received, but a peer is gone (") and errors[
        0].endswith("): exiting without a save; the previous complete checkpoint stays"), text[-3000:]
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("global_step")) == ["global_step2"]
    assert checkpoint_problem(str(step2)) is None
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in step2.iterdir()} == before
