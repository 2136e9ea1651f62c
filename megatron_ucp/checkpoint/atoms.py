"""The atom codec: the only module that knows how a universal folder's files are framed.

An atom (``zero/<param>/<state>.pt``) is ``torch.save(dict(<DeepSpeed's merge keys>, param=<fp32 tensor>))``,
or a bare value for ``step.pt``. The bytes torch writes around the tensor depend only on the keys and
the shape, so they are made once per layout (``skeleton_bytes``) and each atom is written as that
frame with its tensor's bytes in place: from memory (``write_atom``), from a plan copied file to file
or gathered (``write_planned_atom``), or as zeros left as a file hole (``write_zero_atom``). Reading
back: ``atom_tensor`` (the tensor of a loaded atom) and ``AtomReader`` (verification: an atom whose
frame equals a confirmed one of its layout is mapped from the file, not unpickled).
Used by the converter (``universal``), the HF import, the sliced loader, inspect and export.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import threading
import warnings
from typing import Any, Callable, Iterator

import torch

from megatron_ucp.checkpoint.executors import copy_into, pwrite_all, read_local, scratch
from megatron_ucp.checkpoint.plan import ReadPlan
from megatron_ucp.checkpoint.rules import MergeRule
from megatron_ucp.checkpoint.zero import OPTIMIZER_STATE_DICT, load_file
from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.placement import RegionMap
from megatron_ucp.layout.slicing import bitwise_equal
from megatron_ucp.pacing import point

PARAM = "param"  # the atom dict's tensor, beside the merge keys


def merge_keys(rule: MergeRule) -> dict:
    """DeepSpeed's per-atom keys for a sharded parameter, in its order (the tensor goes last)."""
    keys: dict = {"cat_dim": rule.kind.partition_dim}
    if rule.kind.num_sub_params > 1:
        keys["param_n_sub_params"] = rule.kind.num_sub_params
    if rule.kind is Kind.VOCAB:
        keys["vocab_tensor"] = True
    return keys


def atom_keys(kind: Kind, vocab_rows: int | None) -> dict:
    """The keys beside ``param`` in an atom of this kind (replicated atoms carry none)."""
    return {} if kind is Kind.REPLICATED else merge_keys(MergeRule(kind, vocab_rows))


def atom_layout(local: tuple[int, ...], rule: MergeRule, m: RegionMap) -> tuple[dict, tuple[int, ...]]:
    """The keys beside the tensor and the tensor's shape in a parameter's atom files, from a TP-local
    shape ``local`` and the source placement ``m``."""
    local = tuple(local)
    if m.dim is None:
        return {}, local
    full = list(local)
    full[m.dim] = m.src_extents[0]
    return merge_keys(rule), tuple(full)


def atom_tensor(atom: Any) -> torch.Tensor:
    """The tensor of a loaded atom: its ``param`` (DeepSpeed's ZeRO-3 atoms are the bare tensor)."""
    return atom[PARAM] if isinstance(atom, dict) else atom


def make_atom(keys: dict, tensor: torch.Tensor) -> dict:
    """An atom dict: the merge keys, then the tensor (DeepSpeed's order)."""
    return dict(keys, **{PARAM: tensor})


def atom_extras(atom: Any) -> dict:
    """The merge keys of a loaded atom (none for a bare tensor)."""
    return {k: v for k, v in atom.items() if k != PARAM} if isinstance(atom, dict) else {}


def save(obj: Any, path: str) -> int:
    """``torch.save(obj, path)`` (the global optimizer state, a step); bytes written."""
    torch.save(obj, path)
    return os.path.getsize(path)


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
                    torch.save(make_atom(keys, torch.empty(shape, dtype=torch.float32)), buf)
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


_SERIALIZED: dict[tuple, bytes] = {}


def write_serialized(obj, cache_key, path: str) -> int:
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


def write_atom(atom: dict, path: str) -> int:
    """Write an atom built in memory through the cached skeleton of its layout (no zip writer per file)."""
    tensor = atom[PARAM]
    keys = atom_extras(atom)
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


def write_planned_atom(plan: ReadPlan, keys: dict, path: str, gather: bool = False) -> int:
    """Write an atom whose tensor is ``plan``'s (fp32, the atom's shape) without ever filling it with zeros
    or holding it: the bytes around the tensor come from the cached skeleton, the tensor's bytes are
    copied in from the plan's files. ``gather``: read the tensor into a reused buffer first and write it
    once, for plans of many small pieces (row-parallel slices interleave every row: pieces of a few KB,
    which ``copy_file_range`` moves slowly)."""
    full = tuple(plan.local_shape)
    head, tail, data_offset = skeleton_bytes(keys, full)
    nbytes = 4 * math.prod(full)
    dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(dst, head, 0)
        point("atom-started")
        if gather:
            tensor = scratch(nbytes).view(torch.float32)  # reused: no page faults per atom
            read_local(plan, tensor)
            pwrite_all(dst, tensor.view(torch.uint8).numpy(), data_offset)
            del tensor
        else:
            copy_into(plan, dst, data_offset)
        pwrite_all(dst, tail, data_offset + nbytes)
    finally:
        os.close(dst)
    return data_offset + nbytes + len(tail)


def write_zero_atom(keys: dict, shape: tuple[int, ...], path: str) -> None:
    """``torch.save(dict(keys, param=torch.zeros(shape)))``'s content without allocating the zeros: the
    data region is left as a file hole, which reads back as zeros."""
    head, tail, offset = skeleton_bytes(keys, tuple(shape))
    nbytes = 4 * math.prod(shape)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, head, 0)
        pwrite_all(fd, tail, offset + nbytes)
    finally:
        os.close(fd)


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


class AtomReader:
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
        param = atom_tensor(load_file(path, mmap=True))

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
            at_offset = AtomReader._mapped(path, (head, tail, offset), shape)
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
