"""Saving and resuming through DeepSpeed's own checkpoint layout.

``engine.save_checkpoint`` writes ``<save>/global_stepN/`` (layer files, ``mp_rank_XX_model_states.pt``,
ZeRO optimizer shards) and ``<save>/latest``. Our client state, merged by DeepSpeed into every
``mp_rank_XX`` file, adds:

* ``iteration``, ``consumed_train_samples``, ``tokens``, ``checkpoint_version``;
* ``rng_state``: one dict per data-parallel rank of this model-parallel rank (Megatron's layout);
* ``universal_checkpoint_info``: generated from the parameter table (``layout.ucp_info``);
* ``megatron_ucp``: our metadata (configs, topology, padded and original vocab, the pipeline
  partition DeepSpeed used, versions), which our converter and tools read.

What those are and what the files are called is defined once, in ``checkpoint.format``.

We also keep Megatron's ``latest_checkpointed_iteration.txt`` beside ``latest``.

DeepSpeed writes those files by path (``open``, torch's saver, ``shutil.copyfile``, ``chmod``), so a
symbolic link at any of them, planted in a folder that is resumed in place (``--load X --save X``),
would have the save overwrite whatever it points at. ``save_folder_problem`` finds such entries; the
trainer refuses a ``--save`` folder with one before distributed start-up, and ``save`` checks again,
on every rank, right before each save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist

from megatron_ucp.atomic import HOST, atomic_write
from megatron_ucp.checkpoint.format import (
    ATOM_KEYS,
    LATEST_FILE,
    MEGATRON_TRACKER_FILE,
    MODEL_STATES_RE,
    OPTIM_STATES_RE,
    OPTIMIZER_STATE_FILE,
    SOURCE_TRAINING,
    ZERO3_MODEL_STATES_RE,
    ZERO_DIR,
    CheckpointMetadata,
    PipeEntryRecord,
    Versions,
    atom_file,
    check_atom,
    check_global_optimizer_state,
    check_model_states,
    check_optimizer_shard,
    client_state,
    metadata_from_state,
    model_states_name,
    read_json,
    step_folder_name,
    zero3_model_states_name,
)
from megatron_ucp.checkpoint.compact_index import write_compact_index
from megatron_ucp.checkpoint.manifest import (
    MANIFEST_FILE,
    MANIFEST_KEY,
    STEP_FOLDER_RE,
    checkpoint_problem,
    listing,
    merged_listing,
    newest_complete,
    write_manifest,
)
from megatron_ucp.checkpoint.publish import LATEST_UNIVERSAL, require_verified
from megatron_ucp.checkpoint.trust import (
    CheckpointError,
    check_name,
    load_file,
    one_line,
    path_inside,
    restricted_torch_load,
)
from megatron_ucp.checkpoint.zero import model_state_files, open_zero_checkpoint
from megatron_ucp.config import ModelConfig, TrainConfig
from megatron_ucp.distributed.groups import ParallelState
from megatron_ucp.layout.experts import ExpertPlacement
from megatron_ucp.layout.params import pipe_entries
from megatron_ucp.layout.topology import ParallelLayout
from megatron_ucp.pacing import point
from megatron_ucp.training.sliced_load import NewVocabRows, UniversalSource, ZeroSource, sliced_universal_load


T = TypeVar("T")


def build_metadata(model_cfg: ModelConfig, train_cfg: TrainConfig, state: ParallelState,
                   padded_vocab: int, pipeline_parts: list[int], tokenizer: dict | None = None) -> CheckpointMetadata:
    """This run's metadata at iteration 0; ``save`` stamps each checkpoint's counters into it.
    ``tokenizer``: the run's tokenizer record (type, sha256, vocab_size), None with mock data."""
    return CheckpointMetadata(
        source=SOURCE_TRAINING,
        model_config=model_cfg,
        train_config=train_cfg.to_dict(),
        topology=state.layout,
        original_vocab_size=model_cfg.vocab_size,
        padded_vocab_size=padded_vocab,
        pipeline_parts=tuple(pipeline_parts),
        pipe_entries=tuple(PipeEntryRecord.of(e) for e in pipe_entries(model_cfg)),
        dtype=train_cfg.dtype,
        zero_stage=train_cfg.zero_stage,
        iteration=0,
        consumed_train_samples=0,
        versions=Versions.installed(),
        tokenizer=tokenizer,
    )


