"""Loading optimizer state at a new topology, each rank reading only the bytes it owns.

DeepSpeed's universal load asks every ZeRO optimizer for ``_load_universal_checkpoint(folder, ...)``;
its own version ``torch.load``s the *full* atom of every parameter a rank holds a piece of, then cuts
the piece out. Ours is installed in its place for the duration of one ``engine.load_checkpoint``: for
each parameter piece the rank owns (its ZeRO window of its TP-local tensor) it runs a read plan
(``checkpoint.plan``) and fills the optimizer's fp32 master, Adam moments and step exactly where
DeepSpeed's loader would have put them. Everything around it (model-state files, LR scheduler,
counters, the lp params refreshed from the fp32 masters) stays DeepSpeed's own sequence.

Two sources feed the same hook:

* ``ZeroSource``: a ZeRO checkpoint folder written at any topology (direct resume, no universal
  folder in between; the plan composes the source's and the target's placements);
* ``UniversalSource``: a universal folder (ours, DeepSpeed's or an HF import), read by byte range
  from each atom instead of whole.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from megatron_ucp.checkpoint.format import (
    MASTER_KEY,
    MOMENT_KEYS,
    STATE_KEYS,
    STEP_KEY,
    atom_path,
    check_atom,
    check_global_optimizer_state,
    check_state_atom,
    metadata_from_state,
    optimizer_state_path,
)
from megatron_ucp.checkpoint.atoms import PARAM
from megatron_ucp.checkpoint.executors import ReadCount, read_local
from megatron_ucp.checkpoint.plan import ReadPlan, atom_read_plan, read_plan, rebased, state_moves, window_plan
from megatron_ucp.checkpoint.rules import MergeRule, conversion_rules, rules_from_table
from megatron_ucp.checkpoint.trust import CheckpointError, check_name, load_file
from megatron_ucp.checkpoint.universal import optimizer_state
from megatron_ucp.checkpoint.zero import (
    OPTIMIZER_STATE_DICT,
    FlatRef,
    ZeroCheckpoint,
    model_state_files,
    read_scalar,
)
from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.init import new_vocab_rows
from megatron_ucp.layout.params import Kind, model_params
from megatron_ucp.progress import byte_progress

LOADERS = ("ours", "deepspeed")  # --universal-loader


class StateSource(Protocol):
    folder: str
    model_files: list[str]  # the model-state files (by mp rank) to read client state from

    def plan(self, name: str, key: str, local_shape: tuple[int, ...], tp: int, tp_rank: int) -> ReadPlan: ...

    def moves(self, name: str, from_key: str, to_key: str) -> dict[str, tuple[str, int]]: ...

    def step(self, name: str): ...

    def global_state(self) -> dict: ...


def _vocab_extent(kind: Kind, local_shape: tuple[int, ...], tp: int) -> int | None:
    return local_shape[0] * tp if kind is Kind.VOCAB else None


def _check_shape(plan: ReadPlan, local_shape: tuple[int, ...], name: str, where: str) -> ReadPlan:
    if tuple(plan.local_shape) != tuple(local_shape):
        raise CheckpointError(f"{where}: {name} would load as {tuple(plan.local_shape)} but this rank's parameter is "
                              f"{tuple(local_shape)} (the checkpoint describes another model or layout)")
    return plan


class ZeroSource:
    """A ZeRO-1/2/3 checkpoint folder at any topology, read through its recorded layout."""

    def __init__(self, ckpt: ZeroCheckpoint) -> None:
        if ckpt.checkpoint_metadata is None:
            raise CheckpointError(f"{ckpt.model_files[0]}: no megatron_ucp metadata, so its layout is unknown; "
                                  "convert it with tools/ds_to_universal.py and load with --universal-checkpoint")
        self.ckpt = ckpt
        self.folder = ckpt.folder
        self.model_files = list(ckpt.model_files)
        self.rules: dict[str, MergeRule] = conversion_rules(ckpt, strict=True, inject_missing_state=False)

    def _source(self, name: str):
        src = self.ckpt.param_sources.get(name)
        if src is None:
            raise CheckpointError(f"{self.folder}: has no parameter {name}")
        return src

    def plan(self, name: str, key: str, local_shape: tuple[int, ...], tp: int, tp_rank: int) -> ReadPlan:
        src, rule = self._source(name), self.rules[name]
        plan = read_plan(self.ckpt, src, rule, key, tp, tp_rank, _vocab_extent(rule.kind, local_shape, tp))
        return _check_shape(plan, local_shape, name, self.folder)

    def moves(self, name: str, from_key: str, to_key: str) -> dict[str, tuple[str, int]]:
        """Where ``to_key``'s bytes of ``name`` are, relative to ``from_key``'s (``plan.rebased``): in
        each shard file, that state's flat tensor instead of the other's."""
        return state_moves(self.ckpt, self._source(name), from_key, to_key)

    def step(self, name: str):
        src = self._source(name)
        return self.ckpt.step(src.pp, 0, src.fragments[0][0].dp, src.group)

    def global_state(self) -> dict:
        return optimizer_state(self.ckpt)


class UniversalSource:
    """A universal folder; each atom is read by byte range, never whole."""

    def __init__(self, folder: str, rule: Callable[[str], MergeRule] | None = None) -> None:
        """``rule``: each parameter's merge rule, for a folder without our metadata (which gives them)."""
        self.folder = folder
        # By mp rank, whichever of DeepSpeed's two names a converter wrote (ours writes both; DeepSpeed's
        # only mp_rank_XX, which its ZeRO-3 engine would not find).
        self.model_files = model_state_files(folder)
        if not self.model_files:
            raise CheckpointError(f"{folder}: no model-state files (not a universal checkpoint folder)")
        first_file = self.model_files[0]
        meta = metadata_from_state(load_file(first_file, meta=True), first_file)
        if meta is not None:
            rule = rules_from_table(meta.to_dict())
        elif rule is None:
            raise CheckpointError(f"{first_file}: no megatron_ucp metadata, so the parameters' kinds are "
                                  "unknown; load it with --universal-loader deepspeed")
        self.rule: Callable[[str], MergeRule] = rule
        self._refs: dict[tuple[str, str], tuple[FlatRef, tuple[int, ...]]] = {}
        self._global: dict | None = None

    def _atom(self, name: str, key: str) -> tuple[FlatRef, tuple[int, ...]]:
        if (name, key) not in self._refs:
            path = atom_path(self.folder, check_name(name, self.folder), key)
            atom = load_file(path, meta=True)
            if not isinstance(atom, dict):  # our atoms hold the tensor under 'param', beside its merge keys
                raise CheckpointError(f"{path}: expected an atom dict with a '{PARAM}' tensor, found "
                                      f"{type(atom).__name__}")
            tensor = check_state_atom(atom, path)  # the fp32 master weights and moments, whatever the precision
            self._refs[(name, key)] = (FlatRef.of(path, tensor.reshape(-1)), tuple(tensor.shape))
        return self._refs[(name, key)]

    def plan(self, name: str, key: str, local_shape: tuple[int, ...], tp: int, tp_rank: int) -> ReadPlan:
        ref, shape = self._atom(name, key)
        kind = self.rule(name).kind
        plan = atom_read_plan(ref, shape, kind, tp, tp_rank, _vocab_extent(kind, local_shape, tp))
        return _check_shape(plan, local_shape, name, ref.path)

    def moves(self, name: str, from_key: str, to_key: str) -> dict[str, tuple[str, int]]:
        """``to_key``'s atom of ``name`` in place of ``from_key``'s (``plan.rebased``)."""
        (a, shape_a), (b, shape_b) = self._atom(name, from_key), self._atom(name, to_key)
        if a.dtype != b.dtype or shape_a != shape_b:
            raise CheckpointError(f"{b.path}: {tuple(shape_b)} {b.dtype}, but {a.path} is {tuple(shape_a)} {a.dtype}")
        return {a.path: (b.path, b.offset - a.offset)}

    def step(self, name: str):
        """The parameter's step atom (a 0-d tensor or a number): its header, then its few bytes."""
        path = atom_path(self.folder, check_name(name, self.folder), STEP_KEY)
        if not os.path.isfile(path):
            return None
        value = load_file(path, meta=True)
        check_atom(value, path, STEP_KEY)
        return read_scalar(path, value)

    def global_state(self) -> dict:
        if self._global is None:
            path = optimizer_state_path(self.folder)
            self._global = check_global_optimizer_state(load_file(path, mmap=False), path)
        return self._global


