"""numpy values in checkpoint pickles, rebuilt with plain numeric dtypes only.

Our checkpoints hold numpy values beside tensors: numpy scalars (``np.float64``, ``np.int64``) and the numpy
RNG state's ``uint32`` array. numpy pickles them as calls to ``numpy.dtype(code, align, copy)`` followed by a
BUILD with a state tuple, then ``scalar(dtype, bytes)`` or ``_reconstruct(ndarray, ...)`` plus an array
BUILD. The dtype's state can carry fields, a sub-array and flags: a crafted file can turn ``float64`` into a
dtype with a hidden object field, whose bytes numpy then reads as object pointers (a crash, or worse).

So the restricted unpickler (``checkpoint.trust``) is given these stand-ins under numpy's names instead of
numpy's own objects:

* ``numpy.dtype`` -> ``PickledDtype``: records the code and the BUILD state, and admits only a plain
  bool, integer, float or complex dtype in either byte order (no fields, sub-array, object or flags);
* ``numpy.ndarray`` -> ``CheckedArray``: an ndarray subclass whose constructor and BUILD take only such a
  dtype and a bytes buffer of exactly the array's size;
* ``scalar`` and ``_reconstruct`` of ``numpy._core.multiarray`` -> checked versions of both.

numpy's dtype classes are not on the allowlist at all: no real dtype is ever built from a file's state.
Anything else is an ``UnpicklingError``, which ``trust.load_file`` reports as one line naming the file.
"""

from __future__ import annotations

import math
import pickle
from typing import Any, cast

import numpy as np
from numpy._core import multiarray as _multiarray

PLAIN_KINDS = "biufc"  # bool, signed, unsigned, float, complex
_BYTE_ORDERS = ("<", ">", "=", "|")


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"numpy {what}; only plain numeric dtypes are accepted")


def plain_dtype(value: Any) -> np.dtype:
    """The numpy dtype ``value`` stands for, if it is a plain bool/integer/float/complex one."""
    if isinstance(value, PickledDtype):
        return value.dtype
    if isinstance(value, (str, bytes)) and len(value) <= 8:
        try:
            dt = np.dtype(value.decode("ascii") if isinstance(value, bytes) else value)
        except (TypeError, ValueError, UnicodeDecodeError):
            raise _refuse(f"dtype code {value!r} is not understood") from None
        if dt.kind in PLAIN_KINDS and dt.fields is None and dt.subdtype is None and not dt.hasobject:
            return dt
        raise _refuse(f"dtype {value!r} is not plain (kind {dt.kind!r})")
    raise _refuse(f"dtype given as {type(value).__name__}")


class PickledDtype:
    """``numpy.dtype(code, align, copy)`` as a pickle calls it, plus the BUILD that follows: the real dtype
    (``.dtype``) is made from the code and the byte order alone, after the state is checked to say nothing else."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True) -> None:
        if align not in (False, 0) or copy not in (True, False, 0, 1):
            raise _refuse(f"dtype arguments align={align!r}, copy={copy!r}")
        self.dtype = plain_dtype(code)

    def __repr__(self) -> str:
        return f"dtype({str(self.dtype)!r})"

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, sub-array, names, fields, element size, alignment, flags); a plain dtype's
        # is (3, order, None, None, None, -1, -1, 0)
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] in (3, 4)):
            raise _refuse(f"dtype state {_short(state)} is not a plain dtype's")
        _, order, sub, names, fields, size, align, flags = state
        if order not in _BYTE_ORDERS or (sub, names, fields) != (None, None, None) or size != -1 or align != -1 \
                or flags != 0:
            raise _refuse(f"dtype state {_short(state)} adds fields, a sub-array or flags")
        if order in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_data(data: Any, numel: int, dt: np.dtype) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise _refuse(f"data given as {type(data).__name__}, not bytes")
    if len(data) != numel * dt.itemsize:
        raise _refuse(f"data of {len(data)} bytes for {numel} elements of {dt}")
    return bytes(data)


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in value):
        raise _refuse(f"array shape {_short(value)}")
    return value


class CheckedArray(np.ndarray):
    """``numpy.ndarray`` as a pickle builds it: only a plain numeric dtype, filled from exactly its bytes.
    Pickled again, it is a plain ndarray."""

    def __new__(cls, shape: Any = (0,), dtype: Any = "f8", *args: Any, **kwargs: Any) -> "CheckedArray":
        if args or kwargs:  # a buffer, offset or strides: memory the array would read as the dtype
            raise _refuse("ndarray called with a buffer, offset or strides")
        return np.ndarray.__new__(cls, _shape(shape), plain_dtype(dtype))

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _refuse(f"array state {_short(state)}")
        version = state[0] if len(state) == 5 else 1
        shape, dtype, fortran, data = state[-4:]
        shape, dt = _shape(shape), plain_dtype(dtype)
        if version != 1 or not isinstance(fortran, bool):
            raise _refuse(f"array state {_short(state)}")
        checked: Any = (1, shape, dt, fortran, _check_data(data, math.prod(shape), dt))
        np.ndarray.__setstate__(self, checked)

    def __reduce__(self):
        return self.view(np.ndarray).__reduce__()


def reconstruct(cls: Any, shape: Any, dtype: Any) -> CheckedArray:
    """``numpy._core.multiarray._reconstruct``: an empty array that a BUILD then fills."""
    if cls is not CheckedArray:
        raise _refuse(f"_reconstruct of {_short(cls)}")
    return cast(CheckedArray, _multiarray._reconstruct(CheckedArray, _shape(shape), plain_dtype(dtype)))


def scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy._core.multiarray.scalar``: one value of a plain numeric dtype from exactly its bytes."""
    dt = plain_dtype(dtype)
    return _multiarray.scalar(dt, _check_data(data, 1, dt))


# name -> stand-in, for numpy's module paths in either numpy's spelling
STAND_INS: dict[str, Any] = {"numpy.dtype": PickledDtype, "numpy.ndarray": CheckedArray}
for _module in ("numpy._core.multiarray", "numpy.core.multiarray"):
    STAND_INS[f"{_module}._reconstruct"] = reconstruct
    STAND_INS[f"{_module}.scalar"] = scalar
