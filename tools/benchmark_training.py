#!/usr/bin/env python
"""Benchmark training speed of one GPT configuration: our DeepSpeed trainer against a plain PyTorch loop.

    python tools/benchmark_training.py                       # all cases, the recipe's tiny GPT, bf16
    python tools/benchmark_training.py --cases plain tp1-pp1-dp1 --dtype fp32 --json bench.json

Cases (``--cases``, default all):

* ``plain``       the trainer's non-pipeline ``GPTModel`` at TP 1 in this process, stepped by a plain
                  PyTorch loop with the trainer's optimizer groups and schedule, without DeepSpeed;
* ``tp1-pp1-dp1`` ``torchrun --nproc_per_node 1 -m megatron_ucp.train`` (the DeepSpeed pipeline engine);
* ``tp2-pp2-dp2`` the same trainer on 8 ranks (TP 2 x PP 2 x DP 2).

Every case trains the same model (same parameter table, same initial weights, the same mock samples,
the same global batch, LR schedule, AdamW settings and gradient clipping) for ``--train-iters``
iterations; the first ``--warmup-iters`` are dropped and the rest give the mean and min ms/iteration
and tokens/s (tokens per iteration / mean seconds per iteration). Trainer cases run as subprocesses with
``--log-interval 1 --eval-interval 0``; their per-iteration progress lines are parsed. The plain loop
runs in this process and times each iteration the way the trainer does (data, forward/backward of every
micro batch, clipping, optimizer step, reading the loss).

Precision of the plain loop. With ``--dtype bf16`` the trainer runs DeepSpeed's ZeRO-1 optimizer:
bf16 model and bf16 gradient accumulation (DeepSpeed's default ``grad_accum_dtype`` is the model
dtype), fp32 master weights inside the optimizer. The plain loop does the same by hand: the model is
cast to bf16, micro-batch gradients accumulate in the bf16 ``.grad``, and at the step they are copied
to fp32 master parameters, clipped, stepped by ``torch.optim.AdamW`` and copied back to the bf16 model.
With ``--dtype fp32`` AdamW steps the fp32 model directly.

Threads: single-process cases get ``OMP_NUM_THREADS`` (and ``torch.set_num_threads``) = the usable CPU
count (or ``--threads``); an N-rank case gets ``max(1, cpus // N)`` per rank. The report prints the load
average before and after: on a shared machine other processes stall the OpenMP thread team and
show up as single iterations several times slower, which move the mean much more than the min. Without CUDA, trainer subprocesses get
``DS_ACCELERATOR=cpu`` (gloo); with CUDA nothing is forced (the trainer uses nccl) and the plain loop
runs on ``cuda``. A trainer case needing more GPUs than the machine has is reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megatron_ucp.launch import free_port, run_in_group

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------
# Configuration and cases


@dataclass(frozen=True)
class BenchConfig:
    """One model configuration and the measurement protocol; every case uses all of it."""

    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    seq_length: int = 256
    vocab_size: int = 8000
    global_batch_size: int = 8
    micro_batch_size: int = 4  # the largest divisor of global / DP not above this is used
    dtype: str = "bf16"  # bf16 | fp32
    train_iters: int = 20
    warmup_iters: int = 5
    seed: int = 1234
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    make_vocab_size_divisible_by: int = 128
    device: str = "auto"  # the plain loop's device: auto | cpu | cuda

    def __post_init__(self) -> None:
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.train_iters < 1 or not 0 <= self.warmup_iters < self.train_iters:
            raise ValueError(f"need 0 <= warmup iters ({self.warmup_iters}) < train iters ({self.train_iters})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclass(frozen=True)
class Case:
    name: str
    tp: int
    pp: int
    dp: int
    trainer: bool  # False: the plain PyTorch loop

    @property
    def ranks(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def layout(self) -> str:
        return f"TP{self.tp}/PP{self.pp}/DP{self.dp}"


CASES: dict[str, Case] = {
    "plain": Case("plain", 1, 1, 1, trainer=False),
    "tp1-pp1-dp1": Case("tp1-pp1-dp1", 1, 1, 1, trainer=True),
    "tp2-pp2-dp2": Case("tp2-pp2-dp2", 2, 2, 2, trainer=True),
}
BASELINE = "plain"


def pick_micro_batch(global_batch: int, dp: int, requested: int) -> int:
    """The largest micro batch <= ``requested`` such that micro x DP divides the global batch."""
    if global_batch % dp:
        raise ValueError(f"global batch {global_batch} is not divisible by data parallel {dp}")
    per_rank = global_batch // dp
    for m in range(min(requested, per_rank), 0, -1):
        if per_rank % m == 0:
            return m
    return 1


# --------------------------------------------------------------------------------------------------
# Results: parsing, statistics, formatting


# " iteration      3/20 | consumed samples       24 | elapsed time per iteration (ms): 771.1 | tokens/s: 2656 | ..."
PROGRESS_RE = re.compile(
    r"iteration\s+(?P<iteration>\d+)/\s*(?P<train_iters>\d+)\s*\|\s*consumed samples\s+(?P<consumed>\d+)\s*\|"
    r"\s*elapsed time per iteration \(ms\):\s*(?P<ms>[-+0-9.eE]+|nan|inf)\s*\|"
    r"\s*tokens/s:\s*(?P<tokens_per_s>[-+0-9.eE]+|nan|inf)\s*\|"
)
LOSS_RE = re.compile(r"\|\s*lm loss:\s*(?P<loss>[-+0-9.eE]+|nan|inf)\s*\|")


@dataclass(frozen=True)
class ProgressRecord:
    """One progress line of the trainer (with ``--log-interval 1``: one iteration)."""

    iteration: int
    train_iters: int
    consumed_samples: int
    ms: float
    tokens_per_s: float
    loss: float | None = None


def parse_progress_lines(text: str) -> list[ProgressRecord]:
    """Every trainer progress line in ``text`` (other lines, and prefixes such as ``[rank0]:``, are ignored).

    A later line for the same iteration replaces an earlier one; records come back sorted by iteration.
    """
    by_iter: dict[int, ProgressRecord] = {}
    for line in text.splitlines():
        m = PROGRESS_RE.search(line)
        if not m:
            continue
        loss = LOSS_RE.search(line, m.end() - 1)
        rec = ProgressRecord(int(m["iteration"]), int(m["train_iters"]), int(m["consumed"]), float(m["ms"]),
                             float(m["tokens_per_s"]), float(loss["loss"]) if loss else None)
        by_iter[rec.iteration] = rec
    return [by_iter[i] for i in sorted(by_iter)]


@dataclass(frozen=True)
class Summary:
    n: int  # measured iterations (after warm-up)
    mean_ms: float
    min_ms: float
    max_ms: float
    tokens_per_s: float
    median_ms: float | None = None  # JSON only: robust to the spikes of a shared machine  # tokens per iteration / mean seconds per iteration


def measured(iteration_ms: dict[int, float], warmup_iters: int) -> list[float]:
    """Times of iterations ``> warmup_iters`` (iterations are numbered from 1), in iteration order."""
    return [iteration_ms[i] for i in sorted(iteration_ms) if i > warmup_iters]


def summarize(iteration_ms: dict[int, float], warmup_iters: int, tokens_per_iteration: int) -> Summary:
    """Mean/min/max ms over the iterations after warm-up, and the throughput of the mean."""
    kept = measured(iteration_ms, warmup_iters)
    if not kept:
        raise ValueError(f"no iterations left after dropping {warmup_iters} warm-up iterations "
                         f"(have {sorted(iteration_ms)})")
    mean = statistics.fmean(kept)
    return Summary(len(kept), mean, min(kept), max(kept),
                   tokens_per_iteration / (mean / 1000.0) if mean > 0 else float("nan"), statistics.median(kept))


@dataclass
class CaseResult:
    case: str
    layout: str
    ranks: int
    status: str = "ok"  # ok | skipped: ... | failed: ...
    micro_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    iteration_ms: dict[int, float] = field(default_factory=dict)  # every iteration, warm-up included
    summary: Summary | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # lm loss of every iteration (a cross-check between cases)
    command: str | None = None
    omp_num_threads: int | None = None
    wall_s: float | None = None
    log: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.summary is not None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["iteration_ms"] = {str(k): v for k, v in self.iteration_ms.items()}
        return d


def _fmt_ms(x: float) -> str:
    return f"{x:.1f}"


def _fmt_int(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:,.0f}"


def format_table(results: Sequence[CaseResult], baseline: str = BASELINE) -> str:
    """A markdown table; "vs plain" is the throughput ratio (plain ms / case ms; > 1 is faster than plain)."""
    base = next((r for r in results if r.case == baseline and r.ok), None)
    header = ["case", "layout", "ranks", "ms/iteration (mean, min)", "tokens/s", f"vs {baseline}",
              "lm loss (first, last)"]
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.case, r.layout, str(r.ranks), r.status, "", "", ""])
            continue
        s = r.summary
        rel = "n/a" if base is None else f"{base.summary.mean_ms / s.mean_ms:.2f}x"
        loss = "" if r.first_loss is None else f"{r.first_loss:.4f}, {r.last_loss:.4f}"
        rows.append([r.case, r.layout, str(r.ranks), f"{_fmt_ms(s.mean_ms)}, {_fmt_ms(s.min_ms)}",
                     _fmt_int(s.tokens_per_s), rel, loss])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {2, 3, 4, 5}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(row) for row in rows])


# --------------------------------------------------------------------------------------------------
# Environment


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(ranks: int, cpus: int | None = None) -> int:
    return max(1, (cpus or usable_cpus()) // ranks)


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    import torch

    gpus = cuda_device_count()
    if gpus:
        device = f"cuda: {gpus} x {torch.cuda.get_device_name(0)} (nccl)"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}), gloo, DS_ACCELERATOR=cpu"
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "device": device,
        "cuda_devices": gpus,
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews every number here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------------------------------
# Trainer cases


def trainer_args(cfg: BenchConfig, case: Case) -> list[str]:
    """``megatron_ucp.train`` flags for one case."""
    mbs = pick_micro_batch(cfg.global_batch_size, case.dp, cfg.micro_batch_size)
    return [
        "--num-layers", str(cfg.num_layers), "--hidden-size", str(cfg.hidden_size),
        "--num-attention-heads", str(cfg.num_attention_heads), "--seq-length", str(cfg.seq_length),
        "--make-vocab-size-divisible-by", str(cfg.make_vocab_size_divisible_by),
        "--mock-data", "--vocab-size", str(cfg.vocab_size),
        "--tensor-model-parallel-size", str(case.tp), "--pipeline-model-parallel-size", str(case.pp),
        "--global-batch-size", str(cfg.global_batch_size), "--micro-batch-size", str(mbs),
        f"--{cfg.dtype}", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--train-iters", str(cfg.train_iters), "--log-interval", "1", "--eval-interval", "0",
        "--seed", str(cfg.seed), "--lr", repr(cfg.lr), "--min-lr", repr(cfg.min_lr),
        "--weight-decay", repr(cfg.weight_decay), "--adam-beta1", repr(cfg.adam_beta1),
        "--adam-beta2", repr(cfg.adam_beta2), "--adam-eps", repr(cfg.adam_eps), "--clip-grad", repr(cfg.clip_grad),
    ]


def trainer_command(cfg: BenchConfig, case: Case, port: int) -> list[str]:
    """torchrun (the one next to this Python) launching the trainer on ``case.ranks`` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(case.ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "megatron_ucp.train"] + trainer_args(cfg, case)