# Rank 0's record of the newest iteration the run finished (saved or not), in the save folder: a resume says
# how many iterations it lost.
PROGRESS_FILE = "megatron_ucp_progress.json"
# What a save writes at the top of the save folder, besides the step folder: DeepSpeed's tracker and
# recovery scripts, and Megatron's tracker and our progress record (written by us, atomically).
SAVE_FOLDER_FILES = (LATEST_FILE, MEGATRON_TRACKER_FILE, PROGRESS_FILE, "zero_to_fp32.py", "zero_to_torch.py")


def saved_iterations(train_iters: int, save_interval: int | None) -> set[int]:
    """Every iteration a run to ``train_iters`` may save at (whatever iteration it resumes from)."""
    every = set(range(save_interval, train_iters + 1, save_interval)) if save_interval else set()
    return every | ({train_iters} if train_iters > 0 else set())


def _write_target_problem(path: str, want_folder: bool) -> str | None:
    """Why a save must not write at ``path`` (a link, not a plain file or folder, a file with other
    names); None when it may (also when nothing is there yet)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path}: is a symbolic link (to {os.readlink(path)}), which the save would write through"
    if want_folder:
        return None if stat.S_ISDIR(st.st_mode) else f"{path}: exists and is not a folder"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: exists and is not a regular file"
    if st.st_nlink > 1:
        return f"{path}: has {st.st_nlink} hard links, whose other names the save would overwrite too"
    return None


def _step_folder_problem(folder: str) -> str | None:
    """The first entry under a step folder a save would write through (no link is followed)."""
    problem = _write_target_problem(folder, want_folder=True)
    if problem or not os.path.isdir(folder):
        return problem
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            is_folder = entry.is_dir(follow_symlinks=False)
            problem = _write_target_problem(entry.path, want_folder=is_folder)
            if problem is None and is_folder:
                problem = _step_folder_problem(entry.path)
            if problem:
                return problem
    return None


def save_folder_problem(save_dir: str, iterations: Iterable[int] | None = None) -> str | None:
    """``<path>: <what>`` for the first entry of ``save_dir`` that a save would write through, or None.

    Checked: ``SAVE_FOLDER_FILES`` and the ``global_step<N>`` folders of ``iterations`` (every one
    present when None), with everything under them. Each must be absent, or a regular file with no
    other hard link (a folder for a step folder and folders inside it). Every symbolic link among them
    is refused, wherever it points: DeepSpeed never makes one, so one there was planted or left by
    hand. ``save_dir`` itself may be a link (a folder on scratch storage, say): the user named it.
    """
    if not os.path.lexists(save_dir):
        return None
    if not os.path.isdir(save_dir):
        return f"{save_dir}: exists and is not a folder; cannot save a checkpoint into it"
    for name in SAVE_FOLDER_FILES:
        problem = _write_target_problem(os.path.join(save_dir, name), want_folder=False)
        if problem:
            return problem
    wanted = None if iterations is None else set(iterations)
    for name in sorted(os.listdir(save_dir)):
        m = STEP_FOLDER_RE.match(name)
        if m and (wanted is None or int(m.group(1)) in wanted):
            problem = _step_folder_problem(os.path.join(save_dir, name))
            if problem:
                return problem
    return None


def check_save_folder(save_dir: str, iterations: Iterable[int] | None = None) -> None:
    """``save_folder_problem`` as a one-line ``CheckpointError`` that says nothing was saved."""
    problem = save_folder_problem(save_dir, iterations)
    if problem:
        raise CheckpointError(f"{problem}; refusing to save into {save_dir} (nothing was written; remove the entry "
                              "or save elsewhere)")


def gather_over_dp(obj, state: ParallelState) -> list:
    out = [None] * state.size_of("dp")
    dist.all_gather_object(out, obj, group=state.dp_group)
    return out


@dataclass
class ResumeState:
    iteration: int
    consumed_train_samples: int
    rng_state: dict | None  # this rank's saved RNG, when the layout is unchanged
    source_topology: dict | None
    path: str
    note: str = ""  # what the load changed on purpose (printed by the trainer)


def save(engine, save_dir: str, iteration: int, consumed_samples: int, seq_length: int,
         rng_state: dict, metadata: CheckpointMetadata, state: ParallelState, model_cfg: ModelConfig) -> str:
    """Write ``<save_dir>/global_step<iteration>`` on every rank; return its path.

    Refused on every rank, with nothing written, when an entry the save writes is a link
    (``save_folder_problem``)."""
    if metadata.model_config != model_cfg:
        raise RuntimeError("the checkpoint metadata describes another model than the one being saved")
    rng_states = gather_over_dp(rng_state, state)
    meta = dataclasses.replace(metadata, iteration=iteration, consumed_train_samples=consumed_samples)
    client = client_state(meta, tokens=consumed_samples * seq_length, rng_state=rng_states)
    tag = step_folder_name(iteration)
    if engine.global_steps != iteration:
        raise RuntimeError(f"engine is at step {engine.global_steps} but the trainer at iteration {iteration}")
    # Again right before writing (a link may have appeared during the run), on every rank (ranks on other
    # nodes may see another file system); all refuse together if any one finds a problem.
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, save_folder_problem(save_dir, [iteration]))
    problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(f"{problem}; refusing to save iteration {iteration} into {save_dir} "
                              "(nothing was written)")
    if model_cfg.is_moe:
        # DeepSpeed's MoE save refuses ``universal_checkpoint_info`` in the client state and writes the model's
        # ``universal_checkpoint_info`` attribute under that key instead: the same record, handed over there.
        engine.module.universal_checkpoint_info = client.pop("universal_checkpoint_info")
    client[MANIFEST_KEY] = MANIFEST_FILE  # this save ends with a manifest: a folder without one is unfinished
    folder = os.path.join(save_dir, tag)
    aside = _move_aside(folder)
    dist.barrier()  # nobody writes into the folder before it is moved aside
    with _paced_writes(engine.checkpoint_engine, f"save-{iteration}"):
        engine.save_checkpoint(save_dir, tag=tag, client_state=client)
    dist.barrier()
    if dist.get_rank() == 0:  # the compact index (checkpoint.compact_index), once every rank has saved
        _write_index(folder)
    # Each node lists what it wrote (a save folder need not be shared); rank 0 writes the manifest, last.
    listings: list[dict[str, int] | None] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(listing(folder) if _node_leader() else None, listings, dst=0)

    def publish() -> None:
        assert listings is not None
        write_manifest(folder, merged_listing(listings, folder), iteration, state.layout.to_dict())
        atomic_write(os.path.join(save_dir, MEGATRON_TRACKER_FILE), str(iteration))

    try:
        decided_on_rank0(publish)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the checkpoint of iteration {iteration} is incomplete") from None
    if aside is not None:
        shutil.rmtree(aside)
    return folder


@contextlib.contextmanager
def _paced_writes(checkpoint_engine, name: str):
    """Every file DeepSpeed's checkpoint engine writes passes the pacing point ``name`` first (``pacing``: the
    elastic tests hold one node's ranks inside a save and kill them there)."""
    write, own = checkpoint_engine.save, "save" in vars(checkpoint_engine)

    def paced(*args, **kwargs):
        point(name)
        return write(*args, **kwargs)

    checkpoint_engine.save = paced
    try:
        yield
    finally:
        if own:
            checkpoint_engine.save = write
        else:
            del checkpoint_engine.save  # the class's method again


