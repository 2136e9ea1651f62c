"""Read a DeepSpeed ZeRO-1/2/3 checkpoint folder (``<save>/global_stepN``) without loading it whole.

Files (DeepSpeed 0.19.8's checkpoint layout):

* ``mp_rank_XX_model_states.pt``: one per model-parallel rank, ``XX = pp * TP + tp`` under a
  PipelineModule; holds ``param_shapes`` (TP-local shapes per optimizer group), counters and our
  client state (``universal_checkpoint_info``, ``megatron_ucp`` metadata).
* ``[bf16_]zero_pp_rank_{dp}_mp_rank_{XX}_optim_states.pt``: rank ``dp``'s flat fp32 partition and
  Adam moments per group, plus ``param_slice_mappings`` (name -> (numel, start) in that partition).
  Despite its name, ``pp_rank`` is the data-parallel rank.
* ZeRO-3 instead writes ``zero_pp_rank_{dp}_mp_rank_XX_model_states.pt`` on every DP rank, and its
  optimizer files hold ``fp32_flat_groups`` (one flat partition per sub-group) without slice
  mappings: each parameter, in ``param_shapes`` order, owns ``ceil(numel / DP)`` elements of every
  rank's flat partition, rank ``r`` holding elements ``[r * c, (r + 1) * c)`` (the last one padded).

Opening a checkpoint reads only the pickles: optimizer files are loaded onto the ``meta`` device,
which gives every tensor's dtype, shape and byte offset inside the file without touching its data
(the offset as the zip's directory records it: ``checkpoint.torchzip``).
Readers then copy exactly the bytes they need with ``pread`` (``read_into``), straight into their
destination tensors: no mapping of whole files, so memory stays bounded by what is being merged.
Every problem is reported as ``CheckpointError`` naming the file and what is wrong. The files are
untrusted (``checkpoint.trust``): unpickling is restricted, parameter names are checked before they
can become paths, and every fragment is checked to lie inside its flat partition, and every
partition inside its file, before any memory is sized from what a file declares.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from megatron_ucp.checkpoint.format import (  # noqa: F401 - STATE_KEYS: re-exported
    METADATA_KEY,
    MODEL_STATES_RE,
    MOMENT_KEYS,
    OPTIM_STATES_RE,
    STATE_KEYS,
    ZERO3_MODEL_STATES_RE,
    CheckpointMetadata,
    check_model_states,
    check_optimizer_shard,
    metadata_from_state,
    model_states_name,
    optim_states_name,
    zero3_model_states_name,
)
from megatron_ucp.checkpoint.torchzip import stored_nbytes
from megatron_ucp.checkpoint.trust import CheckpointError, check_name, load_file  # noqa: F401 - re-exported
from megatron_ucp.layout.experts import ExpertPlacement, expert_name
from megatron_ucp.layout.slicing import bitwise_equal

# File names (defined in checkpoint.format), under the names this module has always exported.
MODEL_FILE_RE = MODEL_STATES_RE
OPTIM_FILE_RE = OPTIM_STATES_RE
ZERO3_MODEL_FILE_RE = ZERO3_MODEL_STATES_RE

# Keys of DeepSpeed's optimizer files.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
BASE_OPTIMIZER_STATE = "base_optimizer_state"
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
PARAM_SLICE_MAPPINGS = "param_slice_mappings"
FP32_FLAT_GROUPS = "fp32_flat_groups"


@dataclass(frozen=True)
class FlatRef:
    """A flat tensor stored inside a checkpoint file: where its bytes are and how to read them."""

    path: str
    offset: int  # byte offset of element 0 in the file
    numel: int
    dtype: torch.dtype

    @classmethod
    def of(cls, path: str, t: torch.Tensor, span: int | None = None) -> "FlatRef":
        """The flat tensor ``t`` (loaded on the meta device) of ``path``: ``span`` elements from its
        first one (default ``t.numel()``), checked to lie inside its storage and the storage inside the file."""
        if not torch.is_tensor(t):
            raise CheckpointError(f"{path}: expected a tensor, found a {type(t).__name__}")
        storage = t.untyped_storage()
        storage_offset = getattr(storage, "_checkpoint_offset", None)
        if storage_offset is None:
            raise CheckpointError(f"{path}: cannot locate tensor data (not a zip-format torch.save file?)")  # a message
        span = t.numel() if span is None else span
        first = int(t.storage_offset()) * t.element_size()
        end = first + span * t.element_size()
        nbytes = stored_nbytes(storage)
        if t.storage_offset() < 0 or end > nbytes:
            raise CheckpointError(f"{path}: a tensor of {span} {t.dtype} elements runs past its storage of "
                                  f"{nbytes} bytes")
        if int(storage_offset) + nbytes > os.path.getsize(path):
            raise CheckpointError(f"{path}: declares a storage of {nbytes} bytes at byte {storage_offset}, "
                                  f"past the end of the file ({os.path.getsize(path)} bytes)")
        return cls(path, int(storage_offset) + first, span, t.dtype)


def read_into(ref: FlatRef, start: int, dst: torch.Tensor) -> None:
    """Copy elements [start, start + dst.numel()) of ``ref`` into the contiguous tensor ``dst``."""
    if dst.dtype != ref.dtype:
        raise CheckpointError(f"{ref.path}: holds {ref.dtype} elements where {dst.dtype} ones are read "
                              "(optimizer state in another dtype than the fp32 master is not read)")
    if not dst.is_contiguous():
        raise CheckpointError(f"{ref.path}: read_into needs a contiguous {ref.dtype} destination")
    if start < 0 or start + dst.numel() > ref.numel:
        raise CheckpointError(f"{ref.path}: fragment [{start}, {start + dst.numel()}) outside a tensor of {ref.numel}")
    nbytes = dst.numel() * dst.element_size()
    if nbytes == 0:
        return
    view = dst.view(torch.uint8).view(-1).numpy().data  # ndarray.data: the array's bytes as a memoryview
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        pread_exact(fd, view, ref.offset + start * dst.element_size(), ref.path)
    finally:
        os.close(fd)


def pread_exact(fd: int, view: memoryview, pos: int, path: str) -> None:
    """Fill ``view`` from byte ``pos`` of the open file ``fd``: a short read (a signal, the 2 GiB cap of one
    call) is continued; the file ending first is a CheckpointError naming ``path``."""
    done, nbytes = 0, len(view)
    while done < nbytes:
        n = os.preadv(fd, [view[done:done + (1 << 30)]], pos + done)
        if n <= 0:
            raise CheckpointError(f"{path}: truncated: ends before byte {pos + nbytes}")
        done += n


def stored_equals(ref: FlatRef, tensor: torch.Tensor, chunk_elems: int = 1 << 20) -> bool:
    """Whether the stored flat tensor ``ref`` equals ``tensor`` bitwise, read a chunk at a time (no
    mapping whose pages would stay resident)."""
    flat = tensor.contiguous().view(-1)
    if flat.numel() != ref.numel or flat.dtype != ref.dtype:
        return False
    buf = torch.empty(min(chunk_elems, max(ref.numel, 1)), dtype=ref.dtype)
    for start in range(0, ref.numel, chunk_elems):
        n = min(chunk_elems, ref.numel - start)
        read_into(ref, start, buf[:n])
        if not bitwise_equal(buf[:n], flat[start:start + n]):
            return False
    return True


@dataclass
class Fragment:
    """One data-parallel rank's piece of a parameter: ``numel`` elements at ``start`` of its partition."""

    dp: int
    start: int
    numel: int


