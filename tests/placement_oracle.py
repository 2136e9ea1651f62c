"""The placement rules as they were written before ``layout/placement.py``: the test oracle.

These are the project's earlier ``slicing.shard``/``merge`` and ``model/llama.py``'s fused-layout
functions, kept verbatim (only renamed) so that the data-driven placement is checked against an
independent implementation, not against itself.
"""

from __future__ import annotations

import torch

from megatron_ucp.layout.params import Kind


def local_shape(kind: Kind, full_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """The shape one TP rank holds, for a full shape (already padded for VOCAB)."""
    dim = kind.partition_dim
    if dim is None:
        return tuple(full_shape)
    if dim >= len(full_shape):  # 1-D biases of row-parallel layers are never ROW
        raise ValueError(f"{kind.value} parameter of shape {tuple(full_shape)} has no dim {dim}")
    if full_shape[dim] % (tp * kind.num_sub_params):
        what = f"each of the {kind.num_sub_params} sub-parameters in " if kind.num_sub_params > 1 else ""
        raise ValueError(f"tensor parallel {tp} does not divide {what}dim {dim} of shape {tuple(full_shape)}")
    shape = list(full_shape)
    shape[dim] //= tp
    return tuple(shape)


def shard(full: torch.Tensor, kind: Kind, tp: int, tp_rank: int) -> torch.Tensor:
    """The slice of ``full`` that ``tp_rank`` holds (a view, except for fused sub-parameters, which are
    re-assembled per rank; VOCAB tensors must be padded already)."""
    dim = kind.partition_dim
    if dim is None:
        return full
    local_shape(kind, tuple(full.shape), tp)  # validates divisibility
    if kind.num_sub_params > 1:  # [a; b] -> [a_r; b_r]
        return torch.cat([sub.chunk(tp, dim=dim)[tp_rank] for sub in full.chunk(kind.num_sub_params, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def merge(shards: list[torch.Tensor], kind: Kind) -> torch.Tensor:
    """Join the TP slices of one parameter, in TP-rank order; the inverse of ``shard``.

    Replicated parameters must be bitwise equal on every rank: they are never averaged silently.
    """
    dim = kind.partition_dim
    if dim is None:
        first = shards[0]
        for r, other in enumerate(shards[1:], start=1):
            if not torch.equal(first, other):
                raise ValueError(f"replicated parameter differs between TP rank 0 and TP rank {r}")
        return first
    n = kind.num_sub_params
    if n > 1:  # [a_r; b_r] per rank -> [a; b]
        parts = [s.chunk(n, dim=dim) for s in shards]
        return torch.cat([torch.cat([p[i] for p in parts], dim=dim) for i in range(n)], dim=dim)
    return torch.cat(shards, dim=dim)


def _check_heads(num_heads: int, num_kv_heads: int) -> int:
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} must divide num_attention_heads {num_heads}")
    return num_heads // num_kv_heads


def fuse_qkv(q_full: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor,
             num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Separate projections -> Megatron-DeepSpeed's grouped fused QKV.

    q_full [num_heads * hn, ...], k_full and v_full [num_kv_heads * hn, ...] (weights [., h] or biases)
    -> [num_kv_heads * (qpg + 2) * hn, ...] with rows ``for g: q heads g*qpg .. g*qpg+qpg-1, k_g, v_g``.
    Query head i uses key/value head i // qpg, as in HF's ``repeat_kv``.
    """
    qpg = _check_heads(num_heads, num_kv_heads)
    if k_full.shape != v_full.shape or k_full.shape[0] % num_kv_heads:
        raise ValueError(f"k {tuple(k_full.shape)} and v {tuple(v_full.shape)} must be equal and hold "
                         f"{num_kv_heads} heads")
    hn = k_full.shape[0] // num_kv_heads
    rest = tuple(k_full.shape[1:])
    if tuple(q_full.shape) != (num_heads * hn,) + rest:
        raise ValueError(f"q {tuple(q_full.shape)} does not hold {num_heads} heads of {hn} rows")
    q = q_full.reshape(num_kv_heads, qpg * hn, *rest)
    k = k_full.reshape(num_kv_heads, hn, *rest)
    v = v_full.reshape(num_kv_heads, hn, *rest)
    return torch.cat((q, k, v), dim=1).reshape(num_kv_heads * (qpg + 2) * hn, *rest)


def unfuse_qkv(fused: torch.Tensor, num_heads: int,
               num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``fuse_qkv``: grouped fused QKV -> (q [nh*hn, ...], k [nkv*hn, ...], v [nkv*hn, ...])."""
    qpg = _check_heads(num_heads, num_kv_heads)
    rows = fused.shape[0]
    if rows % (num_kv_heads * (qpg + 2)):
        raise ValueError(f"fused QKV with {rows} rows does not split into {num_kv_heads} groups of {qpg + 2} heads")
    hn = rows // (num_kv_heads * (qpg + 2))
    rest = tuple(fused.shape[1:])
    grouped = fused.reshape(num_kv_heads, (qpg + 2) * hn, *rest)
    q, k, v = grouped.split((qpg * hn, hn, hn), dim=1)
    return (q.reshape(num_heads * hn, *rest), k.reshape(num_kv_heads * hn, *rest),
            v.reshape(num_kv_heads * hn, *rest))


def fuse_swiglu(gate_full: torch.Tensor, up_full: torch.Tensor, tp: int) -> torch.Tensor:
    """Gate and up projections [f, ...] -> the TP-rank concatenation of per-rank ``[gate_r; up_r]``.

    ``slicing.shard(result, Kind.COLUMN, tp, r)`` is then exactly rank r's ``dense_h_to_4h`` shard. The
    result depends on ``tp`` (for tp > 1 it is not ``[gate; up]``), so a checkpoint merged by plain
    concatenation at one TP degree cannot be re-split at another: converters go through
    ``unfuse_swiglu(full, tp_src)`` and ``fuse_swiglu(..., tp_dst)`` (DeepSpeed's
    ``parameter_with_2_sub_params_cat_dim_0``; its universal form is ``fuse_swiglu(gate, up, 1)``, which
    ``slicing.shard(., Kind.COLUMN_2SUB, tp, r)`` cuts into the same per-rank shards).
    """
    if gate_full.shape != up_full.shape:
        raise ValueError(f"gate {tuple(gate_full.shape)} and up {tuple(up_full.shape)} differ in shape")
    if gate_full.shape[0] % tp:
        raise ValueError(f"tensor parallel {tp} does not divide ffn_hidden_size {gate_full.shape[0]}")
    pieces = []
    for g, u in zip(gate_full.chunk(tp, dim=0), up_full.chunk(tp, dim=0)):
        pieces += [g, u]
    return torch.cat(pieces, dim=0)


def unfuse_swiglu(full: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``fuse_swiglu(gate, up, tp)``: -> (gate [f, ...], up [f, ...])."""
    if full.shape[0] % (2 * tp):
        raise ValueError(f"fused SwiGLU with {full.shape[0]} rows does not split into {tp} ranks of [gate; up]")
    gates, ups = zip(*(shard.chunk(2, dim=0) for shard in full.chunk(tp, dim=0)))
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)
