"""Convert a ZeRO-1/2/3 checkpoint into DeepSpeed's universal format, in one pass.

For ZeRO-1/2 inputs the atoms are exactly what DeepSpeed's ``ds_to_universal`` writes (same dict
keys, ``torch.equal`` tensors). One universal folder loads at every ZeRO stage, whatever stage wrote
it (DeepSpeed's own output does not: its ZeRO-3 atoms are raw flat tensors that ZeRO-1/2 cannot load,
and each stage's loader looks for different files). So beside DeepSpeed's files we write:

* atoms as dicts in the logical shape with their merge keys, and ``step.pt``, for ZeRO-3 inputs too;
* each model-state file under both names the loaders glob, ``mp_rank_XX_model_states.pt`` (ZeRO-1/2)
  and ``zero_pp_rank_0_mp_rank_XX_model_states.pt`` (ZeRO-3), as hard links where possible;
* in ``zero/optimizer_state.pt`` both stages' global keys (``stage_compatible_global_state``).

It is produced differently from DeepSpeed's:

* **One pass, no temporary copy.** Each parameter's DP fragments are read (``pread``) straight from
  the optimizer shards into their place in the full tensor, which is saved once. DeepSpeed first
  writes every fragment to ``tmp/`` and reads it back.
* **Bounded memory.** A worker holds one full state tensor of one parameter at a time (plus one
  fragment when the destination is strided); the shards are never loaded whole.
* **Rules from the parameter table.** Checkpoints written by our trainer carry their model config;
  each parameter's merge rule (``layout.params.Kind``) comes from the table. Replicated parameters
  are checked bitwise equal across TP ranks, vocab padding is stripped to the original vocab, and
  pipeline-tied weights are read from the first stage. Other checkpoints fall back to their
  ``universal_checkpoint_info`` patterns, as DeepSpeed does.
* **Safe.** Output goes to ``<output>.tmp-<host>-<pid>-r<random>`` (created exclusively) next to the
  target and is renamed into place when complete; ``latest_universal`` is written last; a non-empty output is refused unless
  ``overwrite``; the output may not be inside the input.
* **On many processes** (``Partition``; ``torchrun tools/ds_to_universal.py``): the parameters are split
  between them by size, each writes its share into the one staging folder, and the output is the same,
  bit for bit, as one process's. They only synchronise (a few small ``all_gather_object`` calls), and a
  failure in any of them stops all of them before anything is published.

This module orchestrates; the parts live beside it: ``rules`` (merge rules from the metadata), ``plan``
(the one walk of fragments through the placements, as byte-range plans), ``executors`` (running a plan:
into a tensor, into a file), ``atoms`` (the atom codec), ``partition`` (several processes) and ``verify``
(re-reading the output by another route than the plans that wrote it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterator

import torch

from megatron_ucp.checkpoint.atoms import (  # noqa: F401 - skeleton_bytes, stage_compatible_global_state: re-exported
    make_atom,
    merge_keys,
    save,
    skeleton_bytes,
    stage_compatible_global_state,
    write_atom,
    write_planned_atom,
    write_serialized,
)
from megatron_ucp.checkpoint.crosscheck import crosscheck_files
from megatron_ucp.checkpoint.executors import read_local
from megatron_ucp.checkpoint.format import STEP_KEY, atom_file, model_state_names, optimizer_state_path, zero_dir
from megatron_ucp.checkpoint.partition import Partition, assign_params, shared_staging  # noqa: F401 - re-exported
from megatron_ucp.checkpoint.plan import atom_plan, local_plan, numel, pieces, source_bytes
from megatron_ucp.checkpoint.publish import (  # noqa: F401 - LATEST_UNIVERSAL, staged_folder, ...: re-exported
    LATEST_UNIVERSAL,
    UNIVERSAL_KIND,
    check_output_path,
    check_replaceable,
    fingerprint,
    finished_output,
    is_universal_folder,
    remove_stale_temporaries,
    staged_folder,
    write_latest_universal,
    write_marker,
)
from megatron_ucp.checkpoint.rules import (  # noqa: F401 - rules_from_*, source_tp_map: re-exported
    MergeRule,
    conversion_rules,
    rules_from_table,
    rules_from_ucp_info,
    source_tp_map,
)
from megatron_ucp.checkpoint.trust import check_name, path_inside
from megatron_ucp.checkpoint.verify import (  # noqa: F401 - verify_universal: re-exported
    check_atom_names,
    verify_atoms,
    verify_expert_files,
    verify_universal,
)
from megatron_ucp.checkpoint.zero import (
    BASE_OPTIMIZER_STATE,
    FP32_FLAT_GROUPS,
    OPTIMIZER_STATE_DICT,
    PARAM_SLICE_MAPPINGS,
    SINGLE_PARTITION_OF_FP32_GROUPS,
    STATE_KEYS,
    CheckpointError,
    ParamSource,
    ZeroCheckpoint,
    load_file,
    open_zero_checkpoint,
)
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.slicing import bitwise_equal
from megatron_ucp.pacing import point
from megatron_ucp.progress import ByteProgress, byte_progress


@dataclass
class ConvertReport:
    input_folder: str
    output_folder: str
    iteration: int | None
    topology: dict
    params: int
    bytes_written: int
    seconds: float
    workers: int  # threads (in each process)
    verified: bool = False
    notes: list[str] = field(default_factory=list)
    processes: int = 1

    def summary(self) -> str:
        gb = self.bytes_written / 1e9
        rate = gb / self.seconds if self.seconds > 0 else float("nan")
        ver = ", verified" if self.verified else ", NOT verified"
        notes = "".join(f"; {n}" for n in self.notes)
        procs = f" in each of {self.processes} processes" if self.processes > 1 else ""
        if self.workers == 0:  # kept: nothing was converted
            return f"{self.output_folder}: {self.params} parameters of iteration {self.iteration}{notes}"
        return (f"converted {self.params} parameters of iteration {self.iteration} "
                f"(TP{self.topology['tp']} PP{self.topology['pp']} DP{self.topology['dp']}"
                f"{''.join(f' EP{self.topology[a]}' for a in ('ep',) if a in self.topology)}) into "
                f"{self.output_folder}: {gb:.3f} GB in {self.seconds:.2f} s ({rate:.2f} GB/s), "
                f"{self.workers} workers{procs}{ver}{notes}")


def _local_tensors(src: ParamSource, key: str, ckpt: ZeroCheckpoint) -> list[torch.Tensor]:
    """Each source TP rank's local tensor of state ``key``, read as saved (fp32 only)."""
    out = []
    for tp in range(ckpt.tp):
        plan = local_plan(ckpt, src, key, tp)
        if plan.dtype != torch.float32:
            raise CheckpointError(f"{plan.reads[0].path}: holds {plan.dtype} elements where {torch.float32} ones "
                                  "are read (optimizer state in another dtype than the fp32 master is not read)")
        out.append(read_local(plan))
    return out