@dataclass
class ParamSource:
    """Where every piece of one parameter lives, for the pipeline stage we read it from."""

    name: str
    pp: int
    group: int
    local_shapes: list[tuple[int, ...]]  # per TP rank
    fragments: list[list[Fragment]]  # per TP rank, in DP order, covering the local tensor exactly


@dataclass
class ZeroCheckpoint:
    folder: str
    tp: int
    pp: int
    dp: int
    zero_stage: int
    bf16_prefix: bool
    iteration: int | None
    model_files: list[str]  # indexed by mp rank
    model_states: list[dict]  # small: module is None under a PipelineModule
    optim_files: dict[tuple[int, int], str]  # (dp, mp) -> path
    param_sources: dict[str, ParamSource] = field(default_factory=dict)
    # (dp, mp) -> per optimizer group: {"fp32" | "exp_avg" | "exp_avg_sq": FlatRef}
    flat_refs: dict[tuple[int, int], list[dict[str, FlatRef]]] = field(default_factory=dict)
    steps: dict[tuple[int, int], list] = field(default_factory=dict)  # (dp, mp) -> per group step value
    # our metadata (checked and upgraded), None for checkpoints we did not write
    checkpoint_metadata: CheckpointMetadata | None = None
    # mixture of experts: the optimizer group holding the experts and where each expert lives (None: dense)
    experts: "ExpertIndex | None" = None
    # where the model states and shard headers were read from: "file headers", "compact index <file>", or the
    # headers with the reason a compact index was not used
    index_note: str = "file headers"

    @property
    def ep(self) -> int:
        return 1 if self.experts is None else self.experts.placement.ep

    @property
    def topology(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, **({"ep": self.ep} if self.ep > 1 else {})}

    @property
    def metadata(self) -> dict | None:
        """``checkpoint_metadata`` as plain JSON data, in the current format."""
        return None if self.checkpoint_metadata is None else self.checkpoint_metadata.to_dict()

    @property
    def universal_checkpoint_info(self) -> dict | None:
        return self.model_states[0].get("universal_checkpoint_info")

    def mp_rank(self, pp: int, tp: int) -> int:
        return pp * self.tp + tp

    def optim_file(self, pp: int, tp: int, dp: int) -> str:
        return self.optim_files[(dp, self.mp_rank(pp, tp))]

    def flat_ref(self, pp: int, tp: int, dp: int, group: int, key: str) -> FlatRef:
        return self.flat_refs[(dp, self.mp_rank(pp, tp))][group][key]

    def step(self, pp: int, tp: int, dp: int, group: int):
        return self.steps[(dp, self.mp_rank(pp, tp))][group]


