"""Read the tensors of a PyTorch zip checkpoint as meta tensors located by the zip's own directory.

``torch.load(map_location="meta")`` does not look up where each storage's bytes are: it computes
the offsets, assuming the records lie one after the other exactly as torch's own zip writer puts
them. A file whose records are in another physical order (same names, same bytes, a valid zip that
``torch.load`` reads correctly) then gives offsets into other records' bytes. Every reader here that
copies byte ranges out of a checkpoint (the ZeRO index, the converter, direct resharding, the
Hugging Face ``.bin`` reader) takes its offsets from ``load_meta`` instead, which:

* parses the central directory (Python's ``zipfile``) and each record's local header, and requires
  every record to be stored uncompressed, to carry the same name in both, to have consistent
  sizes, to lie inside the file without overlapping another, and all records to share one archive
  folder;
* unpickles ``data.pkl`` with the restricted unpickler it is given (torch's weights-only one, with
  the caller's allowlist), giving each storage a meta tensor whose ``_checkpoint_offset`` is its
  record's data offset from that directory;
* checks that each storage's declared size (elements times the element size of its own dtype)
  equals its record's size, that no reference names a missing record and that no ``data/`` record
  is left unreferenced, and refuses a big-endian file;
* checks every tensor's view (``check_views``): no overlapping or expanded elements, no negative
  strides, nothing beyond its storage's bytes. An 82 KB file may otherwise declare a stride-0
  tensor of 2**40 elements, which costs nothing here but a terabyte when anything copies it.

Every problem is a ``CheckpointError`` naming the file and the record or tensor.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from megatron_ucp.checkpoint.trust import CheckpointError

# Test-only: take offsets from torch.load(map_location="meta") as before (computed, not looked up), so
# that a test can show what the reader independent of it (``checkpoint.crosscheck``) catches.
FORCE_COMPUTED_OFFSETS = False

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature ... name length, extra length
_LOCAL_SIGNATURE = 0x04034B50
_DATA_DESCRIPTOR_FLAG = 0x08
_UTF8_FLAG = 0x800
_ZIP64_SIZE = 0xFFFFFFFF


@dataclass(frozen=True)
class Record:
    """One stored zip record: its name and where its bytes are."""

    name: str
    header_offset: int
    data_offset: int
    size: int


def read_records(path: str) -> tuple[str, dict[str, Record]]:
    """(the archive folder, its records by name relative to that folder) of the zip file ``path``."""
    file_size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            zf = zipfile.ZipFile(f)
            infos = zf.infolist()
            directory_start = int(getattr(zf, "start_dir", file_size))
    except Exception as e:  # noqa: BLE001 - whatever zipfile trips on, the file is not a torch zip
        raise CheckpointError(f"{path}: unreadable or truncated ({file_size} bytes): not a zip-format "
                              f"torch.save file ({e})") from None  # a message naming the format, not a call
    if not infos:
        raise CheckpointError(f"{path}: an empty zip archive, not a torch.save file")  # a message, not a call
    prefixes = {i.orig_filename.split("/", 1)[0] for i in infos}
    if len(prefixes) != 1 or any("/" not in i.orig_filename for i in infos):
        raise CheckpointError(f"{path}: records in {len(prefixes)} archive folders ({sorted(prefixes)[:3]}); "
                              "a torch.save file has exactly one")  # a message, not a call
    prefix = prefixes.pop()
    records: dict[str, Record] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in infos:
            rec = _record(path, fd, info, prefix)
            if rec.name in records:
                raise CheckpointError(f"{path}: record {info.orig_filename} appears twice in the zip directory")
            if rec.data_offset + rec.size > directory_start:
                raise CheckpointError(f"{path}: record {info.orig_filename} declares {rec.size} bytes at byte "
                                      f"{rec.data_offset}, past the data area ({directory_start} bytes)")
            records[rec.name] = rec
    finally:
        os.close(fd)
    ordered = sorted(records.values(), key=lambda r: r.header_offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.data_offset + a.size > b.header_offset:
            raise CheckpointError(f"{path}: records {prefix}/{a.name} and {prefix}/{b.name} overlap")
    return prefix, records


def _record(path: str, fd: int, info: zipfile.ZipInfo, prefix: str) -> Record:
    name = info.orig_filename
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointError(f"{path}: record {name} is compressed (method {info.compress_type}); "
                              "torch.save stores records uncompressed")  # a message, not a call
    header = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
    if len(header) != _LOCAL_HEADER.size:
        raise CheckpointError(f"{path}: record {name}: its local header at byte {info.header_offset} is past "
                              "the end of the file")
    sig, _, flags, method, _, _, _, csize, usize, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if sig != _LOCAL_SIGNATURE:
        raise CheckpointError(f"{path}: record {name}: no local header at byte {info.header_offset}")
    encoding = "utf-8" if flags & _UTF8_FLAG else "cp437"
    local_name = os.pread(fd, name_len, info.header_offset + _LOCAL_HEADER.size)
    if local_name != name.encode(encoding, "surrogateescape"):
        raise CheckpointError(f"{path}: record {name}: its local header names it "
                              f"{local_name.decode(encoding, 'replace')!r}")
    if method != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: record {name} is compressed in its local header (method {method})")
    sizes = (csize, usize)
    deferred = flags & _DATA_DESCRIPTOR_FLAG and sizes == (0, 0)  # sizes follow the data, as torch writes
    zip64 = info.file_size >= _ZIP64_SIZE and sizes == (_ZIP64_SIZE, _ZIP64_SIZE)
    if not (deferred or zip64 or sizes == (info.file_size, info.file_size)):
        raise CheckpointError(f"{path}: record {name}: its local header says {usize} bytes, the directory "
                              f"{info.file_size}")
    data_offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return Record(name[len(prefix) + 1:], info.header_offset, data_offset, info.file_size)


def _read(path: str, rec: Record, limit: int | None = None) -> bytes:
    n = rec.size if limit is None else min(rec.size, limit)
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, n, rec.data_offset)
    finally:
        os.close(fd)
    if len(data) != n:
        raise CheckpointError(f"{path}: truncated: record {rec.name} ends past the end of the file")
    return data


def load_meta(path: str, unpickler: type) -> Any:
    """The object in the torch zip file ``path``, its tensors on the meta device located by the zip
    directory (``storage._checkpoint_offset``). ``unpickler``: a class like ``pickle.Unpickler``
    (``cls(file, encoding=...)``, an assignable ``persistent_load``, ``load()``)."""
    prefix, records = read_records(path)
    if "data.pkl" not in records:
        raise CheckpointError(f"{path}: no {prefix}/data.pkl record (not a torch.save file?)")  # a message
    if "byteorder" in records:
        order = _read(path, records["byteorder"], 16)
        if order == b"big":
            raise CheckpointError(f"{path}: stored big-endian (record {prefix}/byteorder); only little-endian "
                                  "checkpoints are read")
        if order != b"little":
            raise CheckpointError(f"{path}: record {prefix}/byteorder holds {order[:16]!r}, not 'little'")
    storages: dict[str, torch.UntypedStorage] = {}

    def persistent_load(saved_id: Any) -> torch.storage.TypedStorage:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5 or \
                torch.serialization._maybe_decode_ascii(saved_id[0]) != "storage":
            raise CheckpointError(f"{path}: a storage reference of an unknown form ({str(saved_id)[:80]})")
        storage_type, key, _location, numel = saved_id[1:]
        key = torch.serialization._maybe_decode_ascii(key)
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(numel, int) \
                or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(f"{path}: a malformed storage reference ({str(saved_id)[:80]})")
        rec = records.get(f"data/{key}")
        if rec is None:
            raise CheckpointError(f"{path}: the pickle references record {prefix}/data/{key}, which is missing")
        nbytes = numel * torch._utils._element_size(dtype)
        if nbytes != rec.size:
            raise CheckpointError(f"{path}: record {prefix}/data/{key} holds {rec.size} bytes, but the pickle "
                                  f"declares {numel} {dtype} elements ({nbytes} bytes) there")
        if key not in storages:
            storage = torch.UntypedStorage(nbytes, device="meta")
            storage._checkpoint_offset = rec.data_offset  # type: ignore[attr-defined]  # torch's own name for it
            storage._checkpoint_nbytes = nbytes  # type: ignore[attr-defined]  # set_ grows a meta storage silently
            storages[key] = storage
        return torch.storage.TypedStorage(wrap_storage=storages[key], dtype=dtype, _internal=True)

    loader = unpickler(io.BytesIO(_read(path, records["data.pkl"])), encoding="utf-8")
    loader.persistent_load = persistent_load
    tls = torch.serialization._serialization_tls
    before = tls.map_location
    tls.map_location = "meta"  # what torch.load sets, for tensors rebuilt without a storage
    try:
        result = loader.load()
    finally:
        tls.map_location = before
    unreferenced = sorted(n for n in records if n.startswith("data/") and n[len("data/"):] not in storages)
    if unreferenced:
        raise CheckpointError(f"{path}: record {prefix}/{unreferenced[0]} is not referenced by the pickle "
                              f"({len(unreferenced)} such records)")
    check_views(path, result)
    return result


# --- tensors and their views ------------------------------------------------------------------------


def tensors(obj: Any) -> Iterator[tuple[tuple, torch.Tensor]]:
    """Every tensor inside ``obj`` (dicts, lists, tuples, sets, objects' attributes), with where it is
    (the keys, indices and attribute names leading to it), in the order they were unpickled."""
    seen: set[int] = set()
    stack: list[tuple[tuple, Any]] = [((), obj)]
    while stack:
        where, x = stack.pop()
        if torch.is_tensor(x):
            yield where, x
            continue
        if isinstance(x, (str, bytes, bytearray, int, float, complex, bool, type(None))) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            children = list(x.items())
        elif isinstance(x, (list, tuple)):
            children = list(enumerate(x))
        elif isinstance(x, (set, frozenset)):
            children = [(i, v) for i, v in enumerate(sorted(x, key=repr))]
        elif isinstance(getattr(x, "__dict__", None), dict) and not isinstance(x, type):
            children = list(vars(x).items())
        else:
            continue
        stack.extend((where + (k,), v) for k, v in reversed(children))


def stored_nbytes(storage: torch.UntypedStorage) -> int:
    """The bytes a storage has in its file: a meta storage's size as its record declared it (a view
    rebuilt past its end makes torch grow the meta storage without a word), else its size."""
    return int(getattr(storage, "_checkpoint_nbytes", storage.nbytes()))


def view_problem(t: torch.Tensor) -> str | None:
    """Why the view ``t`` does not address distinct elements inside its storage's bytes, or None."""
    if t.layout != torch.strided:
        return f"is a {t.layout} tensor (only dense tensors are read)"
    if t.numel() == 0:
        return None
    dims = sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1)
    reach = 0  # the largest element offset the dims so far address
    for stride, size in dims:
        if stride < 0:
            return "has a negative stride"
        if stride <= reach:
            return "addresses some elements more than once (an expanded or overlapping view)"
        reach += (size - 1) * stride
    if t.storage_offset() < 0:
        return "starts before its storage"
    end = (t.storage_offset() + reach + 1) * t.element_size()
    if end > stored_nbytes(t.untyped_storage()):
        return f"needs {end} bytes of a storage of {stored_nbytes(t.untyped_storage())}"
    return None


def check_views(path: str, obj: Any) -> None:
    """Refuse ``obj`` if a tensor in it is not a plain view of stored bytes (``view_problem``)."""
    for where, t in tensors(obj):
        problem = view_problem(t)
        if problem:
            at = ".".join(str(k) for k in where) or "the top level"
            raise CheckpointError(f"{path}: the tensor at {at} (shape {tuple(t.shape)}, strides {tuple(t.stride())}) "
                                  f"{problem}; refused")