def merged_state(src: ParamSource, rule: MergeRule, key: str, ckpt: ZeroCheckpoint) -> dict:
    """The universal atom dict of one state of one parameter, built in memory.

    Used for replicated parameters (every TP copy is checked bitwise equal) and for shards that are
    not fp32; sharded fp32 parameters take the copy path below.
    """
    local = src.local_shapes[0]
    if rule.kind is Kind.REPLICATED:
        full, *copies = _local_tensors(src, key, ckpt)
        for tp, copy in enumerate(copies, 1):
            if not bitwise_equal(full, copy):
                raise CheckpointError(f"{ckpt.folder}: TP-replicated parameter {src.name} ({key}) differs between "
                                      f"TP rank 0 and TP rank {tp}; refusing to average it silently")
        return make_atom({}, full)
    if any(s != local for s in src.local_shapes):
        raise CheckpointError(f"{ckpt.folder}: {src.name} has uneven TP shapes {src.local_shapes}")
    merge_map = source_tp_map(src, rule, ckpt.tp, ckpt.folder).inverted()  # drops the vocabulary's padding rows
    locals_ = _local_tensors(src, key, ckpt)
    full = merge_map.apply(locals_, 0).clone()  # a view at TP 1: do not carry padding storage into the file
    del locals_
    return make_atom(merge_keys(rule), full)


