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
"""

from __future__ import annotations

import contextlib
import heapq
import io
import math
import mmap
import os
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, cast

import torch

from megatron_ucp.checkpoint.crosscheck import crosscheck_files
from megatron_ucp.checkpoint.format import (
    OPTIMIZER_STATE_FILE,
    STEP_KEY,
    atom_file,
    atom_path,
    model_state_names,
    optimizer_state_path,
    zero_dir,
)
from megatron_ucp.checkpoint.publish import (  # noqa: F401 - LATEST_UNIVERSAL, staged_folder: re-exported
    LATEST_UNIVERSAL,
    check_replaceable,
    fingerprint,
    finished_output,
    remove_stale_temporaries,
    staged_folder,
    write_latest_universal,
    write_marker,
)
from megatron_ucp.checkpoint.trust import check_name, one_line, path_inside
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
    read_into,
)
from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.params import Kind, spec_of
from megatron_ucp.layout.placement import RegionMap, flat_segments, tp_map
from megatron_ucp.layout.slicing import bitwise_equal
from megatron_ucp.pacing import point
from megatron_ucp.progress import ByteProgress, byte_progress

UNIVERSAL_KIND = "universal"  # the completion marker's kind for our converter's output


@dataclass(frozen=True)
class MergeRule:
    kind: Kind
    vocab_rows: int | None = None  # rows kept for VOCAB parameters (the original vocabulary)

    @property
    def kept_vocab_rows(self) -> int:
        """``vocab_rows``, which a VOCAB rule needs; foreign ``universal_checkpoint_info`` may lack it."""
        if self.vocab_rows is None:
            raise TypeError(f"a {self.kind.value} merge rule without vocab_rows")
        return self.vocab_rows


def rules_from_table(metadata: dict):
    """Merge rules from our parameter table, for checkpoints our trainer wrote."""
    vocab = int(metadata["original_vocab_size"])
    cfg = ModelConfig.from_dict(metadata["model_config"])

    def rule(name: str) -> MergeRule:
        kind = spec_of(name, cfg).kind
        return MergeRule(kind, vocab if kind is Kind.VOCAB else None)

    return rule


class UcpInfoRules(Protocol):
    """A merge rule per parameter name, and the patterns no parameter matched so far."""

    unmatched: Callable[[], list[str]]

    def __call__(self, name: str) -> MergeRule: ...


def rules_from_ucp_info(info: dict, strict: bool) -> UcpInfoRules:
    """DeepSpeed's semantics for foreign checkpoints: replicated, row, vocab patterns; default column."""
    unsupported = [k for k in ("parameter_with_sub_params", "parameter_to_average_patterns", "affine_map")
                   if info.get(k)]
    if unsupported:
        raise CheckpointError(f"universal_checkpoint_info uses {', '.join(unsupported)}, which this converter does "
                              "not support for checkpoints not written by megatron_ucp; use DeepSpeed's converter")
    lists = {
        Kind.REPLICATED: info.get("tp_replicated_parameter_patterns", []),
        Kind.COLUMN_2SUB: info.get("parameter_with_2_sub_params_cat_dim_0", []),
        Kind.ROW: info.get("parameter_with_row_parallelism_patterns", []),
    }
    vocab_patterns = info.get("vocabulary_parameter_patterns", [])
    if vocab_patterns and not isinstance(info.get("original_vocab_size"), int):
        raise CheckpointError("universal_checkpoint_info has vocabulary_parameter_patterns but no integer "
                              "original_vocab_size, so the vocabulary padding cannot be stripped")
    used: set[str] = set()

    def first_match(patterns, name):
        hits = [p for p in patterns if re.match(p, name)]
        if len(hits) > 1:
            raise CheckpointError(f"parameter {name} matches several patterns of one list: {hits}")
        used.update(hits)
        return bool(hits)

    def rule(name: str) -> MergeRule:
        is_vocab = first_match(vocab_patterns, name)
        for kind in (Kind.REPLICATED, Kind.COLUMN_2SUB, Kind.ROW):  # DeepSpeed's precedence
            if first_match(lists[kind], name):
                return MergeRule(kind, info["original_vocab_size"] if is_vocab else None)
        return MergeRule(Kind.VOCAB if is_vocab else Kind.COLUMN, info.get("original_vocab_size") if is_vocab else None)

    def unmatched() -> list[str]:
        every = set(vocab_patterns).union(*lists.values())
        return sorted(every - used) if strict else []

    rules = cast(UcpInfoRules, rule)
    rules.unmatched = unmatched
    return rules


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
                f"(TP{self.topology['tp']} PP{self.topology['pp']} DP{self.topology['dp']}) into "
                f"{self.output_folder}: {gb:.3f} GB in {self.seconds:.2f} s ({rate:.2f} GB/s), "
                f"{self.workers} workers{procs}{ver}{notes}")


