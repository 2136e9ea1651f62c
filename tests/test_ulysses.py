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

import json
import traceback

import pytest
import torch

from dist_utils import run_distributed
from helpers import TINY_GPT, TINY_LLAMA

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


def _worker(rank, world_size, out_dir):
    import torch.distributed as dist

    from megatron_ucp.distributed import groups
    from megatron_ucp.distributed.random import seed_all
    from megatron_ucp.layout.topology import ParallelLayout

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's communication layer, for its all-to-all
    state = groups.initialize(ParallelLayout(sp=world_size))
    single = groups.single_process_state()
    for tracker in (state.tp.rng, single.tp.rng):
        seed_all(1, 0, 0, tracker)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 40, (2, 8), generator=g)
    labels = torch.randint(0, 40, (2, 8), generator=g)
    n = 8 // world_size
    mine = slice(rank * n, (rank + 1) * n)
    results = {}
    try:
        for name, kwargs in MODELS.items():
            try:
                ref_loss, ref = _run(kwargs, single, tokens, labels)
                loss, got = _run(kwargs, state, tokens[:, mine], labels[:, mine])
                dist.all_reduce(loss, group=state.group("sp"))
                torch.testing.assert_close(loss / world_size, ref_loss, rtol=1e-6, atol=0)
                assert got.keys() == ref.keys()
                for p, grad in got.items():
                    dist.all_reduce(grad, group=state.group("sp"))
                    torch.testing.assert_close(grad / world_size, ref[p], rtol=1e-6, atol=1e-9,
                                               msg=lambda m: f"{p}: {m}")
                broken, _ = _run(kwargs, state, tokens[:, mine], labels[:, mine], local=True)
                dist.all_reduce(broken, group=state.group("sp"))
                assert abs(float(broken / world_size - ref_loss)) > 1e-3, "the negative control did not move the loss"
                results[name] = None
            except Exception:  # noqa: BLE001 - reported per check
                results[name] = traceback.format_exc()
    finally:
        groups.destroy()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def ulysses_results(tmp_path_factory):
    cache: dict = {}

    def get(world_size: int) -> list[dict]:
        if world_size not in cache:
            out = tmp_path_factory.mktemp(f"ulysses{world_size}")
            run_distributed(_worker, world_size, str(out))
            cache[world_size] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
        return cache[world_size]

    return get


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_ulysses_gives_one_process_loss_and_gradients(ulysses_results, world_size, model):
    for rank, per_rank in enumerate(ulysses_results(world_size)):
        assert per_rank[model] is None, f"rank {rank}:\n{per_rank[model]}"


def test_what_ulysses_refuses_is_one_line_each():
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.arguments import check_run

    def refused(world: int, model: dict, **train) -> str:
        cfg = TrainConfig(**dict(dict(mock_data=True, vocab_size=50, global_batch_size=8, seq_length=16,
                                      ds_sequence_parallel_size=2), **train))
        with pytest.raises(ValueError) as e:
            check_run(model, cfg, world)
        assert "\n" not in str(e.value)
        return str(e.value)

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
