#!/usr/bin/env python
"""Benchmark training speed of one GPT configuration: our DeepSpeed trainer against a plain PyTorch loop.

    python tools/benchmark_training.py                       # all cases, the recipe's tiny GPT, bf16
    python tools/benchmark_training.py --cases plain tp1-pp1-dp1 --dtype fp32 --json bench.json

Cases (``--cases``, default all):

* ``plain``       the trainer's non-pipeline ``GPTModel`` at TP 1 in this process, stepped by a plain
                  PyTorch loop with the trainer's optimizer groups and schedule, without DeepSpeed;
* ``tp1-pp1-dp1`` ``torchrun --nproc_per_node 1 -m megatron_ucp.train`` (the DeepSpeed pipeline engine);
* ``tp2-pp2-dp2`` the same trainer on 8 ranks (TP 2 x PP 2 x DP 2);
* ``moe-ep2``     a mixture of experts (family ``mixtral``: ``--num-experts`` 8 SwiGLU experts of width
                  ``--expert-ffn-hidden-size``, top-``--topk`` 2) at TP 1 PP 1 DP 2 with expert parallelism 2,
* ``dense-active`` beside it, its dense twin of equal ACTIVE parameters (family ``llama``: the same attention,
                  one SwiGLU MLP of width top-k x the expert width), on the same 2 ranks.

The two MoE-pair cases train the GPT sizes above with grouped-query attention (``--num-key-value-heads``)
and run in paired rounds (``--moe-rounds``, the order alternating), so a change of load on a shared
machine hits both; their own table shows medians over rounds and the median of the per-round ratios.

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

Activation memory of sequence parallelism (``--memory``, instead of the timing cases)::

    python tools/benchmark_training.py --memory            # seq 4096, Llama 2 layers, hidden 256, fp32

shows, side by side per SP degree n = 1, 2, 4 (``--memory-degrees``), the memory one training iteration
adds on a rank for both kinds of sequence parallelism, each as a ratio against SP 1:

* SP 1: one run at TP 1 PP 1 DP 1 without either kind (the reference of every ratio);
* Megatron SP n: TP n with ``--sequence-parallel``, beside TP n without it (the second ratio: what the flag
  itself saves, since TP alone already splits the attention and MLP activations);
* Ulysses SP n: ``--ds-sequence-parallel-size n`` at TP 1 PP 1 DP 1, a world of n ranks.

The model is family ``llama`` (``--num-attention-heads`` 8, ``--num-key-value-heads`` 4, so TP 4 and SP 4
divide both; MLP width top-k x the expert width = 688), micro batch 1, global batch 1, fp32 by default,
3 iterations. Each run is the trainer with ``--report-memory`` (``megatron_ucp.training.memory``): every
rank prints, per iteration, what it held when the iteration began (weights, gradients, optimizer state,
buffers) and its peak during it; the difference is activation and transient memory. On CUDA that is
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` (live tensors, exact). On CPU it is the
rank's resident set: ``VmHWM`` minus ``VmRSS`` from ``/proc/self/status``, the high-water mark reset at the
iteration's start (``/proc/self/clear_refs``) after ``malloc_trim(0)`` hands glibc's free pages back.
Why the resident set: PyTorch's CPU allocator keeps no statistics (no CPU counterpart of
``max_memory_allocated``) and no cache, so its tensors are plain malloc blocks, and the resident set is
what the kernel actually had to give the rank; after the trim it counts a page the iteration re-uses as
well as a new one. It includes the rank's other native allocations during the iteration (gloo buffers,
OpenMP scratch), which are transient memory too, and page-level fragmentation, so at tiny sizes it is
coarse; at sequence length 4096 activations dominate. Iteration 1 is left out (``--warmup-iters``: it
also allocates the optimizer state); per rank the median over the rest is kept, and the table shows the
rank that added the most (the memory a rank of that layout needs); a second table lists every rank.
Every rank of every run gets the same OpenMP thread count (usable CPUs // the widest run's ranks).
Memory, unlike time, does not move with the machine's load, so each layout runs once, the runs one after
another. On CPU attention is PyTorch's fused scaled-dot-product kernel, which never holds the whole
sequence x sequence score matrix, so every activation grows linearly with the sequence.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from typing import TYPE_CHECKING, Sequence

from megatron_ucp.bench import (
    HelpFormatter,
    child_env,
    command_line,
    cuda_device_count,
    load_average,
    markdown_table,
    paired_ratio,
    tail,
    threads_per_rank,
    usable_cpus,
    write_json,
)
from megatron_ucp.bench import machine_info as _machine_info
from megatron_ucp.launch import free_port, run_in_group

if TYPE_CHECKING:
    from megatron_ucp.config import TrainConfig

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
    # The MoE pair (cases moe-ep2 and dense-active): Llama-shaped, grouped-query attention.
    num_key_value_heads: int = 4
    num_experts: int = 8
    moe_top_k: int = 2
    expert_ffn_hidden_size: int = 344  # each expert's SwiGLU width; the dense twin's is top_k x this
    moe_rounds: int = 3  # paired rounds of the two cases

    def __post_init__(self) -> None:
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be bf16 or fp32, got {self.dtype!r}")
        if self.moe_rounds < 1:
            raise ValueError(f"moe rounds must be positive, got {self.moe_rounds}")
        if not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"need 1 <= top-k ({self.moe_top_k}) <= experts ({self.num_experts})")
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
    family: str = "gpt"  # the model family (megatron_ucp.families) the case trains
    ep: int = 1  # expert parallel size (carved out of DP)
    moe: bool = False  # the mixture of experts of the MoE pair

    @property
    def ranks(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def layout(self) -> str:
        return f"TP{self.tp}/PP{self.pp}/DP{self.dp}" + (f"/EP{self.ep}" if self.moe else "")

    @property
    def paired(self) -> bool:
        """One of the MoE pair: run in paired rounds, reported in the pair's own table."""
        return self.name in MOE_PAIR