def source_tp_map(src: ParamSource, rule: MergeRule, tp: int, folder: str) -> RegionMap:
    """Where each TP rank's local tensor sits in the atom's full tensor (``layout.placement``)."""
    local = src.local_shapes[0]
    dim = rule.kind.partition_dim
    kept = rule.kept_vocab_rows if rule.kind is Kind.VOCAB else None
    extent = local[dim] * tp if dim is not None else (local[0] if local else 1)
    if kept is not None and extent < kept:
        raise CheckpointError(f"{folder}: {src.name} has {extent} rows, fewer than the original vocabulary of {kept}")
    try:
        return tp_map(rule.kind, extent, tp, kept=kept)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {src.name}: {e}") from None


def _read_fragment(src: ParamSource, tp: int, frag, key: str, ckpt: ZeroCheckpoint, dst: torch.Tensor) -> None:
    read_into(ckpt.flat_ref(src.pp, tp, frag.dp, src.group, key), frag.start, dst)


def _read_local_range(dst: torch.Tensor, src: ParamSource, tp: int, key: str, ckpt: ZeroCheckpoint,
                      start: int) -> None:
    """Elements [start, start + numel) of TP rank ``tp``'s local tensor (row-major) into the contiguous
    1-D ``dst``, from the DP fragments that hold them."""
    end, lo = start + dst.numel(), 0
    for frag in src.fragments[tp]:
        a, b = max(start, lo), min(end, lo + frag.numel)
        if a < b:
            read_into(ckpt.flat_ref(src.pp, tp, frag.dp, src.group, key), frag.start + a - lo,
                      dst.narrow(0, a - start, b - a))  # a DP fragment's range
        lo += frag.numel
        if lo >= end:
            return
    raise CheckpointError(f"{ckpt.folder}: the fragments of {src.name} on TP rank {tp} end at element {lo}, "
                          f"before {end}")


def _copy_fragments_into(dst: torch.Tensor, src: ParamSource, tp: int, key: str, ckpt: ZeroCheckpoint) -> None:
    """Fill ``dst`` (TP rank ``tp``'s local tensor, possibly a strided view) from its DP fragments."""
    if dst.is_contiguous():  # each DP fragment read straight into its range
        _read_local_range(dst.view(-1), src, tp, key, ckpt, 0)
        return
    offset = 0
    for frag in src.fragments[tp]:  # through a reused per-thread buffer (fresh memory costs a page fault per page)
        piece = _scratch(frag.numel * dst.element_size(), "fragment").view(dst.dtype)
        _read_fragment(src, tp, frag, key, ckpt, piece)
        _copy_flat_range(dst, offset, piece)
        offset += frag.numel


def _copy_flat_range(dst: torch.Tensor, start: int, piece: torch.Tensor) -> None:
    """Copy ``piece`` into elements [start, start+len) of ``dst`` in row-major order (``dst`` 2-D, strided)."""
    if dst.dim() != 2:
        raise CheckpointError(f"cannot place a fragment into a strided {dst.dim()}-D tensor")
    width = dst.shape[1]
    pos, end, done = start, start + piece.numel(), 0
    while pos < end:
        row, col = divmod(pos, width)
        if col == 0 and end - pos >= width:  # whole rows at once
            n_rows = (end - pos) // width
            dst[row:row + n_rows].copy_(piece.narrow(0, done, n_rows * width).view(n_rows, width))  # row-major fill
            step = n_rows * width
        else:
            step = min(width - col, end - pos)
            dst[row, col:col + step].copy_(piece.narrow(0, done, step))  # row-major fill, not a TP rule
        pos += step
        done += step


def _replicas_equal(ref: torch.Tensor, src: ParamSource, tp: int, key: str, ckpt: ZeroCheckpoint) -> bool:
    flat = ref.reshape(-1)
    offset = 0
    for frag in src.fragments[tp]:
        piece = torch.empty(frag.numel, dtype=ref.dtype)
        _read_fragment(src, tp, frag, key, ckpt, piece)
        if not bitwise_equal(flat.narrow(0, offset, frag.numel), piece):  # a DP fragment's range
            return False
        offset += frag.numel
    return True


def merge_keys(rule: MergeRule) -> dict:
    """DeepSpeed's per-atom keys for a sharded parameter, in its order (the tensor goes last)."""
    keys: dict = {"cat_dim": rule.kind.partition_dim}
    if rule.kind.num_sub_params > 1:
        keys["param_n_sub_params"] = rule.kind.num_sub_params
    if rule.kind is Kind.VOCAB:
        keys["vocab_tensor"] = True
    return keys


