"""Cross entropy over vocab-parallel logits, with the padded vocabulary rows masked out.

Each TP rank holds logits for its slice [start, end) of the padded vocabulary. The loss equals the
dense ``F.cross_entropy`` over the *unpadded* vocabulary: padded columns never enter the softmax,
so the loss does not depend on how much padding a TP degree adds. Computed in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ucp.tensor_parallel.mappings import _world


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> None:
    if _world(group) > 1:
        dist.all_reduce(x, op=op, group=group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        logits = logits.float()
        local = logits.shape[-1]
        real_cols = max(0, min(local, vocab_size - vocab_start))  # columns below the true vocab size
        if real_cols < local:
            logits = logits.clone()
            logits[..., real_cols:] = float("-inf")

        logits_max = logits.max(dim=-1)[0]
        _all_reduce(logits_max, group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)

        # The target's logit lives on exactly one rank; the others contribute zero.
        in_range = (target >= vocab_start) & (target < vocab_start + local)
        local_target = (target - vocab_start).clamp(0, local - 1)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        predicted = torch.where(in_range, predicted, torch.zeros_like(predicted))
        _all_reduce(predicted, group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, group)
        loss = sum_exp.log() - predicted

        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, in_range, local_target)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, in_range, local_target = ctx.saved_tensors
        grad = softmax
        one_hot = torch.zeros_like(grad).scatter_(-1, local_target.unsqueeze(-1), 1.0)
        grad = grad - one_hot * in_range.unsqueeze(-1).to(grad.dtype)
        return grad * grad_loss.unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int, group
) -> torch.Tensor:
    """Per-token loss (fp32) for ``logits`` [..., local_vocab] holding columns from ``vocab_start``.

    ``vocab_size`` is the unpadded vocabulary: columns at or beyond it are masked out.
    The gradient is returned in the logits' dtype.
    """
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, group)
