#!/usr/bin/env python
"""Benchmark resuming at a new topology: bytes each rank reads while loading, and time to the first step.

    python tools/benchmark_loading.py                              # GPT 4 layers, hidden 256, vocab 8000, fp32
    python tools/benchmark_loading.py --quick --json bench.json    # tiny sizes, one round (the smoke test)
    python tools/benchmark_loading.py --parts bytes                # only part 1
    python tools/benchmark_loading.py --parts moe                  # only part 3 (not in the default 'all')
    python tools/benchmark_loading.py --num-layers 8 --hidden-size 512 --repeats 5 --time-target tp1-pp2-dp2

One source checkpoint is trained first: our trainer at TP2 PP2 DP2, ZeRO-1, fp32, mock data, for
``--source-iters`` iterations, saved at the end (``<workdir>/source/global_stepN``), and converted by
our converter (``<workdir>/universal``). Everything below resumes from it, on spawned gloo ranks
(``megatron_ucp.launch.spawn_ranks``: a fork server that has imported torch and DeepSpeed once, CPU
DeepSpeed, ``max(1, cpus // ranks)`` threads per rank). The page cache is warm throughout: every
file was written or read moments before. ``--quick`` (the smoke test): 2 layers, hidden 128, 4
heads, vocab 2000, seq 16, global batch 4, one timing round, time target TP1 PP2 DP2.

**1. Bytes read per rank during the load.** Three targets (TP2 PP2 DP2 ZeRO-1; TP1 PP1 DP4 ZeRO-1;
TP1 PP1 DP4 ZeRO-3), three loaders each:

* ``direct``: ``--load <source save dir>``: the trainer reshards straight from the ZeRO shards. At the
  source's own layout (TP2 PP2 DP2 ZeRO-1) the trainer takes DeepSpeed's native path instead; that row
  is reported as ``native`` (no criterion applies to it);
* ``sliced``: ``--universal-checkpoint`` with our loader (``--universal-loader ours``) on the output of
  our converter (``convert_zero_to_universal``);
* ``deepspeed``: the same universal folder with DeepSpeed's loader (``--universal-loader deepspeed``).
  DeepSpeed's ZeRO-3 loader needs ``optimizer_state.pt`` in the form our converter writes, so every
  universal load here reads our converter's output (for a ZeRO-1 source the atoms are the same as
  DeepSpeed's converter writes; ``tests/test_universal.py`` compares them).

All loads of one world size run one after another in one spawn, each with a fresh ``Trainer``
(build, load, close): the 8 ranks that trained and saved the source (rank 0 also converts it) then
load at TP2 PP2 DP2; one spawn of 4 ranks does both DP4 targets. Per rank and loader:

* **read** = ``rchar`` of ``/proc/self/io`` just after ``trainer.load()`` minus just before it, minus
  the **no-load baseline**: the same window, in the same process, after the same build at the same
  target layout, around a no-op instead of the load. ``rchar`` is the sum of what the process passed
  to read(2)/pread(2)/readv(2), so it counts a byte every time a rank reads it: N ranks reading one
  file count it N times, and a page-cache hit counts like a disk read. That is the point: the
  question is how much each rank reads, not how much reaches the disk (``read_bytes`` after evicting
  the page cache would count a byte once per machine and hide exactly the amplification measured
  here). What else could land in the window, and why it does not or how it is handled:

  - reading ``/proc/self/io`` itself: measured by the baseline window (about a hundred bytes);
  - gloo's socket traffic (the load's collectives, DeepSpeed's all-gather of the weights): gloo's
    socket receives do not go through read(2), and ``rchar`` does not count them. Every bytes run
    checks this: an all-reduce of ``SOCKET_PROBE_BYTES`` on all ranks is bracketed the same way and
    its ``rchar`` delta is recorded (``socket_probe_rchar``, about a hundred bytes; a value near the
    probe's size would make every number here wrong, and the report would say so);
  - Python modules the load imports lazily (their ``.py``/``.pyc`` files are read with read(2)):
    ``LOAD_IMPORTS`` are imported before both windows; any module still first imported inside the
    load window is recorded with the size of its file (``window_imports``) and is *not* subtracted:
    it counts against the loader;
  - file reads through ``mmap`` are page faults, not read(2): ``rchar`` does not see them. Both
    loaders' state reads are read/pread (DeepSpeed ``torch.load``s atoms without mmap; ours preads
    byte ranges, after reading each atom's header with ``torch.load(map_location="meta")``); what the
    direct route maps is the source's model-state files and one optimizer file for its global
    entries (``open_zero_checkpoint``, ``optimizer_state``), of which it touches only small
    entries. The trainer's own count of the state bytes it planned to
    read (``state bytes read per rank`` in its resume line, ``plan`` in the JSON) is checked to be
    at most the measured read on every rank, so a state read that ``rchar`` missed would show.

* **owned** = the bytes of optimizer state the rank holds after the load: the numel of its fp32
  partition (ZeRO-1/2: ``engine.optimizer.single_partition_of_fp32_groups``; ZeRO-3:
  ``engine.optimizer.fp32_partitioned_groups_flat``; DeepSpeed's BF16 optimizer:
  ``fp32_groups_flat_partition``) x 3 (fp32 master, exp_avg, exp_avg_sq) x 4 bytes. It includes
  ZeRO's alignment padding and the vocabulary padding rows, which no loader needs to read.

Criterion for ``direct`` and ``sliced``: read <= 1.1 x owned + 1 MiB on every rank. The method is
validated by the table itself: DeepSpeed's loader reads the whole atom of every parameter a rank
holds a piece of, so its read/owned ratio must come out above 1 (about TP at ZeRO-1/2 targets,
plus the parameters a ZeRO partition boundary cuts; about DP at ZeRO-3, where every rank holds a
slice of every parameter). A line under the table says whether it does. As a check that every loader
really loaded, a digest of each rank's loaded partition (fp32 master and both moments) is compared
across the three loaders of a target.

**2. Time to the first resumed step** after a topology change (``--time-target``, default TP1 PP4
DP1 ZeRO-1). Routes:

* ``direct``: resume straight from the source save dir;
* ``ds-convert``: DeepSpeed's ``ds_to_universal.main`` (extract and merge workers: ``--convert-workers``),
  then ``certify_universal`` so the trainer accepts the folder (its time is *not* counted: the
  trainer's gate, not part of DeepSpeed's route), then the trainer with DeepSpeed's loader;
* ``ours-convert``: our ``convert_zero_to_universal`` (``workers=--convert-workers``; its verification
  against the input is on, as the trainer requires a verified folder, and is counted), then the
  trainer with DeepSpeed's loader.

Conversions run in this process (its imports already warm; no interpreter start-up is counted for
them). Wall time per run = conversion seconds + seconds from launching the ranks to the end of the
first resumed training step (a barrier after it; rank 0's ``time.monotonic()``, the system-wide
monotonic clock, against this process's). Start-up+build, load and first-step columns are the phases
of that, each ended by a barrier. Runs are paired: ``--repeats`` rounds, each running every route
once, the order rotated from round to round; the table shows medians over rounds and the median of
the per-round ratio to ``direct``. The first step's loss is printed too: every route loads the same
state, so it must be identical.

**3. MoE** (``--parts moe``; ``all`` does not include it): a mixtral-style model of the same sizes with
8 SwiGLU experts a layer (top-2) is trained at TP1 PP1 DP4 EP2 ZeRO-1 (non-pipeline engine), saved,
converted by our converter, and loaded at TP1 PP1 DP4 EP4 (direct and sliced) and EP1 (also DeepSpeed's
loader, which the trainer refuses at EP > 1: it reads each expert's atom by the target's local name).
Per target and rank: owned, each loader's read measured as in part 1, the criterion for ``direct``,
and whether each universal loader's state digest equals the direct resume's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from megatron_ucp import bench
from megatron_ucp.bench import HelpFormatter, command_line, load_average, paired_ratio, tail, threads_per_rank

TOOLS = Path(__file__).resolve().parent
MiB = 1 << 20
SOCKET_PROBE_BYTES = 8 * MiB
CRITERION_FACTOR, CRITERION_SLACK = 1.1, MiB
_T0 = time.monotonic()  # progress lines show seconds since main() started

# Imported before the measured windows, so that reading their source is not counted as checkpoint
# reading: what trainer.load() imports on first use (found by recording sys.modules around a load).
LOAD_IMPORTS = (
    "megatron_ucp.checkpoint.format", "megatron_ucp.checkpoint.publish", "megatron_ucp.checkpoint.sliced",
    "megatron_ucp.checkpoint.trust", "megatron_ucp.checkpoint.universal", "megatron_ucp.checkpoint.zero",
    "megatron_ucp.checkpoint.torchzip", "megatron_ucp.checkpoint.numpy_safe", "megatron_ucp.checkpoint.crosscheck",
    "megatron_ucp.training.checkpointing", "megatron_ucp.training.sliced_load",
    "deepspeed.checkpoint", "deepspeed.checkpoint.constants", "deepspeed.checkpoint.universal_checkpoint",
    "deepspeed.runtime.state_dict_factory", "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine",
    "deepspeed.utils.tensor_fragment", "deepspeed.runtime.zero.config", "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.bf16_optimizer",
    "deepspeed.runtime.pipe.module", "deepspeed.runtime.pipe.engine", "torch.utils.serialization",
    "torch.utils.serialization.config", "encodings.latin_1",
)


# --------------------------------------------------------------------------------------------------
# Configuration


LAYOUT_RE = re.compile(r"tp(?P<tp>\d+)[- ]pp(?P<pp>\d+)[- ]dp(?P<dp>\d+)(?:[- ]ep(?P<ep>\d+))?"
                       r"(?:[- ]z(?:ero-?)?(?P<z>[0-3]))?")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int = 1
    ep: int | None = None  # expert parallel size of an MoE model (the MoE part); None: a dense model

    @property
    def ranks(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        ep = f" EP{self.ep}" if self.ep is not None else ""
        return f"TP{self.tp} PP{self.pp} DP{self.dp}{ep} ZeRO-{self.zero}"

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """``tp1-pp4-dp1`` (ZeRO-1) or ``tp1-pp1-dp4-z3``; also the printed form ``TP1 PP1 DP4 ZeRO-3``."""
        m = LAYOUT_RE.fullmatch(text.strip().lower())
        if not m:
            raise argparse.ArgumentTypeError(f"layout {text!r}: expected like tp1-pp4-dp1 or tp1-pp1-dp4-z3")
        return cls(int(m["tp"]), int(m["pp"]), int(m["dp"]), int(m["z"] or 1), int(m["ep"]) if m["ep"] else None)


SOURCE = Layout(2, 2, 2, 1)
BYTE_TARGETS = (Layout(2, 2, 2, 1), Layout(1, 1, 4, 1), Layout(1, 1, 4, 3))
# The MoE part: a mixtral-style model of MOE_EXPERTS experts a layer saved at EP2, resumed at EP4.
MOE_SOURCE, MOE_EXPERTS = Layout(1, 1, 4, 1, ep=2), 8
MOE_TARGETS = (Layout(1, 1, 4, 1, ep=4), Layout(1, 1, 4, 1, ep=1))  # EP1: where DeepSpeed's loader can load
LOADERS = ("direct", "sliced", "deepspeed")
ROUTES = ("direct", "ds-convert", "ours-convert")
ROUTE_TEXT = {"direct": "direct reshard", "ds-convert": "DeepSpeed ds_to_universal + DeepSpeed loader",
              "ours-convert": "our converter + DeepSpeed loader"}


@dataclass(frozen=True)
class BenchConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    vocab_size: int = 8000
    seq_length: int = 128
    global_batch_size: int = 8
    source_iters: int = 1
    repeats: int = 3
    time_target: Layout = Layout(1, 4, 1, 1)
    convert_workers: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length",
                     "global_batch_size", "source_iters", "repeats", "convert_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        t = self.time_target
        if (t.zero > 1 and t.pp > 1) or (t.zero == 3 and t.tp > 1):
            raise ValueError(f"{t.name}: ZeRO-2/3 need PP 1, and ZeRO-3 TP 1 (the trainer's rules)")
        if self.time_target == SOURCE:
            raise ValueError(f"the time target must differ from the source layout {SOURCE.name}")
        for layout in (SOURCE, *BYTE_TARGETS, self.time_target):
            if self.global_batch_size % layout.dp:
                raise ValueError(f"global batch {self.global_batch_size} is not divisible by DP {layout.dp} "
                                 f"({layout.name})")
            if layout.pp > self.num_layers:
                raise ValueError(f"{layout.name} needs at least {layout.pp} layers")

    def model_kwargs(self) -> dict:
        return dict(num_layers=self.num_layers, hidden_size=self.hidden_size,
                    num_attention_heads=self.num_attention_heads, max_position_embeddings=self.seq_length,
                    hidden_dropout=0.0, attention_dropout=0.0)

    def moe_model_kwargs(self) -> dict:
        """The MoE part's model: the same sizes, mixtral-shaped (SwiGLU experts of width hidden, top-2)."""
        return dict(self.model_kwargs(), num_key_value_heads=self.num_attention_heads, ffn_hidden_size=self.hidden_size,
                    swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True, tie_embeddings=False,
                    add_bias_linear=False, model_family="mixtral", num_experts=MOE_EXPERTS, moe_top_k=2)

    def train_config(self, layout: Layout, train_iters: int, **kw: Any) -> dict:
        return dict(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                    zero_stage=layout.zero, moe_expert_parallel_size=layout.ep or 1, micro_batch_size=1, global_batch_size=self.global_batch_size,
                    seq_length=self.seq_length, train_iters=train_iters, lr=1e-3, min_lr=1e-4, lr_warmup_iters=0,
                    lr_decay_iters=100, dtype="fp32", mock_data=True, vocab_size=self.vocab_size, log_interval=1,
                    eval_interval=0, seed=self.seed, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["time_target"] = self.time_target.name
        d["source"] = SOURCE.name
        return d


QUICK = dict(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=2000, seq_length=16,
             global_batch_size=4, repeats=1, time_target=Layout(1, 2, 2, 1))


# --------------------------------------------------------------------------------------------------
# Inside the ranks (module level: pickled by name for the spawned processes)


def read_rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def _module_file_bytes(name: str) -> int:
    mod = sys.modules.get(name)
    for attr in ("__cached__", "__file__"):
        path = getattr(mod, attr, None)
        if path and os.path.isfile(path):
            return os.path.getsize(path)
    return 0


def owned_state(engine) -> tuple[int, str]:
    """(bytes of fp32 optimizer state this rank owns, a digest of it: fp32 master, exp_avg, exp_avg_sq)."""
    opt = engine.optimizer
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        flats = getattr(opt, attr, None)
        if flats is not None:
            break
    else:
        raise RuntimeError(f"{type(opt).__name__}: no fp32 partition attribute found")
    numel = sum(int(t.numel()) for t in flats)
    digest = hashlib.sha256()
    for t in flats:
        state = opt.optimizer.state.get(t, {})
        for value in (t, state.get("exp_avg"), state.get("exp_avg_sq")):
            digest.update(b"-" if value is None else value.detach().contiguous().view(-1).numpy().tobytes())
    return numel * 3 * 4, digest.hexdigest()[:16]


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _bytes_job(rank: int, world_size: int, job: dict) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import Trainer

    if job.get("source") is not None:  # train and save the source here first (one spawn fewer)
        _source_job(rank, world_size, job["source"])
        if rank == 0:
            convert_ours(job["source"]["zero_folder"], job["source"]["universal_root"], job["source"]["workers"])
        _barrier()
    for name in LOAD_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    probe = torch.ones(SOCKET_PROBE_BYTES // 4)
    _barrier()
    r0 = read_rchar()
    dist.all_reduce(probe)
    socket_probe = read_rchar() - r0
    results = []
    for case in job["cases"]:
        out = io.StringIO()
        t0 = time.monotonic()
        with Trainer(job["model"], TrainConfig(**case["cfg"])) as trainer:
            trainer.build()
            _barrier()
            t1 = time.monotonic()
            b0 = read_rchar()
            b1 = read_rchar()  # the no-load baseline: the same window around a no-op
            _barrier()
            before = set(sys.modules)
            with contextlib.redirect_stdout(out):
                r0 = read_rchar()
                trainer.load()
                r1 = read_rchar()
            t2 = time.monotonic()
            imported = sorted(set(sys.modules) - before)
            owned, digest = owned_state(trainer.engine)
        results.append({"target": case["target"], "loader": case["loader"], "rchar_window": r1 - r0,
                        "baseline": b1 - b0, "read": (r1 - r0) - (b1 - b0), "owned": owned, "digest": digest,
                        "window_imports": {n: _module_file_bytes(n) for n in imported},
                        "build_s": t1 - t0, "load_s": t2 - t1,
                        "resume_line": resume_line_of(out.getvalue()) if rank == 0 else None})
    return {"socket_probe_rchar": socket_probe, "cases": results}


def _source_job(rank: int, world_size: int, job: dict) -> dict:
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import Trainer

    with Trainer(job["model"], TrainConfig(**job["cfg"])) as trainer:
        trainer.build()
        result = trainer.run()
    return {"loss": result.last_loss}


def _time_job(rank: int, world_size: int, job: dict) -> dict:
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import Trainer

    stamps = {"rank_start": job["rank_start"]}
    out = io.StringIO()
    with Trainer(job["model"], TrainConfig(**job["cfg"])) as trainer:
        trainer.build()
        _barrier()
        stamps["built"] = time.monotonic()
        with contextlib.redirect_stdout(out):
            trainer.load()
        _barrier()
        stamps["loaded"] = time.monotonic()
        result = trainer.run()
        _barrier()
        stamps["stepped"] = time.monotonic()
    return {"stamps": stamps, "loss": result.last_loss, "iteration": result.iteration,
            "resume_line": resume_line_of(out.getvalue()) if rank == 0 else None}


JOBS: dict[str, Callable[[int, int, dict], dict]] = {"source": _source_job, "bytes": _bytes_job, "time": _time_job}


def rank_entry(rank: int, world_size: int, job: dict) -> None:
    """One spawned rank: output to a log file, CPU DeepSpeed on gloo, the job, ``rank{r}.json``."""
    start = time.monotonic()
    log_fd = os.open(os.path.join(job["out_dir"], f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(job["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = JOBS[job["kind"]](rank, world_size, dict(job, rank_start=start))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(job["out_dir"], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------------------------------
# Launching


def _entry() -> Callable[..., None]:
    """``rank_entry`` as the spawned ranks import it: from module ``benchmark_loading`` (``tools/`` must be
    on ``sys.path`` when they start). Run as a script, this file is ``__main__``; the ranks import it by
    name instead of re-running the script."""
    if __name__ == "benchmark_loading":
        return rank_entry
    return importlib.import_module("benchmark_loading").rank_entry


class RunFailed(RuntimeError):
    pass


def launch(kind: str, world_size: int, out_dir: str, **job: Any) -> list[dict]:
    """Run job ``kind`` on ``world_size`` spawned ranks; their ``rank{r}.json`` results, in rank order."""
    from megatron_ucp.launch import spawn_ranks

    os.makedirs(out_dir, exist_ok=True)
    job = dict(job, kind=kind, out_dir=out_dir, threads=threads_per_rank(world_size))
    env_before = os.environ.get("DS_ACCELERATOR")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU DeepSpeed; also picks the fork server in spawn_ranks
    added = str(TOOLS) not in sys.path
    if added:
        sys.path.append(str(TOOLS))  # the ranks copy this process's sys.path when they start
    try:
        spawn_ranks(_entry(), world_size, job)
    except Exception as e:  # noqa: BLE001 - re-raised with the logs' tail
        tails = []
        for r in range(world_size):
            log = Path(out_dir, f"rank{r}.log")
            if log.exists():
                tails.append(f"--- rank {r} ({log}) ---\n" + tail(log, 15))
        raise RunFailed(f"{kind} on {world_size} ranks failed: {type(e).__name__}: {e}\n" + "\n".join(tails)) from e
    finally:
        if added:
            sys.path.remove(str(TOOLS))
        if env_before is None:
            os.environ.pop("DS_ACCELERATOR", None)
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def source_job(cfg: BenchConfig, workdir: str, layout: Layout = SOURCE, model: dict | None = None,
               name: str = "source") -> dict:
    """The job that trains the source (default: the TP2 PP2 DP2 ZeRO-1 GPT) and saves it to ``<workdir>/<name>``."""
    from megatron_ucp.checkpoint.format import step_folder_name

    save = os.path.join(workdir, name)
    return {"model": model or cfg.model_kwargs(), "save": save,
            "cfg": cfg.train_config(layout, cfg.source_iters, save=save, save_interval=cfg.source_iters),
            "zero_folder": os.path.join(save, step_folder_name(cfg.source_iters)),
            "universal_root": os.path.join(workdir, f"{name}_universal" if name != "source" else "universal"),
            "workers": cfg.convert_workers}


def build_source(cfg: BenchConfig, workdir: str) -> str:
    """Train the source on its own spawn (when the bytes part, which does it in passing, is not run)."""
    job = source_job(cfg, workdir)
    launch("source", SOURCE.ranks, os.path.join(workdir, "logs", "source"), **job)
    return job["save"]


def step_folder(save_dir: str) -> str:
    with open(os.path.join(save_dir, "latest")) as f:
        return os.path.join(save_dir, f.read().strip())


def convert_ours(zero_folder: str, out_root: str, workers: int) -> str:
    from megatron_ucp.checkpoint.universal import convert_zero_to_universal

    out = os.path.join(out_root, os.path.basename(zero_folder) + "_universal")
    report = convert_zero_to_universal(zero_folder, out, workers=workers, verify=True)
    if not report.verified:
        raise RuntimeError(f"{out}: our converter did not verify its output")
    return out


def convert_deepspeed(zero_folder: str, out_root: str, workers: int) -> str:
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.join(out_root, os.path.basename(zero_folder) + "_universal")
    args = argparse.Namespace(input_folder=zero_folder, output_folder=out, num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(args)
    return out


# --------------------------------------------------------------------------------------------------
# Part 1: bytes


@dataclass
class BytesRow:
    target: str
    loader: str  # direct | native | sliced | deepspeed
    read: list[int] = field(default_factory=list)  # per rank, baseline subtracted
    owned: list[int] = field(default_factory=list)
    baseline: list[int] = field(default_factory=list)
    plan: list[int] | None = None  # the trainer's own count of state bytes read (direct and sliced)
    digest: list[str] = field(default_factory=list)
    window_imports: dict[str, int] = field(default_factory=dict)  # module -> file bytes, any rank
    build_s: float | None = None  # rank 0: Trainer.build() (then a barrier)
    load_s: float | None = None  # rank 0: trainer.load(), rchar reads included
    route: str = ""
    status: str = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.read)

    @property
    def ratios(self) -> list[float]:
        return [r / o if o else math.inf for r, o in zip(self.read, self.owned)]

    @property
    def max_ratio(self) -> float:
        return max(self.ratios)

    @property
    def sum_ratio(self) -> float:
        return sum(self.read) / sum(self.owned) if sum(self.owned) else math.inf

    @property
    def criterion_applies(self) -> bool:
        return self.loader in ("direct", "sliced")

    @property
    def passes(self) -> bool:
        return all(r <= CRITERION_FACTOR * o + CRITERION_SLACK for r, o in zip(self.read, self.owned))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.ok:
            d.update(read_max=max(self.read), read_sum=sum(self.read), owned_max=max(self.owned),
                     owned_sum=sum(self.owned), ratio_max=self.max_ratio, ratio_sum=self.sum_ratio,
                     criterion=("PASS" if self.passes else "FAIL") if self.criterion_applies else None)
        return d


PLAN_RE_PREFIX = "state bytes read per rank: "


def resume_line_of(text: str) -> str | None:
    """The trainer's ``resumed from ...`` line in what its load printed (other lines follow it)."""
    return next((ln.strip() for ln in text.splitlines() if ln.startswith(("resumed from", "fine-tuning from"))), None)


def parse_plan_bytes(line: str | None) -> list[int] | None:
    """Per-rank state bytes from the trainer's resume line (direct reshard and the sliced loader)."""
    if not line or PLAN_RE_PREFIX not in line:
        return None
    text = line.split(PLAN_RE_PREFIX, 1)[1].split(";", 1)[0]
    return [int(x.replace(",", "")) for x in text.split(", ") if x.strip()]


def route_of(line: str | None) -> str:
    """What the resume line says the load did (the first note after the ``now {...}`` layout)."""
    if not line:
        return ""
    tail = line.rsplit("})", 1)[-1]
    return tail.lstrip("; ").split(";", 1)[0]


def measure_bytes(cfg: BenchConfig, source_dir: str, universal_dir: str, targets: Sequence[Layout], log_dir: str,
                  iteration: int, source: dict | None = None, model: dict | None = None,
                  loaders: Callable[[Layout], Sequence[str]] = lambda target: LOADERS) -> tuple[list[BytesRow], list[int]]:
    """The loaders (default: all three) at each of ``targets`` (one world size) in one spawn, which first
    trains the source when ``source`` is given; rows and each rank's socket-probe rchar. ``model``: the
    model's kwargs (default: the GPT of ``cfg``)."""
    if len({t.ranks for t in targets}) != 1:
        raise ValueError("one spawn measures targets of one world size")
    cases: list[dict[str, Any]] = []
    for target in targets:
        for loader in loaders(target):
            kw: dict[str, Any] = {"load": source_dir} if loader == "direct" else {
                "load": os.path.dirname(universal_dir), "universal_checkpoint": True,
                "universal_loader": "ours" if loader == "sliced" else "deepspeed"}
            cases.append({"target": target.name, "loader": loader, "cfg": cfg.train_config(target, iteration, **kw)})
    per_rank = launch("bytes", targets[0].ranks, log_dir, model=model or cfg.model_kwargs(), cases=cases,
                      source=source)
    rows = []
    for i, case in enumerate(cases):
        results = [r["cases"][i] for r in per_rank]
        line = results[0]["resume_line"]
        route = route_of(line)
        name = "native" if case["loader"] == "direct" and route.startswith("same layout") else case["loader"]
        imports: dict[str, int] = {}
        for r in results:
            imports.update(r["window_imports"])
        rows.append(BytesRow(target=case["target"], loader=name, read=[r["read"] for r in results],
                             owned=[r["owned"] for r in results], baseline=[r["baseline"] for r in results],
                             plan=parse_plan_bytes(line), digest=[r["digest"] for r in results],
                             window_imports=imports, route=route, build_s=results[0]["build_s"],
                             load_s=results[0]["load_s"]))
    return rows, [r["socket_probe_rchar"] for r in per_rank]


def fmt_mib(n: float) -> str:
    return f"{n / MiB:,.2f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


BYTES_HEADER = ["target", "loader", "read MiB/rank (max)", "read MiB (sum)", "owned MiB/rank (max)",
                "owned MiB (sum)", "read/owned (max rank)", "read/owned (sum)", "<= 1.1 x owned + 1 MiB"]


def bytes_cells(r: BytesRow) -> list[str]:
    if not r.ok:
        return [r.target, r.loader, r.status, "", "", "", "", "", ""]
    verdict = "PASS" if r.passes else "FAIL"
    crit = verdict if r.criterion_applies else "n/a (native)" if r.loader == "native" else f"({verdict})"
    return [r.target, r.loader, fmt_mib(max(r.read)), fmt_mib(sum(r.read)), fmt_mib(max(r.owned)),
            fmt_mib(sum(r.owned)), fmt_ratio(r.max_ratio), fmt_ratio(r.sum_ratio), crit]


def format_bytes_table(rows: Sequence[BytesRow]) -> str:
    return bench.markdown_table(BYTES_HEADER, [bytes_cells(r) for r in rows], {2, 3, 4, 5, 6, 7})


def expected_ds_factor(target: str) -> int:
    """What DeepSpeed's loader should read relative to what it owns: DP at ZeRO-3, TP at ZeRO-1/2."""
    layout = Layout.parse(target)
    return layout.dp if layout.zero == 3 else layout.tp


def method_check(rows: Sequence[BytesRow]) -> tuple[bool, str]:
    """DeepSpeed's loader must read more than it owns at every target, else the measurement is blind."""
    ds = [r for r in rows if r.loader == "deepspeed" and r.ok]
    holds = bool(ds) and all(r.max_ratio > 1.0 and r.sum_ratio > 1.0 for r in ds)
    parts = [f"{r.target}: {fmt_ratio(r.max_ratio)} max rank, {fmt_ratio(r.sum_ratio)} all ranks "
             f"(about {'DP' if 'ZeRO-3' in r.target else 'TP'} = {expected_ds_factor(r.target)} expected"
             f"{', plus the atoms ZeRO partition boundaries cut' if 'ZeRO-3' not in r.target else ''})" for r in ds]
    return holds, ("method check - DeepSpeed's loader reads more than it owns (whole atoms): "
                   + "; ".join(parts) + f" -> {'holds' if holds else 'DOES NOT HOLD'}")


def same_state(rows: Sequence[BytesRow]) -> dict[str, dict[str, int]]:
    """Per target, per loader: on how many ranks the loaded state equals DeepSpeed's loader's (by digest)."""
    out: dict[str, dict[str, int]] = {}
    for ref in (r for r in rows if r.ok and r.loader == "deepspeed"):
        out[ref.target] = {r.loader: sum(a == b for a, b in zip(r.digest, ref.digest)) for r in rows
                           if r.ok and r.target == ref.target and r.loader != "deepspeed"}
    return out


def state_check(rows: Sequence[BytesRow]) -> tuple[bool, str]:
    """direct and sliced must load exactly what DeepSpeed's loader loads (a loader that read nothing would
    pass the bytes criterion); native is shown, not required."""
    parts, ok = [], True
    ranks = {r.target: len(r.digest) for r in rows if r.ok}
    for target, by_loader in same_state(rows).items():
        for loader, n in by_loader.items():
            if loader != "native":
                ok = ok and n == ranks[target]
            parts.append(f"{target} {loader}: {n}/{ranks[target]} ranks")
    ok = ok and bool(parts)
    native = ""
    if any("native" in p for p in parts):
        native = (" (native keeps each pipeline stage's own copy of the tied embedding module; a universal "
                  "checkpoint and the direct reshard give every stage the first stage's copy)")
    return ok, ("loaded optimizer state (fp32 master + moments) identical to DeepSpeed's loader's: "
                + ", ".join(parts) + native + f" -> {'yes' if ok else 'NO'}")


def consistency_lines(rows: Sequence[BytesRow], probes: dict[str, list[int]]) -> list[str]:
    lines = [state_check(rows)[1]]
    planned = [r for r in rows if r.ok and r.plan is not None]
    covered = all(len(r.plan or []) == len(r.read) and all(p <= rd for p, rd in zip(r.plan or [], r.read))
                  for r in planned)
    lines.append("trainer's own count of state bytes read <= measured read on every rank (direct, sliced): "
                 + ("yes" if covered and planned else "NO") + " ("
                 + ", ".join(f"{r.target} {r.loader}: plan {fmt_mib(sum(r.plan or []))} MiB of "
                             f"{fmt_mib(sum(r.read))} MiB read" for r in planned) + ")")
    base = [b for r in rows if r.ok for b in r.baseline]
    probe = [p for ps in probes.values() for p in ps]
    lines.append(f"no-load baseline per rank: {min(base, default=0)}-{max(base, default=0)} bytes; gloo socket probe "
                 f"({SOCKET_PROBE_BYTES // MiB} MiB all-reduce): rchar +{max(probe, default=0)} bytes"
                 + ("" if max(probe, default=0) < SOCKET_PROBE_BYTES // 2 else
                    " - SOCKET TRAFFIC IS COUNTED IN RCHAR: THE NUMBERS ABOVE ARE WRONG"))
    imports = {n: b for r in rows for n, b in r.window_imports.items()}
    if imports:
        lines.append(f"modules first imported inside a load window (counted as read): {len(imports)}, "
                     f"{fmt_mib(sum(imports.values()))} MiB of files: {', '.join(sorted(imports))}")
    else:
        lines.append("modules first imported inside a load window: none")
    return lines


# --------------------------------------------------------------------------------------------------
# Part 2: time


@dataclass
class TimedRun:
    route: str
    round: int
    convert_s: float = 0.0
    certify_s: float | None = None  # DeepSpeed's route only; not counted
    startup_build_s: float = 0.0  # launch -> every rank built (barrier)
    load_s: float = 0.0
    step_s: float = 0.0
    resume_s: float = 0.0  # launch -> end of the first step
    loss: float | None = None
    route_line: str = ""

    @property
    def total_s(self) -> float:
        return self.convert_s + self.resume_s


def time_one(cfg: BenchConfig, route: str, rnd: int, source_dir: str, workdir: str, iteration: int) -> TimedRun:
    run = TimedRun(route, rnd)
    zero_folder = step_folder(source_dir)
    scratch = os.path.join(workdir, f"time_{route}_{rnd}")
    os.makedirs(scratch)
    try:
        t0 = time.monotonic()
        if route == "direct":
            load: dict[str, Any] = {"load": source_dir}
        else:
            out = (convert_deepspeed if route == "ds-convert" else convert_ours)(
                zero_folder, os.path.join(scratch, "universal"), cfg.convert_workers)
            run.convert_s = time.monotonic() - t0
            if route == "ds-convert":
                from megatron_ucp.checkpoint.universal import certify_universal

                c0 = time.monotonic()
                certify_universal(zero_folder, out)
                run.certify_s = time.monotonic() - c0
            load = {"load": os.path.dirname(out), "universal_checkpoint": True, "universal_loader": "deepspeed"}
        train_cfg = cfg.train_config(cfg.time_target, iteration + 1, **load)
        launched = time.monotonic()
        per_rank = launch("time", cfg.time_target.ranks, os.path.join(scratch, "logs"), model=cfg.model_kwargs(),
                          cfg=train_cfg)
        first = per_rank[0]
        s = first["stamps"]
        if first["iteration"] != iteration + 1:
            raise RuntimeError(f"{route}: expected to stop at iteration {iteration + 1}, got {first['iteration']}")
        run.startup_build_s = s["built"] - launched
        run.load_s = s["loaded"] - s["built"]
        run.step_s = s["stepped"] - s["loaded"]
        run.resume_s = s["stepped"] - launched
        run.loss = first["loss"]
        run.route_line = route_of(first["resume_line"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return run


def round_order(rnd: int) -> list[str]:
    """Round r runs the routes rotated by r, so no route always runs first (or right after another)."""
    k = rnd % len(ROUTES)
    return list(ROUTES[k:] + ROUTES[:k])


@dataclass
class TimeSummary:
    route: str
    runs: int
    convert_s: float
    startup_build_s: float
    load_s: float
    step_s: float
    total_s: float
    vs_direct: float | None  # median over rounds of total / direct's total in the same round
    loss: float | None


def summarize_times(runs: Sequence[TimedRun]) -> list[TimeSummary]:
    med = statistics.median
    direct_by_round = {r.round: r.total_s for r in runs if r.route == "direct"}
    out = []
    for route in ROUTES:
        rs = [r for r in runs if r.route == route]
        if not rs:
            continue
        paired = [r for r in rs if r.round in direct_by_round]
        vs_direct = paired_ratio([r.total_s for r in paired], [direct_by_round[r.round] for r in paired])
        out.append(TimeSummary(route, len(rs), med([r.convert_s for r in rs]), med([r.startup_build_s for r in rs]),
                               med([r.load_s for r in rs]), med([r.step_s for r in rs]), med([r.total_s for r in rs]),
                               vs_direct, rs[0].loss))
    return out


TIME_HEADER = ["route", "runs", "convert s", "start-up + build s", "load s", "first step s", "total s",
               "total vs direct", "first-step loss"]


def fmt_s(x: float) -> str:
    return f"{x:.2f}"


def time_cells(s: TimeSummary) -> list[str]:
    return [ROUTE_TEXT[s.route], str(s.runs), fmt_s(s.convert_s), fmt_s(s.startup_build_s), fmt_s(s.load_s),
            fmt_s(s.step_s), fmt_s(s.total_s), "n/a" if s.vs_direct is None else fmt_ratio(s.vs_direct),
            "n/a" if s.loss is None else f"{s.loss:.6f}"]


def format_time_table(summaries: Sequence[TimeSummary]) -> str:
    return bench.markdown_table(TIME_HEADER, [time_cells(s) for s in summaries], {1, 2, 3, 4, 5, 6, 7, 8})


# --------------------------------------------------------------------------------------------------
# The MoE part: direct resume EP2 -> EP4, per rank


MOE_HEADER = ["target", "rank", "owned MiB", "direct read MiB", "direct read/owned", "<= 1.1 x owned + 1 MiB",
              "sliced read MiB", "sliced state = direct's", "deepspeed read MiB", "deepspeed read/owned",
              "deepspeed state = direct's"]


def moe_rows(rows: Sequence[BytesRow]) -> list[list[str]]:
    """One line per target and rank: what the rank owns, what each loader read, and whether each universal
    loader loaded the same state as the direct resume (digest of the rank's fp32 partition and moments)."""
    out = []
    for target in dict.fromkeys(r.target for r in rows):
        by = {r.loader: r for r in rows if r.target == target}
        direct = by.get("direct") or by.get("native")
        if direct is None or not direct.ok:
            continue
        for rank, owned in enumerate(direct.owned):
            read = direct.read[rank]
            cells = [target, str(rank), fmt_mib(owned), fmt_mib(read), fmt_ratio(read / owned if owned else math.inf),
                     "PASS" if read <= CRITERION_FACTOR * owned + CRITERION_SLACK else "FAIL"]
            for name in ("sliced", "deepspeed"):
                row = by.get(name)
                if row is None or not row.ok:
                    cells += ["refused" if row is None else row.status, ""]
                    cells += [""] if name == "deepspeed" else []
                    continue
                cells.append(fmt_mib(row.read[rank]))
                if name == "deepspeed":
                    cells.append(fmt_ratio(row.read[rank] / owned if owned else math.inf))
                cells.append("yes" if row.digest[rank] == direct.digest[rank] else "NO")
            out.append(cells)
    return out


def moe_loaders(target: Layout) -> Sequence[str]:
    """DeepSpeed's universal loader reads atoms by local names: the trainer refuses it for experts at EP > 1."""
    return LOADERS if (target.ep or 1) == 1 else ("direct", "sliced")


def run_moe_part(cfg: BenchConfig, workdir: str) -> tuple[bool, list[str], dict]:
    """Train the MoE source at MOE_SOURCE, convert it, and load it at each of MOE_TARGETS by direct resume, our
    sliced universal loader and (at EP 1) DeepSpeed's; (criterion met everywhere, report lines, JSON)."""
    model = cfg.moe_model_kwargs()
    job = source_job(cfg, workdir, MOE_SOURCE, model, name="moe_source")
    universal = os.path.join(job["universal_root"], os.path.basename(job["zero_folder"]) + "_universal")
    _progress(f"MoE: training {MOE_SOURCE.name}, converting, then loading at "
              f"{', '.join(t.name for t in MOE_TARGETS)} ...")
    rows, probe = measure_bytes(cfg, job["save"], universal, MOE_TARGETS, os.path.join(workdir, "logs", "moe"),
                                cfg.source_iters, source=job, model=model, loaders=moe_loaders)
    ok = all(r.ok and r.passes for r in rows if r.criterion_applies)
    same = all(r.digest == next(d for d in rows if d.target == r.target and d.loader == "direct").digest
               for r in rows if r.ok)
    ok = ok and same
    routes = [f"{r.target}: {r.route}" for r in rows if r.loader == "direct"]
    lines = [f"## MoE loading benchmark: mixtral-style {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
             f"{MOE_EXPERTS} experts top-2, vocab {cfg.vocab_size}, fp32; source {MOE_SOURCE.name} checkpoint of "
             f"iteration {cfg.source_iters}", "",
             "### State bytes read per rank during trainer.load() (rchar, no-load baseline subtracted)", "",
             bench.markdown_table(MOE_HEADER, moe_rows(rows), {2, 3, 4, 6, 8, 9}), "",
             *routes,
             f"every loader loaded the direct resume's state on every rank: {'yes' if same else 'NO'}",
             "deepspeed at EP > 1: refused by the trainer (DeepSpeed's universal loader reads each atom by the "
             "target's local parameter name, a different global expert on every expert-parallel rank but the first)",
             f"socket probe rchar per rank: {probe}", ""]
    return ok, lines, {"rows": [r.to_dict() for r in rows], "socket_probe_rchar": probe, "criterion_ok": ok}


# --------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0], formatter_class=HelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=int, default=None, help=f"transformer layers (default {d.num_layers})")
    m.add_argument("--hidden-size", type=int, default=None, help=f"hidden size (default {d.hidden_size})")
    m.add_argument("--num-attention-heads", type=int, default=None,
                   help=f"attention heads (default {d.num_attention_heads})")
    m.add_argument("--vocab-size", type=int, default=None, help=f"mock-data vocabulary (default {d.vocab_size})")
    m.add_argument("--seq-length", type=int, default=None, help=f"tokens per sample (default {d.seq_length})")
    m.add_argument("--global-batch-size", type=int, default=None,
                   help=f"samples per step, every layout (default {d.global_batch_size})")
    p.add_argument("--source-iters", type=int, default=d.source_iters, help="iterations trained before the save")
    p.add_argument("--repeats", type=int, default=None, help=f"timing rounds (default {d.repeats}; --quick: 1)")
    p.add_argument("--time-target", type=Layout.parse, default=None, metavar="LAYOUT",
                   help="layout of the timing part, e.g. tp1-pp4-dp1 or tp1-pp2-dp2 "
                        "(default tp1-pp4-dp1; --quick: tp1-pp2-dp2)")
    p.add_argument("--convert-workers", type=int, default=d.convert_workers,
                   help="workers of both converters (ours: threads; DeepSpeed: extract and merge workers)")
    p.add_argument("--parts", choices=("bytes", "time", "all", "moe"), default="all",
                   help="which measurements to run (moe: only the MoE part, which 'all' does not include)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke test: " + ", ".join(
                       f"{k}={v.name if isinstance(v, Layout) else v}" for k, v in QUICK.items()))
    p.add_argument("--workdir", default=None, help="checkpoints and logs go here (default: a temporary folder)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the numbers as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length", "global_batch_size",
                 "repeats", "time_target"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return BenchConfig(source_iters=args.source_iters, convert_workers=args.convert_workers, **values)


def main(argv: Sequence[str] | None = None) -> int:
    global _T0
    _T0 = time.monotonic()
    args, cfg = bench.parse_config(build_parser(), argv, config_from_args)
    command = command_line(argv, __file__)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        return _run(cfg, args, command, args.workdir)
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as tmp:
        return _run(cfg, args, command, tmp)


def _progress(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _run(cfg: BenchConfig, args: argparse.Namespace, command: str, workdir: str) -> int:
    machine = bench.machine_info()
    t_start = time.monotonic()
    ok = True
    job = source_job(cfg, workdir)
    source_dir, zero_folder, universal = job["save"], job["zero_folder"], ""
    iteration = cfg.source_iters
    rows: list[BytesRow] = []
    probes: dict[str, list[int]] = {}
    lines = [f"## Loading benchmark: GPT {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_attention_heads} heads, vocab {cfg.vocab_size}, seq {cfg.seq_length}, fp32; source "
             f"{SOURCE.name} checkpoint of iteration {iteration}", ""]
    out: dict[str, Any] = {"command": command, "machine": machine, "config": cfg.to_dict()}
    if args.parts == "moe":  # its own header: the GPT source above is not trained
        moe_ok, moe_lines, out["moe"] = run_moe_part(cfg, workdir)
        ok = ok and moe_ok
        lines = moe_lines
    if args.parts in ("bytes", "all"):
        # One spawn per world size; the source's own world size goes first and trains the source.
        by_size: dict[int, list[Layout]] = {}
        for target in sorted(BYTE_TARGETS, key=lambda t: t.ranks != SOURCE.ranks):
            by_size.setdefault(target.ranks, []).append(target)
        universal = os.path.join(job["universal_root"], os.path.basename(zero_folder) + "_universal")
        for ranks, targets in by_size.items():
            first = ranks == SOURCE.ranks
            _progress(("training the source checkpoint, converting it, then " if first else "")
                      + f"bytes on {ranks} ranks: {', '.join(t.name for t in targets)} x {', '.join(LOADERS)} ...")
            log_dir = os.path.join(workdir, "logs", f"bytes_{ranks}")
            try:
                got, probe = measure_bytes(cfg, source_dir, universal, targets, log_dir, iteration,
                                           job if first else None)
                rows += got
                probes[", ".join(t.name for t in targets)] = probe
            except RunFailed as e:
                ok = False
                _progress(str(e))
                rows += [BytesRow(t.name, loader, status=f"failed: {str(e).splitlines()[0][:120]}")
                         for t in targets for loader in LOADERS]
                if first:
                    raise
        rows.sort(key=lambda r: BYTE_TARGETS.index(Layout.parse(r.target)))
        holds, check = method_check(rows)
        crit_ok = all(r.passes for r in rows if r.ok and r.criterion_applies)
        same_ok, _ = state_check(rows)
        ok = ok and holds and crit_ok and same_ok
        lines += ["### Bytes read per rank during trainer.load() (rchar, no-load baseline subtracted)", "",
                  format_bytes_table(rows), "",
                  "criterion required of direct and sliced; (PASS)/(FAIL): DeepSpeed's loader, for comparison; "
                  "native: DeepSpeed's own path at the source's layout", "",
                  check, *consistency_lines(rows, probes), ""]
        out["bytes"] = {"rows": [r.to_dict() for r in rows], "method_check_holds": holds, "method_check": check,
                        "same_state": same_state(rows), "same_state_ok": same_ok, "criterion_ok": crit_ok,
                        "socket_probe_rchar": probes, "criterion": {"factor": CRITERION_FACTOR,
                                                                    "slack_bytes": CRITERION_SLACK}}
    if args.parts in ("time", "all"):
        if not os.path.isfile(os.path.join(source_dir, "latest")):
            _progress(f"training the source checkpoint ({SOURCE.name} fp32, {cfg.source_iters} iteration(s)) ...")
            build_source(cfg, workdir)
        runs: list[TimedRun] = []
        for rnd in range(cfg.repeats):
            for route in round_order(rnd):
                _progress(f"time: round {rnd + 1}/{cfg.repeats}, {route} -> {cfg.time_target.name} ...")
                try:
                    runs.append(time_one(cfg, route, rnd, source_dir, workdir, iteration))
                except Exception as e:  # noqa: BLE001 - reported, the other runs go on
                    ok = False
                    _progress(f"time: {route} failed: {type(e).__name__}: {e}")
        summaries = summarize_times(runs)
        losses = {r.loss for r in runs}
        same_loss = len(losses) == 1 and None not in losses and len(summaries) == len(ROUTES)
        certify = [r.certify_s for r in runs if r.certify_s is not None]
        lines += [f"### Time to the end of the first resumed step: {SOURCE.name} -> {cfg.time_target.name} "
                  f"(medians of {cfg.repeats} paired round(s))", "", format_time_table(summaries), "",
                  f"first resumed step's loss identical across routes: {'yes' if same_loss else 'NO'}",
                  f"not counted: certify_universal after DeepSpeed's converter, median "
                  f"{fmt_s(statistics.median(certify)) if certify else 'n/a'} s; conversions ran in this process "
                  f"(imports warm), {cfg.convert_workers} worker(s) each; ours includes its verification", ""]
        ok = ok and same_loss
        out["time"] = {"target": cfg.time_target.name, "runs": [dataclasses.asdict(r) for r in runs],
                       "summary": [dataclasses.asdict(s) for s in summaries], "same_first_loss": same_loss}
    after = load_average()
    lines += [f"command: {command}",
              f"machine: {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), torch {machine['torch']}, "
              f"deepspeed {machine['deepspeed']}, python {machine['python']}, gloo on CPU",
              f"load average (1, 5, 15 min) before: {machine['load_average']}, after: {after}; "
              f"benchmark wall time {time.monotonic() - t_start:.0f} s"]
    print("\n".join(lines), flush=True)
    if args.json_out:
        out["ok"] = ok
        bench.write_json(args.json_out, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