def merged_state(src: ParamSource, rule: MergeRule, key: str, ckpt: ZeroCheckpoint) -> dict:
    """The universal atom dict of one state of one parameter, built in memory.

    Used for replicated parameters (every TP copy is checked bitwise equal) and for shards that are
    not fp32; sharded fp32 parameters take the copy path below.
    """
    local = src.local_shapes[0]
    if rule.kind is Kind.REPLICATED:
        full = torch.empty(local, dtype=torch.float32)
        _copy_fragments_into(full, src, 0, key, ckpt)
        for tp in range(1, ckpt.tp):
            if not _replicas_equal(full, src, tp, key, ckpt):
                raise CheckpointError(f"{ckpt.folder}: TP-replicated parameter {src.name} ({key}) differs between "
                                      f"TP rank 0 and TP rank {tp}; refusing to average it silently")
        return {"param": full}
    if any(s != local for s in src.local_shapes):
        raise CheckpointError(f"{ckpt.folder}: {src.name} has uneven TP shapes {src.local_shapes}")
    merge_map = source_tp_map(src, rule, ckpt.tp, ckpt.folder).inverted()  # drops the vocabulary's padding rows
    locals_ = []
    for tp in range(ckpt.tp):
        t = torch.empty(local, dtype=torch.float32)
        _copy_fragments_into(t, src, tp, key, ckpt)
        locals_.append(t)
    full = merge_map.apply(locals_, 0).clone()  # a view at TP 1: do not carry padding storage into the file
    del locals_
    return dict(merge_keys(rule), param=full)


def _save(obj, path: str) -> int:
    torch.save(obj, path)
    return os.path.getsize(path)


# --- the copy path: fragments go from shard file to atom file inside the kernel -------------------


def _copy_plan(src: ParamSource, rule: MergeRule, key: str, ckpt: ZeroCheckpoint) -> list[tuple[str, int, int, int]]:
    """(source path, source byte offset, destination element offset, elements) for one atom, coalesced.

    For dim-0 kinds only: the atom's tensor is the full parameter in row-major order, and where TP rank
    ``t``'s local elements go in it is its placement's ``flat_segments`` (per sub-parameter for fused
    kinds; padding rows beyond the vocabulary dropped).
    """
    if rule.kind.partition_dim != 0:
        raise CheckpointError(f"{src.name}: no file-to-file copy plan for {rule.kind.value} parameters")
    local = src.local_shapes[0]
    m = source_tp_map(src, rule, ckpt.tp, ckpt.folder)
    full = (m.src_extents[0],) + tuple(local[1:])  # the kept rows, for VOCAB
    plan: list[list] = []
    for t in range(ckpt.tp):
        runs = m.runs_into(t)
        lo = 0
        for frag in src.fragments[t]:
            ref = ckpt.flat_ref(src.pp, t, frag.dp, src.group, key)
            esize = ref.dtype.itemsize
            for a, dst, n in flat_segments(runs, 0, full, local, lo, lo + frag.numel):
                plan.append([ref.path, ref.offset + (frag.start + a - lo) * esize, dst, n])
            lo += frag.numel
    coalesced: list[list] = []
    for item in plan:
        prev = coalesced[-1] if coalesced else None
        if prev and prev[0] == item[0] and prev[1] + prev[3] * 4 == item[1] and prev[2] + prev[3] == item[2]:
            prev[3] += item[3]
        else:
            coalesced.append(item)
    return [tuple(x) for x in coalesced]