def _write_index(folder: str) -> None:
    """The step folder's compact index, read from its shards' headers; where rank 0 cannot read them all (a save
    folder that is not shared between nodes), none: a resume then reads the headers themselves."""
    try:
        write_compact_index(folder)
    except (CheckpointError, OSError) as e:
        print(f"no compact index for {folder}: {one_line(e)}", flush=True)


def _node_leader() -> bool:
    """Whether this rank acts for its node on the save folder (local rank 0: one per node)."""
    return os.environ.get("LOCAL_RANK", str(dist.get_rank())) == "0"


def _move_aside(folder: str) -> str | None:
    """A step folder already there for this iteration belongs to a run that got past it (or died saving it):
    its node leader renames it to ``<folder>.old-<host>-<pid>`` (what ``publish.remove_stale_temporaries``
    clears) for the new save, which removes it once complete. Returns the new name, or None."""
    if not _node_leader() or not os.path.isdir(folder):
        return None
    aside = f"{folder}.old-{HOST}-{os.getpid()}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another node on the same file system moved it first
        return None
    return aside


def record_progress(save_dir: str, iteration: int, layout: dict[str, int]) -> None:
    """Rank 0 after each iteration: the newest iteration the run finished (a resume counts what it lost)."""
    os.makedirs(save_dir, exist_ok=True)
    atomic_write(os.path.join(save_dir, PROGRESS_FILE), json.dumps({"iteration": iteration, "topology": layout}),
                 fsync=False)


