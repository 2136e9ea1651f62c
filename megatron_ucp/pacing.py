"""Named points in long file work, where a test can slow the work down or stop it.

Tests of crash safety kill a conversion in each of its phases. Timing the kills from a measured run
ties the test to the machine's speed (a faster machine finishes a phase before the kill lands), so
the converter passes through named points instead, and two environment variables act on them:

* ``MEGATRON_UCP_PACE_S=<seconds>``: sleep that long at every point (a slower machine, on purpose);
* ``MEGATRON_UCP_STOP_AT=<point>[:<n>]``: at the ``n``-th arrival (default 1) at ``<point>``, the
  process stops itself with ``SIGSTOP``; the test then kills it exactly there (``stop_and_kill``);
* ``MEGATRON_UCP_HOLD_AT=<point>[:<n>]``: at the ``n``-th arrival the process prints
  ``holding at <point> (pid N)`` to stderr and waits there, running, until the caller's ``release()``
  says so (the trainer's: a SIGTERM arrived) or it is killed. The elastic tests hold one node's workers
  at an iteration, or inside a save, and kill or join a node exactly then.

With neither set, as in every real run, ``point`` only reads the two variables. The points of the
converter (``checkpoint.universal``) are listed in ``CONVERTER_POINTS``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

PACE_ENV = "MEGATRON_UCP_PACE_S"
STOP_ENV = "MEGATRON_UCP_STOP_AT"
HOLD_ENV = "MEGATRON_UCP_HOLD_AT"
HOLD_POLL_S = 0.05  # how often a held process asks release()

# The converter's points, in the order a conversion passes them.
CONVERTER_POINTS = (
    "indexed",        # the input's pickles are read; nothing written yet
    "staged",         # the temporary output folder exists, empty
    "atom-started",   # an atom file holds its header, its tensor bytes not yet written (once per atom)
    "param-written",  # one parameter's atoms are complete (once per parameter)
    "written",        # every atom and side file is in the temporary folder
    "param-verified", # one parameter's atoms were re-read and compared (once per parameter)
    "marked",         # the completion marker is written; the folder is not yet renamed into place
    "published",      # the folder is in place; latest_universal not yet updated
)

_lock = threading.Lock()
_arrivals: dict[str, int] = {}


def _spec(env: str) -> tuple[str, int] | None:
    spec = os.environ.get(env)
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count) if count else 1


def _arrived(env: str, name: str) -> bool:
    """Whether this arrival at ``name`` is the one the variable ``env`` names."""
    spec = _spec(env)
    if spec is None or spec[0] != name:
        return False
    with _lock:
        key = f"{env}:{name}"
        _arrivals[key] = _arrivals.get(key, 0) + 1
        return _arrivals[key] == spec[1]


def point(name: str, release: Callable[[], bool] | None = None) -> None:
    """Pass the point ``name``: sleep, stop or hold if the environment asks for it (see the module's doc);
    ``release``: what ends a hold (without it, only a kill does)."""
    pace = os.environ.get(PACE_ENV)
    if pace:
        time.sleep(float(pace))
    if _arrived(STOP_ENV, name):
        os.kill(os.getpid(), signal.SIGSTOP)
    if _arrived(HOLD_ENV, name):
        # one write(2) of a short line: whole in a pipe other processes write to (print writes text and end apart)
        os.write(sys.stderr.fileno(), f"holding at {name} (pid {os.getpid()})\n".encode())
        while not (release is not None and release()):
            time.sleep(HOLD_POLL_S)