def _copy_bytes(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int) -> None:
    """``copy_file_range`` (page cache to page cache, no user-space copy), or pread/pwrite where unsupported."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_off + done, dst_off + done)
        except OSError:
            n = 0
        if n <= 0:  # unsupported here (another filesystem, an old kernel): copy through a buffer
            while done < nbytes:
                chunk = os.pread(src_fd, min(nbytes - done, 64 << 20), src_off + done)
                if not chunk:
                    raise CheckpointError(f"source ended early while copying {nbytes} bytes")
                os.pwrite(dst_fd, chunk, dst_off + done)
                done += len(chunk)
            return
        done += n


_SKELETONS: dict[tuple, tuple[bytes, bytes, int]] = {}
_SKELETONS_LOCK = threading.Lock()


def skeleton_bytes(keys: dict, shape: tuple[int, ...]) -> tuple[bytes, bytes, int]:
    """(bytes before the tensor data, bytes after it, data offset) of ``torch.save(dict(keys, param=<fp32
    tensor of shape>))``: the file torch would write, minus the data, made once per distinct atom layout."""
    cache_key = (tuple(keys.items()), tuple(shape))
    with _SKELETONS_LOCK:
        if cache_key not in _SKELETONS:
            buf = io.BytesIO()
            # The data is filled in later, so no checksum can be computed now: write torch's "no CRC"
            # (0), as torch.save does with compute_crc32 off. torch.load does not check zip CRCs.
            crc = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
            try:
                with torch.serialization.skip_data():  # reserves the data's place without filling it
                    torch.save(dict(keys, param=torch.empty(shape, dtype=torch.float32)), buf)
            finally:
                torch.serialization.set_crc32_options(crc)
            data = buf.getvalue()
            reader = torch._C.PyTorchFileReader(io.BytesIO(data))
            offset = reader.get_record_offset("data/0")  # type: ignore[attr-defined]  # absent from torch's _C stubs
            nbytes = 4
            for d in shape:
                nbytes *= d
            _SKELETONS[cache_key] = (data[:offset], data[offset + nbytes:], offset)
        return _SKELETONS[cache_key]


_IOV_MAX = 1024
_THREAD = threading.local()


def _scratch(nbytes: int, slot: str = "scratch") -> torch.Tensor:
    """A per-thread byte buffer of at least ``nbytes``, grown as needed and reused across atoms (fresh
    memory costs a page fault per page); ``slot`` names one of several."""
    buf = getattr(_THREAD, slot, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_THREAD, slot, buf)
    return buf[:nbytes]


def _read_row_parallel(tensor: torch.Tensor, src: ParamSource, rule: MergeRule, key: str, ckpt: ZeroCheckpoint,
                       fds: dict[str, int]) -> None:
    """Fill the full [rows, tp * w] tensor: TP rank t's local [rows, w] goes where its placement says
    (column block t).

    Each DP fragment is one contiguous source range; ``preadv`` scatters it into the row pieces it
    covers, so the bytes are copied once, with no intermediate buffer.
    """
    m = source_tp_map(src, rule, ckpt.tp, ckpt.folder)
    full, local = tuple(tensor.shape), tuple(src.local_shapes[0])
    buf = tensor.view(torch.uint8).view(-1).numpy().data  # ndarray.data: the array's bytes as a memoryview
    for t in range(ckpt.tp):
        runs = m.runs_into(t)
        if len(full) == 2 and len(runs) == 1 and runs[0].dst_start == 0 and runs[0].length == local[1]:
            # One column block: read each fragment whole, then one strided copy (no per-row work in Python).
            _copy_fragments_into(tensor.narrow(1, runs[0].src_start, runs[0].length), src, t, key, ckpt)
            continue
        lo = 0
        for frag in src.fragments[t]:
            ref = ckpt.flat_ref(src.pp, t, frag.dp, src.group, key)
            if ref.path not in fds:
                fds[ref.path] = os.open(ref.path, os.O_RDONLY)
            iovs = []
            expect = lo  # the fragment is one contiguous source range: its segments must follow each other
            for a, f, n in flat_segments(runs, 1, full, local, lo, lo + frag.numel):
                if a != expect:
                    raise CheckpointError(f"{src.name}: a row-parallel shard with a gap at element {expect}")
                iovs.append(buf[f * 4:(f + n) * 4])
                expect = a + n
            pos = ref.offset + frag.start * 4
            for i in range(0, len(iovs), _IOV_MAX):
                batch = iovs[i:i + _IOV_MAX]
                want = sum(len(v) for v in batch)
                got = os.preadv(fds[ref.path], batch, pos)
                if got != want:  # a short read (end of file, a signal): finish each piece on its own
                    off = pos
                    for v in batch:
                        done = min(max(got - (off - pos), 0), len(v))
                        while done < len(v):
                            k = os.preadv(fds[ref.path], [v[done:]], off + done)
                            if k <= 0:
                                raise CheckpointError(f"{ref.path}: truncated: ends before byte {off + len(v)}")
                            done += k
                        off += len(v)
                pos += want
            lo += frag.numel


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)


def _write_atom_by_copy(src: ParamSource, rule: MergeRule, key: str, ckpt: ZeroCheckpoint, path: str) -> int:
    """Write a sharded atom without ever filling it with zeros or holding it: the torch.save bytes
    around the tensor come from a cached skeleton, the tensor's bytes are copied in from the shards."""
    assert rule.kind.partition_dim is not None  # convert_param sends replicated parameters to merged_state instead
    keys, full = _atom_layout(src, rule, source_tp_map(src, rule, ckpt.tp, ckpt.folder))  # kept rows, for VOCAB
    head, tail, data_offset = skeleton_bytes(keys, full)
    nbytes = 4 * math.prod(full)
    dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fds: dict[str, int] = {}
    try:
        pwrite_all(dst, head, 0)
        point("atom-started")
        if rule.kind is Kind.ROW:
            # Row-parallel slices interleave every row (pieces of a few KB), which copy_file_range moves
            # slowly; scatter-read each fragment straight into its rows (preadv), then write once.
            tensor = _scratch(nbytes).view(torch.float32).view(full)  # reused: no page faults per atom
            _read_row_parallel(tensor, src, rule, key, ckpt, fds)
            pwrite_all(dst, tensor.view(torch.uint8).view(-1).numpy(), data_offset)
            del tensor
        else:
            for spath, soff, delem, n in _copy_plan(src, rule, key, ckpt):
                if spath not in fds:
                    fds[spath] = os.open(spath, os.O_RDONLY)
                _copy_bytes(fds[spath], soff, dst, data_offset + delem * 4, n * 4)
        pwrite_all(dst, tail, data_offset + nbytes)
    finally:
        os.close(dst)
        for fd in fds.values():
            os.close(fd)
    return data_offset + nbytes + len(tail)


