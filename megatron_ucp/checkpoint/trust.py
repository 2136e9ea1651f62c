"""Reading checkpoint files we did not write.

A ``.pt``/``.bin`` file is a pickle, and unpickling a crafted one runs whatever code it names. Every
file this project reads is therefore unpickled by torch's restricted ``weights_only`` unpickler,
with an explicit allowlist of the few globals real checkpoints hold beyond torch's own tensors and
containers. The allowlist was built by listing the globals
(``torch.serialization.get_unsafe_globals_in_checkpoint``) of every file our trainer writes (ZeRO
1/2/3, bf16/fp16/fp32, pipeline or not, GPT and Llama) and of the converters' output:

* DeepSpeed's ``fragment_address`` (ZeRO-1/2 slice mappings), ``LossScaler`` and
  ``DynamicLossScaler``, and the ``ZeroStageEnum``;
* numpy's array reconstructors (the numpy RNG state in our client state) and numpy scalars, through the
  checked stand-ins of ``numpy_safe`` (plain numeric dtypes only: a dtype's pickled state could otherwise
  give it hidden object fields);
* ``torch.torch_version.TorchVersion`` (a version string) and ``argparse.Namespace`` (the args that
  Megatron-DeepSpeed checkpoints carry).

Anything else is refused with a ``CheckpointError`` naming the file and the global; nothing in the
file runs. ``trust_checkpoint_code()`` (the tools' ``--trust-checkpoint-code``) is the only way
around it, for files the user vouches for.

Indexing a checkpoint (``meta=True``) must not import DeepSpeed, so DeepSpeed's classes are then
replaced by plain stand-ins that keep their fields; its tensors are located by the zip's directory
(``checkpoint.torchzip``), not by the offsets torch computes for a meta load. Every tensor loaded,
meta or not, must be a plain view of its stored bytes (no expanded or overlapping elements). Names taken from a file become paths only
through ``check_name`` and ``path_inside``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import re
import threading
from typing import IO, Any, Callable, Iterator, cast

import torch
import torch._weights_only_unpickler as _weights_only_unpickler


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or inconsistent; the message names it."""


def one_line(e: BaseException) -> str:
    """``<file>: <what is wrong>`` for the errors bad input raises."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, MemoryError):
        return f"out of memory: {e}" if str(e) else "out of memory"
    return " ".join(str(e).split()) or type(e).__name__


# Module path -> names, for the globals real checkpoints hold beyond torch's default allowlist.
ALLOWED_GLOBALS: dict[str, tuple[str, ...]] = {
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "numpy._core.multiarray": ("_reconstruct", "scalar"),
    "numpy.core.multiarray": ("_reconstruct", "scalar"),  # the same functions, as numpy 1.x pickles them
    "numpy": ("ndarray", "dtype"),
    "torch.torch_version": ("TorchVersion",),
    "argparse": ("Namespace",),
}
_NUMPY_ALIASES = {"numpy.core.multiarray": "numpy._core.multiarray"}

TRUST_FLAG = "--trust-checkpoint-code"

_trusted = False
_lock = threading.RLock()  # torch's allowlist is process-wide: one restricted load at a time


def trust_checkpoint_code(on: bool = True) -> None:
    """Process-wide opt-in: unpickle checkpoint files with full pickle (code in them runs)."""
    global _trusted
    _trusted = on


class _DeepSpeedStub:
    """Stands in for DeepSpeed's pickled classes (fragment_address, LossScaler, ZeroStageEnum) when
    only their fields are read, so indexing a checkpoint does not import DeepSpeed."""

    def __init__(self, *args, **kwargs) -> None:
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __int__(self) -> int:  # enums are pickled as Class(value)
        return int(self.args[0])


_STUBS: dict[str, type] = {}


def _stub(full_name: str) -> type:
    if full_name not in _STUBS:
        module, name = full_name.rsplit(".", 1)
        _STUBS[full_name] = type(name, (_DeepSpeedStub,), {"__module__": module})
    return _STUBS[full_name]


def _real(module: str, name: str):
    mod = importlib.import_module(_NUMPY_ALIASES.get(module, module))
    return getattr(mod, name)


# An entry of torch.serialization.safe_globals' list: an object, or (object, the name it is pickled under).
SafeGlobal = Callable[..., Any] | tuple[Callable[..., Any], str]


def allowed_globals(stub_deepspeed: bool) -> list[SafeGlobal]:
    """``(object, full name)`` pairs for ``torch.serialization.safe_globals``. numpy's names get the checked
    stand-ins of ``numpy_safe`` (plain numeric dtypes only), never numpy's own dtype, array or scalar builders."""
    try:
        from megatron_ucp.checkpoint.numpy_safe import STAND_INS
    except ImportError:  # no numpy: no numpy values can be read
        STAND_INS = {}
    out: list[SafeGlobal] = []
    for module, names in ALLOWED_GLOBALS.items():
        for name in names:
            full = f"{module}.{name}"
            if module.startswith("deepspeed") and stub_deepspeed:
                out.append((_stub(full), full))
            elif module.startswith("numpy"):
                if full in STAND_INS:
                    out.append((STAND_INS[full], full))
            else:
                out.append((_real(module, name), full))
    return out