def convert_param(src: ParamSource, rule: MergeRule, ckpt: ZeroCheckpoint, atoms_dir: str) -> int:
    """Write ``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`` for one parameter; return bytes written.

    Sharded parameters are copied file to file; replicated ones are read (they are small) so that
    every TP rank's copy can be checked bitwise equal.
    """
    out_dir = path_inside(atoms_dir, check_name(src.name, ckpt.folder))
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    step = ckpt.step(src.pp, 0, src.fragments[0][0].dp, src.group)
    if step is not None:
        step_key = ("step", repr(step), str(step.dtype) if torch.is_tensor(step) else type(step).__name__)
        written += write_serialized(step.clone() if torch.is_tensor(step) else step, step_key,
                                    os.path.join(out_dir, atom_file(STEP_KEY)))
    sources_are_fp32 = all(p.ref is not None and p.ref.dtype == torch.float32
                           for k in STATE_KEYS for p in pieces(src, ckpt, k))
    for key in STATE_KEYS:
        path = os.path.join(out_dir, atom_file(key))
        if rule.kind is Kind.REPLICATED or not sources_are_fp32:
            atom = merged_state(src, rule, key, ckpt)
            written += write_atom(atom, path)
            del atom
        else:
            written += write_planned_atom(atom_plan(ckpt, src, rule, key), merge_keys(rule), path,
                                          gather=rule.kind is Kind.ROW)
    point("param-written")
    return written


def optimizer_state(ckpt: ZeroCheckpoint) -> dict:
    """``zero/optimizer_state.pt`` from the (pp0, tp0, dp0) optimizer file: its small global entries,
    the param groups and the step, in the form every stage's loader reads."""
    saved = load_file(ckpt.optim_file(0, 0, 0), mmap=True)
    osd = saved[OPTIMIZER_STATE_DICT]
    if ckpt.zero_stage == 3:
        inner = osd[OPTIMIZER_STATE_DICT]
        param_groups = inner["param_groups"]
        small = {k: v for k, v in osd.items() if k not in (OPTIMIZER_STATE_DICT, FP32_FLAT_GROUPS)}
        small["ds_version"] = saved.get("ds_version")
    else:
        param_groups = osd[BASE_OPTIMIZER_STATE]["param_groups"]
        sharded = (BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)
        small = {k: v for k, v in osd.items() if k not in sharded}
    return stage_compatible_global_state(small, param_groups, ckpt.step(0, 0, 0, 0))


def place_model_states(src: str, folder: str, mp_rank: int) -> int:
    """Copy ``src`` to the first name of ``model_state_names`` and hard-link the second; bytes written."""
    first, second = (os.path.join(folder, n) for n in model_state_names(mp_rank))
    shutil.copy2(src, first)
    try:
        os.link(first, second)
    except OSError:  # a file system without hard links
        shutil.copy2(first, second)
    return os.path.getsize(first)


def conversion_request(ckpt: ZeroCheckpoint, strict: bool, inject_missing_state: bool) -> dict:
    """What a conversion was asked to do: a finished output of the same request is kept on a rerun."""
    files = [os.path.join(ckpt.folder, n) for n in sorted(os.listdir(ckpt.folder))]
    return {"tool": "megatron_ucp.ds_to_universal", "input": ckpt.folder,
            "input_fingerprint": fingerprint([f for f in files if os.path.isfile(f)]),
            "strict": strict, "inject_missing_state": inject_missing_state}


