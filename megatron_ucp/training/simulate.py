"""Planning a direct reshard at a scale this machine cannot hold, by simulation.

A direct resume (``checkpointing.load_route`` -> ``sliced_load.ZeroSource``) needs, on every target
rank, the source checkpoint's index (``checkpoint.zero.open_zero_checkpoint``) and a read plan for each
fragment the rank's ZeRO partition owns (``sliced_load._plans``). Both are computed here for a checkpoint
that was never written: the source's index by ``checkpoint.synthetic`` (the same indexing code, fed
synthetic headers), each target rank's windows from the target layout's own synthetic index (DeepSpeed
gives a rank exactly the fragments its shard would hold), and the plans by the loader's own ``_plans``
through a ``ZeroSource``. Nothing is read; the figures are what the rank would do:

* planning seconds (measured here, on this machine);
* source files opened and ``preadv`` calls (``executors.preadv_runs``: how ``read_local`` issues a plan);
* bytes read against bytes owned (the rank's windows times three fp32 states);
* the index bytes the rank reads before it can plan: every model-state file's and every optimizer
  shard's header (the pickles DeepSpeed and our trainer would write, built here with empty tensors and
  measured: ``index_cost``), or the compact index (``checkpoint.compact_index``) alone.
"""

from __future__ import annotations

import dataclasses
import io
import os
import statistics
import tempfile
import time
import zipfile
from dataclasses import dataclass

import torch

from megatron_ucp.checkpoint.compact_index import COMPACT_INDEX_FILE, file_stamp, read_compact_index, write_index
from megatron_ucp.checkpoint.executors import preadv_runs
from megatron_ucp.checkpoint.format import (
    PipeEntryRecord,
    SOURCE_TRAINING,
    CheckpointMetadata,
    Versions,
    client_state,
    model_states_name,
    optim_states_name,
)
from megatron_ucp.checkpoint.synthetic import model_state, shard_headers, synthetic_checkpoint
from megatron_ucp.checkpoint.trust import load_file
from megatron_ucp.checkpoint.zero import ShardHeader, ZeroCheckpoint
from megatron_ucp.config import ModelConfig, TrainConfig
from megatron_ucp.layout.params import Role, pipe_entries
from megatron_ucp.layout.placement import padded_vocab_size
from megatron_ucp.layout.topology import ParallelLayout
from megatron_ucp.training.sliced_load import LoadStats, ZeroSource, _plans

# Llama 3 70B's shape (its config.json): GQA 64 / 8 heads, SwiGLU 28672, untied head, vocabulary 128256.
LLAMA_70B = dict(model_family="llama", num_layers=80, hidden_size=8192, num_attention_heads=64,
                 num_key_value_heads=8, ffn_hidden_size=28672, vocab_size=128256, max_position_embeddings=8192,
                 tie_embeddings=False, swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True,
                 add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)


def pipeline_parts(cfg: ModelConfig, pp: int) -> tuple[int, ...]:
    """The stage boundaries DeepSpeed's ``PipelineModule`` picks for our model (``partition_method``
    ``type:<block>``: whole transformer layers, balanced; ``model.pipe``)."""
    from deepspeed.runtime.utils import partition_balanced

    weights = [1 if e.role is Role.BLOCK else 0 for e in pipe_entries(cfg)]
    return tuple(int(p) for p in partition_balanced(weights, pp))


def saved_metadata(cfg: ModelConfig, layout: ParallelLayout, dtype: str = "bf16", iteration: int = 1000,
                   global_batch: int | None = None) -> CheckpointMetadata:
    """The metadata a ZeRO-1 training checkpoint of ``cfg`` saved at ``layout`` carries."""
    batch = global_batch or layout.dp
    train = TrainConfig(mock_data=True, vocab_size=cfg.vocab_size, micro_batch_size=1, global_batch_size=batch,
                        seq_length=cfg.max_position_embeddings, zero_stage=1, dtype=dtype,
                        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)
    return CheckpointMetadata(
        source=SOURCE_TRAINING, model_config=cfg, original_vocab_size=cfg.vocab_size,
        padded_vocab_size=padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, layout.tp),
        dtype=dtype, iteration=iteration, consumed_train_samples=iteration * batch, versions=Versions.installed(),
        train_config=train.to_dict(), topology=layout, pipeline_parts=pipeline_parts(cfg, layout.pp),
        pipe_entries=tuple(PipeEntryRecord.of(e) for e in pipe_entries(cfg)), zero_stage=1)


