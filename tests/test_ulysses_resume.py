"""Ulysses checkpoints resumed at another sequence-parallel degree (and TP, PP, DP, ZeRO stage), bit for bit.

To DeepSpeed the Ulysses ranks are data-parallel ones (``distributed.groups.ParallelState``): ZeRO
partitions the optimizer state over dp x sp, one ``zero_pp_rank_N`` file each, and the model-state files
are the model-parallel ranks' (``mp_rank_XX``) whatever the SP degree. So a change of SP is a change of
the ZeRO partitioning, which direct resume and our converter plus sliced loader handle like a DP change.
Each case: a real fp32 source (a Llama with 4 key/value heads, so SP and TP 2 or 4 divide them) saved at
iteration 2 with its state dumped, loaded at the target by both routes; right after the load every
parameter's fp32 master and both Adam moments equal the source's bitwise, and the next loss is the
uninterrupted source's (relative 1e-5: the order of sums changes with the layout).
"""

from __future__ import annotations

import math

import pytest

from dist_utils import run_distributed
from helpers import TINY_LLAMA, assemble, load_and_dump, read_losses, run_cfg, train_and_dump
from megatron_ucp.checkpoint.universal import convert_zero_to_universal
from megatron_ucp.layout.slicing import bitwise_equal

pytestmark = pytest.mark.slow

MODEL = dict(TINY_LLAMA, num_key_value_heads=4)
SAVE_AT, ITERS = 2, 3
# name -> (zero stage, tp, pp, dp, sp) of the source; its target; the source's route text
SOURCES = {"sp2_dp2": (1, 1, 1, 2, 2), "sp2_tp2": (1, 2, 1, 1, 2), "z2_sp2_dp2": (2, 1, 1, 2, 2)}
TARGETS = {"sp2_dp2": (1, 2, 2, 1, 1), "sp2_tp2": (1, 1, 1, 2, 1), "z2_sp2_dp2": (1, 1, 1, 1, 4)}


def _cfg(zero, tp, pp, sp, **kw) -> dict:
    return run_cfg(tp, pp, **{"zero_stage": zero, "ds_sequence_parallel_size": sp, "train_iters": SAVE_AT,
                              "lr_warmup_iters": 1, "lr_decay_iters": ITERS, **kw})


def _text(zero, tp, pp, dp, sp) -> str:
    return f"TP{tp} PP{pp} DP{dp}{f' SP{sp}' if sp > 1 else ''} ZeRO-{zero} fp32"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    cache: dict = {}

    def get(name: str) -> dict:
        if name not in cache:
            zero, tp, pp, dp, sp = SOURCES[name]
            root = tmp_path_factory.mktemp(f"ulysses_{name}")
            (root / "dump").mkdir()
            run_distributed(train_and_dump, tp * pp * dp * sp, _cfg(zero, tp, pp, sp, save=str(root / "ckpt")),
                            str(root / "dump"), MODEL, ITERS, str(root / "losses.jsonl"))
            zero_folder = root / "ckpt" / f"global_step{SAVE_AT}"
            universal = root / "universal" / f"global_step{SAVE_AT}_universal"
            assert convert_zero_to_universal(str(zero_folder), str(universal), verify=True).verified
            cache[name] = {"zero": zero_folder, "universal": universal, "dump": root / "dump",
                           "losses": read_losses(root / "losses.jsonl")}
        return cache[name]

    return get


@pytest.mark.parametrize("route", ["direct", "universal"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_ulysses_state_survives_a_sequence_parallel_change(sources, tmp_path, source, route):
    src = sources(source)
    zero, tp, pp, dp, sp = TARGETS[source]
    load = ({"load": str(src["zero"].parent)} if route == "direct"
            else {"load": str(src["universal"].parent), "universal_checkpoint": True})
    dump = tmp_path / "dump"
    dump.mkdir()
    cfg = _cfg(zero, tp, pp, sp, train_iters=ITERS, loss_log=str(tmp_path / "resumed.jsonl"), **load)
    run_distributed(load_and_dump, tp * pp * dp * sp, cfg, str(dump), MODEL, str(tmp_path / "rank0.log"))
    want, _, _, _ = assemble(src["dump"], MODEL)
    got, _, global_steps, _ = assemble(dump, MODEL)
    assert global_steps == SAVE_AT and want.keys() == got.keys()
    for key in want:
        assert bitwise_equal(want[key], got[key]), f"{key} differs after the load"
    log = (tmp_path / "rank0.log").read_text()
    if route == "direct":
        assert f"direct reshard {_text(*SOURCES[source])} -> {_text(*TARGETS[source])}" in log, log
    resumed = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [ITERS]
    assert math.isclose(resumed[ITERS], src["losses"][ITERS], rel_tol=1e-5), (resumed, src["losses"])