def _write_share(ckpt: ZeroCheckpoint, rules: dict[str, MergeRule], sources: list[ParamSource], folder: str,
                 n_workers: int, lead: bool, bar: ByteProgress) -> int:
    """Write the atoms of ``sources`` into ``folder``; the lead process also ``optimizer_state.pt`` and the
    model-state files. Bytes written."""
    atoms_dir = zero_dir(folder)
    written = 0
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        # optimizer_state.pt needs DeepSpeed's real classes (importing DeepSpeed takes a while):
        # it runs beside the copies instead of after them.
        global_state = pool.submit(lambda: save(optimizer_state(ckpt), optimizer_state_path(folder))) if lead else None
        futures = {pool.submit(convert_param, src, rules[src.name], ckpt, atoms_dir): src for src in sources}
        for fut in as_completed(futures):
            written += fut.result()
            bar.update(source_bytes(futures[fut], ckpt, STATE_KEYS))
        if global_state is not None:
            written += global_state.result()
    if lead:
        for mp, path in enumerate(ckpt.model_files):
            written += place_model_states(path, folder, mp)
    return written


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The converter's worker threads are its parallelism. torch's intra-op (OpenMP) pool would run beside
    them on the same cores, its threads spinning between the workers' copies: on 2 cores that cost the
    354M benchmark checkpoint's conversion 0.3-1.0 s of user CPU and 0.2-2.6 s of wall time in 3 paired
    runs (OMP_NUM_THREADS=1 against the default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def convert_zero_to_universal(input_folder: str, output_folder: str, *, workers: int | None = None,
                              overwrite: bool = False, strict: bool = True, inject_missing_state: bool = False,
                              verify: bool = True, progress: bool = False,
                              partition: Partition | None = None) -> ConvertReport:
    """Convert ``input_folder`` (``<save>/global_stepN``) into a universal checkpoint at ``output_folder``.

    The output is verified against the input before it is published (``verify=False`` skips that;
    verifying also compares a sample of each input file's bytes, as located by our reader, with
    ``torch.load``'s reading of them: ``checkpoint.crosscheck``;
    such an output is marked unverified, is not named by ``latest_universal``, and the trainer refuses
    it). ``latest_universal`` (containing the output folder's name) goes into the output's parent. A
    finished, verified output of the same request is kept as it is, so rerunning after a crash works.
    ``progress`` draws a progress bar on stderr when it is a terminal (``megatron_ucp.progress``).

    Several processes may share the work (``partition``; all call this with the same arguments): the
    parameters are split between them by size (``assign_params``) and each writes its share's atoms into
    process 0's staging folder, with ``workers`` threads each; process 0 alone writes the other files.
    Each process then verifies the share the next process wrote, process 0 writes the marker, publishes
    and writes ``latest_universal``. A failure in any process raises in every process, and then nothing
    is published. The output is the same, bit for bit, whatever the number of processes; only process 0
    draws progress, over the parameters it converts, then over those it verifies.
    """
    part = partition or Partition()
    lead = part.rank == 0
    t0 = time.time()
    with part.together() as step:
        inp, out = check_output_path(input_folder, output_folder)
        ckpt = open_zero_checkpoint(inp)
        request = conversion_request(ckpt, strict, inject_missing_state)
        point("indexed")
        step.share = (request["input_fingerprint"], lead and finished_output(out, UNIVERSAL_KIND, request) is not None)
    for r, (seen, _) in enumerate(step.gathered):  # the same decision in every process: no one waits alone
        if seen != step.gathered[0][0]:
            raise CheckpointError(f"{inp}: conversion process {r} sees other files (names, sizes or times) than "
                                  "process 0; every process must read the same checkpoint")
    topology = ckpt.topology
    if step.gathered[0][1]:  # a finished output of this request
        with part.together():
            if lead:
                remove_stale_temporaries(out)
                write_latest_universal(out)
        return ConvertReport(input_folder=inp, output_folder=out, iteration=ckpt.iteration, topology=topology,
                             params=len(ckpt.param_sources), bytes_written=0, seconds=time.time() - t0, workers=0,
                             verified=True, notes=["already converted and verified: kept as it is"],
                             processes=part.world_size)
    with part.together():
        if lead:
            check_replaceable(out, is_universal_folder, "a universal checkpoint folder", overwrite)
        rules = conversion_rules(ckpt, strict, inject_missing_state)

    n_workers = max(1, workers or min(4, os.cpu_count() or 1))
    shares = assign_params({name: numel(src) for name, src in ckpt.param_sources.items()}, part.world_size)
    mine = [ckpt.param_sources[name] for name in shares[part.rank]]  # largest first: the pool ends together
    checked = [ckpt.param_sources[name] for name in shares[(part.rank + 1) % part.world_size]]
    desc = "" if part.world_size == 1 else f" (process 0 of {part.world_size})"
    show = progress and lead
    with _one_torch_thread(), shared_staging(part, out) as tmp:
        with part.together() as step:
            with byte_progress(sum(source_bytes(s, ckpt, STATE_KEYS) for s in mine), "converting" + desc, show) as bar:
                step.share = _write_share(ckpt, rules, mine, tmp, n_workers, lead, bar)
            point("written")
        written = sum(step.gathered)
        if verify:
            with part.together():
                crosscheck_files(input_files(ckpt)[part.rank::part.world_size])  # each process some files
                if lead:
                    check_atom_names(ckpt, tmp)
                    verify_expert_files(ckpt, tmp)
                with byte_progress(sum(source_bytes(s, ckpt, STATE_KEYS) for s in checked), "verifying" + desc, show) as bar:
                    verify_atoms(ckpt, tmp, rules, checked, bar, n_workers)
        with part.together():
            if lead:
                write_marker(tmp, UNIVERSAL_KIND, request, verified=verify,
                             extra={"iteration": ckpt.iteration, "source_topology": topology})
                point("marked")
    notes = []
    if verify:
        with part.together():
            if lead:
                point("published")
                write_latest_universal(out)
    else:
        notes.append(f"not verified: {LATEST_UNIVERSAL} left as it was, and the trainer will refuse this output")
    return ConvertReport(input_folder=inp, output_folder=out, iteration=ckpt.iteration, topology=topology,
                         params=len(ckpt.param_sources), bytes_written=written, seconds=time.time() - t0,
                         workers=n_workers, verified=verify, notes=notes, processes=part.world_size)


def certify_universal(input_folder: str, universal_folder: str, *, strict: bool = True,
                      inject_missing_state: bool = False) -> None:
    """Verify a universal folder another converter wrote (DeepSpeed's ``ds_to_universal``) against its
    ZeRO input and mark it verified, so that the trainer accepts it. Every byte of every input tensor
    our reader locates is first compared with ``torch.load``'s reading (``checkpoint.crosscheck``)."""
    inp, out = check_output_path(input_folder, universal_folder)
    ckpt = open_zero_checkpoint(inp)
    if not os.path.isdir(out) or not is_universal_folder(out):
        raise CheckpointError(f"{universal_folder}: not a universal checkpoint folder")
    crosscheck_files(input_files(ckpt), every=True)
    verify_universal(ckpt, out, conversion_rules(ckpt, strict, inject_missing_state))
    write_marker(out, UNIVERSAL_KIND, conversion_request(ckpt, strict, inject_missing_state), verified=True,
                 extra={"iteration": ckpt.iteration, "certified": True,
                        "source_topology": ckpt.topology})
    write_latest_universal(out)


def input_files(ckpt: ZeroCheckpoint) -> list[str]:
    """Every file of ``ckpt`` the converter reads tensors from: model states, then optimizer shards."""
    return list(ckpt.model_files) + [ckpt.optim_files[k] for k in sorted(ckpt.optim_files)]
