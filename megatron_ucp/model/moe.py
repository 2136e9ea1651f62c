"""The sparse MLP of the MoE families: DeepSpeed's MoE layer with Hugging Face's router (architecture only).

``SparseMLP`` *is* a ``deepspeed.moe.layer.MoE`` (DeepSpeed's checkpointing finds MoE layers by that class
and writes their experts to ``layer_*_expert_*`` files), built with:

* SwiGLU experts (``Expert``): ``dense_4h_to_h(silu(gate) * up)`` with ``dense_h_to_4h = [gate; up]``;
* its gate replaced by ``Router``, the router of transformers' Mixtral and Qwen3-MoE: ``logits = x W^T``
  in the activations' dtype, a softmax in fp32, the top ``k`` experts (``torch.topk``), renormalised to
  sum to 1 where the family asks (Mixtral always; Qwen3-MoE's ``norm_topk_prob``). No noise and no
  random second expert, so routing is deterministic. DeepSpeed's ``TopKGate`` cannot express this for
  every k (its top-2 always renormalises and samples the second expert by default), so only the gate is
  ours: dispatch, the all-to-all over the expert-parallel group and the combine stay DeepSpeed's
  ``MOELayer``;
* no token dropping by default: an expert's capacity is the most tokens any expert receives on any rank
  of the expert-parallel group. With ``token_dropping`` the capacity is
  ``max(ceil(tokens * k / E * factor), min_capacity)`` and routes past it are dropped (their weight
  lost, as in DeepSpeed).

Experts are replicated over tensor parallelism: DeepSpeed's expert groups are built from the
model-parallel unit (``enable_expert_tensor_parallelism``), so the expert-parallel groups run along the
data-parallel ranks of one TP rank, and every TP rank of an expert-parallel rank holds the same experts
whole. ``SparseMoELayer`` is DeepSpeed's ``MOELayer`` without its TP deduplication (splitting each
expert's tokens over the TP ranks and gathering them back): each TP rank computes its experts on all of
its tokens, so their gradients are complete and equal on every TP rank, and no TP collective is needed.
(DeepSpeed's deduplication gathers with ``all_gather_into_tensor`` into a flat buffer, which gloo refuses.)
Routing, dispatch, the all-to-all over the expert-parallel group and the combine are DeepSpeed's own
functions.

The load-balancing loss is transformers' ``load_balancing_loss_func`` for one layer:
``E * sum_e f_e * P_e``, with ``f_e`` the fraction of (token, route) choices that picked expert ``e``
per route slot and ``P_e`` the mean router probability of ``e``. The block adds it to the running total
it carries through the pipeline (``model/llama.py``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deepspeed.moe.sharded_moe import MOELayer, _AllToAll, _route_slots, _sparse_decode, _sparse_encode

from megatron_ucp.layout.params import Kind
from megatron_ucp.layout.placement import split_sub_params
from megatron_ucp.tensor_parallel.layers import mark_parallel


class Expert(nn.Module):
    """One SwiGLU expert, whole on this rank: [tokens, h] -> [tokens, h]."""

    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, 2 * ffn_hidden, bias=False)  # [gate; up]
        self.dense_4h_to_h = nn.Linear(ffn_hidden, hidden, bias=False)
        for p in self.parameters():
            mark_parallel(p, Kind.REPLICATED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = split_sub_params(self.dense_h_to_4h(x), Kind.COLUMN_2SUB)
        return self.dense_4h_to_h(F.silu(gate) * up)


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities [S, E] fp32, top-k weights [S, k] fp32, top-k experts [S, k]) of router logits [S, E]."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """transformers' load-balancing loss of one layer (no padding mask): ``E * sum(f * P)``."""
    mask = F.one_hot(experts, num_experts).to(probs.dtype)  # [S, k, E]
    tokens_per_expert = mask.mean(dim=0)  # [k, E]
    prob_per_expert = probs.mean(dim=0)  # [E]
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * num_experts


