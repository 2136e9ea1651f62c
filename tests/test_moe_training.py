"""MoE training across layouts (gloo ranks): the same losses at every expert, tensor and pipeline layout.

Each run is 3 fp32 iterations of a 4-layer Mixtral-shaped model (8 experts, top-2) on mock data: EP1 DP2
is the reference, PP2 DP2 EP2 and TP2 DP2 EP2 must log the same LM loss and load-balancing loss (fp32
reductions in another order: ~1e-7 relative). The negative control drops the load-balancing losses of the
second pipeline stage's layers: its logged ``moe_loss`` then falls by about half, far outside the bound.
"""

from __future__ import annotations

import pytest

from dist_utils import run_distributed
from helpers import TINY_LLAMA, run_cfg
from megatron_ucp.evidence.loss_curves import compare, load_curves
from megatron_ucp.training.logger import read_loss_log

pytestmark = pytest.mark.slow

MOE = dict(TINY_LLAMA, model_family="mixtral", num_experts=8, moe_top_k=2)
ITERS = 3


def _train(rank, world_size, cfg_dict, drop_stage_aux):
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.model.llama import LlamaLayer
    from megatron_ucp.training.trainer import train

    if drop_stage_aux:  # the negative control: layers 2 and 3 (the second of two stages) add no aux loss
        forward = LlamaLayer.forward

        def dropped(self, x):
            before = x[1] if isinstance(x, tuple) else None
            y, aux = forward(self, x)
            return (y, before if before is not None else aux * 0) if self.layer_number >= 2 else (y, aux)

        LlamaLayer.forward = dropped
    train(MOE, TrainConfig(**cfg_dict))


@pytest.fixture(scope="module")
def moe_losses(tmp_path_factory):
    cache: dict = {}

    def get(tp: int, pp: int, dp: int, ep: int, drop_stage_aux: bool = False) -> dict:
        key = (tp, pp, dp, ep, drop_stage_aux)
        if key not in cache:
            log = tmp_path_factory.mktemp("moe") / "loss.jsonl"
            cfg = run_cfg(tp, pp, moe_expert_parallel_size=ep, train_iters=ITERS, global_batch_size=8,
                          loss_log=str(log))
            run_distributed(_train, tp * pp * dp, cfg, drop_stage_aux)
            cache[key] = {r["iteration"]: r for r in read_loss_log(str(log)) if r["split"] == "train"}
            cache[key]["log"] = log
        return cache[key]

    return get


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("layout", [(1, 2, 2, 2), (2, 1, 2, 2)], ids=["pp2-dp2-ep2", "tp2-dp2-ep2"])
def test_losses_and_load_balancing_loss_are_the_same_at_every_layout(moe_losses, layout):
    ref = moe_losses(1, 1, 2, 1)
    got = moe_losses(*layout)
    assert sorted(got.keys() - {"log"}) == sorted(ref.keys() - {"log"}) == list(range(1, ITERS + 1))
    for it in range(1, ITERS + 1):
        assert _relative(got[it]["loss"], ref[it]["loss"]) <= 1e-6, it
        assert _relative(got[it]["moe_loss"], ref[it]["moe_loss"]) <= 1e-6, it
    # the load-balancing loss is a sum over 4 layers of at least top-k (= 2) each: logged, not zero
    assert all(ref[it]["moe_loss"] >= 2 * 4 * 0.99 for it in range(1, ITERS + 1))
    # and the loss-curve verdict (tools/plot_loss_curves.py) passes them, load-balancing loss included
    verdict = compare(load_curves(ref["log"]), load_curves(got["log"]), resume_iteration=0, atol=1e-4,
                      rtol_first=1e-5)
    assert verdict.moe is not None and verdict.moe.passed and verdict.passed


def test_dropping_one_stages_load_balancing_loss_is_seen(moe_losses):
    ref = moe_losses(1, 2, 2, 2)
    dropped = moe_losses(1, 2, 2, 2, drop_stage_aux=True)
    assert _relative(dropped[1]["moe_loss"], ref[1]["moe_loss"]) > 0.3  # half the layers' losses are gone
    assert all(_relative(dropped[it]["moe_loss"], ref[it]["moe_loss"]) > 1e-4 for it in range(1, ITERS + 1))
    # the loss-curve verdict fails it on the load-balancing loss (and on the training objective it is part of)
    verdict = compare(load_curves(ref["log"]), load_curves(dropped["log"]), resume_iteration=0, atol=1e-4,
                      rtol_first=1e-5)
    assert verdict.moe is not None and not verdict.moe.passed and not verdict.passed
