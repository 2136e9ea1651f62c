"""Executing byte-range plans (``plan.ReadPlan``): read into a tensor, copy into a file.

A plan says which bytes of which files make a tensor; these run it. ``read_local`` reads into memory,
scattering each contiguous source range straight into the places it covers (``preadv``: the bytes are
copied once, with no intermediate buffer); ``copy_into`` moves the bytes file to file inside the kernel
(``copy_file_range``), never through user space.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import torch

from megatron_ucp.checkpoint.plan import Read, ReadPlan
from megatron_ucp.checkpoint.zero import CheckpointError

_IOV_MAX = 1024
_THREAD = threading.local()


def scratch(nbytes: int, slot: str = "scratch") -> torch.Tensor:
    """A per-thread byte buffer of at least ``nbytes``, grown as needed and reused across atoms (fresh
    memory costs a page fault per page); ``slot`` names one of several."""
    buf = getattr(_THREAD, slot, None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_THREAD, slot, buf)
    return buf[:nbytes]


@dataclass
class ReadCount:
    """What ``read_local`` calls did: ``preadv`` calls, bytes read, the files opened."""

    calls: int = 0
    nbytes: int = 0
    files: set[str] = field(default_factory=set)


def _preadv_all(fd: int, iovs: list, pos: int, path: str, count: ReadCount | None = None) -> None:
    """Fill the buffers ``iovs`` from the contiguous bytes at ``pos`` of ``fd``; a short read (end of file,
    a signal, the 2 GiB cap of one call) is finished piece by piece."""
    want = sum(len(v) for v in iovs)
    got = os.preadv(fd, iovs, pos) if want else 0
    if count is not None:
        count.calls, count.nbytes = count.calls + 1, count.nbytes + max(got, 0)
    if got == want:
        return
    off = pos
    for v in iovs:
        done = min(max(got - (off - pos), 0), len(v))
        while done < len(v):
            k = os.preadv(fd, [v[done:done + (1 << 30)]], off + done)
            if count is not None:
                count.calls, count.nbytes = count.calls + 1, count.nbytes + max(k, 0)
            if k <= 0:
                raise CheckpointError(f"{path}: truncated: ends before byte {off + len(v)}")
            done += k
        off += len(v)


def preadv_runs(plan: ReadPlan) -> list[list[Read]]:
    """The plan's reads as ``read_local`` issues them: sorted by file and offset, each run of reads that
    continue one another in one file (at most ``_IOV_MAX``) one ``preadv``."""
    size = plan.dtype.itemsize
    order = sorted(plan.reads, key=lambda r: (r.path, r.offset))
    runs: list[list[Read]] = []
    for r in order:
        last = runs[-1][-1] if runs else None
        if last is not None and last.path == r.path and last.offset + last.numel * size == r.offset \
                and len(runs[-1]) < _IOV_MAX:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def read_local(plan: ReadPlan, out: torch.Tensor | None = None, count: ReadCount | None = None) -> torch.Tensor:
    """Execute ``plan``: the target tensor, zeros where no source byte lands (vocabulary padding).

    ``out``: fill this contiguous tensor of the plan's dtype and size instead of a new one (an optimizer's
    own flat partition: no fresh memory, whose first touch costs a page fault per page). ``count``: add
    the ``preadv`` calls, bytes and files to it."""
    if out is None:
        out = torch.zeros(plan.local_shape, dtype=plan.dtype)
    else:
        if out.dtype != plan.dtype or out.numel() != math.prod(plan.local_shape) or not out.is_contiguous():
            raise ValueError(f"read_local: the destination ({out.dtype}, {out.numel()} elements, contiguous "
                             f"{out.is_contiguous()}) is not the plan's {plan.dtype} x {plan.local_shape}")
        flat, pos = out.view(-1), 0
        for r in plan.reads:  # sorted by destination: zero what falls between them
            if r.dst > pos:
                flat[pos:r.dst].zero_()
            pos = max(pos, r.dst + r.numel)
        if pos < flat.numel():
            flat[pos:].zero_()
    buf = out.view(-1).view(torch.uint8).numpy().data  # the tensor's bytes as a writable memoryview
    size = plan.dtype.itemsize
    fds: dict[str, int] = {}
    try:
        for run in preadv_runs(plan):  # contiguous source ranges: one preadv each
            first = run[0]
            if first.path not in fds:
                fds[first.path] = os.open(first.path, os.O_RDONLY)
                if count is not None:
                    count.files.add(first.path)
            _preadv_all(fds[first.path], [buf[r.dst * size:(r.dst + r.numel) * size] for r in run],
                        first.offset, first.path, count)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


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


def copy_into(plan: ReadPlan, dst_fd: int, data_offset: int) -> None:
    """Execute ``plan`` into the open file ``dst_fd``, whose tensor data starts at byte ``data_offset``."""
    size = plan.dtype.itemsize
    fds: dict[str, int] = {}
    try:
        for r in plan.reads:
            if r.path not in fds:
                fds[r.path] = os.open(r.path, os.O_RDONLY)
            _copy_bytes(fds[r.path], r.offset, dst_fd, data_offset + r.dst * size, r.numel * size)
    finally:
        for fd in fds.values():
            os.close(fd)


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)