CASES: dict[str, Case] = {
    "plain": Case("plain", 1, 1, 1, trainer=False),
    "tp1-pp1-dp1": Case("tp1-pp1-dp1", 1, 1, 1, trainer=True),
    "tp2-pp2-dp2": Case("tp2-pp2-dp2", 2, 2, 2, trainer=True),
    "dense-active": Case("dense-active", 1, 1, 2, trainer=True, family="llama"),
    "moe-ep2": Case("moe-ep2", 1, 1, 2, trainer=True, family="mixtral", ep=2, moe=True),
}
BASELINE = "plain"
MOE_PAIR = ("dense-active", "moe-ep2")  # (the reference of the pair's ratios, the mixture of experts)


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
    median_ms: float | None = None  # JSON only: robust to the spikes of a shared machine


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
    rounds: list[Summary] = field(default_factory=list)  # the MoE pair: one summary per paired round
    parameters: int | None = None  # the MoE pair: every parameter of the model, each once
    active_parameters: int | None = None  # ... those one token passes through (top-k of the experts)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.summary is not None

    @property
    def median_ms(self) -> float:
        """The median over paired rounds of each round's mean ms/iteration (the one run's mean otherwise)."""
        assert self.summary is not None
        return statistics.median(s.mean_ms for s in self.rounds) if self.rounds else self.summary.mean_ms

    @property
    def median_tokens_per_s(self) -> float:
        """The median over paired rounds of each round's tokens/s."""
        assert self.summary is not None
        return (statistics.median(s.tokens_per_s for s in self.rounds) if self.rounds
                else self.summary.tokens_per_s)

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
    return markdown_table(header, rows, {2, 3, 4, 5})


def _fmt_params(active: int | None, total: int | None) -> str:
    return "" if active is None or total is None else f"{active:,} / {total:,}"


def format_moe_table(results: Sequence[CaseResult]) -> str:
    """The MoE pair side by side: medians over paired rounds; "vs dense-active" is the median over rounds of
    the round's tokens/s ratio (> 1: more tokens/s than the dense twin)."""
    ref_name = MOE_PAIR[0]
    ref = next((r for r in results if r.case == ref_name and r.ok), None)
    header = ["case", "model", "layout", "ranks", "parameters (active / total)", "rounds",
              "ms/iteration (median)", "tokens/s (median)", f"vs {ref_name} (paired)", "lm loss (first, last)"]
    rows = []
    for r in results:
        model = moe_model_label(CASES[r.case])
        if not r.ok:
            rows.append([r.case, model, r.layout, str(r.ranks), _fmt_params(r.active_parameters, r.parameters),
                         "", r.status, "", "", ""])
            continue
        ratio = None if ref is None else paired_ratio([s.tokens_per_s for s in r.rounds],
                                                      [s.tokens_per_s for s in ref.rounds])
        loss = "" if r.first_loss is None else f"{r.first_loss:.4f}, {r.last_loss:.4f}"
        rows.append([r.case, model, r.layout, str(r.ranks), _fmt_params(r.active_parameters, r.parameters),
                     str(len(r.rounds)), _fmt_ms(r.median_ms), _fmt_int(r.median_tokens_per_s),
                     "n/a" if ratio is None else f"{ratio:.2f}x", loss])
    return markdown_table(header, rows, {3, 4, 5, 6, 7, 8})


# --------------------------------------------------------------------------------------------------
# Environment


def machine_info() -> dict:
    """``megatron_ucp.bench.machine_info`` with the device the cases run on."""
    gpus = cuda_device_count()
    if gpus:
        import torch

        device = f"cuda: {gpus} x {torch.cuda.get_device_name(0)} (nccl)"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}), gloo, DS_ACCELERATOR=cpu"
    return _machine_info(device=device, cuda_devices=gpus)


