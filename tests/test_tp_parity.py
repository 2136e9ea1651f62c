"""Tensor-parallel parity: every TP op and layer against a single-process dense reference.

Each world size is one spawned gloo run (``_tp_worker``) that executes every check in ``CHECKS`` on
every rank and writes, per rank, ``{check: None | traceback}`` to JSON. The module-scoped
``tp_results`` fixture runs it once per world size and the ``test_*`` functions below only read
those results, so pytest still reports each check separately while paying the spawn cost
(~5 s on a small CPU box) only twice. Each check gets its own TP group with a 20 s timeout, so a
check that dies on one rank before a collective costs its peers 20 s and fails only itself.

Reference: every rank rebuilds the same *full* tensors from fixed seeds, runs the dense torch op
(``F.linear``, ``F.embedding``, ``F.cross_entropy``, a TP=1 ``TransformerLayer``) on them, and
compares with what its TP shard produced: outputs, input gradients, and parameter gradients
all-gathered from the TP group and joined with ``slicing.merge`` (which also insists that
replicated gradients are bitwise equal on every rank).

Precision: the layer checks run in float64 with ``rtol=1e-10, atol=1e-12``. TP changes only the
order of floating-point sums (a row-parallel matmul is the sum of ``tp`` partial products, all-reduced
in gloo's order), which moves float64 results by ~1e-16 relative; any real mistake (a wrong slice,
a missing all-reduce, a bias added twice) is O(1). The mapping checks use small integer values in
float64, where every sum is exact, and compare bitwise. The cross-entropy is computed in fp32 by
design, so it is compared with torch's fp32 defaults (see ``_close32``).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import report_check, run_tp_checks, spawned_results
from helpers import assert_equal, assert_fails, leaf, load_param, same_forward_and_backward
from helpers import close64 as _close  # float64; the module docstring says why these tolerances
from megatron_ucp.config import ModelConfig
from megatron_ucp.distributed.groups import TensorParallelContext
from megatron_ucp.distributed.random import MODEL_PARALLEL_RNG, RNGStatesTracker, seed_all
from megatron_ucp.layout import slicing
from megatron_ucp.layout.params import Kind, Role, param_specs, spec_of
from megatron_ucp.model.gpt import TransformerLayer
from megatron_ucp.tensor_parallel import layers
from megatron_ucp.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ucp.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    parallel_lm_logits,
)
from megatron_ucp.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
)

# TP 4 (one spawned run shared by every check) runs in the full suite; TP 2 also in the fast tier.
WORLD_SIZES = (2, pytest.param(4, marks=pytest.mark.slow))
F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# helpers (used inside the spawned ranks)
# --------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=F64).to(dtype)


def _ints(seed: int, *shape: int) -> torch.Tensor:
    """Small integers stored as float64: every sum of a few of them is exact in any order."""
    return torch.randint(-8, 9, shape, generator=_gen(seed)).to(F64)


def _close32(actual, expected, what: str) -> None:
    """fp32 comparison with torch's fp32 defaults (rtol 1.3e-6, atol 1e-5): the vocab-parallel loss
    takes its max and sum-of-exp over TP ranks, so its fp32 reductions run in another order than
    ``F.cross_entropy``'s and differ by a few ulps; a wrong mask or slice is off by O(0.1)."""
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")




def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _merged_grad(p: torch.nn.Parameter, kind: Kind, group) -> torch.Tensor:
    """The full gradient of a TP parameter: all-gather the shards, join them by ``kind``."""
    return slicing.merge(_all_gather(p.grad, group), kind)




# --------------------------------------------------------------------------------------------------
# 1. conjugate mappings
# --------------------------------------------------------------------------------------------------