def _list_files(folder: str):
    model, optim, zero3 = {}, {}, {}
    for name in sorted(os.listdir(folder)):
        if m := MODEL_FILE_RE.match(name):
            model[int(m.group(1))] = os.path.join(folder, name)
        elif m := OPTIM_FILE_RE.match(name):
            optim[(int(m.group(2)), int(m.group(3)))] = (os.path.join(folder, name), bool(m.group(1)))
        elif m := ZERO3_MODEL_FILE_RE.match(name):
            zero3[(int(m.group(1)), int(m.group(2)))] = os.path.join(folder, name)
    return model, optim, zero3


def _by_mp_rank(folder: str, model: dict[int, str], zero3: dict[tuple[int, int], str]) -> tuple[list[str], bool]:
    """(the model-state files by mp rank, whether they are ZeRO-3's): ``mp_rank_XX_model_states.pt``, or,
    when there are none, DP rank 0's of ZeRO-3's per-DP-rank files. A missing mp rank is a missing file."""
    stage3 = bool(zero3) and not model
    if stage3:  # every DP rank wrote its model states; DP rank 0's stand for each mp rank
        model = {mp: path for (dp, mp), path in zero3.items() if dp == 0}
        if not model:
            raise CheckpointError(f"{os.path.join(folder, zero3_model_states_name(0))}: missing file")
    if model and sorted(model) != list(range(len(model))):
        missing = sorted(set(range(max(model) + 1)) - set(model))
        name = zero3_model_states_name(missing[0]) if stage3 else model_states_name(missing[0])
        raise CheckpointError(f"{os.path.join(folder, name)}: missing file")
    return [model[i] for i in range(len(model))], stage3


def model_state_files(folder: str) -> list[str]:
    """The model-state files of a checkpoint folder (ZeRO or universal) by mp rank; empty if it has none."""
    model, _, zero3 = _list_files(folder)
    return _by_mp_rank(folder, model, zero3)[0]


def open_zero_checkpoint(folder: str, compact: bool = True) -> ZeroCheckpoint:
    """Index a ZeRO-1/2/3 checkpoint folder and check that its files belong together.

    ``compact``: take the model states' index entries and the optimizer shards' headers from the folder's
    compact index (``checkpoint.compact_index``) when it is there and valid, instead of unpickling every
    model-state file and every shard's header; an absent or invalid one falls back to the files
    (``ZeroCheckpoint.index_note`` says which)."""
    folder = os.path.normpath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    model, optim, zero3 = _list_files(folder)
    model_files, stage3 = _by_mp_rank(folder, model, zero3)
    if not model_files:
        if optim:  # optimizer shards without the file that says what they hold
            raise CheckpointError(f"{os.path.join(folder, model_states_name(0))}: missing file (the folder holds "
                                  f"{len(optim)} optimizer shards but no model-state file)")
        raise CheckpointError(f"{folder}: no mp_rank_XX_model_states.pt files (not a DeepSpeed checkpoint folder?)")
    if not optim:
        raise CheckpointError(f"{folder}: no *_optim_states.pt files (ZeRO-0 checkpoints cannot be converted)")
    headers: ShardHeaders = read_shard_header
    states, note = None, "file headers"
    if compact and not stage3:
        from megatron_ucp.checkpoint.compact_index import compact_entries  # it imports this module

        found, note = compact_entries(folder, model_files, {k: v[0] for k, v in optim.items()})
        if found is not None:
            states, shard_headers = found
            headers = shard_headers.__getitem__
    if states is None:
        # Only their small entries are read: the pickle alone (no tensor data), DeepSpeed's classes as stand-ins
        # (importing DeepSpeed costs about half a second, which the converter spends beside its copies instead).
        states = [check_model_states(load_file(p, meta=True), p) for p in model_files]
    return index_zero_checkpoint(folder, model_files, states, optim, stage3, headers, note)


