"""Read a Hugging Face checkpoint folder one tensor at a time.

Formats: ``model.safetensors`` or ``pytorch_model.bin``, single or sharded (``*.index.json`` with a
``weight_map``). Nothing is loaded whole, so converting a model needs memory for a few tensors, not a
shard:

* safetensors: each read opens the shard with ``safe_open`` and takes one tensor, which maps just
  that tensor's bytes; the mapping (and its resident pages) goes when the caller drops the tensor;
* ``.bin`` (torch zip): each shard's pickle is read once, by the restricted unpickler
  (``checkpoint.trust``), onto the ``meta`` device, which gives every
  tensor's dtype, shape, strides and byte offset in the file (``checkpoint.torchzip``, which also
  refuses views that are not plain stored bytes, such as a stride-0 tensor declaring 2**40
  elements), and a read ``pread``s exactly that tensor's bytes. (``torch.load(mmap=True)`` would also avoid a copy, but
  every page touched stays in the process's resident set until the whole shard is unmapped.)

Index entries must be plain file names in the folder; every tensor's bytes are checked to lie
inside its file before anything is read. Every problem is a ``CheckpointError`` naming the file and
what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megatron_ucp.checkpoint.format import read_json
from megatron_ucp.checkpoint.trust import check_name
from megatron_ucp.checkpoint.zero import CheckpointError, FlatRef, load_file, read_into

SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class _BinTensor:
    ref: FlatRef  # the storage's bytes from the tensor's first element
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class HFCheckpoint:
    """The tensors of one HF folder: ``names()``, ``shape(name)``, ``read(name)``."""

    def __init__(self, folder: str, fmt: str, weight_map: dict[str, str]) -> None:
        self.folder = folder
        self.format = fmt  # "safetensors" | "bin"
        self.weight_map = weight_map  # tensor name -> file name inside folder
        self._bin: dict[str, _BinTensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype | None] = {}  # None: a safetensors dtype torch lacks
        for file in sorted(set(weight_map.values())):
            self._index_file(file)
        missing = sorted(n for n in weight_map if n not in self._shapes)
        if missing:
            raise CheckpointError(f"{self._path(weight_map[missing[0]])}: the index lists {missing[0]} in this file, "
                                  f"but the file does not hold it ({len(missing)} such tensors)")

    def _path(self, file: str) -> str:
        return os.path.join(self.folder, file)

    def _index_file(self, file: str) -> None:
        path = self._path(file)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing shard (named by the index in {self.folder})")
        if self.format == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self._shapes[name] = tuple(sl.get_shape())
                        self._dtypes[name] = _SAFE_DTYPES.get(sl.get_dtype(), None)
            except Exception as e:  # noqa: BLE001 - any header problem makes the file unusable
                raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
            return
        sd = load_file(path, meta=True)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a state dict, found a {type(sd).__name__}")
        for name, t in sd.items():
            if not torch.is_tensor(t):
                continue
            if any(st < 0 for st in t.stride()):
                raise CheckpointError(f"{path}: {name} has a negative stride {tuple(t.stride())}")
            numel_span = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride())) if t.numel() else 0
            ref = FlatRef.of(path, t, span=numel_span)  # checked inside its storage and the file
            self._bin[name] = _BinTensor(ref, tuple(t.shape), tuple(t.stride()))
            self._shapes[name] = tuple(t.shape)
            self._dtypes[name] = t.dtype

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def file_of(self, name: str) -> str:
        return self._path(self.weight_map[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype | None:
        return self._dtypes.get(name)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, as a fresh contiguous CPU tensor."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: no tensor {name}")
        path = self.file_of(name)
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)  # mapped: pages load as read and go when the tensor is freed
        bt = self._bin[name]
        return _read_strided(bt.ref, 0, bt.shape, bt.stride)

    def read_slice(self, name: str, index: int) -> torch.Tensor:
        """``read(name)[index]`` (dim 0: one expert of a fused expert tensor), reading only that slice's bytes."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: no tensor {name}")
        shape = self._shapes[name]
        if not shape or not 0 <= index < shape[0]:
            raise CheckpointError(f"{self.file_of(name)}: {name} of shape {shape} has no slice {index} on dim 0")
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(self.file_of(name), framework="pt") as f:
                return f.get_slice(name)[index:index + 1].reshape(shape[1:])
        bt = self._bin[name]
        return _read_strided(bt.ref, index * bt.stride[0], bt.shape[1:], bt.stride[1:])

    def largest_file_bytes(self) -> int:
        return max(os.path.getsize(self._path(f)) for f in set(self.weight_map.values()))


_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def _read_strided(ref: FlatRef, start: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """The tensor of ``shape`` and ``stride`` whose element 0 is element ``start`` of ``ref``, read and made
    contiguous (only the bytes from its first element to its last are read)."""
    numel = _numel(shape)
    span = torch.empty(1 + sum((d - 1) * st for d, st in zip(shape, stride)) if numel else 0, dtype=ref.dtype)
    read_into(ref, start, span)
    if span.numel() == numel and stride == _contiguous_strides(shape):
        return span.view(shape)
    return span.as_strided(shape, stride).contiguous()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def read_config(folder: str) -> dict:
    """``config.json`` of an HF folder: a JSON object (depth-bounded, ``format.read_json``); its entries are
    checked where they are used (``layout.hf.check_hf_config``)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; a Hugging Face checkpoint folder needs its config.json")
    config = read_json(path, "a Hugging Face config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def open_hf_checkpoint(folder: str, safe_serialization: bool | None = None) -> HFCheckpoint:
    """The checkpoint in ``folder``; ``safe_serialization`` True/False insists on safetensors/.bin,
    None takes safetensors when both are present (as ``from_pretrained`` does)."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    formats = []
    if safe_serialization in (True, None):
        formats.append(("safetensors", SAFE_FILE, SAFE_INDEX))
    if safe_serialization in (False, None):
        formats.append(("bin", BIN_FILE, BIN_INDEX))
    for fmt, single, index in formats:
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            index_data = read_json(index_path, "a weight index")
            if not isinstance(index_data, dict) or not isinstance(index_data.get("weight_map"), dict):
                raise CheckpointError(f"{index_path}: not a valid index (needs a 'weight_map' object)")
            weight_map = dict(index_data["weight_map"])
            for tensor, file in weight_map.items():
                check_name(file, f"{index_path} ({tensor})", "shard file name")
            return HFCheckpoint(folder, fmt, weight_map)
        if os.path.isfile(os.path.join(folder, single)):
            ckpt = HFCheckpoint(folder, fmt, {})
            ckpt._index_file(single)
            ckpt.weight_map = {name: single for name in ckpt._shapes}
            return ckpt
    wanted = " or ".join(f"{s} / {i}" for _, s, i in formats)
    raise CheckpointError(f"{folder}: no weights found (looked for {wanted})")