def _allowed_names() -> set[str]:
    return {f"{m}.{n}" for m, names in ALLOWED_GLOBALS.items() for n in names}


def _refusal(path: str, error: Exception) -> CheckpointError:
    """The one-line error for a file the restricted unpickler refused, naming the offending globals."""
    names: list[str] = []
    try:
        names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in _allowed_names()]
    except Exception:  # noqa: BLE001 - a legacy or damaged file: fall back to torch's message
        pass
    text = str(error)
    if not names:
        m = re.search(r"GLOBAL (\S+)", text)
        names = [m.group(1)] if m else []
    # torch wraps the unpickler's own reason in advice; keep just the reason
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    what = (f"the pickled global{'s' if len(names) > 1 else ''} {', '.join(names)}" if names
            else f"pickled content the restricted unpickler refuses ({(reason or [''])[0][:200]})")
    return CheckpointError(f"{path}: holds {what}, which is not on the allowlist of checkpoint contents; "
                           f"refused, nothing in the file ran (pass {TRUST_FLAG} only for a file you trust)")


class _StubUnpickler(pickle.Unpickler):
    """Full pickle with DeepSpeed's classes replaced by stand-ins: only for trusted files."""

    def find_class(self, module: str, name: str):
        if module == "deepspeed" or module.startswith("deepspeed."):
            return _stub(f"{module}.{name}")
        return super().find_class(module, name)


class _stub_pickle:  # noqa: N801 - a stand-in for the pickle module, as torch.load's pickle_module
    Unpickler = _StubUnpickler
    load = pickle.load
    __name__ = "pickle"


class _TrustedMetaUnpickler(_StubUnpickler):
    """Full pickle (trusted files only) as torch.load's wrapper does it: storage classes by name."""

    def find_class(self, module: str, name: str):
        if "Storage" in name:
            with contextlib.suppress(KeyError):
                return torch.serialization.StorageType(name)
        return super().find_class({"torch.tensor": "torch._tensor"}.get(module, module), name)


_original_torch_load = torch.load