def read_progress(load_dir: str) -> int | None:
    """The iteration ``record_progress`` last wrote in ``load_dir``; None without a readable record."""
    try:
        doc = read_json(os.path.join(load_dir, PROGRESS_FILE), "a progress record")
    except CheckpointError:
        return None
    value = doc.get("iteration") if isinstance(doc, dict) else None
    return value if type(value) is int and value >= 0 else None


def _unshare_steps(optimizer) -> None:
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def checkpoint_folder(load_dir: str, universal: bool, step: int | None = None) -> str:
    """The folder ``latest_universal`` in ``load_dir`` names, checked to lie inside it, or for a ZeRO checkpoint
    the newest complete ``global_stepN`` (``resume_folder``); ``step``: the folder of that iteration instead
    (``global_step<N>``, ``..._universal``), which must be complete. Raises where there is none."""
    folder = resume_folder(load_dir, universal, step)
    if folder is None:
        raise CheckpointError(f"{load_dir}: no checkpoint in it; nothing to resume from")
    return folder


def resume_folder(load_dir: str, universal: bool, step: int | None = None,
                  say: Callable[[str], Any] = lambda _: None) -> str | None:
    """What ``--load`` resumes from; None when ``load_dir`` holds no checkpoint at all (a fresh start).

    A ZeRO checkpoint: the newest *complete* ``global_stepN`` folder (``checkpoint.manifest``), each newer
    incomplete one reported through ``say``; a folder of only other DeepSpeed tags: the one ``latest`` names.
    A universal checkpoint: the folder ``latest_universal`` names (the converter publishes only verified ones);
    without one, an error.
    ``step``: that iteration's folder, refused when it is missing or incomplete."""
    if step is not None:
        name = step_folder_name(step) + ("_universal" if universal else "")
        folder = path_inside(load_dir, name)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: no such checkpoint folder (--ckpt-step {step})")
        problem = None if universal else checkpoint_problem(folder)
        if problem:
            raise CheckpointError(f"{problem} (--ckpt-step {step})")
        return folder
    if not universal and (found := newest_complete(load_dir, say)) is not None:
        return found
    tracker = os.path.join(load_dir, LATEST_UNIVERSAL if universal else LATEST_FILE)
    if not os.path.isfile(tracker):
        if universal:  # a conversion's output was asked for: its absence is not a fresh start
            raise CheckpointError(f"{tracker}: no such file; nothing to resume from in {load_dir}")
        return None
    with open(tracker) as f:
        tag = f.read().strip()
    return path_inside(load_dir, check_name(tag, tracker, "checkpoint folder name"))


def layout_words(topology: ParallelLayout, moe: bool = False) -> str:
    """``TP.. PP.. DP..``, with the Ulysses degree ``SP..`` when it is not 1 and the expert layout ``EP..`` of an
    MoE model (or wherever it is not 1)."""
    sp = f" SP{topology.degree('sp')}" if topology.degree("sp") != 1 else ""
    ep = f" EP{topology.degree('ep')}" if moe or topology.degree("ep") != 1 else ""
    return f"TP{topology.degree('tp')} PP{topology.degree('pp')} DP{topology.degree('dp')}{sp}{ep}"


def _layout_text(topology, zero_stage, dtype, moe: bool = False) -> str:
    """``layout_words``, ZeRO stage and precision."""
    return f"{layout_words(topology, moe)} ZeRO-{zero_stage} {dtype}"


def expert_rank(state: ParallelState) -> int:
    """This rank's expert-parallel rank, which decides the global experts its local ones are (a hook:
    a test replaces it to load experts into the wrong ranks, a negative control)."""
    return state.rank_in("ep")


