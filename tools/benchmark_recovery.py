#!/usr/bin/env python
"""Benchmark recovery from a lost node: the elastic direct reshard beside a DeepSpeed user's route.

    python tools/benchmark_recovery.py                      # GPT 4 layers, hidden 256, vocab 8000, 3 rounds
    python tools/benchmark_recovery.py --quick --repeats 1  # the tiny GPT, one round (the smoke test)
    python tools/benchmark_recovery.py --with-ours          # also our converter + our sliced loader

Each round is issue 23's node-loss case, then the DeepSpeed user's route on the checkpoint it left:

**Elastic direct reshard.** Two torchrun agents on loopback ("nodes" A and B, two ranks each, the settings
of ``megatron_ucp.elastic``, A hosting the c10d store) train an fp32 GPT on mock data at TP1 PP1 DP4,
``--load CK --save CK --exit-signal-handler``, a save every 4 iterations, 24 iterations. B's workers hold
after iteration 10 (``MEGATRON_UCP_HOLD_AT``: never inside a save), then B and every worker of it are
SIGKILLed (``megatron_ucp.watch.Agent.kill``). Every line the agents print is stamped when it is read;
from the kill the benchmark takes A's lines: its worker group failing, its ``Rendezvous complete for
workers`` (the re-formed rendezvous, world 2), the trainer's ``resumed from ... at iteration 8`` (the state
loaded: printed after ``trainer.load()`` returns on rank 0) and ``iteration 9/24`` (the first resumed
iteration, logged after it ends). A is then killed: the rest of the run is what ``tests/test_elastic.py``
checks.

**DeepSpeed route** on the same ``CK/global_step8``, the page cache warm:

* DeepSpeed's own converter, as its user runs it: ``python -m deepspeed.checkpoint.ds_to_universal
  --input_folder CK/global_step8 --output_folder U/global_step8_universal`` (its default workers), one
  process, interpreter start-up included;
* our trainer refuses a universal folder without our completion marker, so DeepSpeed's output is then
  checked against its input and marked verified (``tools/ds_to_universal.py ... --certify``). A DeepSpeed
  user does not run that step: it is timed on its own row and counted in no total;
* a restart at DP2: plain ``torchrun --nproc-per-node 2`` (``LOGLEVEL=INFO``) of the trainer with ``--load U
  --universal-checkpoint --universal-loader deepspeed --train-iters 9`` (the learning-rate schedule is
  pinned by ``--lr-decay-iters 24``, so iteration 9 is the same step as in the elastic run). Its lines are
  stamped the same way, from the process start.

The route's times from the kill are the conversion plus the restart's own times: the wait for an operator,
editing the launch and noticing the failure cost nothing here, so the route is measured at its fastest.

``--with-ours`` adds a third route: our converter (``tools/ds_to_universal.py``, verifying its output,
which writes the marker) and the restart with our sliced loader (``--universal-loader ours``).

The rounds are paired: each runs the elastic case, then every route on that round's checkpoint (the order
is fixed: the routes need the checkpoint the elastic run saves). The table shows the median over rounds of
each phase with every round's value, the iteration each route resumed at, and the loss of its first
resumed iteration, which must agree between routes: the same state and the same samples at the same DP.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from megatron_ucp import bench
from megatron_ucp.bench import HelpFormatter, command_line
from megatron_ucp.elastic import torchrun_command
from megatron_ucp.launch import free_port, run_in_group
from megatron_ucp.watch import Agent, agents, held

REPO = Path(__file__).resolve().parents[1]
ITERS, SAVE_INTERVAL, KILL_AFTER, RESUMED_AT = 24, 4, 10, 8
LOSS_RTOL = 1e-5
HANG_S = 600.0  # a guard against a hang only: nothing here asserts how long anything takes
_T0 = time.monotonic()

ROUTES = ("elastic", "deepspeed", "ours")
ROUTE_TEXT = {"elastic": "elastic direct reshard",
              "deepspeed": "DeepSpeed: ds_to_universal + restart, DeepSpeed's loader",
              "ours": "our converter + restart, our sliced loader"}
# Rows of the table: (key, text). Times are seconds from the kill.
PHASES = (("failed", "survivor's worker group failed"),
          ("convert", "offline conversion done"),
          ("rendezvous", "rendezvous formed (re-formed at world 2)"),
          ("loaded", "state loaded (`resumed from` printed)"),
          ("first", "first resumed iteration (9) done"))
CERTIFY_ROW = "not counted: `--certify` of DeepSpeed's output (our trainer's gate, not DeepSpeed's route)"

FAILED_RE = r"\] Worker group FAILED\. "
RENDEZVOUS_RE = r"\] Rendezvous complete for workers\. Result:"
WORLD2_RE = r"\]   global_world_sizes=\[2, 2\]$"  # a line of the rendezvous result: two workers in all
RESUMED_RE = r"^resumed from (?P<path>\S+) at iteration (?P<iteration>\d+) "
FIRST_RE = rf" iteration +{RESUMED_AT + 1}/\d+ \|.* lm loss: (?P<loss>[-+0-9.Ee]+) \|"


@dataclass(frozen=True)
class RecoveryConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    vocab_size: int = 8000
    seq_length: int = 128
    repeats: int = 3
    with_ours: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")

    @property
    def routes(self) -> tuple[str, ...]:
        return ROUTES if self.with_ours else ROUTES[:2]

    def flags(self, train_iters: int = ITERS) -> list[str]:
        """The trainer's flags: fp32, mock data, global batch 8 (micro 1), no dropout, the LR schedule of a
        24-iteration run whatever ``train_iters`` says, a loss line every iteration."""
        return ["--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
                "--num-attention-heads", str(self.num_attention_heads), "--seq-length", str(self.seq_length),
                "--max-position-embeddings", str(self.seq_length), "--make-vocab-size-divisible-by", "8",
                "--mock-data", "--vocab-size", str(self.vocab_size), "--global-batch-size", "8",
                "--micro-batch-size", "1", "--train-iters", str(train_iters), "--lr-decay-iters", str(ITERS),
                "--eval-interval", "0", "--fp32", "--log-interval", "1", "--hidden-dropout", "0",
                "--attention-dropout", "0"]


QUICK = dict(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=50, seq_length=16)


def _env(**extra: str) -> dict[str, str]:
    """A child's environment: this checkout first on PYTHONPATH, one thread a process, CPU DeepSpeed, the
    agent's INFO lines (its rendezvous)."""
    return dict(bench.child_env(REPO, threads=1, cuda=False), LOGLEVEL="INFO", **extra)