_SERIALIZED: dict[tuple, bytes] = {}


def _write_small(obj, cache_key, path: str) -> int:
    """Write ``torch.save(obj)``'s bytes; the same object (e.g. every parameter's step) is serialised once."""
    with _SKELETONS_LOCK:
        data = _SERIALIZED.get(cache_key)
        if data is None:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = _SERIALIZED[cache_key] = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def write_atom_from_memory(atom: dict, path: str) -> int:
    """Write an atom built in memory through the cached skeleton of its layout (no zip writer per file)."""
    tensor = atom["param"]
    keys = {k: v for k, v in atom.items() if k != "param"}
    head, tail, data_offset = skeleton_bytes(keys, tuple(tensor.shape))
    data = tensor.contiguous().view(torch.uint8).view(-1).numpy()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, head, 0)
        point("atom-started")
        pwrite_all(fd, data, data_offset)
        pwrite_all(fd, tail, data_offset + len(data))
    finally:
        os.close(fd)
    return data_offset + len(data) + len(tail)


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
        written += _write_small(step.clone() if torch.is_tensor(step) else step, step_key,
                                os.path.join(out_dir, atom_file(STEP_KEY)))
    sources_are_fp32 = all(ckpt.flat_ref(src.pp, t, f.dp, src.group, k).dtype == torch.float32
                           for t in range(ckpt.tp) for f in src.fragments[t] for k in STATE_KEYS)
    for key in STATE_KEYS:
        path = os.path.join(out_dir, atom_file(key))
        if rule.kind is Kind.REPLICATED or not sources_are_fp32:
            atom = merged_state(src, rule, key, ckpt)
            written += write_atom_from_memory(atom, path)
            del atom
        else:
            written += _write_atom_by_copy(src, rule, key, ckpt, path)
    point("param-written")
    return written


