#!/usr/bin/env python
"""Benchmark ZeRO -> universal checkpoint conversion: our converter against DeepSpeed's and against ``cp -r``.

    python tools/benchmark_conversion.py                      # GPT-2-medium-like, TP2/PP2/DP2, ZeRO-1, bf16
    python tools/benchmark_conversion.py --small --repeats 2 --json bench.json
    python tools/benchmark_conversion.py --input RUN/checkpoints/global_step100 --cases ours,cp

1. **Checkpoint.** Unless ``--input`` names one, a checkpoint is built by running our trainer
   (``python -m torch.distributed.run --nproc_per_node TPxPPxDP -m megatron_ucp.train``) for one
   iteration on mock data and saving it (``global_step1``). It is cached under ``--workdir`` in a folder
   named after the configuration, with a marker file holding the configuration; it is reused when
   ``global_step1`` and a matching marker exist (``--rebuild`` forces a new one). Defaults: 24 layers,
   hidden 1024, 16 heads, vocab 50257, seq 64 (about 355M parameters); ``--small``: 4 layers, hidden 256,
   8 heads, vocab 8000.
2. **Cases**, all on the same input folder, each output into a fresh folder outside it:
   ``ours`` = ``python tools/ds_to_universal.py --input_folder IN --output_folder OUT --no-verify``
   (``--workers N`` adds ``--num_extract_workers N``); ``ours-verified`` (not among the default cases) =
   the same without ``--no-verify``, as a user runs it; ``deepspeed`` =
   ``python -m deepspeed.checkpoint.ds_to_universal --input_folder IN --output_folder OUT`` with its
   default flags; ``cp`` = ``cp -r IN OUT``. Rounds are interleaved (round 1: every case in
   ``--cases`` order, round 2: again, ...; ``--repeats`` rounds) and best and mean wall times are reported.
3. **Page cache.** Dropping the page cache needs root, so every timed run starts *warm* instead:
   before it (untimed) every input file is read once, ``sync`` flushes the previous run's dirty pages
   (so no writeback of an earlier case overlaps this one), and, once per benchmark, the Python imports
   of both converters are warmed by a throw-away interpreter. ``--warmup-runs N`` additionally runs
   every case N times untimed first. No case fsyncs its output, so wall times are "output in the page
   cache", the same for all three. Outputs are deleted (untimed) after each run, except that in the
   last round the ``ours`` and ``deepspeed`` outputs are kept until they have been compared.
4. **Measurements.** The timed runs measure only what costs nothing while they run (wall, CPU, ``wchar``).
   Peak memory and the temporary folder need a sampler thread, whose CPU (about 15 ms a sample, 0.9-1.4 s
   during one run of ours) slowed the run it measured by 10% on 2 cores; so they come from
   ``--memory-runs`` (default 1) extra sampled runs of every case after the timed rounds, whose walls
   are not used (``--memory-runs 0`` samples the timed runs instead, as this benchmark used to).

   * wall time of the subprocess (start to exit, interpreter start-up included) and GB/s = input
     checkpoint bytes / wall seconds; also the tree's CPU seconds (user + system, from
     ``getrusage(RUSAGE_CHILDREN)``), which other work on a shared machine disturbs much less than
     wall time, and the 1-minute load average when each run started;
   * peak memory of the whole process tree (the child and every descendant, found anew at each
     sample, about every ``--interval`` = 100 ms, with psutil): peak of Σ PSS (proportional set size,
     ``memory_full_info().pss``: pages shared between forked workers are split between them, not
     double counted) and peak of Σ RSS (which does double count shared pages). **The memory target
     uses PSS.** Page cache is not process memory and counts in neither;
   * temporary bytes, two ways: (a) ``wchar - output bytes`` (clipped at 0), where ``wchar`` is the
     tree's total of bytes passed to write(2) (``/proc/<pid>/io``). The kernel adds a reaped child's
     I/O counters into its parent's, so summing the last sampled value of every pid double-counts
     every worker that its parent reaped; the exact tree total is instead read from this process's own
     ``/proc/self/io`` before start and after reaping the child (nothing else in this process writes in
     between). The per-pid sampled sum is kept in the JSON as ``wchar_sampled_sum`` for comparison.
     ``wchar`` also counts the tool's log lines and pipe traffic to pool workers, which is why the
     temporary-bytes target has a small tolerance; (b) the peak size of ``OUT/tmp`` (DeepSpeed's
     fragment folder), sampled with a directory walk every 100 ms. The JSON also holds the tree's
     ``write_bytes`` and ``cancelled_write_bytes`` (bytes dirtied in the page cache, and bytes dirtied
     then deleted before writeback);
   * output size (Σ file sizes of the output folder).

5. **Targets** (ours against the others): ours >= 10x faster than DeepSpeed and ours <= 1.5x ``cp -r``,
   each as the median over rounds of the paired ratio (round i's walls of the two cases, which ran
   back to back: load changes on a shared machine hit both); ours' peak Σ PSS <= 1 GiB + 3 x S, with S = the largest parameter's fp32
   optimizer state = 4 bytes x numel x 3 (fp32 master, exp_avg, exp_avg_sq) -- the stricter
   1 GiB + 3 x 4 bytes x numel is printed too; and no temporary bytes (wchar - output <=
   1 MiB + 0.1 % of the output, and no ``OUT/tmp``). The largest parameter and its numel (full,
   unsharded: TP-local shape x TP, padded vocabulary included) come from the checkpoint's parameter
   index (``open_zero_checkpoint``); it is the vocabulary embedding.
6. The ``ours`` and ``deepspeed`` outputs are compared file by file (``compare_universal``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from megatron_ucp import bench
from megatron_ucp.bench import HelpFormatter, child_env, cuda_device_count, package_version, tail, threads_per_rank
from megatron_ucp.launch import end_group, free_port, run_in_group, start_in_group

REPO = Path(__file__).resolve().parent.parent

GB = 1e9
GiB = 1 << 30
MiB = 1 << 20

CASES = ("ours", "deepspeed", "cp", "ours-verified")
DEFAULT_CASES = ("ours", "deepspeed", "cp")
CASE_LABELS = {"ours": "ours (tools/ds_to_universal.py)", "deepspeed": "DeepSpeed ds_to_universal", "cp": "cp -r",
               "ours-verified": "ours, verifying (its default)"}
DEFAULT_WORKDIR = "/tmp/megatron_ucp_conversion_bench"

SPEEDUP_TARGET = 10.0  # ours at least this many times faster than DeepSpeed (median of paired rounds)
CP_RATIO_TARGET = 1.5  # ours at most this many times cp -r (median of paired rounds)
MEMORY_BASE = 1 * GiB
MEMORY_STATE_FACTOR = 3  # x the largest parameter's fp32 optimizer state
FP32_BYTES = 4
STATES = 3  # fp32 master, exp_avg, exp_avg_sq
TEMP_TOLERANCE_ABS = 1 * MiB  # logs, latest_universal, pipe traffic
TEMP_TOLERANCE_REL = 0.001  # of the output


# --------------------------------------------------------------------------------------------------
# Checkpoint configuration and building


@dataclass(frozen=True)
class CheckpointConfig:
    """The model and layout of the checkpoint to convert; the marker of a cached build."""

    num_layers: int = 24
    hidden_size: int = 1024
    num_attention_heads: int = 16
    vocab_size: int = 50257
    seq_length: int = 64
    tp: int = 2
    pp: int = 2
    dp: int = 2
    zero_stage: int = 1
    dtype: str = "bf16"
    micro_batch_size: int = 1
    global_batch_size: int = 2
    seed: int = 1234

    @property
    def ranks(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        return (f"gpt-l{self.num_layers}-h{self.hidden_size}-a{self.num_attention_heads}-v{self.vocab_size}"
                f"-s{self.seq_length}_{self.dtype}_z{self.zero_stage}_tp{self.tp}_pp{self.pp}_dp{self.dp}"
                f"_mb{self.micro_batch_size}_gb{self.global_batch_size}_seed{self.seed}")

    def trainer_args(self, save_dir: str) -> list[str]:
        return [
            "--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
            "--num-attention-heads", str(self.num_attention_heads), "--vocab-size", str(self.vocab_size),
            "--seq-length", str(self.seq_length), "--max-position-embeddings", str(self.seq_length),
            "--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
            "--zero-stage", str(self.zero_stage), f"--{self.dtype}",
            "--micro-batch-size", str(self.micro_batch_size), "--global-batch-size", str(self.global_batch_size),
            "--train-iters", "1", "--save", save_dir, "--save-interval", "1", "--eval-interval", "0",
            "--log-interval", "1", "--mock-data", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--seed", str(self.seed),
        ]


SMALL = dict(num_layers=4, hidden_size=256, num_attention_heads=8, vocab_size=8000)
MARKER = "benchmark_checkpoint.json"


def build_command(cfg: CheckpointConfig, save_dir: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "megatron_ucp.train",
            *cfg.trainer_args(save_dir)]


def build_checkpoint(cfg: CheckpointConfig, workdir: str, rebuild: bool = False, timeout: float = 3600,
                     log: Callable[[str], None] = print) -> str:
    """``<workdir>/<cfg.name>/checkpoints/global_step1``, trained for one iteration; reused when cached."""
    root = os.path.join(os.path.abspath(workdir), cfg.name)
    ckpt = os.path.join(root, "checkpoints", "global_step1")
    marker = os.path.join(root, MARKER)
    want = dataclasses.asdict(cfg)
    if not rebuild and os.path.isdir(ckpt) and os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f).get("config") == want:
                log(f"reusing cached checkpoint {ckpt}")
                return ckpt
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    cmd = build_command(cfg, os.path.join(root, "checkpoints"), free_port())
    threads = threads_per_rank(cfg.ranks)
    env = child_env(REPO, threads=threads)
    log_path = os.path.join(root, "build.log")
    log(f"building the checkpoint ({cfg.ranks} ranks, OMP_NUM_THREADS={threads}); log: {log_path}\n  "
        + shlex.join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        rc = run_in_group(cmd, timeout_s=timeout, grace_s=0, cwd=str(REPO), env=env, stdout=out,
                          stderr=subprocess.STDOUT)
    if rc is None:
        raise subprocess.TimeoutExpired(cmd, timeout)
    if rc != 0 or not os.path.isdir(ckpt):
        raise RuntimeError(f"building the checkpoint failed (exit {rc}); last lines of {log_path}:\n"
                           + tail(log_path, 40))
    seconds = time.perf_counter() - t0
    with open(marker, "w") as f:
        json.dump({"config": want, "build_seconds": round(seconds, 1), "command": cmd}, f, indent=2)
    log(f"built {ckpt} in {seconds:.0f} s")
    return ckpt


# --------------------------------------------------------------------------------------------------
# Checkpoint facts


def folder_bytes(path: str) -> int:
    """Σ sizes of the regular files under ``path`` (symlinks not followed); 0 if it does not exist."""
    total = 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            total += e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


@dataclass
class CheckpointFacts:
    folder: str
    bytes: int
    files: int
    parameters: int  # full model, each parameter once (padded vocabulary rows included)
    largest_param: str
    largest_numel: int  # full (unsharded) numel of the largest parameter
    tp: int
    pp: int
    dp: int
    original_vocab_size: int | None = None
    padded_vocab_size: int | None = None


def full_numel(local_shapes: Sequence[Sequence[int]], replicated: bool) -> int:
    """Numel of the unsharded parameter: one TP rank's numel if replicated, else the sum over TP ranks."""
    sizes = [math.prod(int(s) for s in shape) for shape in local_shapes]
    return sizes[0] if replicated else sum(sizes)