def check_copy_to_tp_region(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    x = leaf(_ints(10, 2, 3, 4))  # replicated input
    y = copy_to_tp_region(x, group)
    assert_equal(y, x.detach(), "copy forward")
    grads = [_ints(100 + r, 2, 3, 4) for r in range(world)]  # each rank's own upstream gradient
    upstream = grads[rank].clone()
    y.backward(upstream)
    # dense: x feeds every rank's branch, so dL/dx is the sum of all branches' gradients
    assert_equal(x.grad, sum(grads), "copy backward = sum over ranks")
    assert_equal(upstream, grads[rank], "copy backward must not modify the upstream gradient in place")
    assert_fails(lambda: assert_equal(x.grad, grads[rank], "identity backward"), "copy backward is not the identity")


def check_reduce_from_tp_region(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    inputs = [_ints(200 + r, 2, 3, 4) for r in range(world)]
    x = leaf(inputs[rank])
    y = reduce_from_tp_region(x, group)
    assert_equal(y, sum(inputs), "reduce forward = sum over ranks")
    assert_equal(x.detach(), inputs[rank], "reduce must not modify its input in place")
    upstream = _ints(300, 2, 3, 4)  # the output is replicated, so is its gradient
    y.backward(upstream)
    assert_equal(x.grad, upstream, "reduce backward = identity")


def check_scatter_to_tp_region(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    x = leaf(_ints(400, 2, 3, 4 * world))
    y = scatter_to_tp_region(x, group)
    assert_equal(y, x.detach().chunk(world, dim=-1)[rank], "scatter forward = own slice")
    grads = [_ints(500 + r, *y.shape) for r in range(world)]
    y.backward(grads[rank])
    assert_equal(x.grad, torch.cat(grads, dim=-1), "scatter backward = all-gather of the slices' gradients")
    # an indivisible last dim is refused (on every rank, before any communication)
    try:
        scatter_to_tp_region(torch.zeros(2, 4 * world + 1), group)
    except ValueError:
        pass
    else:
        raise AssertionError("scatter of an indivisible last dim did not raise")


def check_gather_from_tp_region(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    slices = [_ints(600 + r, 2, 3, 5) for r in range(world)]
    x = leaf(slices[rank])
    y = gather_from_tp_region(x, group)
    assert_equal(y, torch.cat(slices, dim=-1), "gather forward = concatenation in rank order")
    upstream = _ints(700, *y.shape)  # replicated
    y.backward(upstream)
    assert_equal(x.grad, upstream.chunk(world, dim=-1)[rank], "gather backward = own slice")
    assert_fails(lambda: assert_equal(y.detach(), torch.cat(slices[::-1], dim=-1), "reversed"),
                  "gather must respect rank order")
    # a non-contiguous input (a transposed view) gathers the same values
    views = [_ints(800 + r, 2, 5, 3).transpose(1, 2) for r in range(world)]
    assert_equal(gather_from_tp_region(views[rank], group), torch.cat(views, dim=-1), "gather of a non-contiguous view")


# --------------------------------------------------------------------------------------------------
# 2. parallel layers and the vocab-parallel loss
# --------------------------------------------------------------------------------------------------

B, S = 2, 3


def _check_column(ctx: TensorParallelContext, gather_output: bool) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    h_in, h_out = 8, 12
    W, Bias, X, G = _randn(1000, h_out, h_in), _randn(1001, h_out), _randn(1002, B, S, h_in), _randn(1003, B, S, h_out)
    Wd, Bd, Xd = leaf(W), leaf(Bias), leaf(X)
    Yd = F.linear(Xd, Wd, Bd)
    Yd.backward(G)

    layer = ColumnParallelLinear(h_in, h_out, ctx, gather_output=gather_output).to(F64)
    for p in (layer.weight, layer.bias):
        assert p.tensor_model_parallel and p.partition_dim == Kind.COLUMN.partition_dim
    load_param(layer.weight, slicing.shard(W, Kind.COLUMN, world, rank))
    load_param(layer.bias, slicing.shard(Bias, Kind.COLUMN, world, rank))
    x = leaf(X)
    y = layer(x)
    if gather_output:
        _close(y, Yd.detach(), "column output (gathered)")
        y.backward(G)  # replicated gradient of a replicated output
    else:
        _close(y, Yd.detach().chunk(world, dim=-1)[rank], "column output slice")
        y.backward(G.chunk(world, dim=-1)[rank])
    _close(x.grad, Xd.grad, "column input grad")
    _close(_merged_grad(layer.weight, Kind.COLUMN, group), Wd.grad, "column weight grad")
    _close(_merged_grad(layer.bias, Kind.COLUMN, group), Bd.grad, "column bias grad")
    # negative control: joining the same shards along the wrong partition dim cannot match
    assert_fails(lambda: _close(slicing.merge(_all_gather(layer.weight.grad, group), Kind.ROW), Wd.grad, "ROW"),
                  "column weight grad merged on the ROW dim")


def check_column_parallel_linear(ctx: TensorParallelContext) -> None:
    _check_column(ctx, gather_output=False)


def check_column_parallel_linear_gather_output(ctx: TensorParallelContext) -> None:
    _check_column(ctx, gather_output=True)


def check_row_parallel_linear(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    h_in, h_out = 12, 8
    W, Bias, X, G = _randn(1100, h_out, h_in), _randn(1101, h_out), _randn(1102, B, S, h_in), _randn(1103, B, S, h_out)
    Wd, Bd, Xd = leaf(W), leaf(Bias), leaf(X)
    Yd = F.linear(Xd, Wd, Bd)
    Yd.backward(G)

    layer = RowParallelLinear(h_in, h_out, ctx).to(F64)
    assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == Kind.ROW.partition_dim
    assert not layer.bias.tensor_model_parallel
    load_param(layer.weight, slicing.shard(W, Kind.ROW, world, rank))
    load_param(layer.bias, slicing.shard(Bias, Kind.REPLICATED, world, rank))
    x = leaf(X.chunk(world, dim=-1)[rank])  # input: this rank's slice of the features
    y = layer(x)
    _close(y, Yd.detach(), "row output")
    y.backward(G)
    _close(x.grad, Xd.grad.chunk(world, dim=-1)[rank], "row input grad slice")
    _close(_merged_grad(layer.weight, Kind.ROW, group), Wd.grad, "row weight grad")
    _close(_merged_grad(layer.bias, Kind.REPLICATED, group), Bd.grad, "row bias grad (replicated, bitwise equal)")


def check_column_row_mlp(ctx: TensorParallelContext) -> None:
    """Column (no gather) -> gelu -> Row, the Megatron MLP: one all-reduce forward, one backward."""
    world, rank, group = ctx.size, ctx.rank, ctx.group
    h, f = 8, 16
    W1, B1, W2, B2 = _randn(1200, f, h), _randn(1201, f), _randn(1202, h, f), _randn(1203, h)
    X, G = _randn(1204, B, S, h), _randn(1205, B, S, h)
    dense = [leaf(t) for t in (W1, B1, W2, B2)]
    Xd = leaf(X)
    Yd = F.linear(F.gelu(F.linear(Xd, dense[0], dense[1]), approximate="tanh"), dense[2], dense[3])
    Yd.backward(G)

    col, row = ColumnParallelLinear(h, f, ctx).to(F64), RowParallelLinear(f, h, ctx).to(F64)
    params = [(col.weight, Kind.COLUMN), (col.bias, Kind.COLUMN), (row.weight, Kind.ROW), (row.bias, Kind.REPLICATED)]
    for (p, kind), full in zip(params, (W1, B1, W2, B2)):
        load_param(p, slicing.shard(full, kind, world, rank))
    x = leaf(X)
    y = row(F.gelu(col(x), approximate="tanh"))
    _close(y, Yd.detach(), "mlp output")
    y.backward(G)
    _close(x.grad, Xd.grad, "mlp input grad")
    for (p, kind), d, name in zip(params, dense, ("w1", "b1", "w2", "b2")):
        _close(_merged_grad(p, kind, group), d.grad, f"mlp {name} grad")


def check_vocab_parallel_embedding(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    vocab, hidden = 50, 6
    padded = slicing.padded_vocab_size(vocab, 8, world)
    assert padded % world == 0 and padded > vocab
    ranges = [slicing.vocab_range(padded, world, r) for r in range(world)]
    # every rank's first and last real id, and the ids either side of each boundary
    edges = sorted({i for s, e in ranges for i in (s - 1, s, e - 1, e) if 0 <= i < vocab})
    rand = torch.randint(0, vocab, (2 * len(edges),), generator=_gen(2001)).tolist()
    ids = torch.tensor(edges + rand + edges[::-1]).view(2, -1)  # duplicates: gradients accumulate
    for s, e in ranges:
        assert ((ids >= s) & (ids < e)).any(), "test ids must reach every rank's range"

    W = slicing.pad_vocab(_randn(2000, vocab, hidden), padded)
    G = _randn(2002, *ids.shape, hidden)
    Wd = leaf(W)
    Yd = F.embedding(ids, Wd)
    Yd.backward(G)

    layer = VocabParallelEmbedding(padded, hidden, ctx).to(F64)
    assert (layer.vocab_start, layer.vocab_end) == ranges[rank]
    load_param(layer.weight, slicing.shard(W, Kind.VOCAB, world, rank))
    y = layer(ids)
    assert_equal(y, Yd.detach(), "embedding output")  # one rank contributes each row, the rest add exact zeros
    y.backward(G)
    grad = _merged_grad(layer.weight, Kind.VOCAB, group)
    _close(grad, Wd.grad, "embedding weight grad")
    assert_equal(grad[vocab:], torch.zeros_like(grad[vocab:]), "padded rows get no gradient")


def _check_lm_head_cross_entropy(ctx: TensorParallelContext, vocab: int, divisible_by: int) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    hidden, f32 = 8, torch.float32
    padded = slicing.padded_vocab_size(vocab, divisible_by, world)
    start, end = slicing.vocab_range(padded, world, rank)
    starts = [slicing.vocab_range(padded, world, r)[0] for r in range(world)]
    # targets only < vocab, including every real rank's first id and the last real id
    special = [s for s in starts if s < vocab] + [vocab - 1]
    rand = torch.randint(0, vocab, (B * 5 - len(special),), generator=_gen(3002)).tolist()
    T = torch.tensor(special + rand).view(B, 5)
    # padded rows are random, not zero: their logits are real numbers that only the mask keeps out
    W = _randn(3000, padded, hidden, dtype=f32)
    X = _randn(3001, B, 5, hidden, dtype=f32)
    GL = _randn(3003, B, 5, dtype=f32).abs()  # a per-token loss weight, so grad_loss is not all ones

    Xd, Wd = leaf(X), leaf(W)
    loss_d = F.cross_entropy(F.linear(Xd, Wd[:vocab]).reshape(-1, vocab), T.reshape(-1), reduction="none").view(B, 5)
    loss_d.backward(GL)

    x, w = leaf(X), leaf(slicing.shard(W, Kind.VOCAB, world, rank))
    logits = parallel_lm_logits(x, w, ctx)
    assert logits.shape == (B, 5, padded // world)
    _close32(logits, F.linear(X, W).chunk(world, dim=-1)[rank], "logits slice")
    loss = vocab_parallel_cross_entropy(logits, T, start, vocab, group)
    assert loss.dtype == f32 and loss.shape == T.shape
    _close32(loss, loss_d.detach(), "loss vs dense F.cross_entropy over the unpadded vocabulary")
    for other in _all_gather(loss.detach(), group):
        assert_equal(other, loss.detach(), "the loss is identical on every TP rank")
    loss.backward(GL)
    _close32(x.grad, Xd.grad, "head input grad")
    w_grad = _merged_grad(w, Kind.VOCAB, group)
    _close32(w_grad, Wd.grad, "head weight grad")
    assert_equal(w_grad[vocab:], torch.zeros_like(w_grad[vocab:]), "padded vocabulary rows get no gradient")

    # negative control: without the padding mask the padded logits enter the softmax
    with torch.no_grad():
        unmasked = vocab_parallel_cross_entropy(logits.detach(), T, start, padded, group)
    assert_fails(lambda: _close32(unmasked, loss_d.detach(), "unmasked"), "loss without the padding mask")


def check_lm_head_cross_entropy_padded_vocab(ctx: TensorParallelContext) -> None:
    assert 50 % (8 * ctx.size)  # the vocabulary really is padded
    _check_lm_head_cross_entropy(ctx, vocab=50, divisible_by=8)


def check_lm_head_cross_entropy_all_padding_rank(ctx: TensorParallelContext) -> None:
    padded = slicing.padded_vocab_size(10, 8, ctx.size)
    padding_only = [r for r in range(ctx.size) if slicing.vocab_range(padded, ctx.size, r)[0] >= 10]
    if ctx.size == 4:
        assert padding_only == [2, 3], padding_only  # ranks whose whole slice is padding
    _check_lm_head_cross_entropy(ctx, vocab=10, divisible_by=8)


# --------------------------------------------------------------------------------------------------
# 3. a whole transformer layer, TP=N vs TP=1
# --------------------------------------------------------------------------------------------------


def _layer_cfg() -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=4, vocab_size=64,
                       max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)


def _full_layer_weights(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Seeded full weights; norms are perturbed away from ones/zeros so their gradients matter."""
    full = {}
    for i, (name, p) in enumerate(layer.named_parameters()):
        t = 0.3 * _randn(4000 + i, *p.shape)
        full[name] = 1.0 + t if name.endswith("layernorm.weight") else t
    return full


def _load_tp_layer(layer: torch.nn.Module, full: dict, world: int, rank: int, swap: str | None = None) -> None:
    for name, p in layer.named_parameters():
        spec = spec_of(f"1.{name}", _layer_cfg())  # the global name of this parameter in transformer layer 0
        assert spec.role is Role.BLOCK and spec.local_name == name
        assert p.partition_dim == (-1 if spec.kind.partition_dim is None else spec.kind.partition_dim), name
        src = (rank + 1) % world if swap is not None and name.startswith(swap) else rank
        load_param(p, slicing.shard(full[name], spec.kind, world, src))


def check_transformer_layer(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    cfg = _layer_cfg()
    cfg.check_tensor_parallel(world)
    dense_ctx = TensorParallelContext(size=1, rank=0, group=None)
    dense_ctx.rng.add(MODEL_PARALLEL_RNG, 1234)
    dense = TransformerLayer(cfg, dense_ctx, 0).to(F64)
    layer = TransformerLayer(cfg, ctx, 0).to(F64)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {n for n, _ in dense.named_parameters()} == {s.local_name for s in param_specs(cfg) if s.role is Role.BLOCK}

    full = _full_layer_weights(dense)
    for name, p in dense.named_parameters():
        load_param(p, full[name])
    _load_tp_layer(layer, full, world, rank)

    X, G = _randn(4100, B, 5, cfg.hidden_size), _randn(4101, B, 5, cfg.hidden_size)
    yd, dense_grads = same_forward_and_backward(dense, layer, X, G)
    for name, p in layer.named_parameters():
        _close(_merged_grad(p, spec_of(f"1.{name}", cfg).kind, group), dense_grads[name], f"grad of {name}")

    # negative control: hand each rank its neighbour's heads (QKV shard) -> the output must change
    _load_tp_layer(layer, full, world, rank, swap="self_attention.query_key_value")
    with torch.no_grad():
        y_swapped = layer(X)
    assert_fails(lambda: _close(y_swapped, yd.detach(), "swapped"), "layer with swapped QKV shards")


# --------------------------------------------------------------------------------------------------
# negative controls: the classic TP mistakes must be visible to the same comparisons
# --------------------------------------------------------------------------------------------------


def check_negative_controls(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    h_in, h_out = 8, 12
    W, Bias, X, G = _randn(5000, h_out, h_in), _randn(5001, h_out), _randn(5002, B, S, h_in), _randn(5003, B, S, h_out)
    Wd, Bd, Xd = leaf(W), leaf(Bias), leaf(X)
    Yd = F.linear(Xd, Wd, Bd)
    Yd.backward(G)

    # a swapped shard: rank r holds rank r+1's rows
    layer = ColumnParallelLinear(h_in, h_out, ctx, gather_output=True).to(F64)
    load_param(layer.weight, slicing.shard(W, Kind.COLUMN, world, (rank + 1) % world))
    load_param(layer.bias, slicing.shard(Bias, Kind.COLUMN, world, (rank + 1) % world))
    with torch.no_grad():
        y = layer(X)
    assert_fails(lambda: _close(y, Yd.detach(), "swapped"), "column layer with a swapped shard")

    # a column layer without copy_to_tp_region: the input gradient misses the other ranks' parts
    x = leaf(X)
    y = gather_from_tp_region(F.linear(x, slicing.shard(W, Kind.COLUMN, world, rank),
                                       slicing.shard(Bias, Kind.COLUMN, world, rank)), group)
    _close(y, Yd.detach(), "output is still right")
    y.backward(G)
    assert_fails(lambda: _close(x.grad, Xd.grad, "no copy"), "input grad without the backward all-reduce")

    # a row layer that adds its replicated bias before the all-reduce counts it world times
    Wr = _randn(5004, h_out, h_out)
    Yr = F.linear(Yd.detach(), Wr, Bias)
    wrong = reduce_from_tp_region(F.linear(Yd.detach().chunk(world, dim=-1)[rank],
                                           slicing.shard(Wr, Kind.ROW, world, rank), Bias), group)
    assert_fails(lambda: _close(wrong, Yr, "bias per rank"), "row bias added on every rank")

    # an embedding that looks ids up without subtracting its vocab_start
    ids = torch.arange(0, 32).view(2, 16)
    We = _randn(5005, 32, 4)
    part = F.embedding(ids.clamp(max=32 // world - 1), slicing.shard(We, Kind.VOCAB, world, rank))
    outside = (ids < rank * 32 // world) | (ids >= (rank + 1) * 32 // world)
    wrong = reduce_from_tp_region(part.masked_fill(outside.unsqueeze(-1), 0.0), group)
    assert_fails(lambda: assert_equal(wrong, F.embedding(ids, We), "no offset"), "embedding without the vocab offset")


# --------------------------------------------------------------------------------------------------
# 5 (multi-process part). per-rank RNG streams
# --------------------------------------------------------------------------------------------------


def check_rng_fork_per_rank(ctx: TensorParallelContext) -> None:
    world, rank, group = ctx.size, ctx.rank, ctx.group
    tracker = RNGStatesTracker()
    seed_all(1234, pp_rank=0, tp_rank=rank, tracker=tracker)  # tracker seed 1234 + 2718 + rank
    ones = torch.ones(512)
    before = torch.get_rng_state()
    with tracker.fork():
        tp_mask = (F.dropout(ones, p=0.5) != 0).to(torch.uint8)
    assert_equal(torch.get_rng_state(), before, "fork leaves the default generator untouched")
    dp_mask = (F.dropout(ones, p=0.5) != 0).to(torch.uint8)  # the default (data-parallel region) stream

    tp_masks, dp_masks = _all_gather(tp_mask, group), _all_gather(dp_mask, group)
    for r in range(world):
        assert_equal(dp_masks[r], dp_mask, f"default-stream dropout mask equal on rank {r}")
        for q in range(r):
            assert not torch.equal(tp_masks[r], tp_masks[q]), f"ranks {q} and {r} drew the same TP dropout mask"
    # and it is exactly the stream Megatron's seed offset defines
    torch.manual_seed(1234 + 2718 + rank)
    assert_equal((F.dropout(ones, p=0.5) != 0).to(torch.uint8), tp_mask, "tracker stream = seed + 2718 + tp_rank")


# --------------------------------------------------------------------------------------------------
# the spawned run and the pytest side
# --------------------------------------------------------------------------------------------------

CHECKS = {
    f.__name__[len("check_"):]: f
    for f in (
        check_copy_to_tp_region,
        check_reduce_from_tp_region,
        check_scatter_to_tp_region,
        check_gather_from_tp_region,
        check_column_parallel_linear,
        check_column_parallel_linear_gather_output,
        check_row_parallel_linear,
        check_column_row_mlp,
        check_vocab_parallel_embedding,
        check_lm_head_cross_entropy_padded_vocab,
        check_lm_head_cross_entropy_all_padding_rank,
        check_transformer_layer,
        check_negative_controls,
        check_rng_fork_per_rank,
    )
}


def _tp_worker(rank: int, world_size: int, out_dir: str) -> None:
    run_tp_checks(rank, world_size, out_dir, CHECKS)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """``get(world_size)`` -> per-rank results; one spawned run per world size, shared by the tests."""
    return spawned_results(tmp_path_factory, _tp_worker, "tp")


def _dist_test(name: str):
    @pytest.mark.dist
    @pytest.mark.parametrize("world_size", WORLD_SIZES)
    def test(tp_results, world_size):
        report_check(tp_results(world_size), name)

    test.__name__ = f"test_{name}"
    test.__doc__ = CHECKS[name].__doc__
    return test


# One pytest test per check and world size, all reading the same two spawned runs.
for _name in CHECKS:
    globals()[f"test_{_name}"] = _dist_test(_name)
del _name


# --------------------------------------------------------------------------------------------------
# single-process checks
# --------------------------------------------------------------------------------------------------


def test_mappings_are_identities_without_a_group():
    x = leaf(_ints(1, 2, 3))
    for op in (copy_to_tp_region, reduce_from_tp_region, scatter_to_tp_region, gather_from_tp_region):
        assert op(x, None) is x


def test_bf16_linear_matches_fp32_rounded():
    """4. CPU bf16: fp32 GEMM of the exact bf16 values, rounded to nearest-even bf16, bitwise."""
    bf16 = torch.bfloat16
    x = _randn(1, 4, 7, 64, dtype=bf16).requires_grad_()
    w = _randn(2, 24, 64, dtype=bf16).requires_grad_()
    b = _randn(3, 24, dtype=bf16).requires_grad_()
    out = layers.linear(x, w, b)
    assert out.dtype == bf16
    ref32 = F.linear(x.detach().float(), w.detach().float(), b.detach().float())
    assert_equal(out.detach(), ref32.to(bf16), "bf16 linear")
    assert_equal(layers.linear(x, w).detach(), F.linear(x.detach().float(), w.detach().float()).to(bf16), "no bias")

    # negative control: rounding toward zero (dropping the low 16 bits) instead of to nearest
    truncated = (ref32.view(torch.int32) & -65536).view(torch.float32).to(bf16)  # exact: low bits are 0
    assert (truncated != ref32.to(bf16)).any(), "the data must contain values where the roundings differ"
    assert_fails(lambda: assert_equal(out.detach(), truncated, "truncated"), "bf16 output rounded toward zero")

    # gradients come back in bf16 and are the fp32 products rounded once
    g = _randn(4, 4, 7, 24, dtype=bf16)
    out.backward(g)
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == bf16
    g32 = g.float()
    # one bf16 ulp (2**-8 relative): the reference sums in another order before the single rounding
    tol = dict(rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(x.grad, (g32 @ w.detach().float()).to(bf16), **tol)
    torch.testing.assert_close(w.grad, (g32.reshape(-1, 24).T @ x.detach().float().reshape(-1, 64)).to(bf16), **tol)
    torch.testing.assert_close(b.grad, g32.sum(dim=(0, 1)).to(bf16), **tol)


def test_cross_entropy_single_rank_padded_and_bf16():
    """TP=1 (group None): padding columns masked; bf16 logits get a bf16 gradient, the loss is fp32."""
    vocab, padded = 50, 64
    logits = _randn(10, 3, 5, padded, dtype=torch.float32)
    target = torch.randint(0, vocab, (3, 5), generator=_gen(11))
    ref = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab), target.reshape(-1), reduction="none").view(3, 5)
    _close32(vocab_parallel_cross_entropy(logits, target, 0, vocab, None), ref, "tp1 loss")

    lb = logits.to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(lb, target, 0, vocab, None)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert lb.grad.dtype == torch.bfloat16
    assert torch.all(lb.grad[..., vocab:] == 0)