class NewVocabRows:
    """This run's vocabulary (``cfg.vocab_size``) is larger than the checkpoint's ``kept`` rows: a
    deliberate extension (``--allow-vocab-extension``). Rows [kept, vocab) of every VOCAB parameter's fp32
    master are initialised as a fresh model's (``layout.init.new_vocab_rows``: the trainer's own init,
    the same at every layout); their Adam moments stay zero, as the plans leave what they do not read."""

    def __init__(self, cfg: ModelConfig, seed: int, padded_vocab: int, kept: int) -> None:
        self.cfg, self.seed, self.padded_vocab, self.kept = cfg, seed, padded_vocab, kept
        self._infos = {info.name: info for info in model_params(cfg)}
        self.filled: dict[str, int] = {}  # parameter name -> elements this rank initialised

    def fill(self, name: str, window: tuple[int, int], dst: torch.Tensor, tp: int, tp_rank: int) -> None:
        """Initialise the new rows that fall in flat elements ``window`` of this rank's local tensor of
        ``name``, whose fp32 master slot is ``dst`` (flat, ``window``'s length)."""
        info = self._infos.get(name)
        rows = None if info is None else new_vocab_rows(info, self.cfg, self.seed, self.padded_vocab, tp, tp_rank,
                                                        self.kept)
        if rows is None:
            return
        first, values = rows
        lo, hi = max(window[0], first), min(window[1], first + values.numel())
        if lo < hi:
            dst.view(-1)[lo - window[0]:hi - window[0]].copy_(values[lo - first:hi - first])
            self.filled[name] = self.filled.get(name, 0) + hi - lo