# What the index uses of a model-state file (``index_zero_checkpoint``, ``expert_index``, ``ZeroCheckpoint``'s
# properties): the compact index keeps these, and only these.
MODEL_STATE_INDEX_KEYS = ("iteration", "global_steps", "skipped_steps", "dp_world_size", "mp_world_size",
                          "checkpoint_parallel_dimensions", "param_shapes", "universal_checkpoint_info",
                          "num_experts", METADATA_KEY)


# Where an optimizer shard's header comes from: its pickle (``read_shard_header``), a compact index, or a
# simulation (``checkpoint.synthetic``). Keyed by the shard's path.
ShardHeaders = Callable[[str], "ShardHeader"]


def index_zero_checkpoint(folder: str, model_files: list[str], states: list[dict],
                          optim: dict[tuple[int, int], tuple[str, bool]], stage3: bool,
                          headers: ShardHeaders, note: str = "file headers") -> ZeroCheckpoint:
    """The index of a checkpoint from its model states (``states``, by mp rank, checked) and its optimizer
    files (``optim``: (dp, mp) -> (path, bf16 prefix)), each ZeRO-1/2 shard's header given by ``headers``."""
    n_mp = len(model_files)
    first = states[0]
    meta = metadata_from_state(first, model_files[0])
    dims = first.get("checkpoint_parallel_dimensions")
    if dims:
        tp, pp = int(dims["tp_degree"]), int(dims["pp_degree"])
    elif meta is not None and meta.topology is not None:
        tp, pp = meta.topology.tp, meta.topology.pp
    else:
        tp, pp = n_mp, 1
    if meta is not None and meta.topology is not None and (meta.topology.tp, meta.topology.pp) != (tp, pp):
        raise CheckpointError(f"{model_files[0]}: our metadata records TP {meta.topology.tp} x PP {meta.topology.pp}, "
                              f"but DeepSpeed recorded TP {tp} x PP {pp} for these files")
    if tp * pp != n_mp:
        raise CheckpointError(f"{model_files[0]}: records TP {tp} x PP {pp} but the folder has {n_mp} mp_rank files")
    for path, st in zip(model_files, states):
        if st.get("mp_world_size", n_mp) != n_mp:
            raise CheckpointError(f"{path}: mp_world_size {st.get('mp_world_size')} but the folder has {n_mp} files")
        if st.get("global_steps") != first.get("global_steps") or st.get("iteration") != first.get("iteration"):
            raise CheckpointError(f"{path}: from iteration {st.get('iteration', st.get('global_steps'))}, but "
                                  f"{model_files[0]} is from iteration {first.get('iteration', first.get('global_steps'))}"
                                  " (mixed checkpoints)")
        if st.get("param_shapes") is None:
            raise CheckpointError(f"{path}: no param_shapes (a ZeRO-0 checkpoint cannot be converted)")
    prefixes = {bf16 for _, bf16 in optim.values()}
    if len(prefixes) > 1:
        raise CheckpointError(f"{folder}: mixes bf16_zero_* and zero_* optimizer files")
    # The data-parallel degree the files were written at; a missing shard is then a missing name.
    dp = int(first.get("dp_world_size") or (len(optim) + n_mp - 1) // n_mp)
    if len(optim) > dp * n_mp:
        raise CheckpointError(f"{folder}: {len(optim)} optimizer files, more than DP {dp} x {n_mp} mp ranks "
                              f"recorded in {model_files[0]}")
    bf16 = prefixes.pop()
    for d in range(dp):
        for m in range(n_mp):
            if (d, m) not in optim:
                raise CheckpointError(f"{os.path.join(folder, optim_states_name(m, d, bf16))}: missing file")
    ckpt = ZeroCheckpoint(folder=folder, tp=tp, pp=pp, dp=dp, zero_stage=3 if stage3 else 1, bf16_prefix=bf16,
                          iteration=first.get("iteration", first.get("global_steps")), model_files=model_files,
                          model_states=states, optim_files={k: v[0] for k, v in optim.items()},
                          checkpoint_metadata=meta, index_note="file headers" if stage3 else note)
    if stage3:
        _index_zero3_fragments(ckpt)
    else:
        ckpt.experts = expert_index(ckpt, headers)
        _index_fragments(ckpt, _pipeline_replicated(first), headers)
    return ckpt


@dataclass(frozen=True)
class ShardHeader:
    """What the index uses of one ZeRO-1/2 optimizer shard, per optimizer group: its parameters' fragment
    addresses (name -> (start, numel) in the group's flat partition), where the fp32 master and each
    moment's flat partition lie in the file, the step, and the group's layout keys (``name``, ``moe``)."""

    zero_stage: int
    groups: tuple[dict, ...]  # {"name": str | None, "moe": bool} per param group of the base optimizer
    mappings: tuple[dict[str, tuple[int, int]], ...]
    refs: tuple[dict[str, FlatRef], ...]
    steps: tuple  # per group: a number, a 0-d tensor or None


def read_shard_header(path: str) -> ShardHeader:
    """The header of the optimizer shard ``path``, from its pickle (meta tensors, and the steps' few bytes)."""
    osd = check_optimizer_shard(load_file(path, meta=True), path)
    mappings = osd[PARAM_SLICE_MAPPINGS]
    base = osd[BASE_OPTIMIZER_STATE]
    refs, steps = [], []
    for g in range(len(mappings)):
        state = base["state"].get(g, {})
        if not set(MOMENT_KEYS) <= set(state):
            raise CheckpointError(f"{path}: optimizer group {g} has no exp_avg/exp_avg_sq "
                                  "(only Adam-family optimizers convert)")
        refs.append({"fp32": FlatRef.of(path, osd[SINGLE_PARTITION_OF_FP32_GROUPS][g]),
                     "exp_avg": FlatRef.of(path, state["exp_avg"]),
                     "exp_avg_sq": FlatRef.of(path, state["exp_avg_sq"])})
        steps.append(read_scalar(path, state.get("step")))
    groups = tuple({"name": None if group.get("name") is None else str(group.get("name")),
                    "moe": bool(group.get("moe"))} for group in base.get("param_groups") or []
                   if isinstance(group, dict))
    return ShardHeader(int(osd.get("zero_stage", 1)), groups,
                       tuple({name: (int(a.start), int(a.numel)) for name, a in m.items()} for m in mappings),
                       tuple(refs), tuple(steps))


# An expert parameter's name (``layout.experts.expert_name``): its index counts the experts of one
# expert-parallel rank (local) in module and optimizer files, all experts of a layer (global) in ours.
_EP_GROUP_RE = re.compile(r"^ep_size_(\d+)$")  # DeepSpeed's name of the experts' optimizer group
# DeepSpeed's per-expert weight files: MoE layer l of the file's pipeline stage, global expert g, mp rank XX
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def expert_of(name: str) -> int | None:
    """The expert index in a DeepSpeed expert parameter's name (``...deepspeed_experts.<i>....``), or None."""
    e = expert_name(name)
    return None if e is None else e.index


@dataclass(frozen=True)
class ExpertIndex:
    """The experts of a ZeRO-1/2 MoE checkpoint: optimizer group ``group`` holds them, placed by
    ``placement`` (DP rank ``d`` is expert-parallel rank ``d % ep`` and expert-data-parallel rank
    ``d // ep``; ZeRO partitions the group over the ``dp / ep`` ranks of one expert-parallel rank)."""

    group: int
    placement: ExpertPlacement

    def global_name(self, local: str, dp: int, where: str) -> str:
        """The global name of DP rank ``dp``'s local expert parameter ``local``."""
        e = expert_name(local)
        if e is None:
            raise CheckpointError(f"{where}: {local} lies in the experts' optimizer group {self.group} but is not "
                                  "named as a DeepSpeed expert (...deepspeed_moe.experts.deepspeed_experts.<i>...)")
        if e.index >= self.placement.num_local:
            raise CheckpointError(f"{where}: {local}: local expert {e.index} outside the {self.placement.num_local} "
                                  "experts of an expert-parallel rank")
        return self.placement.global_name(local, dp % self.placement.ep)

    def global_names(self, local: str, where: str) -> list[str]:
        """Every expert-parallel rank's global name of the local name ``local``, in rank order."""
        return [self.global_name(local, r, where) for r in range(self.placement.ep)]


def expert_index(ckpt: ZeroCheckpoint, headers: ShardHeaders | None = None) -> ExpertIndex | None:
    """Where a ZeRO-1/2 checkpoint's experts live, or None for a dense one. The expert-parallel size is
    our metadata's topology; a checkpoint without it (plain DeepSpeed) names it in its experts'
    optimizer group (``ep_size_N``). The experts per layer: the local experts of the optimizer files
    times the expert-parallel size, checked against our config and DeepSpeed's ``num_experts``."""
    path = ckpt.optim_file(0, 0, 0)
    header = (headers or read_shard_header)(path)
    groups = header.groups
    moe = [g for g, group in enumerate(groups) if group.get("moe")]
    meta = ckpt.checkpoint_metadata
    ours_moe = meta is not None and meta.model_config.num_experts is not None
    if not moe:
        if ours_moe:
            raise CheckpointError(f"{path}: no optimizer group marked moe, but {ckpt.model_files[0]} records an "
                                  f"MoE model of {meta.model_config.num_experts} experts")  # type: ignore[union-attr]
        return None
    if len(moe) > 1:
        raise CheckpointError(f"{path}: {len(moe)} expert optimizer groups ({moe}); one expert-parallel size is read")
    group = moe[0]
    named = _EP_GROUP_RE.match(str(groups[group].get("name", "")))
    if meta is not None and meta.topology is not None:
        ep = meta.topology.degree("ep")
        if named and int(named.group(1)) != ep:
            raise CheckpointError(f"{path}: expert group {groups[group].get('name')!r}, but {ckpt.model_files[0]} "
                                  f"records expert parallel size {ep}")
    elif named:
        ep = int(named.group(1))
    else:
        raise CheckpointError(f"{path}: cannot tell the expert parallel size: optimizer group {group} is marked moe "
                              f"but named {groups[group].get('name')!r}, not 'ep_size_<N>', and "
                              f"{ckpt.model_files[0]} has no megatron_ucp topology")
    if ep < 1 or ckpt.dp % ep:
        raise CheckpointError(f"{path}: expert parallel size {ep} does not divide the {ckpt.dp} data-parallel ranks")
    mappings = header.mappings
    if group >= len(mappings):
        raise CheckpointError(f"{path}: no slice mappings for the experts' optimizer group {group}")
    per_layer: dict[tuple[str, str], set[int]] = {}
    for name in mappings[group]:
        e = expert_name(name)
        if e is None:
            raise CheckpointError(f"{path}: {name} lies in the experts' optimizer group {group} but is not named as "
                                  "a DeepSpeed expert (...deepspeed_moe.experts.deepspeed_experts.<i>...)")
        per_layer.setdefault((e.prefix, e.suffix), set()).add(e.index)
    counts = {len(indices) for indices in per_layer.values()}
    if len(counts) != 1 or any(indices != set(range(len(indices))) for indices in per_layer.values()):
        raise CheckpointError(f"{path}: the experts' optimizer group holds local experts {sorted(per_layer.values())} "
                              "per parameter; expected the same 0..n-1 for every one")
    num_experts = counts.pop() * ep
    recorded = [] if not ours_moe else [meta.model_config.num_experts]  # type: ignore[union-attr]
    ds_recorded = ckpt.model_states[0].get("num_experts")
    if isinstance(ds_recorded, (list, tuple)) and ds_recorded:
        recorded.append(max(int(n) for n in ds_recorded))
    elif isinstance(ds_recorded, int):
        recorded.append(ds_recorded)
    if any(n != num_experts for n in recorded):
        raise CheckpointError(f"{path}: holds {num_experts // ep} experts per expert-parallel rank, {num_experts} at "
                              f"expert parallel size {ep}, but {ckpt.model_files[0]} records {recorded[0]} experts")
    return ExpertIndex(group, ExpertPlacement(num_experts, ep))


def _pipeline_replicated(model_state: dict):
    patterns = (model_state.get("universal_checkpoint_info") or {}).get("pipeline_replicated_parameter_patterns", [])
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.match(name) for c in compiled)