def trainer_env(case: Case, cuda: bool, base: dict | None = None, cpus: int | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    threads = threads_per_rank(case.ranks, cpus)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_process_group(cmd: list[str], env: dict, log, timeout_s: float) -> int | None:
    """Run ``cmd`` from the repository root in its own process group, output to ``log``; its exit
    status, or None after a timeout.

    On a timeout or an interrupt the whole group (torchrun and its ranks) is ended, SIGTERM first so
    torchrun can forward it to its ranks (``megatron_ucp.launch.run_in_group``).
    """
    return run_in_group(cmd, timeout_s=timeout_s, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)


def run_trainer_case(cfg: BenchConfig, case: Case, log_dir: str | Path, timeout_s: float = 1800.0,
                     cpus: int | None = None) -> CaseResult:
    """Run the trainer for one case and summarise its progress lines (the log is kept in ``log_dir``)."""
    gpus = cuda_device_count()
    cuda = gpus > 0
    result = CaseResult(case.name, case.layout, case.ranks)
    result.micro_batch_size = pick_micro_batch(cfg.global_batch_size, case.dp, cfg.micro_batch_size)
    result.gradient_accumulation_steps = cfg.global_batch_size // (result.micro_batch_size * case.dp)
    if cuda and case.ranks > gpus:
        result.status = f"skipped: needs {case.ranks} GPUs, have {gpus}"
        return result
    cmd = trainer_command(cfg, case, free_port())
    env = trainer_env(case, cuda, cpus=cpus)
    result.command = shlex.join(cmd)
    result.omp_num_threads = int(env["OMP_NUM_THREADS"])
    log_path = Path(log_dir) / f"{case.name}.log"
    result.log = str(log_path)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = run_process_group(cmd, env, log, timeout_s)
    result.wall_s = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    records = parse_progress_lines(text)
    if rc != 0:
        result.status = f"failed: {'timeout' if rc is None else f'exit {rc}'} (log {log_path})"
        return result
    got = [r.iteration for r in records]
    if got != list(range(1, cfg.train_iters + 1)):
        result.status = f"failed: expected progress lines for iterations 1..{cfg.train_iters}, got {got} (log {log_path})"
        return result
    result.iteration_ms = {r.iteration: r.ms for r in records}
    result.summary = summarize(result.iteration_ms, cfg.warmup_iters, cfg.tokens_per_iteration)
    result.losses = [r.loss for r in records]
    result.first_loss, result.last_loss = result.losses[0], result.losses[-1]
    return result


# --------------------------------------------------------------------------------------------------
# The plain PyTorch loop


def plain_configs(cfg: BenchConfig):
    """(ModelConfig, TrainConfig) of the plain case: parsed from the very flags a TP1/PP1/DP1 trainer
    case gets (``trainer_args``), so the plain loop cannot train a different model or schedule."""
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.training.arguments import model_kwargs, parse_args, train_config

    values = parse_args(trainer_args(cfg, CASES[BASELINE]))
    train_cfg = train_config(values)
    return ModelConfig(vocab_size=cfg.vocab_size, **model_kwargs(values)), train_cfg


def single_process_state():
    """The parallel state of one process at TP 1 / PP 1 / DP 1 with no process groups.

    With no group every tensor-parallel op and the vocab-parallel loss are the identity, so our model
    runs in this process without torch.distributed (no rendezvous, nothing left initialised).
    """
    from megatron_ucp.distributed.groups import ParallelState, TensorParallelContext
    from megatron_ucp.layout.topology import ParallelLayout

    layout = ParallelLayout()
    return ParallelState(layout=layout, global_rank=0, coords=layout.coords(0), tp_group=None, dp_group=None,
                         pp_group=None, mp_group=None, tp=TensorParallelContext())


def build_plain_model(cfg: BenchConfig):
    """The trainer's non-pipeline ``GPTModel`` at TP 1, outside DeepSpeed.

    It carries GPTPipe's parameter names (``tied_modules.embed.*``, ``1.*`` ... ``{L+1}.*``) and is
    initialised from the layout parameter table with the trainer's seeding, so it starts from exactly
    the trainer's weights. Returns ``(model, train_config)``.
    """
    from megatron_ucp.distributed.random import seed_all
    from megatron_ucp.families import family_of_model
    from megatron_ucp.model.sequential import GPTModel

    model_cfg, train_cfg = plain_configs(cfg)
    state = single_process_state()
    seed_all(train_cfg.seed, 0, 0, state.tp.rng)  # the trainer's seeding; also registers the tracker stream
    return GPTModel(model_cfg, state, train_cfg.seed, block=family_of_model(model_cfg).block), train_cfg


def plain_device(cfg: BenchConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if cuda_device_count() else "cpu"
    return cfg.device


def run_plain_case(cfg: BenchConfig, threads: int | None = None) -> CaseResult:
    """Train ``cfg`` in this process with a plain loop and time every iteration."""
    import torch

    from megatron_ucp.training.data import micro_batches
    from megatron_ucp.training.optim import build_lr_scheduler, build_optimizer
    from megatron_ucp.training.trainer import build_datasets

    case = CASES[BASELINE]
    result = CaseResult(case.name, case.layout, case.ranks)
    device = torch.device(plain_device(cfg))
    mbs = pick_micro_batch(cfg.global_batch_size, 1, cfg.micro_batch_size)
    gas = cfg.global_batch_size // mbs
    result.micro_batch_size, result.gradient_accumulation_steps = mbs, gas
    threads = threads or usable_cpus()
    result.omp_num_threads = threads
    result.command = f"in process: run_plain_case (device {device}, {threads} threads)"
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        mixed = cfg.dtype == "bf16"  # bf16 model, fp32 master copy stepped by AdamW
        model, train_cfg = build_plain_model(cfg)
        model.to(device)
        if mixed:
            model.to(torch.bfloat16)
        names = [n for n, _ in model.named_parameters()]
        model_params = [p for _, p in model.named_parameters()]
        if mixed:
            # As DeepSpeed: the module is cast to bf16 first, the fp32 master copy is made from it.
            masters = [torch.nn.Parameter(p.detach().float().clone()) for p in model_params]
        else:
            masters = model_params
        # The trainer's optimizer and schedule, over the tensors this loop steps (under the model's names).
        optimizer = build_optimizer(zip(names, masters), model.model_config, train_cfg)
        scheduler = build_lr_scheduler(optimizer, train_cfg)
        train_data, _, _ = build_datasets(train_cfg)
        data = micro_batches(train_data, 0, None, train_cfg.global_batch_size, train_cfg.micro_batch_size, 0, 1,
                             device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        model.train()
        losses = []
        sync()
        for iteration in range(1, cfg.train_iters + 1):
            t0 = time.perf_counter()
            total = None
            for _ in range(gas):
                ids, labels = next(data)
                loss = model(ids, labels) / gas
                loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
            if mixed:  # bf16 grads (accumulated in bf16, as DeepSpeed's ZeRO-1 does) -> fp32
                for m, p in zip(masters, model_params):
                    m.grad = None if p.grad is None else p.grad.float()
                    p.grad = None
            if train_cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(masters, train_cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if mixed:
                with torch.no_grad():
                    torch._foreach_copy_(model_params, masters)
            losses.append(float(total))  # also synchronises, as the trainer's float(loss) does
            sync()
            result.iteration_ms[iteration] = 1000.0 * (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
    result.wall_s = time.perf_counter() - start
    result.summary = summarize(result.iteration_ms, cfg.warmup_iters, cfg.tokens_per_iteration)
    result.losses = losses
    result.first_loss, result.last_loss = losses[0], losses[-1]
    return result


# --------------------------------------------------------------------------------------------------
# Orchestration and CLI


def run_benchmark(cfg: BenchConfig, cases: Sequence[str], log_dir: str | Path, timeout_s: float = 1800.0,
                  progress=None, threads: int | None = None) -> list[CaseResult]:
    """Run ``cases`` (names of ``CASES``) in the canonical order; failures are recorded, not raised."""
    results = []
    for name in [n for n in CASES if n in set(cases)]:
        case = CASES[name]
        if progress:
            progress(f"running {name} ({case.layout}, {case.ranks} rank(s)) ...")
        if case.trainer:
            r = run_trainer_case(cfg, case, log_dir, timeout_s, threads)
        else:
            try:
                r = run_plain_case(cfg, threads)
            except Exception as e:  # noqa: BLE001 - report it in the table, keep the other cases
                r = CaseResult(name, case.layout, case.ranks, status=f"failed: {type(e).__name__}: {e}")
        if progress:
            what = (f"{r.summary.mean_ms:.1f} ms/iteration" if r.ok else r.status)
            progress(f"  {name}: {what}" + (f" ({r.wall_s:.0f} s wall)" if r.wall_s else ""))
        results.append(r)
    return results


def _parse_cases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(bad) or '(none)'}: choose from {', '.join(CASES)}")
    return names


def selected_cases(args: argparse.Namespace) -> list[str]:
    return list(CASES) if args.cases is None else [n for group in args.cases for n in group]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--cases", type=_parse_cases, nargs="+", default=None, metavar="CASE",
                   help=f"cases to run, space- or comma-separated, from: {', '.join(CASES)} (default: all)")
    p.add_argument("--num-layers", type=int, default=d.num_layers, help="transformer layers")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help="hidden size")
    p.add_argument("--num-attention-heads", type=int, default=d.num_attention_heads, help="attention heads")
    p.add_argument("--seq-length", type=int, default=d.seq_length, help="tokens per sample")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="mock-data vocabulary")
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size, help="samples per optimizer step, every case")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="per-rank micro batch; lowered where it does not divide global batch / DP")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=d.dtype,
                   help="bf16: bf16 model, fp32 master weights in the optimizer")
    p.add_argument("--train-iters", type=int, default=d.train_iters, help="iterations per case")
    p.add_argument("--warmup-iters", type=int, default=d.warmup_iters, help="first iterations left out")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the mock data")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="device of the plain loop")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of a single-process case (an N-rank case gets threads // N per rank); "
                        "default: the usable CPU count")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per trainer case")
    p.add_argument("--log-dir", default=None, help="keep the trainer logs here (default: a temporary folder)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the numbers as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                       num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                       vocab_size=args.vocab_size, global_batch_size=args.global_batch_size,
                       micro_batch_size=args.micro_batch_size, dtype=args.dtype, train_iters=args.train_iters,
                       warmup_iters=args.warmup_iters, seed=args.seed, device=args.device)