@dataclass
class LoadStats:
    """What one rank read: state bytes by plan (the bytes it owns) and how many pieces."""

    state_bytes: int = 0
    pieces: int = 0
    params: set[str] = field(default_factory=set)
    reads: ReadCount = field(default_factory=ReadCount)  # the preadv calls, bytes and files the reads took
    show_progress: bool = False  # a byte progress bar (on a terminal), for one rank


def _plans(source: StateSource, stats: LoadStats, name: str, local_shape: tuple[int, ...], tp: int,
           tp_rank: int, window: tuple[int, int]) -> dict[str, ReadPlan]:
    """Each state's reads of this rank's ``window`` of parameter ``name``: planned once, for the fp32
    master, and moved to the moments' bytes."""
    base = window_plan(source.plan(name, MASTER_KEY, local_shape, tp, tp_rank), window, name)
    plans = {MASTER_KEY: base}
    plans.update({key: rebased(base, source.moves(name, MASTER_KEY, key)) for key in MOMENT_KEYS})
    stats.state_bytes += sum(p.nbytes for p in plans.values())
    stats.pieces += len(plans)
    stats.params.add(name)
    return plans


def _read_all(pieces: list[tuple[ReadPlan, torch.Tensor]], stats: LoadStats, desc: str) -> None:
    """Read each plan into its destination (a contiguous view of the optimizer's own memory), drawing
    the bytes read so far (all planned first: a true total)."""
    with byte_progress(sum(p.nbytes for p, _ in pieces), desc, enabled=stats.show_progress) as bar:
        for plan, dst in pieces:
            read_local(plan, dst, count=stats.reads)
            bar.update(plan.nbytes)


def _zeroed_state(state: dict, like: torch.Tensor, key: str) -> torch.Tensor:
    """The optimizer's ``key`` tensor for the flat partition ``like``, zeroed: its own when it has one of
    that shape (DeepSpeed allocates Adam's moments at start-up), else a new one."""
    own = state.get(like, {}).get(key)
    if torch.is_tensor(own) and own.shape == like.shape and own.dtype == like.dtype:
        return own.zero_()
    return torch.zeros_like(like)


# Keys of a param group that describe the target's own layout, not a hyperparameter: the experts' group is
# named after the expert-parallel size (``ep_size_<N>``, which DeepSpeed looks its process groups up by) and
# marked ``moe``. A checkpoint's values of these are the source's and are never copied over the target's.
LAYOUT_GROUP_KEYS = ("params", "name", "moe")

ExpertNames = Callable[[str], str]  # a module's local expert parameter name -> its global name


