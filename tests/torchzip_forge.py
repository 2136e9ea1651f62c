"""Forge torch zip files whose every field is chosen: what the property tests feed the readers.

``torch.save`` can only write honest files. A ``Forge`` describes a file by its parts instead, and
``write`` lays them out as a torch zip (stored records under one ``archive/`` folder, as torch writes):

* storages: the record bytes, each declared in the pickle with its own dtype and element count, which
  may disagree with the record's real size;
* tensors: views of a storage with any offset, shape and stride (zero, overlapping, past the end);
* the records' physical order, 64-byte alignment or none, records the pickle never references, and
  references to records that are not there.

``torch.load(path, weights_only=True)`` is the oracle: a reader must give exactly its tensors, or refuse.
``reforge`` writes a real checkpoint's content this way, one record's declaration changed.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, field

import torch

from helpers import load_tool

_CRAFT = load_tool("untrusted_inputs")  # its zip writer lays the records out
ARCHIVE = "archive"
_LEGACY = {torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.float16: "HalfStorage",
           torch.bfloat16: "BFloat16Storage", torch.int64: "LongStorage", torch.int32: "IntStorage",
           torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
           torch.bool: "BoolStorage"}
DTYPES = tuple(_LEGACY)


@dataclass
class Storage:
    data: bytes  # the record's bytes
    dtype: torch.dtype  # as the pickle declares it
    numel: int  # elements the pickle declares (honest: len(data) // element size)


@dataclass
class View:
    key: str  # the storage's key
    offset: int  # storage offset, in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class Forge:
    storages: dict[str, Storage] = field(default_factory=dict)
    tensors: dict[str, View] = field(default_factory=dict)  # the pickled object: {name: tensor}
    extra: dict[str, object] = field(default_factory=dict)  # plain values beside the tensors
    order: list[str] | None = None  # physical order of the storage records (default: by key)
    align: int = 64  # data offsets rounded up to this (1: none)
    unreferenced: dict[str, bytes] = field(default_factory=dict)  # data/<key> records no tensor uses
    missing: tuple[str, ...] = ()  # storage keys referenced but not written


def honest(tensors: dict[str, torch.Tensor]) -> Forge:
    """The forge of ``{name: contiguous tensor}``, each its own storage: a file torch would write."""
    f = Forge()
    for i, (name, t) in enumerate(tensors.items()):
        key = str(i)
        t = t.contiguous()
        f.storages[key] = Storage(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"",
                                  t.dtype, t.numel())
        f.tensors[name] = View(key, 0, tuple(t.shape), tuple(t.stride()))
    return f


class _Pid:
    def __init__(self, key: str, s: Storage) -> None:
        self.key, self.storage = key, s


class _Tensor:
    def __init__(self, pid: _Pid, v: View) -> None:
        self.pid, self.view = pid, v

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.pid, self.view.offset, torch.Size(self.view.size), self.view.stride, False,
                 collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Pid):
            return ("storage", getattr(torch, _LEGACY[obj.storage.dtype]), obj.key, "cpu", obj.storage.numel)
        return None


def pickled(f: Forge) -> bytes:
    pids = {k: _Pid(k, s) for k, s in f.storages.items()}
    for k in f.missing:
        pids.setdefault(k, _Pid(k, Storage(b"", torch.float32, 1)))
    obj: dict[str, object] = {n: _Tensor(pids[v.key], v) for n, v in f.tensors.items()}
    obj.update(f.extra)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _records(f: Forge, pkl: bytes | None = None) -> list[tuple[str, bytes]]:
    keys = f.order if f.order is not None else sorted(f.storages, key=lambda k: (len(k), k))
    recs = [("data.pkl", pickled(f) if pkl is None else pkl), (".format_version", b"1"),
            (".storage_alignment", b"64"), ("byteorder", b"little")]
    recs += [(f"data/{k}", f.storages[k].data) for k in keys if k not in f.missing]
    recs += [(f"data/{k}", data) for k, data in f.unreferenced.items()]
    recs += [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
    return recs


def write(f: Forge, path) -> None:
    _CRAFT.write_zip_records(str(path), ARCHIVE, _records(f), aligned=f.align > 1)


def tensor_paths(obj, path=()) -> list[tuple]:
    """The paths (keys and indices) of every tensor inside nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return [path]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [p for k, v in items for p in tensor_paths(v, (*path, k))]


def reforge(obj, path, mutate=None, at: int = 0, order_seed: int | None = None) -> None:
    """Write the object ``obj`` (a real checkpoint's content) as a torch zip at ``path``, each tensor its own
    contiguous storage; ``mutate(view, storage) -> (view, storage)`` changes the record of tensor number
    ``at`` (in ``tensor_paths`` order): its dtype, declared size, offset, shape or stride as the pickle
    declares them. ``order_seed`` shuffles the records' physical order."""
    f = Forge()
    seen = [0]

    def swap(o):
        if torch.is_tensor(o):
            t = o.detach().contiguous().cpu()
            key = str(len(f.storages))
            st = Storage(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"", t.dtype, t.numel())
            v = View(key, 0, tuple(t.shape), tuple(t.stride()))
            if mutate is not None and seen[0] == at:
                v, st = mutate(v, st)
            seen[0] += 1
            f.storages[key] = st
            return _Tensor(_Pid(key, st), v)
        if isinstance(o, dict):
            return type(o)((k, swap(v)) for k, v in o.items()) if type(o) is not dict else {k: swap(v) for k, v in o.items()}
        if isinstance(o, list):
            return [swap(v) for v in o]
        if isinstance(o, tuple) and not hasattr(o, "_fields"):
            return tuple(swap(v) for v in o)
        return o

    placeholder = swap(obj)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(placeholder)
    if order_seed is not None:
        import random

        f.order = sorted(f.storages)
        random.Random(order_seed).shuffle(f.order)
    _CRAFT.write_zip_records(str(path), ARCHIVE, _records(f, buf.getvalue()))


def oracle(path) -> dict | None:
    """What ``torch.load(weights_only=True)`` reads (None: it refuses the file)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - any refusal is the oracle refusing
        return None
