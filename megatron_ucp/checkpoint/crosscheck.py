"""Check the bytes our reader located against ``torch.load``'s reading of the same file.

The converter and the direct loaders copy byte ranges whose offsets come from one reader
(``checkpoint.torchzip``). Verifying an output against its input with that same reader cannot see a
mistake in it: both sides would read the same wrong bytes. So each input file is also read by
``torch.load(weights_only=True, mmap=True)`` (torch's own zip reader, through ``trust.load_file``'s
restricted path; mapping the file reads nothing until a page is touched), and the two readings are
paired by where each tensor sits in the unpickled object. For each paired storage, the bytes at the
offset our reader gave must equal torch's.

By default a sample of storages is compared (the first, the last and some between, ``SAMPLE`` in
all) and of each only its first, middle and last ``CHUNK`` bytes: a misplaced offset shows in any
part of a storage. ``every=True`` compares every byte of every storage.
"""

from __future__ import annotations

import os

import torch

from megatron_ucp.checkpoint.torchzip import stored_nbytes, tensors
from megatron_ucp.checkpoint.trust import CheckpointError, load_file

SAMPLE = 16  # storages compared per file by default
CHUNK = 64 << 10  # bytes compared at each place of a sampled storage
_FULL_CHUNK = 4 << 20  # bytes per comparison when every byte is compared


def _where(where: tuple) -> str:
    return ".".join(str(k) for k in where) or "the top level"


def _sampled(n: int, sample: int) -> list[int]:
    if n <= sample:
        return list(range(n))
    return sorted({round(i * (n - 1) / (sample - 1)) for i in range(sample)})


def _ranges(nbytes: int, every: bool) -> list[tuple[int, int]]:
    """(start, length) pieces of a storage of ``nbytes`` to compare."""
    if every or nbytes <= 3 * CHUNK:
        return [(s, min(_FULL_CHUNK, nbytes - s)) for s in range(0, nbytes, _FULL_CHUNK)]
    return [(0, CHUNK), ((nbytes - CHUNK) // 2, CHUNK), (nbytes - CHUNK, CHUNK)]


def crosscheck_file(path: str, every: bool = False, sample: int = SAMPLE) -> int:
    """Compare our reader's bytes of ``path``'s storages with ``torch.load``'s; the bytes compared. A
    difference, or a tensor only one reading has, is a ``CheckpointError`` naming the file."""
    ours = load_file(path, meta=True)
    theirs = dict(tensors(load_file(path, mmap=True, stub_deepspeed=True)))
    pairs: dict[int, tuple[tuple, torch.UntypedStorage, torch.UntypedStorage]] = {}
    for where, t in tensors(ours):
        storage = t.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        twin = theirs.get(where)
        if offset is None or twin is None:
            raise CheckpointError(f"{path}: the tensor at {_where(where)} is not located by both our reader and "
                                  "torch.load; refusing to trust this file's layout")
        if int(offset) not in pairs:
            pairs[int(offset)] = (where, storage, twin.untyped_storage())
    ordered = list(pairs.items())
    compared = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in (range(len(ordered)) if every else _sampled(len(ordered), sample)):
            offset, (where, mine, other) = ordered[i]
            if stored_nbytes(mine) != other.nbytes():
                raise CheckpointError(f"{path}: the storage of the tensor at {_where(where)} holds {stored_nbytes(mine)} "
                                      f"bytes to our reader, {other.nbytes()} to torch.load")
            real = torch.empty(0, dtype=torch.uint8).set_(other)
            for start, n in _ranges(stored_nbytes(mine), every):
                if os.pread(fd, n, offset + start) != real[start:start + n].numpy().tobytes():
                    raise CheckpointError(f"{path}: the bytes our reader located for the tensor at {_where(where)} "
                                          f"(byte {offset + start}) differ from torch.load's; refusing to trust "
                                          "this file's layout")
                compared += n
    finally:
        os.close(fd)
    return compared


def crosscheck_files(paths: list[str], every: bool = False) -> int:
    """``crosscheck_file`` of each of ``paths``; the bytes compared."""
    return sum(crosscheck_file(p, every=every) for p in paths)