def _load_zero12(opt, source: StateSource, stats: LoadStats, lp_groups_name: str, tp: int, tp_rank: int,
                 new_rows: NewVocabRows | None = None, expert_names: ExpertNames | None = None) -> None:
    """DeepSpeed's ``load_hp_checkpoint_state_from_checkpoint_dir`` (ZeRO-1/2, BF16_Optimizer), with
    every parameter's fragment read by plan: same destinations, same group hyperparameters. An MoE
    model's experts (its ``moe`` group) are read under their global names (``expert_names``); the
    group's ZeRO window is this rank's part of its expert-data-parallel partition, as DeepSpeed set it."""
    optim_sd = source.global_state()
    opt._load_global_state(optim_sd)
    lp_groups = getattr(opt, lp_groups_name)

    def name_of(lp, group: dict) -> str:
        name = opt.param_names[lp]
        if not group.get("moe"):
            return name
        if expert_names is None:
            raise CheckpointError(f"{source.folder}: {name} is an expert parameter but the load was given no "
                                  "expert placement")
        return expert_names(name)
    pieces = []  # (plan, destination): the fp32 master fragment, or a moment's place in its flat state
    flats = []  # per group: {moment: its flat state tensor}, when the group has mapped parameters
    masters = []  # (name, window, its fp32 master fragment)
    for i, group in enumerate(opt.optimizer.param_groups):
        hp = group["params"][0]
        mapped = [lp for lp in lp_groups[i] if lp._hp_mapping is not None]
        flat = {key: _zeroed_state(opt.optimizer.state, hp, key) for key in MOMENT_KEYS} if mapped else {}
        flats.append(flat)
        for lp in mapped:
            mapping = lp._hp_mapping
            addr, hp_addr = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            window = (int(addr.start), int(addr.start) + int(addr.numel))
            # As DeepSpeed's map_to_flat_opt_states leaves them: views of the group's flat moments.
            mapping.optim_fragment = {key: flat[key].narrow(0, hp_addr.start, hp_addr.numel) for key in MOMENT_KEYS}
            plans = _plans(source, stats, name_of(lp, group), tuple(lp.shape), tp, tp_rank, window)
            for key in STATE_KEYS:
                dst = mapping.get_hp_fragment().data if key == MASTER_KEY else mapping.optim_fragment[key]
                pieces.append((plans[key], dst))
            masters.append((name_of(lp, group), window, mapping.get_hp_fragment().data))
    _read_all(pieces, stats, "resharding")
    if new_rows is not None:
        for name, window, dst in masters:
            new_rows.fill(name, window, dst, tp, tp_rank)
    for i, (group, saved) in enumerate(zip(opt.optimizer.param_groups, optim_sd["param_groups"])):
        steps = [source.step(name_of(lp, group)) for lp in lp_groups[i] if lp._hp_mapping is not None]
        if steps:
            if any(not _same_step(s, steps[0]) for s in steps):
                raise CheckpointError(f"{source.folder}: optimizer group {i} has parameters at different steps")
            hp = group["params"][0]
            if steps[0] is not None:
                opt.optimizer.state[hp]["step"] = steps[0]
            opt.optimizer.state[hp].update(flats[i])
        for key, value in saved.items():
            if key not in LAYOUT_GROUP_KEYS:
                group[key] = value


def _same_step(a, b) -> bool:
    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))


def _load_zero3(opt, source: StateSource, stats: LoadStats, tp: int, tp_rank: int,
                new_rows: NewVocabRows | None = None) -> None:
    """DeepSpeed's ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``, each rank reading its own
    ``ceil(numel / DP)`` window of every TP-local parameter (zeros past the end)."""
    import torch.distributed as dist

    if getattr(opt, "swap_optimizer", False):
        raise CheckpointError("the sliced loader does not support ZeRO-3 optimizer offload to NVMe; "
                              "use --universal-loader deepspeed")
    optim_sd = source.global_state()
    opt._load_global_state_stage3(optim_sd)
    # ZeRO-3's form of the global state (ours) carries the step and the hyperparameters inside the
    # inner optimizer state; DeepSpeed's converter writes the ZeRO-1/2 form: the step of any parameter's
    # atom then, and the first param group's hyperparameters.
    inner = optim_sd.get(OPTIMIZER_STATE_DICT)
    first_name = opt.param_names[opt.fp16_groups[0][0]]
    step = inner["state"][0]["step"] if inner is not None else source.step(first_name)
    hyper = (inner if inner is not None else optim_sd)["param_groups"][0]
    # Every flat partition (the fp32 master and each moment's) zeroed, then each parameter's window read
    # into its slot: zeros past the end of each window, as DeepSpeed's loader leaves them.
    filled = {}
    for g, flat in enumerate(opt.fp32_partitioned_groups_flat):
        filled[(MASTER_KEY, g)] = flat.data.zero_()
        for key in MOMENT_KEYS:
            filled[(key, g)] = _zeroed_state(opt.optimizer.state, flat, key)
    pieces = []  # (plan, its slot in a flat partition)
    masters = []  # (name, window, its fp32 master slot)
    for sub_group, fp16_group in enumerate(opt.fp16_groups):
        offset = 0
        for param in fp16_group:
            group = opt._get_param_partition_group(param)
            rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
            numel = int(param.ds_numel)
            part = math.ceil(numel / world)
            window = (min(rank * part, numel), min((rank + 1) * part, numel))
            plans = _plans(source, stats, opt.param_names[param], tuple(param.ds_shape), tp, tp_rank, window)
            for key in STATE_KEYS:  # a ZeRO-3 partition slot, not a TP cut
                pieces.append((plans[key], filled[(key, sub_group)].narrow(0, offset, window[1] - window[0])))
            masters.append((opt.param_names[param], window,
                            filled[(MASTER_KEY, sub_group)].narrow(0, offset, window[1] - window[0])))
            offset += part
    _read_all(pieces, stats, "resharding")
    if new_rows is not None:
        for name, window, dst in masters:
            new_rows.fill(name, window, dst, tp, tp_rank)
    for (key, g), tensor in filled.items():
        flat = opt.fp32_partitioned_groups_flat[g]
        if key == MASTER_KEY:
            opt.optimizer.state[flat]["step"] = step
        else:
            opt.optimizer.state[flat][key] = tensor
    for group in opt.optimizer.param_groups:
        for key, value in hyper.items():
            group[key] = [] if key == "params" else value
    for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
        fp32 = opt.fp32_partitioned_groups_flat[sub_group]
        if sum(fp32.size()) > 0:
            opt.fp16_partitioned_groups_flat[sub_group].data.copy_(fp32.data)
    for sub_group in range(len(opt.fp16_partitioned_groups_flat)):
        updated = opt.unflatten(opt.fp16_partitioned_groups_flat[sub_group], opt.fp16_partitioned_groups[sub_group])
        for partitioned, q in zip(opt.fp16_partitioned_groups[sub_group], updated):
            partitioned.data = q.data