def expert_names(engine, state: ParallelState):
    """For an MoE model: this rank's local expert parameter name -> its global name (``layout.experts``);
    None for a dense model."""
    if not getattr(engine, "has_moe_layers", False):
        return None
    placement = ExpertPlacement(max(engine.num_experts), state.size_of("ep"))
    ep_rank = expert_rank(state)
    return lambda name: placement.global_name(name, ep_rank)


def check_resume_state(value, path: str) -> dict:
    """The model-state file ``path`` a resume reads its counters from: typed (``format.check_model_states``),
    with the counters our trainer writes."""
    state = check_model_states(value, path)
    for key in ("iteration", "consumed_train_samples"):
        if key not in state:
            raise CheckpointError(f"{path}: not written by megatron_ucp (no {key!r} in its client state)")
    return state


def _resume_files(folder: str) -> tuple[list[str], dict]:
    """(the model-state files of ``folder`` by mp rank, the first one's checked counters)."""
    model_files = model_state_files(folder)
    if not model_files:
        raise CheckpointError(f"{os.path.join(folder, model_states_name(0))}: missing file; nothing to resume from")
    return model_files, check_resume_state(load_file(model_files[0], meta=True), model_files[0])


def check_load_folder(load_dir: str, universal: bool, step: int | None = None
                      ) -> tuple[str | None, CheckpointMetadata | None]:
    """What ``--load`` resumes from, checked before distributed start-up (the entry point): the folder
    ``resume_folder`` picks, and that folder's first model-state file with the counters a resume reads.
    Returns (that folder, our metadata in that file, or None for a checkpoint we did not write); (None, None)
    when ``load_dir`` holds no checkpoint yet (the run starts from scratch)."""
    folder = resume_folder(load_dir, universal, step)
    if folder is None:
        return None, None
    return folder, folder_metadata(folder)


def folder_metadata(folder: str) -> CheckpointMetadata | None:
    """Our metadata in the first model-state file of ``folder`` (checked, with the counters a resume reads)."""
    model_files, state = _resume_files(folder)
    return metadata_from_state(state, model_files[0])


def check_loaded_file(path: str, loaded) -> None:
    """What DeepSpeed's own loaders unpickle (``trust.restricted_torch_load``), checked before they use it:
    model states, ZeRO optimizer shards and a universal folder's global optimizer state."""
    name = os.path.basename(path)
    if MODEL_STATES_RE.match(name) or ZERO3_MODEL_STATES_RE.match(name):
        check_model_states(loaded, path)
    elif OPTIM_STATES_RE.match(name):
        check_optimizer_shard(loaded, path, stage3=None, lenient=True)
    elif name == OPTIMIZER_STATE_FILE:
        check_global_optimizer_state(loaded, path)
    elif name in ATOM_FILES and os.path.basename(os.path.dirname(os.path.dirname(path))) == ZERO_DIR:
        check_atom(loaded, path, name[:-len(".pt")])


ATOM_FILES = {atom_file(key) for key in ATOM_KEYS}  # a universal folder's zero/<param>/<key>.pt


def check_native_files(folder: str, state: ParallelState) -> None:
    """Before DeepSpeed's native loader reads a ZeRO checkpoint at this run's layout: each rank checks the
    model-state file and the optimizer shard it will read (DeepSpeed reads only its own), and the first
    problem any rank found is raised on every rank; a rank failing alone would leave the others waiting in
    a collective (or training on with the rest of the state)."""
    mp, dp = state.get_model_parallel_rank(), state.zero_rank  # the file of its ZeRO partition (dp x sp)
    problem = None
    try:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            m = OPTIM_STATES_RE.match(name)
            if m and (int(m.group(2)), int(m.group(3))) == (dp, mp):
                check_optimizer_shard(load_file(path, meta=True), path, stage3=None, lenient=True)
            elif name in (model_states_name(mp), zero3_model_states_name(mp, dp)):
                check_model_states(load_file(path, meta=True), path)
    except CheckpointError as e:
        problem = str(e)
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        dist.barrier()  # every rank fails here together: none tears its groups down under a peer's gloo traffic
        raise CheckpointError(first)