def stage_compatible_global_state(global_state: dict, param_groups: list[dict], step) -> dict:
    """``zero/optimizer_state.pt`` that every ZeRO stage's universal loader accepts.

    ZeRO-1/2 read ``param_groups`` (hyperparameters, by position), ``ds_version`` and the loss-scaler
    keys; ZeRO-3 reads the step and hyperparameters from ``optimizer_state_dict``. ``global_state``
    holds the source's small global entries (loss scaler, clip_grad, ...) and must have ``ds_version``.
    """
    if not global_state.get("ds_version"):
        raise ValueError("the global optimizer state needs ds_version (DeepSpeed's ZeRO-1/2 loader asserts it)")
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [i]} for i, g in enumerate(param_groups)]
    out = dict(global_state)
    out["param_groups"] = groups
    out[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": groups}
    return out


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


def check_output_path(input_folder: str, output_folder: str) -> tuple[str, str]:
    """Real paths of input and output; the output may neither be inside the input nor contain it."""
    inp = os.path.realpath(input_folder)
    out = os.path.realpath(output_folder.rstrip("/") or output_folder)
    if out == inp or os.path.commonpath([inp, out]) == inp:
        raise CheckpointError(f"{output_folder}: the output may not be inside the input folder {input_folder}")
    if os.path.commonpath([inp, out]) == out:
        raise CheckpointError(f"{output_folder}: the output may not contain the input folder {input_folder}")
    return inp, out


def is_universal_folder(path: str) -> bool:
    """A universal checkpoint folder, ours or DeepSpeed's: ``zero/`` beside model-state files."""
    names = os.listdir(path)
    return os.path.isdir(zero_dir(path)) and any(n.endswith("model_states.pt") for n in names)


def conversion_request(ckpt: ZeroCheckpoint, strict: bool, inject_missing_state: bool) -> dict:
    """What a conversion was asked to do: a finished output of the same request is kept on a rerun."""
    files = [os.path.join(ckpt.folder, n) for n in sorted(os.listdir(ckpt.folder))]
    return {"tool": "megatron_ucp.ds_to_universal", "input": ckpt.folder,
            "input_fingerprint": fingerprint([f for f in files if os.path.isfile(f)]),
            "strict": strict, "inject_missing_state": inject_missing_state}


@dataclass(frozen=True)
class Partition:
    """This process's place among the processes that convert one checkpoint together.

    The default, ``world_size`` 1, is one process on its own (no ``torch.distributed`` needed). With more,
    every process calls ``convert_zero_to_universal`` with the same arguments and its own ``rank``; they
    coordinate over ``group`` (default: the default group, which must be initialised; gloo is enough)
    with a few small ``all_gather_object`` calls only: no tensor travels, every process reads its share
    from the input and writes it into the one staging folder (a file system all of them see).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of {self.world_size} processes")

    @classmethod
    def of_process_group(cls, group: Any = None) -> "Partition":
        """This process's rank and the size of ``group`` (default: the default group)."""
        import torch.distributed as dist

        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def all_gather(self, obj: Any) -> list:
        """Every process's ``obj`` (small, picklable), in rank order."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: BaseException | None, payload: Any = None) -> list:
        """Every process's ``payload``, once all of them got here. When any process failed (``error``), every
        process raises: the failed ones their own error, the others a ``CheckpointError`` repeating the first
        failure's one-line message, so that no process goes on (or waits forever) alone."""
        gathered = self.all_gather((None if error is None else _one_line(error), None if error else payload))
        if error is not None:
            raise error
        for r, (msg, _) in enumerate(gathered):
            if msg is not None:
                raise CheckpointError(f"{msg} (in conversion process {r} of {self.world_size})")
        return [p for _, p in gathered]

    def together(self) -> "_Together":
        """``with part.together() as step: ...; step.share = x``: the block runs here, then every process
        agrees (``agree``): a failure in any process's block raises in every process; else ``step.gathered``
        holds every process's ``share``."""
        return _Together(self)


class _Together:
    def __init__(self, part: Partition) -> None:
        self.part = part
        self.share: Any = None
        self.gathered: list = []

    def __enter__(self) -> "_Together":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # never swallows the block's exception
        if exc is not None and not isinstance(exc, Exception):
            return  # KeyboardInterrupt, SystemExit: the launcher stops the other processes
        self.gathered = self.part.agree(exc, self.share)  # raises exc itself when this block failed


def _one_line(e: BaseException) -> str:
    msg = one_line(e)
    return msg if isinstance(e, CheckpointError) else f"{type(e).__name__}: {msg}"


def assign_params(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Split parameters between ``world_size`` processes, balanced by size (``sizes``: name -> elements).

    Largest first, each to the process with the least so far (ties: the lower rank); names order equal
    sizes, so every process computes the same split. Each share is in that order, largest first. No
    process gets more than an even share plus the largest parameter (greedy list scheduling).
    """
    if world_size < 1:
        raise ValueError(f"world_size {world_size}: need at least one process")
    shares: list[list[str]] = [[] for _ in range(world_size)]
    loads = [(0, r) for r in range(world_size)]  # a heap of (elements so far, rank)
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, r = heapq.heappop(loads)
        shares[r].append(name)
        heapq.heappush(loads, (load + sizes[name], r))
    return shares


def _source_bytes(src: ParamSource, ckpt: ZeroCheckpoint) -> int:
    """Bytes of optimizer state read from the shards for one parameter (every TP copy, every state)."""
    return sum(f.numel * ckpt.flat_ref(src.pp, tp, f.dp, src.group, key).dtype.itemsize
               for tp, frags in enumerate(src.fragments) for f in frags for key in STATE_KEYS)


@contextlib.contextmanager
def _shared_staging(part: Partition, out: str) -> Iterator[str]:
    """``staged_folder(out)`` made by process 0 (with its ``zero/``), its name given to every process.

    The block's steps must be agreed (``Partition.together``), so that it raises in every process or in
    none. When it completes, process 0 publishes (the marker must be there) and every process returns
    once that is done, or raises if publishing failed; when it raises, process 0 removes the folder.
    """
    completed = False
    publish_error: Exception | None = None
    try:
        with contextlib.ExitStack() as stack:
            with part.together() as step:
                if part.rank == 0:
                    tmp = stack.enter_context(staged_folder(out))
                    os.makedirs(zero_dir(tmp))
                    point("staged")
                    step.share = tmp
            yield step.gathered[0]
            completed = True
    except Exception as e:
        if not completed:
            raise  # the block's failure, which every process raises
        publish_error = e  # process 0's publishing
    part.agree(publish_error)


def _write_share(ckpt: ZeroCheckpoint, rules: dict[str, MergeRule], sources: list[ParamSource], folder: str,
                 n_workers: int, lead: bool, bar: ByteProgress) -> int:
    """Write the atoms of ``sources`` into ``folder``; the lead process also ``optimizer_state.pt`` and the
    model-state files. Bytes written."""
    atoms_dir = zero_dir(folder)
    written = 0
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        # optimizer_state.pt needs DeepSpeed's real classes (importing DeepSpeed takes a while):
        # it runs beside the copies instead of after them.
        global_state = pool.submit(lambda: _save(optimizer_state(ckpt), optimizer_state_path(folder))) if lead else None
        futures = {pool.submit(convert_param, src, rules[src.name], ckpt, atoms_dir): src for src in sources}
        for fut in as_completed(futures):
            written += fut.result()
            bar.update(_source_bytes(futures[fut], ckpt))
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
    shares = assign_params({name: _numel(src) for name, src in ckpt.param_sources.items()}, part.world_size)
    mine = [ckpt.param_sources[name] for name in shares[part.rank]]  # largest first: the pool ends together
    checked = [ckpt.param_sources[name] for name in shares[(part.rank + 1) % part.world_size]]
    desc = "" if part.world_size == 1 else f" (process 0 of {part.world_size})"
    show = progress and lead
    with _one_torch_thread(), _shared_staging(part, out) as tmp:
        with part.together() as step:
            with byte_progress(sum(_source_bytes(s, ckpt) for s in mine), "converting" + desc, show) as bar:
                step.share = _write_share(ckpt, rules, mine, tmp, n_workers, lead, bar)
            point("written")
        written = sum(step.gathered)
        if verify:
            with part.together():
                crosscheck_files(input_files(ckpt)[part.rank::part.world_size])  # each process some files
                if lead:
                    check_atom_names(ckpt, tmp)
                with byte_progress(sum(_source_bytes(s, ckpt) for s in checked), "verifying" + desc, show) as bar:
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


def conversion_rules(ckpt: ZeroCheckpoint, strict: bool, inject_missing_state: bool) -> dict[str, MergeRule]:
    """Each parameter's merge rule: from our table when the checkpoint carries our metadata, else from
    its ``universal_checkpoint_info`` patterns, as DeepSpeed does."""
    info = ckpt.universal_checkpoint_info
    metadata = ckpt.metadata
    if info is None and not inject_missing_state:
        raise CheckpointError(f"{ckpt.model_files[0]}: required universal_checkpoint_info is missing "
                              "(pass inject_missing_state to convert with DeepSpeed's defaults)")
    try:
        if metadata is not None:
            rule_of = rules_from_table(metadata)
        else:
            rule_of = rules_from_ucp_info(info or {"universal_checkpoint_version": 0.4}, strict)
        rules = {name: rule_of(name) for name in ckpt.param_sources}
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.model_files[0]}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:  # the parameter table or the config refuses what the file says
        raise CheckpointError(f"{ckpt.model_files[0]}: {type(e).__name__}: {e}") from None
    if metadata is None:
        unmatched = rule_of.unmatched()
        if unmatched:
            raise CheckpointError(f"{ckpt.model_files[0]}: universal_checkpoint_info patterns match no parameter: "
                                  f"{unmatched} (pass strict=False / --no_strict to ignore)")
    return rules


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


def _numel(src: ParamSource) -> int:
    return sum(sum(f.numel for f in frags) for frags in src.fragments)


def verify_universal(ckpt: ZeroCheckpoint, output_folder: str, rules: dict[str, MergeRule]) -> None:
    """Re-read every written atom and compare it with the input shards, independently of the writer."""
    check_atom_names(ckpt, output_folder)
    verify_atoms(ckpt, output_folder, rules, list(ckpt.param_sources.values()), workers=min(4, os.cpu_count() or 1))


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
    bytes when done. How each atom is opened: ``_AtomReader``."""
    reader = _AtomReader()

    def check(src: ParamSource) -> ParamSource:
        name = src.name
        m = source_tp_map(src, rules[name], ckpt.tp, ckpt.folder)
        keys, shape = _atom_layout(src, rules[name], m)
        for key in STATE_KEYS:
            path = atom_path(output_folder, name, key)
            with reader.param(path, keys, shape) as (param, confirm):
                for tp in range(ckpt.tp):
                    if not _local_matches(param, shape, m, src, tp, key, ckpt):
                        raise CheckpointError(f"{path}: does not match TP rank {tp} of {ckpt.folder}")
                confirm()
        point("param-verified")
        return src

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for src in pool.map(check, sources):  # in order: the first failure raises, the rest are cancelled
            if bar is not None:
                bar.update(_source_bytes(src, ckpt))


def _atom_layout(src: ParamSource, rule: MergeRule, m: RegionMap) -> tuple[dict, tuple[int, ...]]:
    """The keys beside the tensor and the tensor's shape in a parameter's atom files."""
    local = tuple(src.local_shapes[0])
    if m.dim is None:
        return {}, local
    full = list(local)
    full[m.dim] = m.src_extents[0]
    return merge_keys(rule), tuple(full)


class _AtomReader:
    """Opens atoms for verification without unpickling each one.

    ``torch.load`` of an atom costs about a millisecond of Python (holding the GIL) whatever its size; a
    checkpoint has thousands. So the first atom of each layout (its keys and tensor shape) is read by
    ``torch.load`` and compared as a whole, and once it matches, its bytes around the tensor data are
    known to be a correct atom of that layout. Every later atom whose bytes around the data are the
    same, byte for byte (two small reads), has that structure too, and its tensor is mapped straight
    from the file at the same offset. Anything else (another writer's atom, a changed file) is read
    by ``torch.load``.
    """

    def __init__(self) -> None:
        self._confirmed: dict[tuple, tuple[bytes, bytes, int]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def param(self, path: str, keys: dict, shape: tuple[int, ...]) -> Iterator[tuple[torch.Tensor, Callable]]:
        layout = (tuple(keys.items()), shape)
        with self._lock:
            known = self._confirmed.get(layout)
        mapped = self._mapped(path, known, shape) if known is not None else None
        if mapped is not None:
            yield mapped, lambda: None
            return
        param = load_file(path, mmap=True)["param"]

        def confirm() -> None:  # the whole atom matched: remember its bytes around the data
            with self._lock:
                if layout not in self._confirmed:
                    self._confirmed[layout] = self._framing(path, param, keys, shape)

        yield param, confirm

    @staticmethod
    def _framing(path: str, param: torch.Tensor, keys: dict, shape: tuple[int, ...]) -> tuple[bytes, bytes, int]:
        _, skeleton_tail, offset = skeleton_bytes(keys, shape)  # where torch.save puts the data of this layout
        framing = (b"", b"", -1)  # not laid out so: every atom of this layout goes through torch.load
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(fd, offset, 0)
            tail = os.pread(fd, len(skeleton_tail), offset + 4 * math.prod(shape))
        finally:
            os.close(fd)
        if param.dtype == torch.float32 and tuple(param.shape) == shape:
            at_offset = _AtomReader._mapped(path, (head, tail, offset), shape)
            if at_offset is not None and bitwise_equal(at_offset, param):  # the loaded tensor is the bytes there
                framing = (head, tail, offset)
        return framing

    @staticmethod
    def _mapped(path: str, known: tuple[bytes, bytes, int], shape: tuple[int, ...]) -> torch.Tensor | None:
        head, tail, offset = known
        if offset < 0:
            return None
        nbytes = 4 * math.prod(shape)
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != offset + nbytes + len(tail) or os.pread(fd, len(head), 0) != head or \
                    os.pread(fd, len(tail), offset + nbytes) != tail:
                return None
            if nbytes == 0:
                return torch.empty(shape, dtype=torch.float32)
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():  # read-only memory is fine: the tensor is only compared
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(mm, dtype=torch.float32, count=nbytes // 4, offset=offset).view(shape)


# Source bytes read per comparison in verification: one reused buffer of this size per worker thread,
# instead of one the size of a whole local tensor (100 MB for the 354M model's embedding). Measured in
# pairs, the verification time is the same either way.
_VERIFY_CHUNK_BYTES = 1 << 20


def _local_matches(param: torch.Tensor, expected: tuple[int, ...], m: RegionMap, src: ParamSource, tp: int,
                   key: str, ckpt: ZeroCheckpoint) -> bool:
    """TP rank ``tp``'s fragments equal, bit for bit, the saved full tensor ``param`` (of the atom's shape
    ``expected``) wherever the placement ``m`` puts them (padding rows are not in the atom, so they are not
    compared). The local tensor is read a few dim-0 rows at a time into a reused, cache-sized buffer."""
    shape = tuple(src.local_shapes[0])
    if param.dtype != torch.float32 or tuple(param.shape) != tuple(expected):
        return False
    if not shape:  # a 0-d tensor: one row of one element
        shape, param = (1,), param.reshape(1)
    width = math.prod(shape[1:])
    step = max(1, _VERIFY_CHUNK_BYTES // (4 * max(width, 1)))
    buf = _scratch(4 * min(step, shape[0]) * width, "verify").view(torch.float32)
    for r0 in range(0, shape[0], step):
        n = min(step, shape[0] - r0)
        local = buf[:n * width].view((n,) + shape[1:])  # local rows [r0, r0 + n)
        _read_local_range(local.view(-1), src, tp, key, ckpt, r0 * width)
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