def checkpoint_facts(folder: str) -> CheckpointFacts:
    from megatron_ucp.checkpoint.zero import open_zero_checkpoint

    ckpt = open_zero_checkpoint(folder)

    from megatron_ucp.config import ModelConfig
    from megatron_ucp.layout.params import Kind, spec_of

    cfg = ModelConfig.from_dict(ckpt.metadata["model_config"]) if ckpt.metadata else None

    def replicated(name: str) -> bool:
        if cfg is None:
            return False
        try:
            return spec_of(name, cfg).kind is Kind.REPLICATED
        except ValueError:  # a name the table does not know: counted as sharded
            return False

    numels = {name: full_numel(src.local_shapes, replicated(name)) for name, src in ckpt.param_sources.items()}
    largest = max(numels, key=numels.get)
    n_files = sum(len(files) for _, _, files in os.walk(folder))
    meta = ckpt.metadata or {}
    return CheckpointFacts(folder=os.path.abspath(folder), bytes=folder_bytes(folder), files=n_files,
                           parameters=sum(numels.values()), largest_param=largest, largest_numel=numels[largest],
                           tp=ckpt.tp, pp=ckpt.pp, dp=ckpt.dp, original_vocab_size=meta.get("original_vocab_size"),
                           padded_vocab_size=meta.get("padded_vocab_size"))