def format_report(cfg: BenchConfig, results: Sequence[CaseResult], machine: dict, command: str) -> str:
    lines = [
        f"## Training benchmark: GPT {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, seq {cfg.seq_length}, vocab {cfg.vocab_size}, "
        f"global batch {cfg.global_batch_size}, {cfg.dtype}",
        "",
        f"{cfg.train_iters} iterations per case, the first {cfg.warmup_iters} excluded as warm-up; "
        f"tokens/s = {cfg.tokens_per_iteration} tokens per iteration / mean time; "
        f"vs {BASELINE} = {BASELINE} mean ms / case mean ms.",
        "",
        format_table(results),
        "",
        f"command: {command}",
        f"machine: {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), torch {machine['torch']}, "
        f"deepspeed {machine['deepspeed']}, python {machine['python']}, device {machine['device']}",
        f"load average (1, 5, 15 min) before: {machine.get('load_average')}, after: {_load_average()}",
        "",
    ]
    for r in results:
        extra = ""
        if r.micro_batch_size is not None:
            extra = f" [micro batch {r.micro_batch_size} x accumulation {r.gradient_accumulation_steps}"
            extra += f", OMP_NUM_THREADS {r.omp_num_threads}]" if r.omp_num_threads else "]"
        lines.append(f"- {r.case}{extra}: {r.command or r.status}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cases = selected_cases(args)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    command = shlex.join([sys.executable, *sys.argv] if argv is None else
                         [sys.executable, str(Path(__file__).resolve()), *argv])
    machine = machine_info()
    # A SIGTERM becomes SystemExit, so a running trainer case ends its whole process group on the way out.
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        return _run_main(args, cfg, cases, machine, command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run_main(args, cfg, cases, machine, command)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_main(args: argparse.Namespace, cfg: BenchConfig, cases: list[str], machine: dict, command: str) -> int:
    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        results = run_benchmark(cfg, cases, args.log_dir, args.timeout, progress, args.threads)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
            results = run_benchmark(cfg, cases, tmp, args.timeout, progress, args.threads)
            for r in results:  # the logs vanish with the folder: show what failed
                if r.status.startswith("failed") and r.log and os.path.exists(r.log):
                    tail = Path(r.log).read_text(errors="replace").splitlines()[-40:]
                    progress(f"--- last lines of {r.case}'s log ---\n" + "\n".join(tail))
                    r.log = None
    print(format_report(cfg, results, machine, command), flush=True)
    if args.json_out:
        out = {"command": command, "machine": machine, "config": dataclasses.asdict(cfg),
               "cases": [r.to_dict() for r in results]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if all(r.ok or r.status.startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