def _progress(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class RouteRun:
    """One route in one round: seconds from the kill by phase (``PHASES`` keys; absent: not a phase of this
    route), the iteration it resumed at, the loss of its first resumed iteration."""
    route: str
    round: int
    times: dict[str, float] = field(default_factory=dict)
    certify_s: float | None = None  # DeepSpeed's route: our marker step, not in the route, counted nowhere
    resumed_at: int | None = None
    loss: float | None = None


def _resumed(agent: Agent, after: int) -> tuple[int, float, int]:
    """(index of the ``resumed from`` line, its time, the iteration it names)."""
    i, line, m = agent.wait_for(RESUMED_RE, after=after, timeout_s=HANG_S)
    return i, line.t, int(m["iteration"])


def node_loss(cfg: RecoveryConfig, ckpt: str, rnd: int) -> RouteRun:
    """The elastic case: A and B train at DP4, B dies after iteration 10, A re-forms and resumes at DP2.
    Returns A's phases from the kill; ``ckpt`` keeps the checkpoints (``global_step8`` among them)."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"recovery{os.getpid()}r{rnd}p{free_port()}"
    args = [*cfg.flags(), "--load", ckpt, "--save", ckpt, "--save-interval", str(SAVE_INTERVAL),
            "--exit-signal-handler"]
    run = RouteRun("elastic", rnd)
    with agents() as started:
        def agent(name: str, host: bool, env: dict[str, str]) -> Agent:
            cmd = torchrun_command(sys.executable, nnodes="1:2", nproc_per_node=2, endpoint=endpoint,
                                   run_id=run_id, host=host, max_restarts=3)
            started.append(Agent(name, [*cmd, "-m", "megatron_ucp.train", *args], env=env))
            return started[-1]

        a = agent("A", True, _env())
        b = agent("B", False, _env(MEGATRON_UCP_HOLD_AT=f"iteration-{KILL_AFTER}"))
        start, _, _ = a.wait_for(r"global batch 8 = micro 1 x accumulation 2 x DP 4", timeout_s=HANG_S)
        held(b, f"iteration-{KILL_AFTER}", 2, timeout_s=HANG_S)  # B's workers finished iteration 10: no save runs
        after = len(a.lines)  # A's lines before the kill belong to the DP4 run
        killed = b.kill()
        _, failed, _ = a.wait_for(FAILED_RE, after=after, timeout_s=HANG_S)
        j, rdzv, _ = a.wait_for(RENDEZVOUS_RE, after=after, timeout_s=HANG_S)
        a.wait_for(WORLD2_RE, after=j, timeout_s=HANG_S)
        k, loaded, run.resumed_at = _resumed(a, j)
        _, first, m = a.wait_for(FIRST_RE, after=k, timeout_s=HANG_S)
        a.wait_for(r"micro 1 x accumulation 4 x DP 2", after=k, timeout_s=HANG_S)
    run.times = {"failed": failed.t - killed, "rendezvous": rdzv.t - killed, "loaded": loaded - killed,
                 "first": first.t - killed}
    run.loss = float(m["loss"])
    return run


def _timed(cmd: Sequence[str], log: str) -> float:
    """Run ``cmd`` to its end (output to ``log``); its wall seconds. A failure raises with the log's tail."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        rc = run_in_group(cmd, timeout_s=HANG_S, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{cmd[:4]} exited with {rc}; the end of {log}:\n{bench.tail(log, 30)}")
    return time.monotonic() - t0


def convert(route: str, step_folder: str, out_root: str, log_dir: str) -> tuple[float, float | None]:
    """Convert ``step_folder`` into ``out_root/<name>_universal`` the route's way: (conversion seconds,
    seconds of our certification of DeepSpeed's output, or None for our converter)."""
    out = os.path.join(out_root, os.path.basename(step_folder) + "_universal")
    io_flags = ["--input_folder", step_folder, "--output_folder", out]
    ours = [sys.executable, str(REPO / "tools" / "ds_to_universal.py"), *io_flags, "--quiet"]
    if route == "ours":
        return _timed(ours, os.path.join(log_dir, "convert_ours.log")), None
    convert_s = _timed([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", *io_flags],
                       os.path.join(log_dir, "convert_deepspeed.log"))
    return convert_s, _timed([*ours, "--certify"], os.path.join(log_dir, "certify.log"))


def restart(cfg: RecoveryConfig, route: str, universal_root: str) -> dict[str, Any]:
    """The restart at DP2 from a universal folder: plain torchrun, two ranks, one resumed iteration. Its
    phases in seconds from the process start, the iteration it resumed at, its first iteration's loss."""
    loader = "deepspeed" if route == "deepspeed" else "ours"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megatron_ucp.train", *cfg.flags(RESUMED_AT + 1), "--load", universal_root,
           "--universal-checkpoint", "--universal-loader", loader]
    with agents() as started:
        started.append(Agent(f"restart-{route}", cmd, env=_env()))
        agent = started[-1]
        j, rdzv, _ = agent.wait_for(RENDEZVOUS_RE, timeout_s=HANG_S)
        agent.wait_for(WORLD2_RE, after=j, timeout_s=HANG_S)
        k, loaded, resumed_at = _resumed(agent, j)
        _, first, m = agent.wait_for(FIRST_RE, after=k, timeout_s=HANG_S)
        agent.wait_for(r"micro 1 x accumulation 4 x DP 2", after=k, timeout_s=HANG_S)
        rc = agent.proc.wait(timeout=HANG_S)
        if rc != 0:
            raise RuntimeError(f"the {route} restart exited with {rc}:\n{agent.tail()}")
    t0 = agent.started
    return {"rendezvous": rdzv.t - t0, "loaded": loaded - t0, "first": first.t - t0, "resumed_at": resumed_at,
            "loss": float(m["loss"])}


def converted_route(cfg: RecoveryConfig, route: str, rnd: int, step_folder: str, scratch: str) -> RouteRun:
    """A route with an offline step: convert ``step_folder``, restart from the output. Times from the kill
    are the conversion's plus the restart's own (no operator time, no gap between them)."""
    out_root = os.path.join(scratch, f"universal_{route}")
    convert_s, certify_s = convert(route, step_folder, out_root, scratch)
    got = restart(cfg, route, out_root)
    shutil.rmtree(out_root, ignore_errors=True)
    run = RouteRun(route, rnd, certify_s=certify_s, resumed_at=got["resumed_at"], loss=got["loss"])
    run.times = {"convert": convert_s, **{k: convert_s + got[k] for k in ("rendezvous", "loaded", "first")}}
    return run


def one_round(cfg: RecoveryConfig, rnd: int, workdir: str) -> list[RouteRun]:
    scratch = os.path.join(workdir, f"round{rnd}")
    ckpt = os.path.join(scratch, "ckpt")
    os.makedirs(ckpt)
    try:
        _progress(f"round {rnd + 1}/{cfg.repeats}: the node-loss case (2 agents x 2 ranks, B killed after "
                  f"iteration {KILL_AFTER}) ...")
        runs = [node_loss(cfg, ckpt, rnd)]
        step = os.path.join(ckpt, f"global_step{RESUMED_AT}")
        for route in cfg.routes[1:]:
            _progress(f"round {rnd + 1}/{cfg.repeats}: {ROUTE_TEXT[route]} ...")
            runs.append(converted_route(cfg, route, rnd, step, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return runs


# --------------------------------------------------------------------------------------------------
# Report


def _med(values: Sequence[float]) -> str:
    if not values:
        return "—"
    each = ", ".join(f"{v:.1f}" for v in values)
    return f"{statistics.median(values):.1f}" + (f" ({each})" if len(values) > 1 else "")


def _distinct(cells: Iterable[str]) -> str:
    """The rounds' values, each once, in order."""
    return ", ".join(dict.fromkeys(cells))


def recovery_table(runs: Sequence[RouteRun], routes: Sequence[str]) -> str:
    """Rows: the phases, seconds from the kill (median over rounds, each round's value in parentheses),
    then our certification step (counted nowhere), the iteration resumed at and the first resumed loss.
    Columns: the routes."""
    by = {route: [r for r in runs if r.route == route] for route in routes}
    rows = [[text, *(_med([r.times[key] for r in by[route] if key in r.times]) for route in routes)]
            for key, text in PHASES]
    rows.append([CERTIFY_ROW, *(_med([r.certify_s for r in by[route] if r.certify_s is not None]) for route in routes)])
    rows.append(["resumed at iteration", *(_distinct(str(r.resumed_at) for r in by[route]) for route in routes)])
    rows.append([f"loss of iteration {RESUMED_AT + 1}",
                 *(_distinct(f"{r.loss:.6e}" for r in by[route] if r.loss is not None) for route in routes)])
    header = ["seconds from the kill", *(ROUTE_TEXT[r] for r in routes)]
    return bench.markdown_table(header, rows, set(range(1, len(routes) + 1)))


def loss_disagreements(runs: Sequence[RouteRun]) -> list[str]:
    """One line per round and route whose first resumed loss is not the elastic run's within LOSS_RTOL."""
    out = []
    for rnd in sorted({r.round for r in runs}):
        ref = next(r for r in runs if r.round == rnd and r.route == "elastic").loss
        for r in runs:
            if r.round == rnd and r.route != "elastic" and r.loss is not None and ref is not None:
                rel = abs(r.loss - ref) / abs(ref)
                if rel > LOSS_RTOL:
                    out.append(f"round {rnd + 1}: {r.route} loss {r.loss:.6e} vs elastic {ref:.6e} "
                               f"(relative {rel:.1e} > {LOSS_RTOL:g})")
    return out


def report(cfg: RecoveryConfig, runs: Sequence[RouteRun], command: str, machine: dict) -> list[str]:
    wrong = [f"{r.route} (round {r.round + 1}) resumed at iteration {r.resumed_at}"
             for r in runs if r.resumed_at != RESUMED_AT]
    disagree = loss_disagreements(runs)
    return [f"## Recovery from a lost node: GPT {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}, seq {cfg.seq_length}, fp32, global batch 8; "
            f"2 agents x 2 ranks (DP4), B killed after iteration {KILL_AFTER}, last save {RESUMED_AT}; "
            f"resumed at DP2", "",
            recovery_table(runs, cfg.routes), "",
            "Median over rounds (each round's value in parentheses). The converted routes' times are the "
            "conversion plus the restart's own: no operator time, no gap, failure detection not counted.",
            "every route resumed at iteration 8: " + ("yes" if not wrong else "NO: " + "; ".join(wrong)),
            f"first resumed losses agree within {LOSS_RTOL:g} relative: "
            + ("yes" if not disagree else "NO: " + "; ".join(disagree)),
            f"command: {command}",
            f"machine: {machine['usable_cpus']} usable CPUs, torch {machine['torch']}, DeepSpeed "
            f"{machine['deepspeed']}, load average before {machine['load_average']}, after {bench.load_average()}",
            ""]


# --------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    d = RecoveryConfig()
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], formatter_class=HelpFormatter)
    for name, what in (("num_layers", "transformer layers"), ("hidden_size", "hidden size"),
                       ("num_attention_heads", "attention heads"), ("vocab_size", "mock-data vocabulary"),
                       ("seq_length", "tokens per sample")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{what} (default {getattr(d, name)}; --quick: {QUICK[name]})")
    p.add_argument("--repeats", type=int, default=d.repeats, help="paired rounds")
    p.add_argument("--with-ours", action="store_true", help="also time our converter + our sliced loader")
    p.add_argument("--quick", action="store_true", help="the tiny GPT (a smoke test)")
    p.add_argument("--workdir", default=None, help="checkpoints and logs go here (default: a temporary folder)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the numbers as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> RecoveryConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in QUICK:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return RecoveryConfig(repeats=args.repeats, with_ours=args.with_ours, **values)


def run_benchmark(cfg: RecoveryConfig, workdir: str) -> list[RouteRun]:
    runs: list[RouteRun] = []
    for rnd in range(cfg.repeats):
        runs += one_round(cfg, rnd, workdir)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; 0 when every route resumed at iteration 8 with the elastic run's first loss, else 1."""
    global _T0
    _T0 = time.monotonic()
    args, cfg = bench.parse_config(build_parser(), argv, config_from_args)
    command, machine = command_line(argv, __file__), bench.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench_recovery_", dir=args.workdir) as workdir:
        runs = run_benchmark(cfg, workdir)
    print("\n".join(report(cfg, runs, command, machine)), flush=True)
    if args.json_out:
        bench.write_json(args.json_out, {"command": command, "machine": machine, "config": dataclasses.asdict(cfg),
                                         "runs": [dataclasses.asdict(r) for r in runs]})
    ok = all(r.resumed_at == RESUMED_AT for r in runs) and not loss_disagreements(runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
