"""Conjugate forward/backward communication pairs for tensor parallelism.

Each op is an autograd Function whose backward is the adjoint of its forward, so a layer built from
them computes the same gradients as the dense layer it shards. Every op takes the TP group
explicitly; with one rank they are identities.

| op                      | forward                    | backward                   |
|-------------------------|----------------------------|----------------------------|
| copy_to_tp_region       | identity                   | all-reduce (sum)           |
| reduce_from_tp_region   | all-reduce (sum)           | identity                   |
| scatter_to_tp_region    | keep own slice of last dim | all-gather last dim        |
| gather_from_tp_region   | all-gather last dim        | keep own slice of last dim |

Megatron-style sequence parallelism (``TensorParallelContext.sequence_parallel``) keeps the activations
between the tensor-parallel regions split along the sequence (dim 1 of our ``[b, s, h]``) over the TP
ranks, with these pairs in place of the copy / all-reduce ones:

| op                              | forward                      | backward                     |
|---------------------------------|------------------------------|------------------------------|
| scatter_to_sequence_region      | keep own slice of sequence   | all-gather sequence          |
| gather_from_sequence_region     | all-gather sequence          | reduce-scatter sequence      |
| reduce_scatter_to_sequence_region | reduce-scatter sequence    | all-gather sequence          |

gloo has no reduce-scatter: there it is an all-reduce followed by keeping the own slice (the same
values, more traffic); NCCL uses ``reduce_scatter_tensor``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[-1] % world:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by tensor parallel {world}")
    return x.chunk(world, dim=-1)[dist.get_rank(group=group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _reduced(x: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(x.clone(), group)


def _pair(name: str, forward, backward) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """The op ``name(x, group)``: an autograd function whose forward is ``forward(x, group)`` and whose
    backward is ``backward(grad, group)`` (its adjoint: the tables above name each pair); the identity
    on one rank."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    fn: Any = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})

    def op(x: torch.Tensor, group) -> torch.Tensor:
        return x if _world(group) == 1 else fn.apply(x, group)

    op.__name__ = op.__qualname__ = name
    return op


copy_to_tp_region = _pair("copy_to_tp_region", _identity, _reduced)
reduce_from_tp_region = _pair("reduce_from_tp_region", _reduced, _identity)
scatter_to_tp_region = _pair("scatter_to_tp_region", _split_last, _gather_last)
gather_from_tp_region = _pair("gather_from_tp_region", _gather_last, _split_last)


SEQUENCE_DIM = 1  # activations are [b, s, h]


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if x.shape[SEQUENCE_DIM] % world:
        raise ValueError(f"sequence length {x.shape[SEQUENCE_DIM]} is not divisible by tensor parallel {world}")
    return x.chunk(world, dim=SEQUENCE_DIM)[dist.get_rank(group=group)].contiguous()


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQUENCE_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if dist.get_backend(group) != "nccl":
        return _split_seq(_all_reduce(x.clone(), group), group)
    if x.shape[SEQUENCE_DIM] % world:
        raise ValueError(f"sequence length {x.shape[SEQUENCE_DIM]} is not divisible by tensor parallel {world}")
    parts = x.movedim(SEQUENCE_DIM, 0).contiguous()
    out = torch.empty((parts.shape[0] // world,) + tuple(parts.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, parts, group=group)
    return out.movedim(0, SEQUENCE_DIM).contiguous()


scatter_to_sequence_region = _pair("scatter_to_sequence_region", _split_seq, _gather_seq)
gather_from_sequence_region = _pair("gather_from_sequence_region", _gather_seq, _reduce_scatter_seq)
reduce_scatter_to_sequence_region = _pair("reduce_scatter_to_sequence_region", _reduce_scatter_seq, _gather_seq)
