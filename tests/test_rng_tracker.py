"""The tensor-parallel RNG tracker and the checkpointed RNG state (megatron_ucp/distributed/random.py).

Single-process: a rank is simulated by its tracker seed. The multi-process check that real TP ranks
draw different attention-dropout masks while sharing the default stream is
``test_tp_parity.py::test_rng_fork_per_rank``.
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_ucp.distributed.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    get_rng_state,
    seed_all,
    set_rng_state,
)

SEED = 1234


@pytest.fixture(autouse=True)
def _isolated_global_rng():
    """Each test starts from the same default stream (not the one a previous test left) and leaves
    the global generators as it found them."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    torch.manual_seed(0)
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def _mask(n: int = 1024) -> torch.Tensor:
    return F.dropout(torch.ones(n), p=0.5) != 0


def _tracker(tp_rank: int) -> RNGStatesTracker:
    t = RNGStatesTracker()
    t.add(MODEL_PARALLEL_RNG, SEED + 2718 + tp_rank)
    return t


def test_add_leaves_default_generator_untouched():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _tracker(0)
    assert torch.equal(torch.get_rng_state(), before)


def test_fork_draws_differ_between_differently_seeded_ranks():
    t0, t1 = _tracker(0), _tracker(1)
    with t0.fork():
        m0 = _mask()
    with t1.fork():
        m1 = _mask()
    assert not torch.equal(m0, m1)
    # each is the stream its seed defines
    torch.manual_seed(SEED + 2718 + 1)
    assert torch.equal(_mask(), m1)


def test_fork_leaves_default_stream_untouched_and_continues_its_own():
    tracker = _tracker(0)
    torch.manual_seed(7)
    expected_default = _mask()  # what the default stream gives with no fork in between
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with tracker.fork():
        a = _mask()
    assert torch.equal(torch.get_rng_state(), before), "fork changed the default generator"
    assert torch.equal(_mask(), expected_default)
    with tracker.fork():
        b = _mask()
    # the tracked stream continues across forks: a then b are one stream's consecutive draws
    torch.manual_seed(SEED + 2718)
    assert torch.equal(_mask(), a) and torch.equal(_mask(), b)
    assert not torch.equal(a, b)


def test_fork_restores_default_stream_when_the_body_raises():
    tracker = _tracker(0)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"):
        with tracker.fork():
            _mask()
            raise RuntimeError("inside")
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(SEED + 2718)
    _mask()
    expected = _mask()
    with tracker.fork():  # the draw made before the exception still advanced the tracked stream
        assert torch.equal(_mask(), expected)


def test_fork_of_an_unknown_name_raises():
    with pytest.raises(KeyError, match="never added"):
        with RNGStatesTracker().fork("nope"):
            pass


def test_get_states_set_states_reproduce_draws():
    tracker = _tracker(3)
    with tracker.fork():
        _mask()  # move away from the seed state
    saved = tracker.get_states()
    with tracker.fork():
        first = _mask()
    with tracker.fork():
        _mask()  # the tracker has moved on; `saved` is a snapshot, not a view of it
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(_mask(), first)
    # set_states copies: drawing again does not change `saved`, which still replays `first`
    other = RNGStatesTracker()
    other.set_states(saved)
    with other.fork():
        assert torch.equal(_mask(), first)
    assert set(saved) == {MODEL_PARALLEL_RNG}


def test_seed_all_uses_megatron_offsets():
    for pp_rank, tp_rank in ((0, 0), (1, 0), (0, 3), (2, 1)):
        tracker = RNGStatesTracker()
        seed_all(SEED, pp_rank, tp_rank, tracker)
        default = torch.rand(8)
        with tracker.fork():
            tracked = torch.rand(8)
        torch.manual_seed(SEED + 100 * pp_rank)
        assert torch.equal(torch.rand(8), default)
        torch.manual_seed(SEED + 2718 + tp_rank)
        assert torch.equal(torch.rand(8), tracked)


def _draw_everything(tracker: RNGStatesTracker) -> tuple:
    with tracker.fork():
        tracked = torch.rand(5)
    return random.random(), np.random.rand(3).tolist(), torch.rand(5), tracked


def test_get_rng_state_set_rng_state_round_trip():
    tracker = RNGStatesTracker()
    seed_all(SEED, 1, 2, tracker)
    _draw_everything(tracker)
    state = get_rng_state(tracker)
    expected = _draw_everything(tracker)
    later = _draw_everything(tracker)  # the streams have moved on, so a match below is the restore's doing
    assert later[0] != expected[0] and not torch.equal(later[2], expected[2])
    assert not torch.equal(later[3], expected[3])

    # through a checkpoint file, into a fresh tracker, after the global streams were disturbed
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    fresh = RNGStatesTracker()
    set_rng_state(loaded, fresh)
    got = _draw_everything(fresh)
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert torch.equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])
