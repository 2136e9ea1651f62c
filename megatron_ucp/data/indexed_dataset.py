"""Memory-mapped token datasets in Megatron's ``MMapIndexedDataset`` format.

A dataset is two files sharing a prefix:

``{prefix}.bin``
    every sequence's tokens, back to back, in one dtype (native little-endian), no header.
``{prefix}.idx`` (all little-endian)
    ====================  =========================================================
    9 bytes               magic ``b"MMIDIDX\\x00\\x00"``
    uint64                version, 1
    uint8                 dtype code (see ``DTYPE_CODES``)
    uint64                number of sequences ``n``
    uint64                length of ``doc_idx``, i.e. documents + 1
    int32[n]              ``sizes``: tokens per sequence
    int64[n]              ``pointers``: byte offset of each sequence in the ``.bin``
    int64[docs + 1]       ``doc_idx``: index of each document's first sequence, then ``n``
    ====================  =========================================================

This is byte-for-byte what Megatron-LM writes and reads, so the files are interchangeable.
Our builder writes one sequence per document (Megatron does the same unless sentence
splitting is on); the reader accepts any valid file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from megatron_ucp.atomic import fresh_temporary_name

__all__ = [
    "DTYPE_CODES",
    "HEADER_MAGIC",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "best_dtype",
    "data_file_path",
    "index_file_path",
]

HEADER_MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's dtype codes.  (Megatron's table has no code for uint32.)
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, len(doc_idx)


def _code_of(dtype: np.dtype | type) -> int:
    dt = np.dtype(dtype)
    for code, t in DTYPE_CODES.items():
        if np.dtype(t) == dt:
            return code
    raise ValueError(f"dtype {dt} has no Megatron code; use one of {[np.dtype(t).name for t in DTYPE_CODES.values()]}")


def best_dtype(vocab_size: int) -> type[np.generic]:
    """Token dtype for a vocabulary: uint16 when every id fits comfortably, else int32 (Megatron's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def data_file_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def _tmp_name(path: str) -> str:
    # A fresh temporary sibling (same directory, so os.replace is an atomic rename), never guessed in advance.
    return fresh_temporary_name(path)


def _create_exclusively(path: str):
    """A new file at ``path`` opened for binary writing; whatever is already there (a planted link
    included) is never opened or followed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


class IndexedDatasetBuilder:
    """Write a dataset incrementally: ``add_document`` for each document, then ``finalize``.

    Nothing appears under the final names until ``finalize`` succeeds: tokens go to a
    temporary ``.bin``, the index to a temporary ``.idx``, and both are renamed into place
    (the ``.bin`` first, so a present ``.idx`` always describes a complete ``.bin``).
    Use as a context manager to delete the temporaries if an exception escapes.
    """

    def __init__(self, bin_path: str | os.PathLike, dtype: np.dtype | type = np.int32) -> None:
        self.bin_path = str(bin_path)
        self.dtype = np.dtype(dtype)
        self._code = _code_of(self.dtype)
        self._tmp_bin = _tmp_name(self.bin_path)
        Path(self.bin_path).parent.mkdir(parents=True, exist_ok=True)
        self._file = _create_exclusively(self._tmp_bin)
        self._sizes: list[int] = []
        self._finalized = False
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._range: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._range = None

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one document (one sequence) of token ids."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.bin_path}: a document must be 1-D, got shape {arr.shape}")
        if arr.size and self._range is not None:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._range[0] or hi > self._range[1]:
                raise ValueError(f"{self.bin_path}: token ids [{lo}, {hi}] do not fit {self.dtype}")
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"{self.bin_path}: document of {arr.size} tokens exceeds int32 sizes")
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(int(arr.size))

    def finalize(self, idx_path: str | os.PathLike) -> None:
        """Write the index and move both files into place."""
        idx_path = str(idx_path)
        self._file.close()
        sizes = np.asarray(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        tmp_idx = _tmp_name(idx_path)
        with _create_exclusively(tmp_idx) as f:
            f.write(_HEADER.pack(HEADER_MAGIC, VERSION, self._code, len(sizes), len(doc_idx)))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, idx_path)
        self._finalized = True

    def abort(self) -> None:
        """Close and delete the temporary data file (no-op after ``finalize``)."""
        self._file.close()
        if not self._finalized:
            Path(self._tmp_bin).unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


class IndexedDataset:
    """Read-only view of ``{prefix}.bin`` / ``{prefix}.idx`` through ``np.memmap``.

    ``ds[i]`` is sequence ``i`` (a memmap-backed array, no copy); ``len(ds)`` is the number
    of sequences; ``sizes``/``pointers``/``doc_idx`` are the index arrays.  The files are
    validated on open (header, index length, contiguous pointers, ``.bin`` size); any
    inconsistency raises ``ValueError`` naming the file.  Pickles by prefix, so a dataset
    can be sent to DataLoader workers without copying the data.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        self.idx_path = index_file_path(prefix)
        self.bin_path = data_file_path(prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: indexed dataset file not found")
        self._read_index()
        self._read_data()

    def _read_index(self) -> None:
        path = self.idx_path
        file_size = os.path.getsize(path)
        if file_size < _HEADER.size:
            raise ValueError(f"{path}: truncated index ({file_size} bytes, header needs {_HEADER.size})")
        with open(path, "rb") as f:
            magic, version, code, n, n_doc_idx = _HEADER.unpack(f.read(_HEADER.size))
        if magic != HEADER_MAGIC:
            raise ValueError(f"{path}: bad magic {magic!r}, expected {HEADER_MAGIC!r} (not an MMIDIDX index)")
        if version != VERSION:
            raise ValueError(f"{path}: unsupported index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ValueError(f"{path}: unknown dtype code {code}")
        expected = _HEADER.size + 4 * n + 8 * n + 8 * n_doc_idx
        if file_size != expected:
            what = "truncated" if file_size < expected else "trailing bytes in"
            raise ValueError(f"{path}: {what} index: {file_size} bytes, header implies {expected}")
        if n_doc_idx < 1:
            raise ValueError(f"{path}: empty doc_idx (it must hold at least the final entry {n})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        offset = _HEADER.size
        # The arrays are memory-mapped too: a large corpus has millions of sequences.
        self.sizes = np.memmap(path, np.dtype("<i4"), "r", offset, (n,)) if n else np.zeros(0, np.int32)
        offset += 4 * n
        self.pointers = np.memmap(path, np.dtype("<i8"), "r", offset, (n,)) if n else np.zeros(0, np.int64)
        offset += 8 * n
        self.doc_idx = np.memmap(path, np.dtype("<i8"), "r", offset, (n_doc_idx,))

        if n and int(self.sizes.min()) < 0:
            raise ValueError(f"{path}: negative sequence size")
        # Sequences must be stored back to back from offset 0 -- Megatron always writes them
        # so, and it lets a document range be read as one contiguous slice of the .bin.
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(self.sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=starts[1:])
        if not np.array_equal(starts, self.pointers):
            raise ValueError(f"{path}: sequence pointers are not contiguous byte offsets of the sizes")
        if self.doc_idx[0] != 0 or self.doc_idx[-1] != n or np.any(np.diff(self.doc_idx) < 0):
            raise ValueError(f"{path}: doc_idx must rise from 0 to the number of sequences ({n})")

    def _read_data(self) -> None:
        expected = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        actual = os.path.getsize(self.bin_path)
        if actual != expected:
            what = "truncated" if actual < expected else "too large"
            raise ValueError(
                f"{self.bin_path}: data file {what}: {actual} bytes, but {self.idx_path} describes {expected}"
            )
        # np.memmap cannot map an empty file; an empty dataset gets an empty array.
        self.tokens = np.memmap(self.bin_path, self.dtype, "r") if expected else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end if ``length`` is None)."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        size = int(self.sizes[i])
        if not 0 <= offset <= size:
            raise IndexError(f"offset {offset} out of range for sequence {i} of length {size}")
        end = size if length is None else min(size, offset + length)
        start = self._token_start(i)
        return self.tokens[start + offset : start + end]

    def token_span(self, first: int, stop: int) -> tuple[int, int]:
        """Positions ``[begin, end)`` in ``self.tokens`` of sequences ``first .. stop-1``."""
        if not 0 <= first <= stop <= len(self):
            raise IndexError(f"sequence range [{first}, {stop}) out of range for {self.prefix}")
        if first == stop:
            return (0, 0)
        return self._token_start(first), self._token_start(stop - 1) + int(self.sizes[stop - 1])

    def _token_start(self, i: int) -> int:
        return int(self.pointers[i]) // self.dtype.itemsize

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["prefix"])

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, sequences={len(self)}, dtype={self.dtype.name})"
