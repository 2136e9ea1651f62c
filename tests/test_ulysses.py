"""DeepSpeed-Ulysses sequence parallelism against one process, whole models on gloo ranks.

Each of ``sp`` ranks holds a slice of every sample's sequence; attention all-to-alls to whole sequences of
``1 / sp`` of the heads (DeepSpeed's ``DistributedAttention``) and back; positions (learned, or rotary) are
offset by the slice's start; each rank's loss is its slice's mean. So, in float64, the mean of the ranks'
losses is the one-process loss, and the mean of their gradients its gradients (every parameter is
replicated over the sequence ranks), up to rounding: the model runs in float64 but the cross entropy in
fp32 by design (``tensor_parallel/cross_entropy.py``), and a mean of slice means rounds differently from
one mean, so the bound is 1e-6 relative. The negative control replaces the
all-to-all by the local slice (each rank attends within its own slice only): the loss moves by O(1e-2).
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


def _run(model_kwargs: dict, state, tokens, labels, local: bool = False):
    """(loss, {name: gradient}) of a fresh float64 model on ``state``'s layout; ``local``: attention within
    the slice (the negative control)."""
    from megatron_ucp.config import ModelConfig
    from megatron_ucp.families import family_of_model
    from megatron_ucp.model.sequential import GPTModel

    cfg = ModelConfig(vocab_size=40, **model_kwargs)
    model = GPTModel(cfg, state, seed=7, block=family_of_model(cfg).block).double()
    if local:
        for m in model.modules():
            if hasattr(m, "ulysses"):
                m.ulysses = None
    loss = model(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _check(model_kwargs: dict, state, single, tokens, labels) -> None:
    """One model: the sp ranks' mean loss and gradients against one process's; then the negative control."""
    import torch.distributed as dist

    sp = state.size_of("sp")
    n = tokens.shape[1] // sp
    mine = slice(state.rank_in("sp") * n, (state.rank_in("sp") + 1) * n)
    ref_loss, ref = _run(model_kwargs, single, tokens, labels)
    loss, got = _run(model_kwargs, state, tokens[:, mine], labels[:, mine])
    dist.all_reduce(loss, group=state.group("sp"))
    torch.testing.assert_close(loss / sp, ref_loss, rtol=1e-6, atol=0)
    assert got.keys() == ref.keys()
    for p, grad in got.items():
        dist.all_reduce(grad, group=state.group("sp"))
        torch.testing.assert_close(grad / sp, ref[p], rtol=1e-6, atol=1e-9, msg=lambda m: f"{p}: {m}")
    broken, _ = _run(model_kwargs, state, tokens[:, mine], labels[:, mine], local=True)
    dist.all_reduce(broken, group=state.group("sp"))
    assert abs(float(broken / sp - ref_loss)) > 1e-3, "the negative control did not move the loss"


def _worker(rank, world_size, out_dir):
    import deepspeed

    from megatron_ucp.distributed import groups
    from megatron_ucp.distributed.random import seed_all
    from megatron_ucp.layout.topology import ParallelLayout

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's communication layer, for its all-to-all
    state = groups.initialize(ParallelLayout(sp=world_size))
    single = groups.single_process_state()
    for tracker in (state.tp.rng, single.tp.rng):
        seed_all(1, 0, 0, tracker)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 40, (2, 8), generator=g)
    labels = torch.randint(0, 40, (2, 8), generator=g)
    try:
        record_checks(rank, out_dir, {name: functools.partial(_check, kwargs, state, single, tokens, labels)
                                      for name, kwargs in MODELS.items()})
    finally:
        groups.destroy()


@pytest.fixture(scope="module")
def ulysses_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, _worker, "ulysses")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_ulysses_gives_one_process_loss_and_gradients(ulysses_results, world_size, model):
    report_check(ulysses_results(world_size), model)


def test_what_ulysses_refuses_is_one_line_each():
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.arguments import check_run

    def refused(world: int, model: dict, **train) -> str:
        return run_refusal(world, model, **dict({"ds_sequence_parallel_size": 2}, **train))

    llama = dict(TINY_LLAMA)  # 8 heads, 2 key/value heads
    assert "does not divide seq_length 15" in refused(2, llama, seq_length=15)
    assert "does not divide the 1 key/value heads of a tensor-parallel rank" in refused(
        4, llama, tensor_model_parallel_size=2)
    assert "does not divide the 2 attention heads" in refused(8, dict(TINY_GPT, num_attention_heads=4),
                                                              tensor_model_parallel_size=2,
                                                              ds_sequence_parallel_size=4)
    assert "not built for MoE models" in refused(2, dict(llama, model_family="mixtral", num_experts=4))
    assert "not built together" in refused(4, dict(TINY_GPT, num_attention_heads=4), tensor_model_parallel_size=2,
                                           sequence_parallel=True)
    check_run(llama, TrainConfig(mock_data=True, vocab_size=50, global_batch_size=8, seq_length=16,
                                 ds_sequence_parallel_size=2), 2)  # accepted
