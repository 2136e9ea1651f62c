"""Lose a node, gain a node, keep training: the trainer on torchrun's elastic agent (issue 23's acceptance).

Two "nodes" are two torchrun agents on loopback (``elastic_harness``) with the settings of
``megatron_ucp.elastic`` (what ``run_elastic.sh`` starts), agent A hosting the c10d rendezvous store. The
job is the tiny GPT (fp32, mock data, global batch 8, 24 iterations, a save every 4), started with
``--load CK --save CK --exit-signal-handler``: one command starts the job and restarts it. Where a node dies
or joins is set by what the job prints, never by time: ``MEGATRON_UCP_HOLD_AT`` holds one node's workers
after an iteration, or before their first file of a save, until a SIGTERM releases them or the test kills
them (``megatron_ucp.pacing``).

Every run is compared with one uninterrupted run at TP1 PP1 DP4: the data order and the initial weights are
the same at every layout, so its losses stand for each layout here, to float summation order (1e-5
relative, at every iteration).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

from elastic_harness import Agent, agents, held
from helpers import TINY_FLAGS, read_losses
from megatron_ucp.checkpoint.format import OPTIM_STATES_RE
from megatron_ucp.checkpoint.manifest import checkpoint_problem
from megatron_ucp.elastic import torchrun_command
from megatron_ucp.launch import free_port

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ITERS = 24
RTOL = 1e-5
HANG_S = 300  # a guard against a hang only: nothing here asserts how long anything takes
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", LOGLEVEL="INFO")


def _flags() -> list[str]:
    """The tiny GPT at two layers (two pipeline stages possible), global batch 8 (DP 1, 2, 4 and 8 divide it),
    without dropout."""
    flags = list(TINY_FLAGS)
    for flag, value in (("--num-layers", "2"), ("--global-batch-size", "8"), ("--train-iters", str(ITERS))):
        flags[flags.index(flag) + 1] = value
    return flags + ["--lr-decay-iters", str(ITERS), "--log-interval", "1", "--save-interval", "4", "--hidden-dropout",
                    "0", "--attention-dropout", "0"]  # no dropout: its masks are drawn per rank, so per layout


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted job on four spawned ranks (TP1 PP1 DP4), with the configs its flags parse to; its
    training losses by iteration."""
    from dist_utils import run_distributed
    from helpers import train_model
    from megatron_ucp.training.arguments import configs_from_flags

    log = tmp_path_factory.mktemp("elastic_reference") / "loss.jsonl"
    model, cfg = configs_from_flags([*_flags(), "--loss-log", str(log)], environ={"WORLD_SIZE": "4"})
    run_distributed(train_model, 4, cfg.to_dict(), model)
    losses = read_losses(log)
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses


class Job:
    """The elastic job's agents: ``agent(name, host, nproc, hold)`` starts one with the job's flags."""

    def __init__(self, tmp_path: Path, started: list[Agent], extra: tuple[str, ...] = ()) -> None:
        self.ckpt, self.log = tmp_path / "ckpt", tmp_path / "loss.jsonl"
        self.endpoint, self.run_id = f"127.0.0.1:{free_port()}", f"job{os.getpid()}{free_port()}"
        self.started, self.extra = started, extra

    def agent(self, name: str, *, host: bool, nproc: int = 2, hold: str | None = None) -> Agent:
        cmd = torchrun_command(sys.executable, nnodes="1:2", nproc_per_node=nproc, endpoint=self.endpoint,
                               run_id=self.run_id, host=host, max_restarts=3)
        args = [*_flags(), *self.extra, "--load", str(self.ckpt), "--save", str(self.ckpt), "--exit-signal-handler",
                "--loss-log", str(self.log)]
        env = dict(ENV, **({"MEGATRON_UCP_HOLD_AT": hold} if hold else {}))
        agent = Agent(name, [*cmd, "-m", "megatron_ucp.train", *args], env=env)
        self.started.append(agent)
        return agent

    def losses(self) -> dict[int, float]:
        return read_losses(self.log)


def _finished(agent: Agent) -> int:
    agent.wait_for(rf" iteration +{ITERS}/{ITERS} ", timeout_s=HANG_S)
    return agent.proc.wait(timeout=HANG_S)


def _goes_on_after_the_kill(a: Agent, killed_at: float, start: int, what: str, resumed: str, layout: str) -> None:
    """After node B's kill: A says it resumes as ``resumed``, trains at ``layout`` and finishes the job (exit 0);
    prints the seconds from the kill to the first resumed iteration."""
    i, _, _ = a.wait_for(resumed, after=start, timeout_s=HANG_S)
    a.wait_for(layout, after=i, timeout_s=HANG_S)
    _, first, _ = a.wait_for(r" iteration +9/24 ", after=i, timeout_s=HANG_S)
    print(f"\n{what}: kill -> first resumed iteration {first.t - killed_at:.1f} s")
    assert _finished(a) == 0, a.tail()


