"""What the benchmarks in ``tools/`` share: the machine they ran on, thread counts, child environments,
paired-run statistics, markdown tables and the CLI plumbing around them.

Each ``tools/benchmark_*.py`` is a thin CLI over its own measurements; everything here is the same for
all of them, so a fix (a CPU count that honours the affinity mask, a table that lines up) lands once.
Nothing here imports torch or DeepSpeed at module level.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, TypeVar

C = TypeVar("C")

# --------------------------------------------------------------------------------------------------
# The machine


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(ranks: int, cpus: int | None = None) -> int:
    """OpenMP threads for each of ``ranks`` processes sharing ``cpus`` (default: the usable CPUs)."""
    return max(1, (cpus or usable_cpus()) // ranks)


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews every number a benchmark measures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def package_version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable torch: no GPUs
        return 0


def machine_info(**extra: Any) -> dict[str, Any]:
    """The facts every benchmark report prints and stores (``extra`` adds a benchmark's own)."""
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "deepspeed": package_version("deepspeed"),
        "load_average": load_average(),
        **extra,
    }


# --------------------------------------------------------------------------------------------------
# Child processes


def child_env(repo: str | Path, base: Mapping[str, str] | None = None, *, threads: int | None = None,
              cuda: bool | None = None) -> dict[str, str]:
    """The environment of a benchmarked child: ``repo`` first on ``PYTHONPATH`` (the checkout under test,
    not an installed copy), ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``threads`` when given, and
    without CUDA ``DS_ACCELERATOR=cpu`` (gloo)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if not (cuda_device_count() > 0 if cuda is None else cuda):
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tail(path: str | Path, n: int) -> str:
    """The last ``n`` lines of a log ("" if it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# Statistics of paired runs


def paired_ratio(values: Sequence[float], refs: Sequence[float]) -> float | None:
    """The median over rounds of ``values[i] / refs[i]``: both ran in round i, back to back, so a change of
    load on a shared machine hits both. None without a usable pair."""
    ratios = [a / b for a, b in zip(values, refs) if b > 0]
    return statistics.median(ratios) if ratios else None


# --------------------------------------------------------------------------------------------------
# Reports


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = (),
                   aligned: bool = True) -> str:
    """A markdown table; columns in ``right`` are right-aligned. ``aligned`` pads every cell to its column's
    width (for reading in a terminal); otherwise cells are written as they are (``|---|---:|``)."""
    rows = [list(r) for r in rows]
    right = set(right)
    if aligned:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    else:
        widths = [0] * len(header)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    if aligned:
        seps = ["-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)]
    else:
        seps = ["---:" if i in right else "---" for i in range(len(header))]
    sep = "|" + "|".join(seps) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def write_json(path: str | Path, doc: Any, **kwargs: Any) -> None:
    """``doc`` as indented JSON at ``path``, its folder made first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, **kwargs)


# --------------------------------------------------------------------------------------------------
# CLI


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and booleans (flags whose help says what they do)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                 make: Callable[[argparse.Namespace], C]) -> tuple[argparse.Namespace, C]:
    """The parsed flags and the benchmark's configuration made from them; a ``ValueError`` from ``make`` (a
    frozen config's validation) is the parser's one-line usage error (exit status 2)."""
    args = parser.parse_args(argv)
    try:
        return args, make(args)
    except ValueError as e:
        parser.error(str(e))


def command_line(argv: Sequence[str] | None, script: str | Path) -> str:
    """The command a report prints: this interpreter with ``sys.argv``, or ``script`` with ``argv`` when
    ``main(argv)`` was called from Python."""
    return shlex.join([sys.executable, *sys.argv] if argv is None else
                      [sys.executable, str(Path(script).resolve()), *argv])