def load_route(folder: str, universal: bool, state: ParallelState, cfg: TrainConfig, extend: bool = False):
    """(what the load does, in words; the sliced source, or None for DeepSpeed's own loader).

    A universal folder is read by our sliced reader unless ``--universal-loader deepspeed``. A ZeRO
    checkpoint saved at this run's layout (TP, PP, DP, ZeRO stage, precision) loads through DeepSpeed's
    native path; at any other layout it is resharded directly from its shards. ``extend``: the run's
    vocabulary is larger than the checkpoint's, which only the sliced reader initialises, so it reads
    at every layout."""
    model_files, resume_state = _resume_files(folder)
    meta = metadata_from_state(resume_state, model_files[0])
    moe = meta is not None and meta.model_config.is_moe
    if extend and cfg.universal_loader == "deepspeed":
        raise CheckpointError(f"{folder}: --allow-vocab-extension needs --universal-loader ours: DeepSpeed's loader "
                              "would leave the new vocabulary rows zero")
    experts = ""
    if moe and meta is not None and meta.topology is not None:  # the expert layout of a universal load
        experts = f", experts EP{meta.topology.degree('ep')} -> EP{state.layout.degree('ep')}"
    if universal:
        if cfg.universal_loader == "deepspeed":
            ep = state.layout.degree("ep")
            if moe and ep > 1:  # its atoms are per global expert (ours and DeepSpeed's converter alike)
                raise CheckpointError(f"{folder}: DeepSpeed's universal loader reads each expert's atom by this run's "
                                      f"local parameter name, which at EP {ep} is another global expert on every "
                                      "expert-parallel rank but the first; use --universal-loader ours (or EP 1)")
            return f"universal checkpoint, DeepSpeed's loader{experts}", None
        return f"universal checkpoint, sliced loader{experts}", UniversalSource(folder)
    if meta is None or meta.topology is None:
        return "same layout (no metadata)", None
    saved, now = (meta.topology, meta.zero_stage, meta.dtype), (state.layout, cfg.zero_stage, cfg.dtype)
    src, dst = _layout_text(*saved, moe=moe), _layout_text(*now, moe=moe)
    if saved == now and not extend:
        return f"same layout ({dst})", None
    if cfg.universal_loader == "deepspeed":
        raise CheckpointError(f"{folder}: saved at {src}, this run is {dst}; DeepSpeed's loader cannot change the "
                              "layout of a ZeRO checkpoint: convert it with tools/ds_to_universal.py and pass "
                              "--universal-checkpoint, or use --universal-loader ours")
    return f"direct reshard {src} -> {dst}", ZeroSource(open_zero_checkpoint(folder))