# --------------------------------------------------------------------------------------------------
# Process-tree measurement


def read_proc_io(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/io`` as ints (rchar, wchar, syscr, syscw, read_bytes, write_bytes, cancelled_write_bytes)."""
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(":", 1) for line in f if ":" in line)}


class ProcessTreeSampler:
    """Samples a process and all its descendants every ``interval`` seconds, in a thread.

    Keeps the peaks of Σ PSS and Σ RSS over the tree, the last ``/proc/<pid>/io`` wchar seen for every
    pid, and (optionally, in a second thread every ``dir_interval``) the peak size of ``watch_dir``.
    """

    def __init__(self, pid: int, interval: float = 0.02, watch_dir: str | None = None,
                 dir_interval: float = 0.1) -> None:
        self.pid, self.interval, self.watch_dir, self.dir_interval = pid, interval, watch_dir, dir_interval
        self.peak_pss = 0
        self.peak_rss = 0
        self.peak_pss_at = 0.0  # seconds after start
        self.peak_processes = 0
        self.samples = 0
        self.pss_failures = 0
        self.last_wchar: dict[int, int] = {}
        self.peak_dir_bytes = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._procs: dict[int, object] = {}  # pid -> psutil.Process (kept so create_time checks work)
        self._t0 = 0.0

    def start(self) -> "ProcessTreeSampler":
        import psutil

        self._t0 = time.perf_counter()
        try:
            self._root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            self._root = None
        self._threads.append(threading.Thread(target=self._loop, name="tree-sampler", daemon=True))
        if self.watch_dir:
            self._threads.append(threading.Thread(target=self._dir_loop, name="dir-sampler", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    @property
    def wchar_sampled_sum(self) -> int:
        return sum(self.last_wchar.values())

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def sample_once(self) -> None:
        import psutil

        if self._root is None:
            return
        try:
            procs = [self._root] + self._root.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            procs = []
            if self._root.is_running():
                procs = [self._root]
        pss = rss = alive = 0
        for p in procs:
            p = self._procs.setdefault(p.pid, p)  # reuse the object: psutil caches per-object state
            try:
                try:
                    mem = p.memory_full_info()
                    pss += getattr(mem, "pss", mem.rss)
                    rss += mem.rss
                except psutil.AccessDenied:
                    self.pss_failures += 1
                    mem = p.memory_info()
                    pss += mem.rss
                    rss += mem.rss
                alive += 1
                try:
                    self.last_wchar[p.pid] = read_proc_io(p.pid)["wchar"]
                except (OSError, KeyError, ValueError):
                    pass
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        self.samples += 1
        self.peak_processes = max(self.peak_processes, alive)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_pss_at = pss, self.elapsed
        self.peak_rss = max(self.peak_rss, rss)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            self.sample_once()
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t)))

    def _dir_loop(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            self.peak_dir_bytes = max(self.peak_dir_bytes, folder_bytes(self.watch_dir))
            self._stop.wait(max(0.0, self.dir_interval - (time.perf_counter() - t)))


@dataclass
class RunMeasurement:
    """One timed run of one case."""

    wall_s: float
    returncode: int
    peak_pss: int
    peak_rss: int
    wchar: int  # exact, whole tree (from this process's counters after reaping the child)
    output_bytes: int = 0
    peak_tmp_bytes: int = 0
    write_bytes: int = 0
    cancelled_write_bytes: int = 0
    wchar_sampled_sum: int = 0  # Σ last sampled wchar per pid: double counts reaped workers
    samples: int = 0
    mean_sample_interval_s: float = 0.0
    peak_processes: int = 0
    peak_pss_at_s: float = 0.0
    cpu_s: float = 0.0  # user + system seconds of the whole tree (getrusage of reaped children)
    load_average: float | None = None  # 1-minute load average when the run started
    log: str = ""

    @property
    def temp_bytes(self) -> int:
        return temp_bytes(self.wchar, self.output_bytes)


def temp_bytes(wchar: int, output_bytes: int) -> int:
    """Bytes written that are not part of the final output: ``wchar - output``, clipped at 0."""
    return max(0, int(wchar) - int(output_bytes))


def run_measured(cmd: Sequence[str], *, cwd: str | None = None, env: dict | None = None, log_path: str | None = None,
                 interval: float = 0.02, watch_dir: str | None = None, timeout: float | None = None,
                 sample: bool = True) -> RunMeasurement:
    """Run ``cmd`` and measure wall time, its tree's CPU time and I/O, and (``sample``) the peak Σ PSS / Σ RSS
    of its process tree and the peak size of ``watch_dir``. Unsampled, the memory and folder peaks are 0.

    Nothing else in this process may write while it runs (its ``/proc/self/io`` delta is the tree's).
    """
    log_f = open(log_path, "w") if log_path else subprocess.DEVNULL  # opened before the I/O snapshot
    try:
        load = os.getloadavg()[0]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        io0 = read_proc_io()
        t0 = time.perf_counter()
        proc = start_in_group(cmd, cwd=cwd, env=env, stdout=log_f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
        sampler = ProcessTreeSampler(proc.pid, interval=interval, watch_dir=watch_dir)
        if sample:
            sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            sampler.stop()
            end_group(proc, grace_s=0)
            raise
        wall = time.perf_counter() - t0
        io1 = read_proc_io()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.stop()
    finally:
        if log_path:
            log_f.close()
    return RunMeasurement(
        wall_s=wall, returncode=rc, peak_pss=sampler.peak_pss, peak_rss=sampler.peak_rss,
        wchar=io1["wchar"] - io0["wchar"], peak_tmp_bytes=sampler.peak_dir_bytes,
        write_bytes=io1.get("write_bytes", 0) - io0.get("write_bytes", 0),
        cancelled_write_bytes=io1.get("cancelled_write_bytes", 0) - io0.get("cancelled_write_bytes", 0),
        wchar_sampled_sum=sampler.wchar_sampled_sum, samples=sampler.samples,
        mean_sample_interval_s=wall / sampler.samples if sampler.samples else float("nan"),
        peak_processes=sampler.peak_processes, peak_pss_at_s=sampler.peak_pss_at,
        cpu_s=(ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), load_average=load, log=log_path or "")


# --------------------------------------------------------------------------------------------------
# Cases, results and targets


def case_command(case: str, input_folder: str, output_folder: str, workers: int | None = None) -> list[str]:
    if case in ("ours", "ours-verified"):
        # --no-verify: DeepSpeed's converter does not re-read its output either (like for like);
        # ours-verified is the tool as a user runs it, re-reading every atom against the shards
        cmd = [sys.executable, str(REPO / "tools" / "ds_to_universal.py"), "--input_folder", input_folder,
               "--output_folder", output_folder] + (["--no-verify"] if case == "ours" else [])
        if workers is not None:
            cmd += ["--num_extract_workers", str(workers)]
        return cmd
    if case == "deepspeed":
        return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", input_folder,
                "--output_folder", output_folder]
    if case == "cp":
        return ["cp", "-r", input_folder, output_folder]
    raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")


@dataclass
class CaseResult:
    """A case's numbers over its repeats: best and mean wall of the timed runs; memory and the temporary
    folder's peak are the worst of the sampled runs (``memory_runs``, or the timed runs when there are
    none); temp bytes (exact in every run) the worst of all."""

    case: str
    walls: list[float]
    peak_pss: int
    peak_rss: int
    temp_bytes: int
    peak_tmp_bytes: int
    output_bytes: int
    cpu_s: float = float("nan")  # user + system seconds of the tree, best timed run
    runs: list[RunMeasurement] = field(default_factory=list)
    memory_runs: list[RunMeasurement] = field(default_factory=list)

    @property
    def best_wall(self) -> float:
        return min(self.walls)

    @property
    def mean_wall(self) -> float:
        return statistics.fmean(self.walls)

    @classmethod
    def from_runs(cls, case: str, runs: Sequence[RunMeasurement],
                  memory_runs: Sequence[RunMeasurement] = ()) -> "CaseResult":
        if not runs:
            raise ValueError(f"{case}: no runs")
        sampled = list(memory_runs) or list(runs)
        return cls(case=case, walls=[r.wall_s for r in runs], peak_pss=max(r.peak_pss for r in sampled),
                   peak_rss=max(r.peak_rss for r in sampled),
                   temp_bytes=max(r.temp_bytes for r in [*runs, *memory_runs]),
                   peak_tmp_bytes=max(r.peak_tmp_bytes for r in sampled), output_bytes=runs[-1].output_bytes,
                   cpu_s=min(r.cpu_s for r in runs), runs=list(runs), memory_runs=list(memory_runs))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(best_wall_s=self.best_wall, mean_wall_s=self.mean_wall)
        return d


def paired_ratio(results: dict[str, CaseResult], case: str, ref: str) -> float | None:
    """The median over rounds of ``case``'s wall / ``ref``'s wall in the same round (None without both)."""
    if case not in results or ref not in results:
        return None
    return bench.paired_ratio(results[case].walls, results[ref].walls)


def format_table(results: dict[str, CaseResult], input_bytes: int) -> str:
    """A markdown table, one row per case in ``results`` order. Ratios: medians of paired rounds (``paired_ratio``)."""
    header = ["case", "wall s (best)", "wall s (mean)", "CPU s (best)", "GB/s", "peak PSS GiB", "peak RSS GiB",
              "temp GB (wchar - output)", "peak OUT/tmp GB", "output GB", "ratio vs DeepSpeed (median, paired)",
              "ratio vs cp -r (median, paired)"]
    rows = []

    def ratio(case: str, ref: str) -> str:
        r = paired_ratio(results, case, ref)
        return "n/a" if r is None else f"{r:.2f}x"

    for case, r in results.items():
        rate = input_bytes / GB / r.best_wall if r.best_wall > 0 else float("nan")
        row = [CASE_LABELS.get(case, case), f"{r.best_wall:.2f}", f"{r.mean_wall:.2f}", f"{r.cpu_s:.2f}",
               f"{rate:.3f}", f"{r.peak_pss / GiB:.3f}", f"{r.peak_rss / GiB:.3f}", f"{r.temp_bytes / GB:.3f}",
               f"{r.peak_tmp_bytes / GB:.3f}", f"{r.output_bytes / GB:.3f}", ratio(case, "deepspeed"),
               ratio(case, "cp")]
        rows.append(row)
    return bench.markdown_table(header, rows, range(1, len(header)), aligned=False)


@dataclass
class Target:
    name: str
    holds: bool | None  # None: a case it needs was not run
    detail: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[self.holds]
        return f"- [{mark}] {self.name}: {self.detail}"


def fp32_state_bytes(numel: int) -> int:
    """The largest parameter's fp32 optimizer state: fp32 master + exp_avg + exp_avg_sq, 4 bytes each."""
    return FP32_BYTES * numel * STATES


def memory_budget(numel: int) -> int:
    """The memory target: 1 GiB + 3 x (4 bytes x numel x 3)."""
    return MEMORY_BASE + MEMORY_STATE_FACTOR * fp32_state_bytes(numel)


def strict_memory_budget(numel: int) -> int:
    """The stricter reading, printed for reference: 1 GiB + 3 x 4 bytes x numel."""
    return MEMORY_BASE + MEMORY_STATE_FACTOR * FP32_BYTES * numel


def temp_tolerance(output_bytes: int) -> int:
    return int(TEMP_TOLERANCE_ABS + TEMP_TOLERANCE_REL * output_bytes)


def evaluate_targets(results: dict[str, CaseResult], largest_numel: int) -> list[Target]:
    """The four targets for ``ours`` (plus the stricter memory bound, for reference)."""
    ours = results.get("ours")
    ds = results.get("deepspeed")
    cp = results.get("cp")
    out: list[Target] = []

    name = f"ours >= {SPEEDUP_TARGET:g}x faster than DeepSpeed (median of paired rounds)"
    if ours and ds:
        speedup = paired_ratio(results, "deepspeed", "ours")
        assert speedup is not None
        holds = speedup >= SPEEDUP_TARGET
        detail = (f"{speedup:.2f}x over {min(len(ours.walls), len(ds.walls))} round(s) (best walls: DeepSpeed "
                  f"{ds.best_wall:.2f} s, ours {ours.best_wall:.2f} s)")
        if not holds:
            detail += f"; misses: {SPEEDUP_TARGET / speedup:.2f}x too slow"
        out.append(Target(name, holds, detail))
    else:
        out.append(Target(name, None, "needs cases ours and deepspeed"))

    name = f"ours <= {CP_RATIO_TARGET:g}x cp -r (median of paired rounds)"
    if ours and cp:
        ratio = paired_ratio(results, "ours", "cp")
        assert ratio is not None
        holds = ratio <= CP_RATIO_TARGET
        detail = (f"{ratio:.2f}x over {min(len(ours.walls), len(cp.walls))} round(s) (best walls: ours "
                  f"{ours.best_wall:.2f} s, cp -r {cp.best_wall:.2f} s)")
        if not holds:
            detail += f"; misses: {ratio / CP_RATIO_TARGET:.2f}x too slow"
        out.append(Target(name, holds, detail))
    else:
        out.append(Target(name, None, "needs cases ours and cp"))

    state = fp32_state_bytes(largest_numel)
    budget = memory_budget(largest_numel)
    name = "ours peak memory (Σ PSS) <= 1 GiB + 3 x S, S = 4 B x numel x 3 (fp32 + exp_avg + exp_avg_sq)"
    basis = f"numel {largest_numel}, S = {state / GiB:.3f} GiB, budget {budget / GiB:.3f} GiB"
    if ours:
        holds = ours.peak_pss <= budget
        detail = f"{ours.peak_pss / GiB:.3f} GiB vs {budget / GiB:.3f} GiB ({basis})"
        if not holds:
            detail += f"; misses by {(ours.peak_pss - budget) / GiB:.3f} GiB"
        out.append(Target(name, holds, detail))
        strict = strict_memory_budget(largest_numel)
        out.append(Target("(reference, stricter) ours peak Σ PSS <= 1 GiB + 3 x 4 B x numel",
                          ours.peak_pss <= strict,
                          f"{ours.peak_pss / GiB:.3f} GiB vs {strict / GiB:.3f} GiB"))
    else:
        out.append(Target(name, None, f"needs case ours ({basis})"))

    name = "ours writes no temporary bytes (wchar - output <= 1 MiB + 0.1% of output; no OUT/tmp)"
    if ours:
        tol = temp_tolerance(ours.output_bytes)
        holds = ours.temp_bytes <= tol and ours.peak_tmp_bytes == 0
        detail = (f"wchar - output = {ours.temp_bytes} B (tolerance {tol} B), "
                  f"peak OUT/tmp = {ours.peak_tmp_bytes} B")
        out.append(Target(name, holds, detail))
    else:
        out.append(Target(name, None, "needs case ours"))
    return out


def format_targets(targets: Sequence[Target]) -> str:
    return "\n".join(t.line() for t in targets)


# --------------------------------------------------------------------------------------------------
# The benchmark


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _filesystem(path: str) -> str:
    """The mount holding ``path``, from /proc/mounts (device, mount point, type)."""
    try:
        path = os.path.realpath(path)
        best = ("?", "/", "?")
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, typ = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (dev, mnt, typ)
        return f"{best[0]} on {best[1]} ({best[2]})"
    except OSError:
        return "?"


def machine_info(workdir: str) -> dict:
    """``megatron_ucp.bench.machine_info`` with the CPU model, memory and the work folder's file system."""
    import psutil

    vm = psutil.virtual_memory()
    return bench.machine_info(cpu=_cpu_model(), memory_total_gib=round(vm.total / GiB, 2),
                              memory_available_gib=round(vm.available / GiB, 2),
                              workdir_filesystem=_filesystem(workdir), psutil=package_version("psutil"),
                              cuda=cuda_device_count() > 0)


def prewarm(folder: str, chunk: int = 16 * MiB) -> float:
    """Read every file under ``folder`` once (into the page cache); return the seconds it took."""
    t0 = time.perf_counter()
    buf = bytearray(chunk)
    view = memoryview(buf)
    for d, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
    return time.perf_counter() - t0


def warm_imports(env: dict) -> None:
    subprocess.run([sys.executable, "-c", "import torch, deepspeed.checkpoint.ds_to_universal, "
                    "megatron_ucp.checkpoint.universal"], cwd=str(REPO), env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def output_name(case: str, input_folder: str) -> str:
    base = os.path.basename(os.path.normpath(input_folder))
    return base if case == "cp" else f"{base}_universal"


def parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(bad) or '(none)'}: "
                                         f"choose from {', '.join(CASES)}")
    if len(set(cases)) != len(cases):
        raise argparse.ArgumentTypeError(f"a case is repeated in {text!r}")
    return cases


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("checkpoint")
    g.add_argument("--input", default=None, help="benchmark this existing ZeRO checkpoint folder (no build)")
    g.add_argument("--small", action="store_true", help="quick preset: 4 layers, hidden 256, 8 heads, vocab 8000")
    d = CheckpointConfig()
    for flag, dest in (("--num-layers", "num_layers"), ("--hidden-size", "hidden_size"),
                       ("--num-attention-heads", "num_attention_heads"), ("--vocab-size", "vocab_size"),
                       ("--seq-length", "seq_length"), ("--tp", "tp"), ("--pp", "pp"), ("--dp", "dp")):
        small = f", {SMALL[dest]} with --small" if dest in SMALL else ""
        g.add_argument(flag, dest=dest, type=_positive_int, default=None,
                       help=f"default {getattr(d, dest)}{small}")
    g.add_argument("--workdir", default=DEFAULT_WORKDIR, help="cache of built checkpoints, outputs and logs")
    g.add_argument("--rebuild", action="store_true", help="build the checkpoint even if a cached one matches")
    g.add_argument("--build-timeout", type=float, default=3600, help="seconds")
    b = p.add_argument_group("benchmark")
    b.add_argument("--cases", type=parse_cases, default=",".join(DEFAULT_CASES),
                   help=f"comma-separated subset of {','.join(CASES)} (ours-verified: ours with its default "
                        "verification, not like for like with DeepSpeed's converter)")
    b.add_argument("--repeats", type=_positive_int, default=1, help="timed rounds (interleaved over cases)")
    b.add_argument("--warmup-runs", type=int, default=0, help="untimed runs of every case before the timed rounds")
    b.add_argument("--workers", type=_positive_int, default=None,
                   help="ours: --num_extract_workers N (default: the converter's own default)")
    # Each sample walks the process table and reads every process's smaps: at 20 ms that kept about one of
    # two cores busy beside a DeepSpeed conversion, slowing whichever case ran; 100 ms costs a fifth of it,
    # which is still 0.9-1.4 s of CPU during one 6-10 s run of ours (10% of its wall time on 2 cores, as
    # the median of 4 paired runs). So by default the timed runs are not sampled at all.
    b.add_argument("--interval", type=float, default=0.1, help="memory sampling interval, seconds (default 0.1)")
    b.add_argument("--memory-runs", type=int, default=1,
                   help="sampled runs of every case after the timed rounds, for peak memory and the temporary "
                        "folder (their walls are not used); 0: sample the timed runs instead, whose walls "
                        "then include the sampler's CPU")
    b.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    b.add_argument("--no-compare", dest="compare", action="store_false", help="skip comparing ours with DeepSpeed's")
    b.add_argument("--keep-outputs", action="store_true", help="keep every output folder")
    b.add_argument("--json", default=None, help="write every number here")
    return p