@contextlib.contextmanager
def sliced_universal_load(engine, source: StateSource, tp: int, tp_rank: int, progress: bool = False,
                          new_rows: NewVocabRows | None = None,
                          expert_names: ExpertNames | None = None) -> Iterator[LoadStats]:
    """Within the block, ``engine.load_checkpoint`` runs DeepSpeed's universal-load sequence with our
    sliced reader in place of its per-parameter loader, on ``source``'s files. ``progress``: draw a
    byte progress bar of this rank's reads (on a terminal; pass it on one rank). ``new_rows``: the
    vocabulary rows the checkpoint lacks, initialised after the reads. ``expert_names``: an MoE model's
    local expert parameter name on this rank -> its global name (the one the source knows it by)."""
    opt = engine.optimizer
    stats = LoadStats(show_progress=progress)
    lp_groups_name = next((n for n in ("bit16_groups", "bf16_groups") if hasattr(opt, n)), None)
    if engine.zero_optimization_partition_weights():
        def hook(self, folder, load_optimizer_states, load_from_fp32_weights):
            _load_zero3(self, source, stats, tp, tp_rank, new_rows)
    elif lp_groups_name is not None:
        def hook(self, folder, load_optimizer_states, load_from_fp32_weights):
            _load_zero12(self, source, stats, lp_groups_name, tp, tp_rank, new_rows, expert_names)
    else:
        raise CheckpointError(f"{source.folder}: the sliced loader needs a ZeRO or bf16 optimizer, "
                              f"not {type(opt).__name__}")
    config = engine._config
    saved_flag = config.load_universal_checkpoint
    saved_names = engine.__dict__.get("_get_all_ckpt_names")
    files_engine = engine.checkpoint_engine
    saved_load = files_engine.__dict__.get("load")
    opt._load_universal_checkpoint = types.MethodType(hook, opt)
    # The model-state files (client state, LR scheduler, counters) are the source's own, whatever the
    # target's ZeRO stage would call them.
    files = list(source.model_files)
    engine._get_all_ckpt_names = lambda load_dir, tag: files
    # DeepSpeed reads them whole, twice (its state-dict loader checks the first, then loads it), though a
    # universal-load sequence uses only their small entries: a non-pipeline model's 'module' (its
    # weights, the size of the model) is never touched. Mapped, their bytes are read only where used.
    # (Callers run this inside ``trust.restricted_torch_load``, which routes torch.load through the allowlist.)
    files_engine.load = lambda path, map_location=None: torch.load(path, map_location=map_location, mmap=True)
    config.load_universal_checkpoint = True
    try:
        yield stats
    finally:
        config.load_universal_checkpoint = saved_flag
        del opt._load_universal_checkpoint
        if saved_load is None:
            files_engine.__dict__.pop("load", None)
        else:
            files_engine.load = saved_load
        if saved_names is None:
            engine.__dict__.pop("_get_all_ckpt_names", None)
        else:
            engine._get_all_ckpt_names = saved_names