def expected_step(model_state: dict) -> int | None:
    steps = model_state.get("global_steps")
    return None if steps is None else steps - model_state.get("skipped_steps", 0)


def _global_shapes(shapes: dict, experts: ExpertIndex | None, where: str) -> Iterator[tuple[str, tuple]]:
    """(name, shape) of every parameter of one optimizer group's ``param_shapes``; in the experts'
    group (whose names are DP rank 0's local ones) each local expert stands for one global expert of
    every expert-parallel rank."""
    for name, shape in shapes.items():
        check_name(name, where)
        for global_name in [name] if experts is None else experts.global_names(name, where):
            yield global_name, shape


def _index_fragments(ckpt: ZeroCheckpoint, pipeline_replicated, headers: ShardHeaders) -> None:
    """Read every optimizer file's slice mappings (its header, from ``headers``) and record where each
    parameter's pieces are. An expert's pieces are those of the DP ranks of its expert-parallel rank, in
    DP (= expert-data-parallel) order, under its global name (``ExpertIndex``)."""
    sources: dict[str, ParamSource] = {}
    experts = ckpt.experts
    for pp in range(ckpt.pp):
        for tp in range(ckpt.tp):
            mp = ckpt.mp_rank(pp, tp)
            shapes = ckpt.model_states[mp]["param_shapes"]
            step = expected_step(ckpt.model_states[mp])
            pieces: dict[str, list[Fragment]] = {}
            groups: dict[str, int] = {}
            for dp in range(ckpt.dp):
                path = ckpt.optim_file(pp, tp, dp)
                header = headers(path)
                ckpt.zero_stage = header.zero_stage
                mappings = header.mappings
                if len(mappings) != len(shapes):
                    raise CheckpointError(f"{path}: {len(mappings)} optimizer groups, but {ckpt.model_files[mp]} "
                                          f"records {len(shapes)}")
                refs, group_steps = list(header.refs), list(header.steps)
                ckpt.flat_refs[(dp, mp)] = refs
                ckpt.steps[(dp, mp)] = group_steps
                for g, mapping in enumerate(mappings):
                    got = group_steps[g]
                    if step is not None and got is not None and int(got) != step:
                        raise CheckpointError(
                            f"{path}: optimizer is at step {int(got)}, but {ckpt.model_files[mp]} is at "
                            f"step {step} (mixed-iteration shard files)")
                    for name, addr in mapping.items():
                        check_name(name, path)
                        if experts is not None and g == experts.group:  # a local expert: its global name
                            name = experts.global_name(name, dp, path)
                        frag = Fragment(dp, addr[0], addr[1])
                        _check_inside_partition(path, name, frag, refs[g])
                        pieces.setdefault(name, []).append(frag)
                        groups[name] = g
            for g, group_shapes in enumerate(shapes):
                for name, shape in _global_shapes(group_shapes, experts if experts and g == experts.group else None,
                                                  ckpt.model_files[mp]):
                    if name in sources and sources[name].pp != pp:
                        if pipeline_replicated(name):
                            continue  # tied weights: the first stage's copy is the one that trains
                        raise CheckpointError(f"{ckpt.model_files[mp]}: parameter {name} appears on stages "
                                              f"{sources[name].pp} and {pp} but is not declared pipeline-replicated")
                    frags = pieces.get(name, [])
                    numel = 1
                    for s in shape:
                        numel *= int(s)
                    if sum(f.numel for f in frags) != numel:
                        raise CheckpointError(f"{ckpt.folder}: fragments of {name} (pp {pp}, tp {tp}) hold "
                                              f"{sum(f.numel for f in frags)} elements, its shape {tuple(shape)} "
                                              f"needs {numel}")
                    src = sources.get(name)
                    if src is None:
                        src = sources[name] = ParamSource(name, pp, g, [], [])
                    src.local_shapes.append(tuple(int(s) for s in shape))
                    src.fragments.append(frags)
    for name, src in sources.items():
        if len(src.fragments) != ckpt.tp:
            raise CheckpointError(f"{ckpt.folder}: parameter {name} found on {len(src.fragments)} of {ckpt.tp} TP ranks")
    ckpt.param_sources = sources