class _ExactReader(io.RawIOBase):
    """A file read with ``pread`` exactly as asked, no read-ahead: what a header-only (meta) load reads
    is the zip directory and the pickle, a few KiB, not a buffered file's 8 KiB chunks per seek."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        data = os.pread(self._fd, len(buffer), self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def load_file(path: str, mmap: bool = True, meta: bool = False, map_location: Any = None,
              stub_deepspeed: bool = False) -> Any:
    """``torch.load`` of a file we did not just write: restricted unpickling, clear one-line errors.

    ``meta=True`` reads only the pickle (``checkpoint.torchzip``): tensors come back on the meta device
    with their file offsets as the zip directory gives them, and DeepSpeed's classes as stand-ins
    (their fields only), so DeepSpeed is not imported; ``stub_deepspeed`` does the same for a real load.
    Either way every tensor must be a plain view of its stored bytes (``torchzip.check_views``).
    """
    from megatron_ucp.checkpoint import torchzip  # it imports CheckpointError from here

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing file")
    location = "meta" if meta else (map_location if map_location is not None else "cpu")
    try:
        if meta and not torchzip.FORCE_COMPUTED_OFFSETS:
            if _trusted:
                return torchzip.load_meta(path, _TrustedMetaUnpickler)
            with _lock, torch.serialization.safe_globals(allowed_globals(stub_deepspeed=True)):
                return torchzip.load_meta(path, _weights_only_unpickler.Unpickler)
        if meta:  # torch's computed offsets: only for tests, as the reader the checks must catch
            with _ExactReader(path) as reader:
                f = cast(IO[bytes], reader)  # a raw binary file: what torch.load reads from
                if _trusted:
                    return _original_torch_load(f, map_location="meta", weights_only=False, pickle_module=_stub_pickle)
                with _lock, torch.serialization.safe_globals(allowed_globals(stub_deepspeed=True)):
                    return _original_torch_load(f, map_location="meta", weights_only=True)
        if _trusted:
            obj = _original_torch_load(path, map_location=location, mmap=mmap, weights_only=False)
        else:
            with _lock, torch.serialization.safe_globals(allowed_globals(stub_deepspeed=stub_deepspeed)):
                obj = _original_torch_load(path, map_location=location, mmap=mmap, weights_only=True)
        torchzip.check_views(path, obj)  # before any caller copies an expanded view into real memory
        return obj
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        size = os.path.getsize(path)
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: unreadable or truncated ({size} bytes): {type(e).__name__}: {first}") from None


@contextlib.contextmanager
def restricted_torch_load(check: Callable[[str, Any], None] | None = None) -> Iterator[None]:
    """Route every ``torch.load`` in this block (DeepSpeed's loaders pass ``weights_only=False``: its
    checkpoint engine, its universal loader reading atoms, ``optimizer_state.pt``) through
    ``load_file``, with DeepSpeed's real classes on the allowlist. ``check(path, loaded)``: run on what
    each file holds before DeepSpeed sees it (a structure check that raises ``CheckpointError``)."""

    def guarded(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            raise CheckpointError(f"{f!r}: refusing to unpickle a stream of unknown origin")
        loaded = load_file(os.fspath(f), mmap=bool(mmap), map_location=map_location)
        if check is not None:
            check(os.fspath(f), loaded)
        return loaded

    if _trusted:
        yield
        return
    with _lock:
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = _original_torch_load


# --- names and paths --------------------------------------------------------------------------------

_MAX_NAME_BYTES = 255


def check_name(name: Any, source: str, what: str = "parameter name") -> str:
    """``name`` if it is safe as one path component; else a ``CheckpointError`` naming ``source``."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "is empty or not a string"
    elif name in (".", ".."):
        problem = "is a relative path component"
    elif "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        problem = "contains a path separator"
    elif "\0" in name:
        problem = "contains a NUL byte"
    elif len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        problem = f"is longer than {_MAX_NAME_BYTES} bytes"
    if problem:
        raise CheckpointError(f"{source}: {what} {name!r} {problem}; refusing to use it as a file name")
    return name


def path_inside(root: str, *parts: str) -> str:
    """``os.path.join(root, *parts)``, after checking that it resolves inside ``root``."""
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and os.path.commonpath([real_root, real]) != real_root:
        raise CheckpointError(f"{path}: resolves to {real}, outside {root}")
    return path


def regular_file_inside(folder: str, name: str, source: str) -> str:
    """A file we copy out of ``folder``: a plain name, a regular file, resolving inside ``folder``.

    A symbolic link is accepted only where the Hugging Face cache puts one: a ``snapshots/<rev>``
    folder whose files link into the repository's ``blobs/``.
    """
    check_name(name, source, "file name")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise CheckpointError(f"{path}: not a regular file")
    inside = [os.path.realpath(folder)]
    snapshot = os.path.realpath(folder)
    if os.path.basename(os.path.dirname(snapshot)) == "snapshots":
        inside.append(os.path.join(os.path.dirname(os.path.dirname(snapshot)), "blobs"))
    if not any(os.path.commonpath([root, real]) == root for root in inside):
        raise CheckpointError(f"{path}: links to {real}, outside {folder}; refusing to copy it")
    return path