def _assert_continuous(losses: dict[int, float], reference: dict[int, float], first: int) -> None:
    assert sorted(losses) == list(range(1, ITERS + 1))
    worst = max(abs(losses[i] - reference[i]) / abs(reference[i]) for i in range(first, ITERS + 1))
    print(f"iterations {first}..{ITERS}: max relative difference to the uninterrupted run {worst:.2e}")
    assert worst <= RTOL, {i: (losses[i], reference[i]) for i in range(first, ITERS + 1)}


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_node_loss_resumes_at_dp2_from_the_last_save_and_goes_on(tmp_path, reference):
    with agents() as started:
        job = Job(tmp_path, started)
        a, b = job.agent("A", host=True), job.agent("B", host=False, hold="iteration-10")
        start, _, _ = a.wait_for(r"global batch 8 = micro 1 x accumulation 2 x DP 4", timeout_s=HANG_S)
        # both of B's workers finished iteration 10: no save is running (8, 12)
        held(b, "iteration-10", 2, timeout_s=HANG_S)
        _goes_on_after_the_kill(a, b.kill(), start, "node loss",
                                r"resuming at iteration 8: layout TP1 PP1 DP4 -> TP1 PP1 DP2 \(world 4 -> 2\); "
                                r"2 iterations lost \(the job had reached iteration 10\)",
                                r"global batch 8 = micro 1 x accumulation 4 x DP 2")
    _assert_continuous(job.losses(), reference, 9)


def test_node_join_saves_on_sigterm_and_goes_on_at_dp4_losing_nothing(tmp_path, reference):
    with agents() as started:
        job = Job(tmp_path, started)
        a = job.agent("A", host=True, hold="iteration-10")
        start, _, _ = a.wait_for(r"global batch 8 = micro 1 x accumulation 4 x DP 2", timeout_s=HANG_S)
        # A's workers hold there until the SIGTERM torchrun sends them when B arrives
        held(a, "iteration-10", 2, after=start, timeout_s=HANG_S)
        b = job.agent("B", host=False)
        i, _, _ = a.wait_for(r"exiting after iteration 10 on SIGTERM \(checkpoint saved\)", after=start,
                             timeout_s=HANG_S)
        assert checkpoint_problem(str(job.ckpt / "global_step10")) is None
        a.wait_for(r"resuming at iteration 10: layout TP1 PP1 DP2 -> TP1 PP1 DP4 \(world 2 -> 4\); "
                   r"0 iterations lost \(the job had reached iteration 10\)", after=i, timeout_s=HANG_S)
        a.wait_for(r"global batch 8 = micro 1 x accumulation 2 x DP 4", after=i, timeout_s=HANG_S)
        assert _finished(a) == 0, a.tail()
        assert b.proc.wait(timeout=HANG_S) == 0, b.tail()
    _assert_continuous(job.losses(), reference, 1)


def test_model_parallel_job_loses_a_node_and_goes_on_at_tp2_pp2_dp1(tmp_path, reference):
    with agents() as started:
        job = Job(tmp_path, started, ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"))
        a, b = job.agent("A", host=True, nproc=4), job.agent("B", host=False, nproc=4, hold="iteration-10")
        start, _, _ = a.wait_for(r"global batch 8 = micro 1 x accumulation 4 x DP 2", timeout_s=HANG_S)
        held(b, "iteration-10", 4, timeout_s=HANG_S)
        _goes_on_after_the_kill(a, b.kill(), start, "model-parallel node loss",
                                r"resuming at iteration 8: layout TP2 PP2 DP2 -> TP2 PP2 DP1 \(world 8 -> 4\); "
                                r"2 iterations lost", r"global batch 8 = micro 1 x accumulation 8 x DP 1")
    _assert_continuous(job.losses(), reference, 1)


def test_a_kill_during_a_save_skips_the_partial_checkpoint_and_leaves_the_previous_one_alone(tmp_path, reference):
    with agents() as started:
        job = Job(tmp_path, started)
        a, b = job.agent("A", host=True), job.agent("B", host=False, hold="save-12")
        start, _, _ = a.wait_for(r"global batch 8 = micro 1 x accumulation 2 x DP 4", timeout_s=HANG_S)
        # B's workers are in the save of iteration 12, before their first file
        held(b, "save-12", 2, timeout_s=HANG_S)
        step12, step8 = job.ckpt / "global_step12", job.ckpt / "global_step8"
        deadline = time.monotonic() + HANG_S  # A's two ranks write their shards, then wait for B's
        while sum(bool(OPTIM_STATES_RE.match(p.name)) for p in step12.glob("*")) < 2:
            assert time.monotonic() < deadline, a.tail()
            time.sleep(0.1)
        before = _hashes(step8)
        b.kill()
        i, skipped, _ = a.wait_for(rf"skipping incomplete checkpoint {step12}: missing ", after=start,
                                   timeout_s=HANG_S)
        print(f"\n{skipped.text}")
        a.wait_for(r"resuming at iteration 8: layout TP1 PP1 DP4 -> TP1 PP1 DP2 \(world 4 -> 2\); "
                   r"4 iterations lost \(the job had reached iteration 12\)", after=i, timeout_s=HANG_S)
        assert _finished(a) == 0, a.tail()
    assert _hashes(step8) == before
    assert checkpoint_problem(str(step12)) is None  # saved again, whole, by the resumed run
    _assert_continuous(job.losses(), reference, 9)
