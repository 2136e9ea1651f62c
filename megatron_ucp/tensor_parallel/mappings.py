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


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherFromRegion.apply(x, group)


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


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _ReduceScatterToSequence.apply(x, group)