class Router(nn.Module):
    """The gate DeepSpeed's ``MOELayer`` calls: its ``wg`` is the router weight [E, h]."""

    def __init__(self, hidden: int, num_experts: int, k: int, renormalize: bool, token_dropping: bool,
                 capacity_factor: float, eval_capacity_factor: float, min_capacity: int, tp: int) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden, num_experts, bias=False)
        mark_parallel(self.wg.weight, Kind.REPLICATED)
        self.num_experts = num_experts
        self.k = k
        self.renormalize = renormalize
        self.token_dropping = token_dropping
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.tp = tp  # the capacity is kept a multiple of it (what DeepSpeed's TP deduplication would need)
        self.ep_group = None
        self.wall_clock_breakdown = False

    def _set_ep_group(self, ep_group) -> None:  # DeepSpeed's MOELayer hands the gate its group
        self.ep_group = ep_group

    def _capacity(self, tokens: int, counts: torch.Tensor) -> int:
        if self.token_dropping:
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = max(math.ceil(tokens * self.k / self.num_experts * factor), self.min_capacity)
        else:
            most = counts.max().reshape(1)
            if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
                dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.ep_group)  # same buffer on every rank
            capacity = max(int(most.item()), 1)
        return math.ceil(capacity / self.tp) * self.tp

    def forward(self, x: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        """``x`` [S, h] -> DeepSpeed's sparse routes: (l_aux, capacity, E, experts [k, S], slots [k, S],
        weights [k, S] fp32, tokens per expert [E])."""
        if used_token is not None or not sparse_routes or use_tutel:
            raise ValueError("the router serves DeepSpeed's sparse routes only (no used_token, no Tutel)")
        logits = F.linear(x, self.wg.weight)
        probs, weights, experts = route(logits, self.k, self.renormalize)
        l_aux = load_balancing_loss(probs, experts, self.num_experts)
        # Each (token, route) takes the next free slot of its expert, route by route: slot j's places come
        # after every earlier route's.
        mask = F.one_hot(experts.t(), self.num_experts)  # [k, S, E]
        counts = mask.sum(dim=(0, 1))  # [E]
        before = torch.cumsum(mask.sum(dim=1), dim=0) - mask.sum(dim=1)  # [k, E]: routes of earlier slots
        slots = (torch.cumsum(mask, dim=1) - 1 + before.unsqueeze(1)) * mask  # [k, S, E]
        slots = slots.sum(dim=-1)  # [k, S]
        capacity = self._capacity(x.shape[0], counts)
        indices = experts.t().contiguous()
        if self.token_dropping:
            indices = torch.where(slots < capacity, indices, torch.full_like(indices, -1))
        return (l_aux, capacity, self.num_experts, indices.to(torch.int32), slots.to(torch.int32),
                weights.t().contiguous(), counts.detach())


class SparseMoELayer(MOELayer):
    """DeepSpeed's ``MOELayer`` forward, minus the TP deduplication (module docstring)."""

    def forward(self, *inputs: torch.Tensor, **kwargs) -> torch.Tensor:
        x = inputs[0]
        d_model = x.shape[-1]
        tokens = x.reshape(-1, d_model)
        self.l_aux, capacity, num_experts, indices, slots_in, weights, self.exp_counts = self.gate(tokens, None)
        capacity = int(capacity)
        slots = _route_slots(indices, slots_in, num_experts, capacity)
        dispatched = _sparse_encode(tokens, slots, num_experts, capacity)  # [E, C, h]
        if self.ep_size > 1:
            dispatched = _AllToAll.apply(self.ep_group, dispatched)
        dispatched = dispatched.reshape(self.ep_size, self.num_local_experts, -1, d_model)
        out = self.experts(dispatched).reshape(self.ep_size * self.num_local_experts, -1, d_model)
        if self.ep_size > 1:
            out = _AllToAll.apply(self.ep_group, out)
        return _sparse_decode(out.reshape(num_experts * capacity, d_model), slots, weights,
                              tokens.shape[0]).reshape(x.shape)


def sparse_mlp(hidden: int, ffn_hidden: int, num_experts: int, ep: int, tp: int, k: int, renormalize: bool,
               token_dropping: bool, capacity_factor: float, eval_capacity_factor: float, min_capacity: int):
    """DeepSpeed's ``MoE`` with ``Expert`` experts and our ``Router`` as its gate."""
    from deepspeed.moe.layer import MoE

    moe = MoE(hidden, Expert(hidden, ffn_hidden), num_experts=num_experts, ep_size=ep, k=k,
              capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
              min_capacity=min_capacity, drop_tokens=token_dropping, use_rts=False,
              enable_expert_tensor_parallelism=True, top2_2nd_expert_sampling=False)
    router = Router(hidden, num_experts, k, renormalize, token_dropping, capacity_factor, eval_capacity_factor,
                    min_capacity, tp)
    old = moe.deepspeed_moe
    moe.deepspeed_moe = SparseMoELayer(router, old.experts, old.ep_group_name, old.ep_size, old.num_local_experts)
    return moe