def decided_on_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0, its result given to every rank. A ``CheckpointError`` or ``OSError`` it raises is
    raised on every rank, as a one-line ``CheckpointError``: no rank waits for an answer that never comes."""
    box: list[tuple[Any, str | None]] = [(None, None)]  # (result, rank 0's error)
    if dist.get_rank() == 0:
        try:
            box[0] = (decide(), None)
        except (CheckpointError, OSError) as e:
            box[0] = (None, one_line(e))
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise CheckpointError(error)
    return result


def agreed_folder(load_dir: str, universal: bool, step: int | None) -> str | None:
    """``resume_folder`` as rank 0 finds it (and reports the checkpoints it skips), the same on every rank."""
    return decided_on_rank0(lambda: resume_folder(load_dir, universal, step, say=lambda line: print(line, flush=True)))


def load(engine, load_dir: str, universal: bool, state: ParallelState, cfg: TrainConfig,
         group_hyperparameters: list[dict], new_rows: NewVocabRows | None = None, *, folder: str) -> ResumeState:
    """Resume model, optimizer, scheduler and counters through DeepSpeed's loader.

    On top of DeepSpeed's load:

    * ``cfg.finetune``: iteration, consumed samples, engine step counters and the LR schedule start
      fresh, and every optimizer group takes this run's hyperparameters. Weights and Adam moments are
      loaded (DeepSpeed's ZeRO-1/2 universal loader always loads moments; an imported Hugging Face
      checkpoint has zero moments and step 0).
    * ``folder``: the checkpoint folder in ``load_dir``, as every rank agreed on it (``agreed_folder``).
    * A precision change (say bf16 -> fp16): the loss scaler the checkpoint carries belongs to the old
      precision, so the engine's freshly configured one is kept (fp16 restarts dynamic scaling at its
      initial scale).
    * Every file is unpickled with the allowlist of ``checkpoint.trust`` (DeepSpeed's own loaders
      would run any code a file carries), and a universal folder must carry the completion marker of a
      verified conversion with every file it lists.
    * ``new_rows``: the run's vocabulary extends the checkpoint's (``--allow-vocab-extension``); the sliced
      reader initialises the rows the checkpoint lacks as a fresh model's, and the note reports them.
    * ZeRO-3 universal loads copy group 0's hyperparameters to every group; each group gets its own
      weight decay back (the no-decay group has none). They also give every sub-group the *same* step
      tensor, which Adam increments in place once per sub-group, so the bias correction would run
      ahead by one step per extra sub-group; each sub-group gets its own copy.
    """
    if universal:
        require_verified(folder)
    route, source = load_route(folder, universal, state, cfg, extend=new_rows is not None)
    if source is None and not universal:
        check_native_files(folder, state)
    optimizer = engine.optimizer
    fresh_scaler = {k: getattr(optimizer, k) for k in ("loss_scaler", "dynamic_loss_scale") if hasattr(optimizer, k)}
    stats = None
    with contextlib.ExitStack() as stack:
        # DeepSpeed unpickles with weights_only=False; we do not, and check what it reads before it uses it
        stack.enter_context(restricted_torch_load(check=check_loaded_file))
        if source is not None:
            stats = stack.enter_context(sliced_universal_load(engine, source, state.size_of("tp"), state.rank_in("tp"),
                                                              progress=dist.get_rank() == 0, new_rows=new_rows,
                                                              expert_names=expert_names(engine, state)))
        path, client = engine.load_checkpoint(load_dir, tag=os.path.basename(folder), load_optimizer_states=True,
                                              load_lr_scheduler_states=not cfg.finetune)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint to load in {load_dir}")
    check_resume_state(client, path)
    meta = metadata_from_state(client, path)
    notes = [route]
    if stats is not None:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, stats.state_bytes)
        notes.append(f"state bytes read per rank: {', '.join(f'{b:,}' for b in per_rank)}")
    if new_rows is not None:
        filled: list[dict[str, int]] = [{}] * dist.get_world_size()
        dist.all_gather_object(filled, new_rows.filled)
        names = sorted({name for rank in filled for name in rank})
        vocab = new_rows.cfg.vocab_size
        notes.append(f"vocabulary extended from {new_rows.kept} to {vocab} rows: rows {new_rows.kept}..{vocab - 1} "
                     f"of {', '.join(names) or 'no parameter'} initialised as a fresh model's (seed "
                     f"{new_rows.seed}), their Adam moments zero")
    if meta is not None and meta.dtype != cfg.dtype:
        for key, value in fresh_scaler.items():
            setattr(optimizer, key, value)
        notes.append(f"precision {meta.dtype} -> {cfg.dtype}: loss scaler reset")
    groups = optimizer.param_groups
    if len(groups) != len(group_hyperparameters):
        raise RuntimeError(f"{path}: the optimizer has {len(groups)} groups, expected {len(group_hyperparameters)}")
    if cfg.finetune:
        for group, hp in zip(groups, group_hyperparameters):
            group.update(hp)
        engine.global_steps = 0
        engine.global_samples = 0
        engine.skipped_steps = 0
        notes.append("fine-tuning: iteration, data position and LR schedule start fresh")
        iteration, consumed = 0, 0
    else:
        if (universal or source is not None) and cfg.zero_stage == 3:  # a universal-load sequence ran
            for group, hp in zip(groups, group_hyperparameters):
                group["weight_decay"] = hp["weight_decay"]
            _unshare_steps(optimizer)
        iteration, consumed = int(client["iteration"]), int(client["consumed_train_samples"])
    source_layout = meta.topology if meta is not None else None
    source_topology = source_layout.to_dict() if source_layout is not None else None
    rng = None
    if source_layout == state.layout and client.get("rng_state"):
        rng = client["rng_state"][state.rank_in("dp")]
    return ResumeState(
        iteration=iteration,
        consumed_train_samples=consumed,
        rng_state=rng,
        source_topology=source_topology,
        path=path,
        note="".join(f"; {n}" for n in notes),
    )