def retarget(meta: CheckpointMetadata, layout: ParallelLayout) -> CheckpointMetadata:
    """The metadata the same run would carry at ``layout`` (its padded vocabulary and stage boundaries)."""
    cfg = meta.model_config
    return dataclasses.replace(meta, topology=layout, pipeline_parts=pipeline_parts(cfg, layout.pp),
                               padded_vocab_size=padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                                                   layout.tp))


@dataclass(frozen=True)
class Window:
    """One parameter piece a target rank's ZeRO partition owns: flat elements ``window`` of its TP-local tensor."""

    name: str
    local_shape: tuple[int, ...]
    window: tuple[int, int]


def rank_windows(target: ZeroCheckpoint, pp: int, tp: int, dp: int) -> list[Window]:
    """The pieces target rank (pp, tp, dp) owns, in optimizer-group and module order: those of its own
    shard in the target layout's index (what DeepSpeed's ``_hp_mapping`` would give it)."""
    out = []
    mp = target.mp_rank(pp, tp)
    for group in target.model_states[mp]["param_shapes"]:
        for name in group:
            src = target.param_sources[name]
            if src.pp != pp:
                continue  # a tied copy on another stage
            lo = 0
            for frag in src.fragments[tp]:
                if frag.dp == dp:
                    out.append(Window(name, tuple(src.local_shapes[tp]), (lo, lo + frag.numel)))
                lo += frag.numel
    return out


def owned_bytes(windows: list[Window], states: int = 3, itemsize: int = 4) -> int:
    """Bytes of fp32 state (master and both moments) the windows hold."""
    return sum(w.window[1] - w.window[0] for w in windows) * states * itemsize


@dataclass(frozen=True)
class RankPlan:
    rank: int  # the target's global rank
    coords: tuple[int, int, int]  # (pp, tp, dp)
    seconds: float  # planning time, this machine
    files: int  # distinct source files read
    preads: int  # preadv calls, as read_local issues the plans
    read_bytes: int
    owned_bytes: int
    pieces: int  # parameter pieces planned (each for three states)


def global_rank(layout: ParallelLayout, pp: int, tp: int, dp: int) -> int:
    return (pp * layout.dp + dp) * layout.tp + tp


def plan_rank(source: ZeroSource, target: ZeroCheckpoint, pp: int, tp: int, dp: int) -> RankPlan:
    """Plan target rank (pp, tp, dp)'s reads through the loader's own ``_plans``; count what executing them takes."""
    windows = rank_windows(target, pp, tp, dp)
    stats = LoadStats()
    start = time.perf_counter()
    plans = [plan for w in windows
             for plan in _plans(source, stats, w.name, w.local_shape, target.tp, tp, w.window).values()]
    seconds = time.perf_counter() - start
    files = {r.path for plan in plans for r in plan.reads}
    preads = sum(len(preadv_runs(plan)) for plan in plans)
    layout = ParallelLayout(tp=target.tp, pp=target.pp, dp=target.dp)
    return RankPlan(global_rank(layout, pp, tp, dp), (pp, tp, dp), seconds, len(files), preads, stats.state_bytes,
                    owned_bytes(windows), len(windows))