def config_from_args(args: argparse.Namespace) -> CheckpointConfig:
    values = dict(SMALL) if args.small else {}
    for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length", "tp", "pp", "dp"):
        if getattr(args, k) is not None:
            values[k] = getattr(args, k)
    return CheckpointConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    env = child_env(REPO)
    facts_before = machine_info(workdir)
    print(f"machine: {facts_before['cpu']}, {facts_before['usable_cpus']} usable CPUs, "
          f"{facts_before['memory_total_gib']} GiB RAM ({facts_before['memory_available_gib']} GiB available), "
          f"{facts_before['workdir_filesystem']}; python {facts_before['python']}, torch {facts_before['torch']}, "
          f"deepspeed {facts_before['deepspeed']}; load average {facts_before['load_average']}", flush=True)

    cfg = None
    if args.input:
        input_folder = os.path.abspath(args.input)
    else:
        cfg = config_from_args(args)
        input_folder = build_checkpoint(cfg, workdir, rebuild=args.rebuild, timeout=args.build_timeout)
    facts = checkpoint_facts(input_folder)
    print(f"checkpoint {facts.folder}: {facts.bytes / GB:.3f} GB in {facts.files} files, "
          f"{facts.parameters:,} parameters (TP{facts.tp} PP{facts.pp} DP{facts.dp}; vocab "
          f"{facts.original_vocab_size} padded to {facts.padded_vocab_size}); largest parameter "
          f"{facts.largest_param} with {facts.largest_numel:,} elements", flush=True)

    runs_root = os.path.join(workdir, "runs")
    os.makedirs(runs_root, exist_ok=True)
    if os.path.commonpath([os.path.realpath(input_folder), os.path.realpath(runs_root)]) == \
            os.path.realpath(input_folder):  # every output must be outside the input
        raise SystemExit(f"--workdir {workdir} is inside the input folder {input_folder}")

    warm_imports(env)
    runs: dict[str, list[RunMeasurement]] = {c: [] for c in args.cases}
    memory_runs: dict[str, list[RunMeasurement]] = {c: [] for c in args.cases}
    kept: dict[str, str] = {}
    comparison = None

    def one_run(case: str, tag: str, timed: bool, keep: bool, sampled: bool) -> None:
        nonlocal comparison
        run_dir = os.path.join(runs_root, f"{case}-{tag}")
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        out = os.path.join(run_dir, "out", output_name(case, input_folder))
        os.makedirs(os.path.dirname(out))
        cmd = case_command(case, input_folder, out, args.workers)
        warm_s = prewarm(input_folder)
        os.sync()
        m = run_measured(cmd, cwd=str(REPO), env=env, log_path=os.path.join(run_dir, "log.txt"),
                         interval=args.interval, watch_dir=os.path.join(out, "tmp"), timeout=args.timeout,
                         sample=sampled)
        if m.returncode != 0:
            raise SystemExit(f"{case} failed (exit {m.returncode}): {shlex.join(cmd)}\n{tail(m.log, 30)}")
        m.output_bytes = folder_bytes(out)
        kind = "timed" if timed else ("memory" if sampled else "warm-up")
        memory = (f"peak PSS {m.peak_pss / GiB:.3f} GiB, RSS {m.peak_rss / GiB:.3f} GiB, peak OUT/tmp "
                  f"{m.peak_tmp_bytes / GB:.3f} GB, {m.samples} samples (every {1000 * m.mean_sample_interval_s:.0f}"
                  " ms)") if sampled else "not sampled"
        print(f"  {kind} {case} {tag}: {m.wall_s:.2f} s (CPU {m.cpu_s:.2f} s, load {m.load_average:.1f} at start), "
              f"wchar {m.wchar / GB:.3f} GB, output {m.output_bytes / GB:.3f} GB, {memory}, input pre-read "
              f"{warm_s:.1f} s", flush=True)
        if timed:
            runs[case].append(m)
        elif sampled:
            memory_runs[case].append(m)
        if keep:
            kept[case] = out
        elif not args.keep_outputs:
            shutil.rmtree(run_dir, ignore_errors=True)
        if args.compare and comparison is None and "ours" in kept and "deepspeed" in kept:
            from megatron_ucp.checkpoint.inspect import compare_universal

            t0 = time.perf_counter()
            comparison = compare_universal(kept["ours"], kept["deepspeed"])
            print(f"  compared ours with DeepSpeed's output in {time.perf_counter() - t0:.0f} s: "
                  f"{comparison.summary()}", flush=True)
            if not args.keep_outputs:
                for c in ("ours", "deepspeed"):
                    shutil.rmtree(os.path.dirname(os.path.dirname(kept[c])), ignore_errors=True)

    for w in range(args.warmup_runs):
        for case in args.cases:
            one_run(case, f"warmup{w + 1}", timed=False, keep=False, sampled=False)
    for r in range(args.repeats):
        last = r == args.repeats - 1
        for case in args.cases:
            one_run(case, f"r{r + 1}", timed=True, keep=last and args.compare and case in ("ours", "deepspeed"),
                    sampled=args.memory_runs <= 0)
    for i in range(max(0, args.memory_runs)):
        for case in args.cases:
            one_run(case, f"mem{i + 1}", timed=False, keep=False, sampled=True)

    results = {c: CaseResult.from_runs(c, runs[c], memory_runs[c]) for c in args.cases}
    targets = evaluate_targets(results, facts.largest_numel)
    facts_after = machine_info(workdir)
    print()
    print(f"input: {facts.folder} ({facts.bytes / GB:.3f} GB, {facts.parameters:,} parameters); "
          f"{args.repeats} timed round(s), warm page cache; memory from "
          f"{f'{args.memory_runs} sampled run(s) per case after them' if args.memory_runs > 0 else 'the timed runs'}; "
          "ratios = medians over rounds of the walls of the same round; "
          f"GB = 1e9 B, GiB = 2^30 B")
    print(format_table(results, facts.bytes))
    print()
    print("targets (memory = peak Σ PSS over the process tree):")
    print(format_targets(targets))
    if comparison is not None:
        print(f"ours == DeepSpeed (compare_universal().equal): {comparison.equal} "
              f"({comparison.compared} files compared)")
    elif "ours" in args.cases and "deepspeed" in args.cases:
        print("ours == DeepSpeed: not compared (--no-compare)")
    print(f"load average before {facts_before['load_average']}, after {facts_after['load_average']}")

    if args.json:
        doc = {
            "command": [sys.executable, *sys.argv] if argv is None else ["benchmark_conversion.py", *argv],
            "machine_before": facts_before,
            "machine_after": facts_after,
            "config": dataclasses.asdict(cfg) if cfg else None,
            "checkpoint": dataclasses.asdict(facts),
            "cases": {c: results[c].to_dict() for c in args.cases},
            "commands": {c: case_command(c, input_folder, "OUT", args.workers) for c in args.cases},
            "targets": [dataclasses.asdict(t) for t in targets],
            "memory_budget_bytes": memory_budget(facts.largest_numel),
            "strict_memory_budget_bytes": strict_memory_budget(facts.largest_numel),
            "largest_param_fp32_state_bytes": fp32_state_bytes(facts.largest_numel),
            "outputs_equal": None if comparison is None else comparison.equal,
            "comparison": None if comparison is None else dataclasses.asdict(comparison),
            "table": format_table(results, facts.bytes),
        }
        bench.write_json(args.json, doc, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