def _index_zero3_fragments(ckpt: ZeroCheckpoint) -> None:
    """ZeRO-3: place each parameter by ``param_shapes`` order, ``ceil(numel / DP)`` elements per rank."""
    if ckpt.pp != 1:
        raise CheckpointError(f"{ckpt.model_files[0]}: a ZeRO-3 checkpoint with pipeline parallel size {ckpt.pp}")
    sources: dict[str, ParamSource] = {}
    for tp in range(ckpt.tp):
        mp = ckpt.mp_rank(0, tp)
        names_shapes = [(check_name(n, ckpt.model_files[mp]), tuple(int(d) for d in s))
                        for g in ckpt.model_states[mp]["param_shapes"] for n, s in g.items()]
        step = expected_step(ckpt.model_states[mp])
        sizes = None
        for dp in range(ckpt.dp):
            path = ckpt.optim_file(0, tp, dp)
            osd = check_optimizer_shard(load_file(path, meta=True), path, stage3=True)
            flats = osd[FP32_FLAT_GROUPS]
            state = osd.get(OPTIMIZER_STATE_DICT, {}).get("state", {})
            refs, group_steps = [], []
            for g, flat in enumerate(flats):
                st = state.get(g, {})
                if not set(MOMENT_KEYS) <= set(st):
                    raise CheckpointError(f"{path}: optimizer sub-group {g} has no exp_avg/exp_avg_sq "
                                          "(only Adam-family optimizers convert)")
                refs.append({"fp32": FlatRef.of(path, flat), "exp_avg": FlatRef.of(path, st["exp_avg"]),
                             "exp_avg_sq": FlatRef.of(path, st["exp_avg_sq"])})
                if len({r.numel for r in refs[-1].values()}) != 1:
                    raise CheckpointError(f"{path}: sub-group {g}'s fp32, exp_avg and exp_avg_sq partitions differ "
                                          f"in size ({[r.numel for r in refs[-1].values()]})")
                rank0 = ckpt.flat_refs.get((0, mp), [])
                _check_one_dtype(path, g, refs[-1], rank0[g] if g < len(rank0) else None)
                got = read_scalar(path, st.get("step"))
                if step is not None and got is not None and int(got) != step:
                    raise CheckpointError(f"{path}: optimizer is at step {int(got)}, but {ckpt.model_files[mp]} is "
                                          f"at step {step} (mixed-iteration shard files)")
                group_steps.append(got)
            these = [r["fp32"].numel for r in refs]
            if sizes is not None and these != sizes:
                raise CheckpointError(f"{path}: flat partition sizes {these} differ from DP rank 0's {sizes}")
            sizes = these
            ckpt.flat_refs[(dp, mp)] = refs
            ckpt.steps[(dp, mp)] = group_steps
        assert sizes is not None  # ckpt.dp >= 1: open_zero_checkpoint found optimizer files
        group, offset = 0, 0
        for name, shape in names_shapes:
            numel = 1
            for d in shape:
                numel *= d
            per_rank = -(-numel // ckpt.dp)
            while group < len(sizes) and offset == sizes[group] and per_rank:
                group, offset = group + 1, 0
            if group >= len(sizes) or offset + per_rank > sizes[group]:
                raise CheckpointError(f"{ckpt.optim_file(0, tp, 0)}: flat partitions too small for the parameters "
                                      f"recorded in {ckpt.model_files[mp]} (at {name})")
            frags = [Fragment(r, offset, min(per_rank, numel - r * per_rank))
                     for r in range(ckpt.dp) if r * per_rank < numel]
            src = sources.setdefault(name, ParamSource(name, 0, group, [], []))
            if src.group != group:
                raise CheckpointError(f"{ckpt.model_files[mp]}: {name} lies in sub-group {group} on TP rank {tp} "
                                      f"but {src.group} on TP rank 0")
            src.local_shapes.append(shape)
            src.fragments.append(frags)
            offset += per_rank
        if group != len(sizes) - 1 or offset != sizes[group]:
            raise CheckpointError(f"{ckpt.optim_file(0, tp, 0)}: flat partitions of {sizes} elements, but the "
                                  f"parameters in {ckpt.model_files[mp]} fill them only to sub-group {group} "
                                  f"element {offset}")
    for name, src in sources.items():
        if len(src.fragments) != ckpt.tp:
            raise CheckpointError(f"{ckpt.folder}: parameter {name} found on {len(src.fragments)} of {ckpt.tp} TP ranks")
    ckpt.param_sources = sources


def _check_one_dtype(path: str, group: int, refs: dict[str, FlatRef], rank0: dict[str, FlatRef] | None) -> None:
    """A ZeRO-3 sub-group's states all have DP rank 0's fp32 master's dtype: parameters are placed by
    element counts, which are byte ranges only at one element size."""
    want = (rank0 or refs)["fp32"]
    for key, ref in refs.items():
        if ref.dtype != want.dtype:
            raise CheckpointError(f"{path}: sub-group {group}'s {key} partition is stored as {ref.dtype}, but the "
                                  f"fp32 master in {want.path} as {want.dtype}; mixed dtypes are not read")


def _check_inside_partition(path: str, name: str, frag: Fragment, refs: dict[str, FlatRef]) -> None:
    """A fragment address taken from a file must lie inside every state's flat partition."""
    for key, ref in refs.items():
        if frag.start < 0 or frag.numel < 0 or frag.start + frag.numel > ref.numel:
            raise CheckpointError(f"{path}: the fragment of {name} at [{frag.start}, {frag.start + frag.numel}) "
                                  f"lies outside its {key} partition of {ref.numel} elements")


def read_scalar(path: str, value):
    """A step value as saved: a python number, or a 0-d tensor whose bytes are read from the file."""
    if value is None or not torch.is_tensor(value):
        return value
    if value.device.type != "meta":
        return value.clone()
    out = torch.empty((), dtype=value.dtype)
    read_into(FlatRef.of(path, value), 0, out.view(1))
    return out