# --------------------------------------------------------------------------------------------------
# Trainer cases


def moe_model_label(case: Case) -> str:
    return f"{case.family}, " + ("experts" if case.moe else "dense")


def family_args(cfg: BenchConfig, case: Case) -> list[str]:
    """The flags of a case's model family (none for the GPT cases): the MoE pair's attention and MLP."""
    if case.family == "gpt":
        return []
    from megatron_ucp.families import family_named, recipe_flags

    ffn = cfg.expert_ffn_hidden_size * (1 if case.moe else cfg.moe_top_k)
    flags = recipe_flags(family_named(case.family), cfg.num_key_value_heads, ffn)
    if case.moe:
        flags += ["--num-experts", str(cfg.num_experts), "--topk", str(cfg.moe_top_k),
                  "--moe-expert-parallel-size", str(case.ep)]
    return flags


def parameter_counts(cfg: BenchConfig, case: Case) -> tuple[int, int]:
    """(active, total) parameters of a case's model, from the parameter table: a token passes through
    every non-expert parameter and top-k of each layer's experts."""
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.layout.params import model_params
    from megatron_ucp.training.arguments import model_kwargs, parse_args

    model = ModelConfig(vocab_size=cfg.vocab_size, **model_kwargs(parse_args(trainer_args(cfg, case))))
    sizes = [(math.prod(p.full_shape), p.expert is not None) for p in model_params(model)]
    total = sum(n for n, _ in sizes)
    experts = sum(n for n, expert in sizes if expert)
    active = total - experts + (experts * model.moe_top_k // model.num_experts if model.num_experts else 0)
    return active, total


def trainer_args(cfg: BenchConfig, case: Case) -> list[str]:
    """``megatron_ucp.train`` flags for one case."""
    mbs = pick_micro_batch(cfg.global_batch_size, case.dp, cfg.micro_batch_size)
    return family_args(cfg, case) + [
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


def torchrun_command(ranks: int, args: list[str], port: int) -> list[str]:
    """torchrun (the one next to this Python) launching the trainer with ``args`` on ``ranks`` local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "megatron_ucp.train"] + args


def trainer_command(cfg: BenchConfig, case: Case, port: int) -> list[str]:
    """torchrun launching the trainer for ``case`` on ``case.ranks`` local ranks."""
    return torchrun_command(case.ranks, trainer_args(cfg, case), port)


def trainer_env(case: Case, cuda: bool, base: dict | None = None, cpus: int | None = None) -> dict:
    return child_env(REPO, base, threads=threads_per_rank(case.ranks, cpus), cuda=cuda)


def run_process_group(cmd: list[str], env: dict, log, timeout_s: float) -> int | None:
    """Run ``cmd`` from the repository root in its own process group, output to ``log``; its exit
    status, or None after a timeout.

    On a timeout or an interrupt the whole group (torchrun and its ranks) is ended, SIGTERM first so
    torchrun can forward it to its ranks (``megatron_ucp.launch.run_in_group``).
    """
    return run_in_group(cmd, timeout_s=timeout_s, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)


def launch_logged(cmd: list[str], env: dict, log_path: Path, result: CaseResult | MemoryResult,
                  timeout_s: float) -> int | None:
    """Run ``cmd`` with its output in ``log_path``; record the command, threads, log and wall time in
    ``result``; its exit status, or None after a timeout."""
    result.command, result.omp_num_threads, result.log = shlex.join(cmd), int(env["OMP_NUM_THREADS"]), str(log_path)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = run_process_group(cmd, env, log, timeout_s)
    result.wall_s = time.perf_counter() - start
    return rc


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
    log_path = Path(log_dir) / f"{case.name}.log"
    rc = launch_logged(trainer_command(cfg, case, free_port()), trainer_env(case, cuda, cpus=cpus), log_path,
                       result, timeout_s)
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


def plain_configs(cfg: BenchConfig) -> tuple[dict, TrainConfig]:
    """(model kwargs, TrainConfig) of the plain case: parsed from the very flags a TP1/PP1/DP1 trainer
    case gets (``trainer_args``), so the plain loop cannot train a different model or schedule."""
    from megatron_ucp.training.arguments import model_kwargs, parse_args, train_config

    values = parse_args(trainer_args(cfg, CASES[BASELINE]))
    return model_kwargs(values), train_config(values)


def plain_device(cfg: BenchConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if cuda_device_count() else "cpu"
    return cfg.device


def run_plain_case(cfg: BenchConfig, threads: int | None = None) -> CaseResult:
    """Train ``cfg`` in this process with a plain loop and time every iteration."""
    import torch

    from megatron_ucp.training.data import micro_batches
    from megatron_ucp.training.optim import build_lr_scheduler, build_optimizer
    from megatron_ucp.training.trainer import build_datasets, single_process_model

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
        kwargs, train_cfg = plain_configs(cfg)
        train_data, _, vocab_size = build_datasets(train_cfg)
        # The trainer's non-pipeline GPTModel with GPTPipe's parameter names and the trainer's initial
        # weights, outside DeepSpeed and torch.distributed.
        model = single_process_model(kwargs, train_cfg, vocab_size)
        model.to(device)
        if mixed:
            model.to(torch.bfloat16)
        names = [n for n, _ in model.named_parameters()]
        model_params: list[torch.Tensor] = [p for _, p in model.named_parameters()]
        masters: list[torch.Tensor]
        if mixed:
            # As DeepSpeed: the module is cast to bf16 first, the fp32 master copy is made from it.
            masters = [torch.nn.Parameter(p.detach().float().clone()) for p in model_params]
        else:
            masters = model_params
        # The trainer's optimizer and schedule, over the tensors this loop steps (under the model's names).
        optimizer = build_optimizer(zip(names, masters), model.model_config, train_cfg)
        scheduler = build_lr_scheduler(optimizer, train_cfg)
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
# Activation memory of the two kinds of sequence parallelism (--memory)

# What --memory measures unless flags say otherwise: a small Llama-shaped model at sequence length 4096.
MEMORY_DEFAULTS = dict(num_layers=2, seq_length=4096, global_batch_size=1, micro_batch_size=1, dtype="fp32",
                       train_iters=3, warmup_iters=1)
MEMORY_FAMILY = "llama"


@dataclass(frozen=True)
class MemoryCase:
    """One trainer run of the memory table: TP x SP ranks, PP 1, DP 1, micro batch 1."""

    name: str
    tp: int = 1
    sp: int = 1  # DeepSpeed-Ulysses degree (--ds-sequence-parallel-size)
    sequence_parallel: bool = False  # Megatron's (--sequence-parallel)

    @property
    def ranks(self) -> int:
        return self.tp * self.sp

    @property
    def layout(self) -> str:
        return f"TP{self.tp}/PP1/DP1/SP{self.sp}" + (" +seqpar" if self.sequence_parallel else "")

    @property
    def what(self) -> str:
        if self.sp > 1:
            return f"Ulysses SP {self.sp}: --ds-sequence-parallel-size {self.sp}, each rank 1/{self.sp} of the sequence"
        if self.tp == 1:
            return "TP 1, no sequence parallelism: the SP 1 row of both kinds"
        if self.sequence_parallel:
            return f"Megatron SP {self.tp}: TP {self.tp} with --sequence-parallel"
        return f"TP {self.tp} without --sequence-parallel (Megatron SP {self.tp}'s own reference)"

    def flags(self) -> list[str]:
        return ((["--sequence-parallel"] if self.sequence_parallel else [])
                + (["--ds-sequence-parallel-size", str(self.sp)] if self.sp > 1 else []))


MEMORY_CASES: dict[str, MemoryCase] = {c.name: c for c in [
    MemoryCase("tp1"),
    MemoryCase("tp2", tp=2), MemoryCase("tp2-seqpar", tp=2, sequence_parallel=True),
    MemoryCase("tp4", tp=4), MemoryCase("tp4-seqpar", tp=4, sequence_parallel=True),
    MemoryCase("ulysses2", sp=2), MemoryCase("ulysses4", sp=4),
]}
MEMORY_DEGREES = (1, 2, 4)


def memory_row_cases(n: int) -> tuple[str, str, str]:
    """The runs of the table's SP ``n`` row: (TP n alone, Megatron SP n, Ulysses SP n); at n = 1 all three
    are the one TP 1 run."""
    return ("tp1", "tp1", "tp1") if n == 1 else (f"tp{n}", f"tp{n}-seqpar", f"ulysses{n}")


def memory_cases(degrees: Sequence[int]) -> list[str]:
    """The runs that the rows of ``degrees`` need, each once, in ``MEMORY_CASES`` order (TP 1 always: the
    ratios' reference)."""
    bad = [n for n in degrees if n not in MEMORY_DEGREES]
    if bad:
        raise ValueError(f"memory degrees must be among {MEMORY_DEGREES}, got {bad}")
    needed = {name for n in (1, *degrees) for name in memory_row_cases(n)}
    return [name for name in MEMORY_CASES if name in needed]


def memory_trainer_args(cfg: BenchConfig, case: MemoryCase) -> list[str]:
    """``megatron_ucp.train`` flags of one memory run: the timing cases' flags for a Llama-family model at
    TP ``case.tp``, plus the case's sequence parallelism and ``--report-memory``."""
    base = Case(case.name, case.tp, 1, 1, trainer=True, family=MEMORY_FAMILY)
    return trainer_args(cfg, base) + case.flags() + ["--report-memory"]


# " memory | rank 1 | iteration 2 | held MiB: 515.8 | peak MiB: 913.5 | added MiB: 397.8 | source: cpu rss |"
# (megatron_ucp.training.memory.memory_line; ranks share one stdout, so lines may run together: search the text)
MEMORY_RE = re.compile(
    r"memory \| rank (?P<rank>\d+) \| iteration (?P<iteration>\d+) \| held MiB: (?P<held>[-+0-9.eE]+) \| "
    r"peak MiB: (?P<peak>[-+0-9.eE]+) \| added MiB: (?P<added>[-+0-9.eE]+) \| source: (?P<source>[^|]+?) \|"
)


@dataclass(frozen=True)
class MemoryRecord:
    rank: int
    iteration: int
    held_mib: float
    peak_mib: float
    added_mib: float
    source: str


def parse_memory_lines(text: str) -> list[MemoryRecord]:
    """Every ``--report-memory`` record in ``text``, sorted by (rank, iteration); a later record for the same
    rank and iteration replaces an earlier one."""
    found = {}
    for m in MEMORY_RE.finditer(text):
        rec = MemoryRecord(int(m["rank"]), int(m["iteration"]), float(m["held"]), float(m["peak"]),
                           float(m["added"]), m["source"].strip())
        found[rec.rank, rec.iteration] = rec
    return [found[k] for k in sorted(found)]


@dataclass
class MemoryResult:
    case: str
    layout: str
    ranks: int
    status: str = "ok"  # ok | skipped: ... | failed: ...
    source: str | None = None  # "cpu rss" | "cuda allocated"
    # per rank: the median over the measured iterations (after warm-up)
    added_mib: dict[int, float] = field(default_factory=dict)
    held_mib: dict[int, float] = field(default_factory=dict)
    peak_mib: dict[int, float] = field(default_factory=dict)
    records: list[MemoryRecord] = field(default_factory=list)  # every iteration of every rank
    command: str | None = None
    omp_num_threads: int | None = None
    wall_s: float | None = None
    log: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.added_mib)

    @property
    def per_rank_mib(self) -> float:
        """The table's number: the most any rank added (the memory a rank of this layout needs)."""
        return max(self.added_mib.values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("added_mib", "held_mib", "peak_mib"):
            d[key] = {str(k): v for k, v in getattr(self, key).items()}
        return d


def summarize_memory(result: MemoryResult, records: Sequence[MemoryRecord], train_iters: int,
                     warmup_iters: int) -> None:
    """Fill ``result`` from its records: every rank must report every iteration; per rank, the medians over
    the iterations after warm-up (the first iteration also allocates the optimizer state: left out)."""
    result.records = list(records)
    by_rank: dict[int, dict[int, MemoryRecord]] = {}
    for r in records:
        by_rank.setdefault(r.rank, {})[r.iteration] = r
    want = list(range(1, train_iters + 1))
    if sorted(by_rank) != list(range(result.ranks)) or any(sorted(its) != want for its in by_rank.values()):
        result.status = (f"failed: expected memory records of ranks 0..{result.ranks - 1} for iterations "
                         f"1..{train_iters}, got {sorted((r.rank, r.iteration) for r in records)}")
        return
    result.source = records[0].source
    for rank, its in sorted(by_rank.items()):
        kept = [its[i] for i in want if i > warmup_iters]
        result.added_mib[rank] = statistics.median(r.added_mib for r in kept)
        result.held_mib[rank] = statistics.median(r.held_mib for r in kept)
        result.peak_mib[rank] = statistics.median(r.peak_mib for r in kept)


def run_memory_case(cfg: BenchConfig, case: MemoryCase, log_dir: str | Path, timeout_s: float = 1800.0,
                    cpus: int | None = None) -> MemoryResult:
    """Run the trainer with ``--report-memory`` for one memory case and collect every rank's records."""
    gpus = cuda_device_count()
    result = MemoryResult(case.name, case.layout, case.ranks)
    if gpus and case.ranks > gpus:
        result.status = f"skipped: needs {case.ranks} GPUs, have {gpus}"
        return result
    log_path = Path(log_dir) / f"memory-{case.name}.log"
    rc = launch_logged(torchrun_command(case.ranks, memory_trainer_args(cfg, case), free_port()),
                       child_env(REPO, threads=threads_per_rank(case.ranks, cpus), cuda=gpus > 0), log_path,
                       result, timeout_s)
    if rc != 0:
        result.status = f"failed: {'timeout' if rc is None else f'exit {rc}'} (log {log_path})"
        return result
    summarize_memory(result, parse_memory_lines(log_path.read_text(errors="replace")), cfg.train_iters,
                     cfg.warmup_iters)
    return result


def run_memory_benchmark(cfg: BenchConfig, degrees: Sequence[int], log_dir: str | Path, timeout_s: float = 1800.0,
                         progress=None, threads: int | None = None) -> list[MemoryResult]:
    """Every run the memory table's rows ``degrees`` need, one after another (never two at once: each
    rank's resident set must not compete with another run's for the machine). Every rank of every run gets
    the same OpenMP threads (``threads`` // the widest run's ranks), so thread scratch is alike in every row."""
    results = []
    names = memory_cases(degrees)
    each = threads_per_rank(max(MEMORY_CASES[n].ranks for n in names), threads)
    for name in names:
        case = MEMORY_CASES[name]
        if progress:
            progress(f"running memory case {name} ({case.layout}, {case.ranks} rank(s)) ...")
        r = run_memory_case(cfg, case, log_dir, timeout_s, cpus=each * case.ranks)
        if progress:
            progress(f"  {name}: " + (f"{r.per_rank_mib:.1f} MiB per rank" if r.ok else r.status)
                     + (f" ({r.wall_s:.0f} s wall)" if r.wall_s else ""))
        results.append(r)
    return results


def _ratio(value: MemoryResult | None, ref: MemoryResult | None) -> str:
    if value is None or ref is None or not value.ok or not ref.ok or ref.per_rank_mib <= 0:
        return "n/a"
    return f"{value.per_rank_mib / ref.per_rank_mib:.2f}x"


def _mib(r: MemoryResult | None) -> str:
    if r is None:
        return "not run"
    return f"{r.per_rank_mib:,.1f}" if r.ok else r.status


def format_memory_table(results: Sequence[MemoryResult], degrees: Sequence[int]) -> str:
    """Both kinds side by side, one row per SP degree: activation MiB per rank (the rank that added the most;
    per rank the median over the measured iterations) and ratios (SP n's MiB / the reference's MiB; below
    1 is less memory): "vs SP 1" against the TP 1 run, "vs TP n alone" against TP n without
    --sequence-parallel."""
    by_name = {r.case: r for r in results}
    ref = by_name.get("tp1")
    header = ["SP n", "TP n alone (MiB)", "Megatron SP: TP n +seqpar (MiB)", "vs SP 1", "vs TP n alone",
              "Ulysses SP n (MiB)", "vs SP 1"]
    rows = []
    for n in sorted(set(degrees) | {1}):
        alone, megatron, ulysses = (by_name.get(name) for name in memory_row_cases(n))
        rows.append([str(n), _mib(alone), _mib(megatron), _ratio(megatron, ref), _ratio(megatron, alone),
                     _mib(ulysses), _ratio(ulysses, ref)])
    return markdown_table(header, rows, {0, 1, 2, 3, 4, 5, 6})


def format_memory_runs(results: Sequence[MemoryResult]) -> str:
    """One line per run: what it is, and every rank's numbers (medians over the measured iterations)."""
    header = ["run", "what", "layout", "ranks", "held MiB (per rank)", "added MiB (per rank)", "peak MiB (per rank)"]
    rows = []
    for r in results:
        what = MEMORY_CASES[r.case].what
        if not r.ok:
            rows.append([r.case, what, r.layout, str(r.ranks), r.status, "", ""])
            continue
        rows.append([r.case, what, r.layout, str(r.ranks)]
                    + [", ".join(f"{v:,.1f}" for _, v in sorted(d.items()))
                       for d in (r.held_mib, r.added_mib, r.peak_mib)])
    return markdown_table(header, rows, {3})


def format_memory_report(cfg: BenchConfig, results: Sequence[MemoryResult], degrees: Sequence[int], machine: dict,
                         command: str) -> str:
    source = next((r.source for r in results if r.ok), None)
    how = {"cpu rss": "the rank's resident set (VmHWM after a reset, minus VmRSS at the iteration's start, glibc's "
                      "free pages given back first)",
           "cuda allocated": "torch.cuda.max_memory_allocated minus memory_allocated at the iteration's start"}
    warmup = "iteration 1" if cfg.warmup_iters == 1 else f"iterations 1..{cfg.warmup_iters}"
    lines = [
        f"## Activation memory per rank: {MEMORY_FAMILY} {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} key/value), MLP "
        f"{cfg.moe_top_k * cfg.expert_ffn_hidden_size}, seq {cfg.seq_length}, vocab {cfg.vocab_size}, micro batch "
        f"{cfg.micro_batch_size}, global batch {cfg.global_batch_size}, {cfg.dtype}, PP 1, DP 1",
        "",
        f"Each number is the memory one training iteration adds on a rank above what the rank held when the "
        f"iteration began (weights, gradients, optimizer state, buffers): activations and transients. Measured "
        f"as {how.get(source or '', 'n/a')}; per rank the median over iterations {cfg.warmup_iters + 1}.."
        f"{cfg.train_iters} ({warmup} left out: the first also allocates the optimizer state); "
        f"the table shows the rank that added the most. Ratios are SP n / the reference (below 1: less).",
        "",
        "Megatron SP n = TP n with --sequence-parallel (norms, dropout and residuals on 1/n of the sequence), "
        "beside TP n without it; Ulysses SP n = --ds-sequence-parallel-size n at TP 1 (a world of n ranks); "
        "SP 1 = the one TP 1 run without either.",
        "",
        format_memory_table(results, degrees),
        "",
        format_memory_runs(results),
        "",
        f"command: {command}",
        f"machine: {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), torch {machine['torch']}, "
        f"deepspeed {machine['deepspeed']}, python {machine['python']}, device {machine['device']}",
        "",
    ]
    lines += [f"- {r.case} [OMP_NUM_THREADS {r.omp_num_threads}]: {r.command or r.status}" for r in results]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Orchestration and CLI


def run_moe_pair(cfg: BenchConfig, names: Sequence[str], log_dir: str | Path, timeout_s: float = 1800.0,
                 progress=None, threads: int | None = None) -> list[CaseResult]:
    """The selected MoE-pair cases in ``cfg.moe_rounds`` paired rounds, the order alternating from round to
    round; each result is its first round's run with every round's summary in ``rounds``. A failed round
    fails the case (its later rounds are not run)."""
    results: dict[str, CaseResult] = {}
    for rnd in range(cfg.moe_rounds):
        for name in (names if rnd % 2 == 0 else list(reversed(names))):
            if name in results and not results[name].ok:
                continue
            case = CASES[name]
            if progress:
                progress(f"running {name} ({case.layout}, {case.ranks} rank(s)), round {rnd + 1}/{cfg.moe_rounds} ...")
            round_dir = Path(log_dir) / f"round{rnd + 1}"
            round_dir.mkdir(parents=True, exist_ok=True)
            r = run_trainer_case(cfg, case, round_dir, timeout_s, threads)
            if progress:
                what = f"{r.summary.mean_ms:.1f} ms/iteration" if r.summary and r.ok else r.status
                progress(f"  {name}: {what}" + (f" ({r.wall_s:.0f} s wall)" if r.wall_s else ""))
            first = results.setdefault(name, r)
            if r.ok and first.ok:
                assert r.summary is not None
                first.rounds.append(r.summary)
            elif not r.ok:
                first.status = r.status
    for name, r in results.items():
        r.active_parameters, r.parameters = parameter_counts(cfg, CASES[name])
    return [results[n] for n in names]


def run_benchmark(cfg: BenchConfig, cases: Sequence[str], log_dir: str | Path, timeout_s: float = 1800.0,
                  progress=None, threads: int | None = None) -> list[CaseResult]:
    """Run ``cases`` (names of ``CASES``) in the canonical order, the MoE pair last in paired rounds;
    failures are recorded, not raised."""
    results = []
    for name in [n for n in CASES if n in set(cases) and not CASES[n].paired]:
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
    pair = [n for n in MOE_PAIR if n in set(cases)]
    return results + (run_moe_pair(cfg, pair, log_dir, timeout_s, progress, threads) if pair else [])


def _parse_cases(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CASES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(bad) or '(none)'}: choose from {', '.join(CASES)}")
    return names


def selected_cases(args: argparse.Namespace) -> list[str]:
    return list(CASES) if args.cases is None else [n for group in args.cases for n in group]


def build_parser(d: BenchConfig | None = None) -> argparse.ArgumentParser:
    """The CLI; ``d`` gives the defaults shown and used (``--memory`` passes ``MEMORY_DEFAULTS``)."""
    d = d or BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
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
    moe = p.add_argument_group("the MoE pair (cases moe-ep2 and dense-active)")
    moe.add_argument("--num-key-value-heads", type=int, default=d.num_key_value_heads,
                     help="key/value heads of both models' grouped-query attention")
    moe.add_argument("--num-experts", type=int, default=d.num_experts, help="experts per MoE layer")
    moe.add_argument("--topk", type=int, default=d.moe_top_k, help="experts each token is routed to")
    moe.add_argument("--expert-ffn-hidden-size", type=int, default=d.expert_ffn_hidden_size,
                     help="each expert's SwiGLU width; the dense twin's MLP is topk times as wide")
    moe.add_argument("--moe-rounds", type=int, default=d.moe_rounds, help="paired rounds of the two cases")
    mem = p.add_argument_group("activation memory of sequence parallelism (--memory)")
    mem.add_argument("--memory", action="store_true",
                     help="instead of the timing cases: the activation memory per rank of Megatron's and "
                          "DeepSpeed-Ulysses sequence parallelism at SP 1, 2, 4 (Llama family; its defaults: "
                          + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in MEMORY_DEFAULTS.items()) + ")")
    mem.add_argument("--memory-degrees", type=int, nargs="+", default=list(MEMORY_DEGREES), metavar="N",
                     help="the SP degrees of the memory table's rows")
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
                       warmup_iters=args.warmup_iters, seed=args.seed, device=args.device,
                       num_key_value_heads=args.num_key_value_heads, num_experts=args.num_experts,
                       moe_top_k=args.topk, expert_ffn_hidden_size=args.expert_ffn_hidden_size,
                       moe_rounds=args.moe_rounds)


def format_report(cfg: BenchConfig, results: Sequence[CaseResult], machine: dict, command: str) -> str:
    single = [r for r in results if not CASES[r.case].paired]
    pair = [r for r in results if CASES[r.case].paired]
    lines = [
        f"## Training benchmark: GPT {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, seq {cfg.seq_length}, vocab {cfg.vocab_size}, "
        f"global batch {cfg.global_batch_size}, {cfg.dtype}",
        "",
        f"{cfg.train_iters} iterations per case, the first {cfg.warmup_iters} excluded as warm-up; "
        f"tokens/s = {cfg.tokens_per_iteration} tokens per iteration / mean time"
        + (f"; vs {BASELINE} = {BASELINE} mean ms / case mean ms." if single else "."),
        "",
    ]
    if single:
        lines += [format_table(single), ""]
    if pair:
        lines += [
            f"### Mixture of experts vs dense at equal active parameters ({cfg.num_key_value_heads} key/value "
            f"heads; {cfg.num_experts} experts of width {cfg.expert_ffn_hidden_size}, top-{cfg.moe_top_k}, vs "
            f"one MLP of width {cfg.moe_top_k * cfg.expert_ffn_hidden_size})",
            "",
            f"{cfg.moe_rounds} paired round(s), the order alternating; per round the mean over the iterations "
            f"after warm-up; the table shows medians over rounds.",
            "",
            format_moe_table(pair),
            "",
        ]
    lines += [
        f"command: {command}",
        f"machine: {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), torch {machine['torch']}, "
        f"deepspeed {machine['deepspeed']}, python {machine['python']}, device {machine['device']}",
        f"load average (1, 5, 15 min) before: {machine.get('load_average')}, after: {load_average()}",
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
    memory = "--memory" in (sys.argv[1:] if argv is None else argv)
    parser = build_parser(BenchConfig(**MEMORY_DEFAULTS) if memory else None)
    args = parser.parse_args(argv)
    if memory and args.cases is not None:
        parser.error("--memory runs its own cases: leave out --cases")
    try:
        memory_cases(args.memory_degrees)
    except ValueError as e:
        parser.error(str(e))
    cases = selected_cases(args)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    command = command_line(argv, __file__)
    machine = machine_info()
    # A SIGTERM becomes SystemExit, so a running trainer case ends its whole process group on the way out.
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        return _run_main(args, cfg, cases, machine, command)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run_main(args, cfg, cases, machine, command)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_logged(args: argparse.Namespace, prefix: str, run, progress) -> list:
    """``run(log_dir)`` with the logs kept in ``--log-dir``, or in a temporary folder whose failed logs'
    last lines are shown before it vanishes."""
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        return run(args.log_dir)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        results = run(tmp)
        for r in results:
            if r.status.startswith("failed") and r.log and os.path.exists(r.log):
                progress(f"--- last lines of {r.case}'s log ---\n" + tail(r.log, 40))
                r.log = None
    return results


def _run_main(args: argparse.Namespace, cfg: BenchConfig, cases: list[str], machine: dict, command: str) -> int:
    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.memory:
        return _run_memory(args, cfg, machine, command, progress)
    results = _run_logged(args, "bench_training_", lambda log_dir: run_benchmark(
        cfg, cases, log_dir, args.timeout, progress, args.threads), progress)
    print(format_report(cfg, results, machine, command), flush=True)
    if args.json_out:
        out = {"command": command, "machine": machine, "config": dataclasses.asdict(cfg),
               "cases": [r.to_dict() for r in results]}
        write_json(args.json_out, out)
    return 0 if all(r.ok or r.status.startswith("skipped") for r in results) else 1


def _run_memory(args: argparse.Namespace, cfg: BenchConfig, machine: dict, command: str, progress) -> int:
    degrees = args.memory_degrees
    results = _run_logged(args, "bench_memory_", lambda log_dir: run_memory_benchmark(
        cfg, degrees, log_dir, args.timeout, progress, args.threads), progress)
    print(format_memory_report(cfg, results, degrees, machine, command), flush=True)
    if args.json_out:
        write_json(args.json_out, {"command": command, "machine": machine, "config": dataclasses.asdict(cfg),
                                   "memory_degrees": list(degrees), "memory": [r.to_dict() for r in results]})
    return 0 if all(r.ok or r.status.startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
