"""RNG streams for tensor parallelism (Megatron's two-stream scheme).

* The default torch generator is the *data-parallel-region* stream: identical on every TP rank, so
  dropout on replicated activations (after a row-parallel all-reduce) draws the same mask everywhere.
* The tracker's ``model-parallel-rng`` stream differs per TP rank: dropout on *sharded* activations
  (attention probabilities of a rank's own heads) must draw independent masks.

Seeds follow Megatron: default = seed + 100 * pp_rank, tracker = seed + 2718 + tp_rank. A resume at
the same layout restores the saved states; a resume at another layout reseeds with
``seed + iteration`` so the new run is deterministic.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"


def _device_get_state() -> torch.Tensor | None:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _device_set_state(state: torch.Tensor | None) -> None:
    if state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state)


class RNGStatesTracker:
    """Named RNG states swapped in and out of torch's default generator by ``fork``."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add(self, name: str, seed: int) -> None:
        saved = (torch.get_rng_state(), _device_get_state())
        torch.manual_seed(seed)
        self._states[name] = (torch.get_rng_state(), _device_get_state())
        torch.set_rng_state(saved[0])
        _device_set_state(saved[1])

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was never added to the tracker")
        saved = (torch.get_rng_state(), _device_get_state())
        torch.set_rng_state(self._states[name][0])
        _device_set_state(self._states[name][1])
        try:
            yield
        finally:
            self._states[name] = (torch.get_rng_state(), _device_get_state())
            torch.set_rng_state(saved[0])
            _device_set_state(saved[1])

    def get_states(self) -> dict:
        return {k: (v[0].clone(), None if v[1] is None else v[1].clone()) for k, v in self._states.items()}

    def set_states(self, states: dict) -> None:
        self._states = {k: (v[0].clone(), None if v[1] is None else v[1].clone()) for k, v in states.items()}


def seed_all(seed: int, pp_rank: int, tp_rank: int, tracker: RNGStatesTracker) -> None:
    """Seed python, numpy, torch and the tracker for one rank (Megatron's offsets)."""
    default_seed = seed + 100 * pp_rank
    random.seed(default_seed)
    np.random.seed(default_seed % (2**32))
    torch.manual_seed(default_seed)
    tracker.add(MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)


def get_rng_state(tracker: RNGStatesTracker) -> dict:
    """Everything needed to continue this rank's random streams exactly."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": _device_get_state(),
        "rng_tracker_states": tracker.get_states(),
    }


def set_rng_state(state: dict, tracker: RNGStatesTracker) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    _device_set_state(state["cuda_rng_state"])
    tracker.set_states(state["rng_tracker_states"])