def ranks_to_plan(target: ZeroCheckpoint) -> list[tuple[str, tuple[int, int, int]]]:
    """The target ranks to plan, by a pass over the target's index alone (no planning): the one that owns
    the most bytes (a plan reads exactly what it owns), the median one by bytes, and the one with the most
    parameter pieces (planning time grows with them), each once."""
    windows = {(pp, tp, dp): rank_windows(target, pp, tp, dp)
               for pp in range(target.pp) for tp in range(target.tp) for dp in range(target.dp)}
    owned = sorted((owned_bytes(w), coords) for coords, w in windows.items())
    pieces = max(windows, key=lambda coords: (len(windows[coords]), owned_bytes(windows[coords])))
    picks = [("busiest", owned[-1][1]), ("median", owned[(len(owned) - 1) // 2][1]), ("most pieces", pieces)]
    return [(label, coords) for i, (label, coords) in enumerate(picks) if coords not in [c for _, c in picks[:i]]]


# --- the index bytes a rank reads ----------------------------------------------------------------------


def _header_file(obj, folder: str, name: str) -> tuple[str, int]:
    """``torch.save(obj)`` to ``folder/name`` (the zip's record names carry the name): (its path, its bytes
    without its tensors' data: the pickle, the zip's headers, directory and alignment padding, which
    reading its header, ``torchzip.load_meta``, reads)."""
    path = os.path.join(folder, name)
    torch.save(obj, path)
    with zipfile.ZipFile(path) as z:
        data = sum(i.file_size for i in z.infolist() if "/data/" in i.filename)
    return path, os.path.getsize(path) - data


def _seconds_to_read(path: str, repeats: int) -> float:
    """Median seconds of reading a header as the index does (``load_file(meta=True)``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_file(path, meta=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _empty(numel: int = 0) -> torch.Tensor:
    return torch.empty(0) if numel == 0 else torch.empty(numel)


def model_state_file(meta: CheckpointMetadata, pp_rank: int) -> dict:
    """A model-state file as DeepSpeed's pipeline engine and our trainer write it (``module`` None, every
    DP rank's RNG state, DeepSpeed's counters and config), tensors empty: its pickle's size."""
    from megatron_ucp.distributed.random import RNGStatesTracker, get_rng_state, seed_all, set_rng_state
    from megatron_ucp.training.trainer import build_ds_config

    assert meta.topology is not None and meta.train_config is not None
    state = model_state(meta, pp_rank)
    train = TrainConfig.from_dict(meta.train_config)
    mine = RNGStatesTracker()
    saved = get_rng_state(mine)
    rng = []  # each DP rank's RNG state, as the trainer saves them (seeded streams: full-size states)
    try:
        for dp in range(meta.topology.dp):
            tracker = RNGStatesTracker()
            seed_all(train.seed + dp, pp_rank, 0, tracker)
            rng.append(get_rng_state(tracker))
    finally:
        set_rng_state(saved, mine)
    client = client_state(meta, tokens=meta.consumed_train_samples * train.seq_length, rng_state=rng)
    state.update(client)
    state.update({"module": None, "buffer_names": [], "optimizer": None, "frozen_param_shapes": None,
                  "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": {"num_steps": meta.iteration},
                  "data_sampler": None, "random_ltd": None, "global_samples": meta.consumed_train_samples,
                  "ds_config": build_ds_config(train, meta.topology), "ds_version": meta.versions.deepspeed})
    return state


def optimizer_shard_file(header: ShardHeader, meta: CheckpointMetadata) -> dict:
    """An optimizer shard as DeepSpeed 0.19.8's ZeRO-1 optimizers write it, tensors empty: its pickle's size."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from megatron_ucp.training.trainer import build_ds_config

    assert meta.topology is not None and meta.train_config is not None
    ds_config = build_ds_config(TrainConfig.from_dict(meta.train_config), meta.topology)
    groups = len(header.mappings)
    params = [list(range(len(m))) for m in header.mappings]
    base = {"state": {g: {"step": torch.tensor(1.0), "exp_avg": _empty(), "exp_avg_sq": _empty()}
                      for g in range(groups)},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1 if g == 0 else 0.0,
                              "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
                              "differentiable": False, "fused": None, "decoupled_weight_decay": True,
                              "name": header.groups[g]["name"], "params": params[g]}
                             for g in range(groups)]}
    osd = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
           "base_optimizer_state": base, "single_partition_of_fp32_groups": [_empty() for _ in range(groups)],
           "zero_stage": ZeroStageEnum.optimizer_states, "group_paddings": [0] * groups,
           "partition_count": [1] * groups, "ds_version": "0.19.8",
           "param_slice_mappings": [{name: fragment_address(numel=n, start=s) for name, (s, n) in m.items()}
                                    for m in header.mappings]}
    if meta.dtype == "bf16":
        osd["param_alignment_paddings"] = [[0] * len(m) for m in header.mappings]
    return {"optimizer_state_dict": osd, "ds_config": ds_config, "ds_version": "0.19.8"}


@dataclass(frozen=True)
class IndexCost:
    """What a rank reads before it can plan, every model-state file and shard header or the compact index:
    files, bytes, and seconds on this machine (headers: the median time of one header of each kind, times
    their number; compact: reading and validating the index against the files' sizes, measured whole)."""

    model_files: int
    model_bytes: int
    model_seconds: float
    shard_files: int
    shard_bytes: int
    shard_seconds: float
    compact_bytes: int
    compact_seconds: float

    def total(self, compact: bool) -> tuple[int, float]:
        """(bytes, seconds) of the index reads: the compact index alone, or every model-state file and shard header."""
        if compact:
            return self.compact_bytes, self.compact_seconds
        return self.model_bytes + self.shard_bytes, self.model_seconds + self.shard_seconds


def _file_size(header: ShardHeader) -> int:
    """A synthetic shard's size: the end of its last flat tensor."""
    return max(ref.offset + ref.numel * ref.dtype.itemsize for refs in header.refs for ref in refs.values())


def index_cost(meta: CheckpointMetadata, repeats: int = 3) -> IndexCost:
    """The index reads of the checkpoint ``meta`` describes. The headers: the pickles DeepSpeed and our
    trainer would write (built with empty tensors; one model-state file and one shard per pipeline stage,
    the others of a stage differ only in numbers), measured. The compact index: written for the
    synthetic files and read back by ``compact_index.read_compact_index`` against sparse stand-ins of
    them (empty files of the right sizes: it checks their sizes and times, it reads none)."""
    topo = meta.topology
    assert topo is not None
    bf16 = meta.dtype == "bf16"
    with tempfile.TemporaryDirectory(prefix="plan_sim_") as folder:
        headers = shard_headers(meta, folder)
        model_bytes = shard_bytes = 0
        model_seconds = shard_seconds = 0.0
        for pp in range(topo.pp):
            mp = pp * topo.tp
            path, nbytes = _header_file(model_state_file(meta, pp), folder, model_states_name(mp))
            model_bytes += nbytes * topo.tp
            model_seconds += _seconds_to_read(path, repeats) * topo.tp
            os.remove(path)
            name = optim_states_name(mp, 0, bf16)
            path, nbytes = _header_file(optimizer_shard_file(headers[os.path.join(folder, name)], meta), folder, name)
            shard_bytes += nbytes * topo.tp * topo.dp
            shard_seconds += _seconds_to_read(path, repeats) * topo.tp * topo.dp
            os.remove(path)
        for path, header in headers.items():
            with open(path, "wb") as f:
                f.truncate(_file_size(header))
        models = {os.path.join(folder, model_states_name(mp)): model_state(meta, mp // topo.tp)
                  for mp in range(topo.tp * topo.pp)}
        for path in models:
            with open(path, "wb") as f:
                f.truncate(model_bytes // (topo.tp * topo.pp))
        write_index(folder, {os.path.basename(p): (file_stamp(p), h) for p, h in headers.items()},
                    {os.path.basename(p): (file_stamp(p), state) for p, state in models.items()})
        compact_bytes = os.path.getsize(os.path.join(folder, COMPACT_INDEX_FILE))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            read_compact_index(folder, list(models), {p: p for p in headers})
            times.append(time.perf_counter() - start)
    return IndexCost(topo.tp * topo.pp, model_bytes, model_seconds, len(headers), shard_bytes, shard_seconds,
                     compact_bytes, statistics.median(times))


# --- the benchmark's cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    source: ParallelLayout
    target: ParallelLayout


@dataclass(frozen=True)
class CaseResult:
    case: Case
    index_seconds: float  # building the source's synthetic index (a rank builds it from what it read)
    ranks: list[tuple[str, RankPlan]]  # the planning seconds: the median of the repeats
    index: IndexCost


def run_case(cfg: ModelConfig, case: Case, dtype: str = "bf16", repeats: int = 3,
             which: list[tuple[int, int, int]] | None = None) -> CaseResult:
    """Plan ``case``'s direct reshard for the ranks ``ranks_to_plan`` picks (or the ranks ``which``,
    as (pp, tp, dp)), ``repeats`` times each; and the index reads of its source."""
    meta = saved_metadata(cfg, case.source, dtype)
    start = time.perf_counter()
    source = ZeroSource(synthetic_checkpoint(meta))
    seconds = time.perf_counter() - start
    target = synthetic_checkpoint(retarget(meta, case.target), "/synthetic/target")
    picks = ranks_to_plan(target) if which is None else [(f"rank {c}", c) for c in which]
    ranks = []
    for label, coords in picks:
        runs = [plan_rank(source, target, *coords) for _ in range(max(repeats, 1))]
        ranks.append((label, dataclasses.replace(runs[0], seconds=statistics.median(r.seconds for r in runs))))
    return CaseResult(case, seconds, ranks, index_cost(meta, repeats))
