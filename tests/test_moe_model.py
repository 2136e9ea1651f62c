"""The sparse MLP of the MoE families against transformers, one process (no expert parallelism needed).

Our MoE MLP is DeepSpeed's MoE layer with our router (``model/moe.py``); transformers' Mixtral and
Qwen3-MoE blocks are the reference: the same weights must give the same output (float64, so only the
order of the routes' sum differs), the same load-balancing loss, and the router's renormalisation must
matter. The parameter table's global expert index makes initialisation independent of the expert layout.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_LLAMA, run_refusal
from megatron_ucp.config import ModelConfig
from megatron_ucp.layout.experts import ExpertPlacement, expert_name
from megatron_ucp.layout.init import full_init
from megatron_ucp.layout.params import model_params
from megatron_ucp.model.moe import Router, load_balancing_loss, route, sparse_mlp

H, F, E, K = 16, 24, 8, 2
MIXTRAL = dict(TINY_LLAMA, model_family="mixtral", num_experts=E)


def _ours(renormalize: bool, token_dropping: bool = False, **kw) -> torch.nn.Module:
    kw = dict(dict(capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1), **kw)
    return sparse_mlp(H, F, num_experts=E, ep=1, tp=1, k=K, renormalize=renormalize,
                      token_dropping=token_dropping, **kw).double()


def _hf_block(kind: str, renormalize: bool = True):
    """transformers' sparse MoE block of ``kind`` (random weights, float64)."""
    if kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K)
        block = MixtralSparseMoeBlock(cfg)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=renormalize)
        block = Qwen3MoeSparseMoeBlock(cfg)
    torch.manual_seed(0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block.double().eval()


def _copy_hf_weights(ours: torch.nn.Module, block) -> None:
    """The HF block's router and fused experts into our layer (its experts' [gate; up] rows are ours)."""
    with torch.no_grad():
        ours.deepspeed_moe.gate.wg.weight.copy_(block.gate.weight)
        for e, expert in enumerate(ours.deepspeed_moe.experts.deepspeed_experts):
            expert.dense_h_to_4h.weight.copy_(block.experts.gate_up_proj[e])
            expert.dense_4h_to_h.weight.copy_(block.experts.down_proj[e])


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("kind,renormalize", [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])
def test_the_sparse_mlp_is_transformers_block(kind, renormalize):
    block = _hf_block(kind, renormalize)
    ours = _ours(renormalize)
    _copy_hf_weights(ours, block)
    x = _x()
    want = block(x)
    want = want[0] if isinstance(want, tuple) else want
    got, l_aux, counts = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert int(counts.sum()) == x.shape[0] * x.shape[1] * K  # every route reached an expert
    # negative control: the other renormalisation moves the output by far more than rounding
    other = _ours(not renormalize)
    _copy_hf_weights(other, block)
    assert (other(x)[0] - want).abs().max() > 1e-3


def test_the_load_balancing_loss_is_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(40, E, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    probs, _, experts = route(logits, K, renormalize=True)
    ours = load_balancing_loss(probs, experts, E)
    torch.testing.assert_close(ours, load_balancing_loss_func((logits,), E, K).to(ours.dtype), rtol=1e-12, atol=0)
    # negative control: another expert choice changes it
    assert not torch.allclose(load_balancing_loss(probs, experts.roll(1, dims=0) * 0, E), ours)


def test_routes_take_distinct_slots_and_dropping_respects_capacity():
    tokens = torch.randn(64, H, generator=torch.Generator().manual_seed(3))
    for dropping, min_capacity in ((False, 1), (True, 2)):
        router = Router(H, E, K, True, dropping, 1.0, 1.0, min_capacity, tp=1)
        l_aux, capacity, n, indices, slots, weights, counts = router(tokens)
        assert n == E and indices.shape == slots.shape == weights.shape == (K, 64)
        kept = indices >= 0
        assert (slots[kept] < capacity).all()
        pairs = set(zip(indices[kept].tolist(), slots[kept].tolist()))
        assert len(pairs) == int(kept.sum()), "two routes share an expert slot"
        if not dropping:
            assert kept.all() and capacity == int(counts.max())
        else:
            assert capacity == max(-(-64 * K // E), min_capacity)
    # a capacity below the busiest expert's load drops routes: their tokens lose that expert's share
    router = Router(H, E, K, True, True, 0.25, 0.25, 1, tp=1)
    assert (router(tokens)[3] < 0).any()


def test_an_experts_initial_weights_are_the_same_at_every_expert_layout():
    """Expert-parallel rank r holds local experts 0..E/ep-1 = global r*E/ep..; each starts as its global one."""
    from megatron_ucp.distributed.groups import TensorParallelContext
    from megatron_ucp.families.llama import block
    from megatron_ucp.model.init import initialize_parameters

    cfg = ModelConfig(vocab_size=50, **MIXTRAL)
    infos = {p.name: p for p in model_params(cfg)}
    assert sum(p.expert is not None for p in model_params(cfg)) == 2 * E * cfg.num_layers
    for ep in (1, 2, 4):
        placement = ExpertPlacement(E, ep)
        for ep_rank in range(ep):
            layer = block(cfg, TensorParallelContext(), 0, ep).build()
            module = torch.nn.ModuleDict({"1": layer})
            initialize_parameters(module, cfg, 1234, 56, 1, 0, ep=(ep, ep_rank))
            experts = {n: p for n, p in module.named_parameters() if expert_name(n)}
            assert len(experts) == 2 * E // ep
            for local, p in experts.items():
                name = placement.global_name(local, ep_rank)
                assert expert_name(name).index in placement.experts_of(ep_rank)
                assert torch.equal(p.detach(), full_init(infos[name], cfg, 1234))
    # negative control: two different global experts do not start equal
    a, b = (full_init(infos[f"1.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.dense_h_to_4h.weight"], cfg, 1234)
            for e in (0, 1))
    assert not torch.equal(a, b)


def test_global_and_local_expert_names_convert_both_ways():
    placement = ExpertPlacement(8, 4)
    local = "3.mlp.deepspeed_moe.experts.deepspeed_experts.1.dense_4h_to_h.weight"
    name = placement.global_name(local, 2)
    assert name == "3.mlp.deepspeed_moe.experts.deepspeed_experts.5.dense_4h_to_h.weight"
    assert placement.local_name(name) == (2, local)
    assert placement.global_name("3.mlp.deepspeed_moe.gate.wg.weight", 2) == "3.mlp.deepspeed_moe.gate.wg.weight"
    with pytest.raises(ValueError, match="local expert 2 outside the 2 experts"):
        placement.global_name(local.replace(".1.", ".2."), 0)
    with pytest.raises(ValueError, match="does not divide"):
        ExpertPlacement(8, 3)


def test_what_an_moe_run_refuses_is_one_line_each():
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.arguments import check_run

    def refused(world: int, model: dict, **train) -> str:
        return run_refusal(world, model, **train)

    assert "ZeRO stage 3 is not built for MoE models" in refused(2, MIXTRAL, zero_stage=3)
    assert "needs an MoE model (--num-experts)" in refused(2, TINY_LLAMA, moe_expert_parallel_size=2)
    assert "does not divide --num-experts 8" in refused(6, MIXTRAL, moe_expert_parallel_size=3, global_batch_size=6)
    assert "parallel degree ep 4 does not divide dp x sp = 2" in refused(2, MIXTRAL, moe_expert_parallel_size=4)
    # and the layouts that fit are accepted (negative control of the refusals above)
    check_run(MIXTRAL, TrainConfig(mock_data=True, vocab_size=50, global_batch_size=8, seq_length=16, zero_stage=2,
                                   moe_expert_parallel_size=4), 4)
