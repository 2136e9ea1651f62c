"""Megatron-style sequence parallelism against plain tensor parallelism, whole models on gloo ranks.

At the same TP degree, ``--sequence-parallel`` changes where the activations between the tensor-parallel
regions live (each rank's slice of the sequence instead of a replica), never the parameters or their
shards. So the GPT and Llama models in float64, SP on and off, must give the same loss and the same
local gradient of every parameter on every rank (only the order of sums differs: ~1e-16 relative). The
negative control removes the TP reduction of the norms' (and row-parallel biases') gradients: those are
then partial sums over this rank's tokens, off by O(1).
"""

from __future__ import annotations

import functools

import pytest
import torch

from dist_utils import record_checks, report_check, spawned_results
from helpers import TINY_GPT, TINY_LLAMA, run_refusal

WORLD_SIZES = (2, pytest.param(4, marks=pytest.mark.slow))
MODELS = {"gpt": dict(TINY_GPT, num_attention_heads=4, max_position_embeddings=8),
          "llama": dict(TINY_LLAMA, num_key_value_heads=4, max_position_embeddings=8)}


def _run(model_kwargs: dict, state, sequence_parallel: bool, tokens, labels):
    """(loss, {name: local gradient}) of a fresh float64 model (the trainer sets the flag the same way:
    on the shared TP context, before it builds the model, for the whole run)."""
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.families import family_of_model
    from megatron_ucp.model.sequential import GPTModel

    cfg = ModelConfig(vocab_size=40, **model_kwargs)
    state.tp.sequence_parallel = sequence_parallel
    try:
        model = GPTModel(cfg, state, seed=7, block=family_of_model(cfg).block).double()
        loss = model(tokens, labels)
        loss.backward()
    finally:
        state.tp.sequence_parallel = False
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _check(model_kwargs: dict, state, tokens, labels) -> None:
    from unittest import mock

    from megatron_ucp.model import gpt, llama

    ref_loss, ref = _run(model_kwargs, state, False, tokens, labels)
    loss, got = _run(model_kwargs, state, True, tokens, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")
    # negative control: the norms' gradients left as this rank's partial sums
    with mock.patch.object(gpt, "sequence_parallel_weight", lambda p, tp: p), \
            mock.patch.object(llama, "copy_to_tp_region", lambda x, group: x):
        _, broken = _run(model_kwargs, state, True, tokens, labels)
    norms = [n for n in ref if "layernorm" in n]
    assert norms and all(not torch.allclose(broken[n], ref[n], rtol=1e-3, atol=1e-8) for n in norms), \
        "the negative control did not move the norm gradients"


def _worker(rank, world_size, out_dir):
    from megatron_ucp.distributed import groups
    from megatron_ucp.distributed.random import seed_all
    from megatron_ucp.layout.topology import ParallelLayout

    state = groups.initialize(ParallelLayout(tp=world_size))
    seed_all(1, 0, state.rank_in("tp"), state.tp.rng)  # the TP-rank streams (no dropout here: p = 0)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 40, (2, 8), generator=g)
    labels = torch.randint(0, 40, (2, 8), generator=g)
    try:
        record_checks(rank, out_dir, {name: functools.partial(_check, kwargs, state, tokens, labels)
                                      for name, kwargs in MODELS.items()})
    finally:
        groups.destroy()


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, _worker, "sp")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_sequence_parallel_gives_tensor_parallels_loss_and_gradients(sp_results, world_size, model):
    report_check(sp_results(world_size), model)


def test_what_sequence_parallelism_refuses_is_one_line_each():
    from helpers import TINY_LLAMA as LLAMA
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.arguments import check_run

    def refused(world: int, model: dict, **train) -> str:
        return run_refusal(world, model, **dict({"sequence_parallel": True}, **train))

    assert "needs --tensor-model-parallel-size > 1" in refused(2, LLAMA)
    assert "seq_length 15 is not divisible by tensor parallel 2" in refused(
        2, dict(LLAMA, max_position_embeddings=16), tensor_model_parallel_size=2, seq_length=15)
    assert "not built for MoE models" in refused(2, dict(LLAMA, model_family="mixtral", num_experts=4),
                                                 tensor_model_parallel_size=2)
    check_run(LLAMA, TrainConfig(mock_data=True, vocab_size=50, global_batch_size=8, seq_length=16,
                                 sequence_parallel=True, tensor_model_parallel_size=2), 2)  # accepted
