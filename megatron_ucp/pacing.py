"""Named points in long file work, where a test can slow the work down or stop it.

Tests of crash safety kill a conversion in each of its phases. Timing the kills from a measured run
ties the test to the machine's speed (a faster machine finishes a phase before the kill lands), so
the converter passes through named points instead, and two environment variables act on them:

* ``MEGATRON_UCP_PACE_S=<seconds>``: sleep that long at every point (a slower machine, on purpose);
* ``MEGATRON_UCP_STOP_AT=<point>[:<n>]``: at the ``n``-th arrival (default 1) at ``<point>``, the
  process stops itself with ``SIGSTOP``; the test then kills it exactly there (``stop_and_kill``).

With neither set, as in every real run, ``point`` only reads the two variables. The points of the
converter (``checkpoint.universal``) are listed in ``CONVERTER_POINTS``.
"""

from __future__ import annotations

import os
import signal
import threading
import time

PACE_ENV = "MEGATRON_UCP_PACE_S"
STOP_ENV = "MEGATRON_UCP_STOP_AT"

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


def _stop_spec() -> tuple[str, int] | None:
    spec = os.environ.get(STOP_ENV)
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count) if count else 1


def point(name: str) -> None:
    """Pass the point ``name``: sleep and/or stop if the environment asks for it (see the module's doc)."""
    pace = os.environ.get(PACE_ENV)
    if pace:
        time.sleep(float(pace))
    spec = _stop_spec()
    if spec is None or spec[0] != name:
        return
    with _lock:
        _arrivals[name] = _arrivals.get(name, 0) + 1
        here = _arrivals[name] == spec[1]
    if here:
        os.kill(os.getpid(), signal.SIGSTOP)

