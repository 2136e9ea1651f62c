"""Verification of a universal folder against its ZeRO input, independent of the plan that wrote it.

The converter writes each atom from ``plan.atom_plan``: the source placement composed with a TP 1
target's. Verification takes another route: it reads each *source* TP rank's local tensor as it was
saved (``plan.local_plan``: its fragments in DP order, no placement at all), and compares it, bit for
bit, with the atom's elements wherever the source placement (``rules.source_tp_map``) puts that rank's
runs, in the source's own layout. A fault in composing placements or in the converter's plans
therefore shows up as a mismatch naming the atom's file, and nothing is published.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from megatron_ucp.checkpoint.atoms import AtomReader, atom_layout
from megatron_ucp.checkpoint.executors import read_local, scratch
from megatron_ucp.checkpoint.format import MASTER_KEY, OPTIMIZER_STATE_FILE, atom_path, zero_dir
from megatron_ucp.checkpoint.plan import ReadPlan, local_plan, source_bytes, window_plan
from megatron_ucp.checkpoint.rules import MergeRule, source_tp_map
from megatron_ucp.checkpoint.trust import check_name, load_file
from megatron_ucp.checkpoint.zero import (
    EXPERT_FILE_RE,
    STATE_KEYS,
    CheckpointError,
    ParamSource,
    ZeroCheckpoint,
    expert_of,
)
from megatron_ucp.layout.placement import RegionMap
from megatron_ucp.layout.slicing import bitwise_equal
from megatron_ucp.pacing import point
from megatron_ucp.progress import ByteProgress


def verify_universal(ckpt: ZeroCheckpoint, output_folder: str, rules: dict[str, MergeRule]) -> None:
    """Re-read every written atom and compare it with the input shards, independently of the writer."""
    check_atom_names(ckpt, output_folder)
    verify_atoms(ckpt, output_folder, rules, list(ckpt.param_sources.values()), workers=min(4, os.cpu_count() or 1))
    verify_expert_files(ckpt, output_folder)


def verify_expert_files(ckpt: ZeroCheckpoint, output_folder: str) -> int:
    """An MoE checkpoint's expert atoms against DeepSpeed's own per-expert files; the tensors compared.

    ``layer_<l>_expert_<g>_mp_rank_XX_model_states.pt`` holds global expert ``g``'s weights (of one TP
    rank) under their global names, saved from the module of the rank that trains it: a record of where
    each expert lives that owes nothing to the optimizer files' local names or to the index that maps
    them to global ones (``zero.ExpertIndex``), which ``verify_atoms`` shares with the writer. Each
    expert atom's fp32 master, in the file's precision, must equal every TP rank's copy there, and every
    expert atom must be found. A folder without such files (a writer that omits them) is not checked."""
    if ckpt.experts is None:
        return 0
    files = sorted(f for f in os.listdir(ckpt.folder) if EXPERT_FILE_RE.match(f))
    experts = {name for name in ckpt.param_sources if expert_of(name) is not None}
    found: set[str] = set()
    compared = 0
    for file in files:
        path = os.path.join(ckpt.folder, file)
        m = EXPERT_FILE_RE.match(file)
        assert m is not None
        weights = load_file(path)
        if not isinstance(weights, dict):
            raise CheckpointError(f"{path}: expected a dict of expert weights, found {type(weights).__name__}")
        for name, tensor in weights.items():
            check_name(name, path)
            if expert_of(name) != int(m.group(2)) or name not in experts or not torch.is_tensor(tensor):
                raise CheckpointError(f"{path}: holds {name}, not a weight of global expert {m.group(2)} of the "
                                      "optimizer files")
            atom = atom_path(output_folder, name, MASTER_KEY)
            master = load_file(atom)
            param = master.get("param") if isinstance(master, dict) else None
            if not torch.is_tensor(param) or param.shape != tensor.shape or not bitwise_equal(param.to(tensor.dtype),
                                                                                              tensor):
                raise CheckpointError(f"{atom}: does not match global expert {m.group(2)}'s weight in {path}")
            found.add(name)
            compared += 1
    if files and found != experts:
        raise CheckpointError(f"{ckpt.folder}: no layer_*_expert_* file holds {sorted(experts - found)[:3]}")
    return compared


def check_atom_names(ckpt: ZeroCheckpoint, output_folder: str) -> None:
    """``zero/`` holds one folder per parameter of the input (and ``optimizer_state.pt``), nothing else."""
    atoms_dir = zero_dir(output_folder)
    names = set(os.listdir(atoms_dir)) - {OPTIMIZER_STATE_FILE}
    if names != set(ckpt.param_sources):
        raise CheckpointError(f"{atoms_dir}: holds {sorted(names ^ set(ckpt.param_sources))[:5]} unexpectedly")


def verify_atoms(ckpt: ZeroCheckpoint, output_folder: str, rules: dict[str, MergeRule], sources: list[ParamSource],
                 bar: ByteProgress | None = None, workers: int = 1) -> None:
    """Re-read the atoms of ``sources`` and compare them with the input shards, on ``workers`` threads; a
    mismatch raises a ``CheckpointError`` naming the atom's file. ``bar`` counts each parameter's source
    bytes when done. How each atom is opened: ``atoms.AtomReader``."""
    reader = AtomReader()

    def check(src: ParamSource) -> ParamSource:
        name = src.name
        m = source_tp_map(src, rules[name], ckpt.tp, ckpt.folder)
        keys, shape = atom_layout(src.local_shapes[0], rules[name], m)
        for key in STATE_KEYS:
            path = atom_path(output_folder, name, key)
            with reader.param(path, keys, shape) as (param, confirm):
                for tp in range(ckpt.tp):
                    if not _local_matches(param, shape, m, local_plan(ckpt, src, key, tp), tp):
                        raise CheckpointError(f"{path}: does not match TP rank {tp} of {ckpt.folder}")
                confirm()
        point("param-verified")
        return src

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for src in pool.map(check, sources):  # in order: the first failure raises, the rest are cancelled
            if bar is not None:
                bar.update(source_bytes(src, ckpt, STATE_KEYS))


# Source bytes read per comparison in verification: one reused buffer of this size per worker thread,
# instead of one the size of a whole local tensor (100 MB for the 354M model's embedding). Measured in
# pairs, the verification time is the same either way.
_VERIFY_CHUNK_BYTES = 1 << 20


def _local_matches(param: torch.Tensor, expected: tuple[int, ...], m: RegionMap, source: ReadPlan, tp: int) -> bool:
    """TP rank ``tp``'s local tensor as saved (``source``) equals, bit for bit, the saved full tensor
    ``param`` (of the atom's shape ``expected``) wherever the placement ``m`` puts it (padding rows are
    not in the atom, so they are not compared). The local tensor is read a few dim-0 rows at a time into
    a reused, cache-sized buffer."""
    shape = tuple(source.local_shape)
    if param.dtype != torch.float32 or tuple(param.shape) != tuple(expected):
        return False
    if source.dtype != torch.float32:
        where = source.reads[0].path if source.reads else "the input"
        raise CheckpointError(f"{where}: holds {source.dtype} elements where {torch.float32} ones are read "
                              "(optimizer state in another dtype than the fp32 master is not read)")
    if not shape:  # a 0-d tensor: one row of one element
        shape, param = (1,), param.reshape(1)
    width = math.prod(shape[1:])
    step = max(1, _VERIFY_CHUNK_BYTES // (4 * max(width, 1)))
    buf = scratch(4 * min(step, shape[0]) * width, "verify").view(torch.float32)
    for r0 in range(0, shape[0], step):
        n = min(step, shape[0] - r0)
        local = buf[:n * width].view((n,) + shape[1:])  # local rows [r0, r0 + n)
        read_local(window_plan(source, (r0 * width, (r0 + n) * width), "verification"), local.view(-1))
        if m.dim is None:
            if not bitwise_equal(local, param.narrow(0, r0, n)):  # the same rows: a chunk, not a TP rule
                return False
        elif m.dim == 0:  # local rows [dst_start, +length) sit at full rows [src_start, +length)
            for r in m.runs_into(tp):  # each run of the placement, clipped to this chunk's rows
                lo, hi = max(r0, r.dst_start), min(r0 + n, r.dst_start + r.length)
                if lo < hi and not bitwise_equal(local.narrow(0, lo - r0, hi - lo),  # the run's rows in the chunk
                                                 param.narrow(0, r.src_start + lo - r.dst_start, hi - lo)):  # run
                    return False
        else:  # the same rows of the full tensor, in the columns (or later dim) the placement gives
            rows = param.narrow(0, r0, n)  # the chunk's rows, not a TP rule
            if not all(bitwise_equal(local.narrow(m.dim, r.dst_start, r.length),  # a run of the placement
                                     rows.narrow(m.dim, r.src_start, r.length)) for r in m.runs_into(tp)):
                return False
    return True
