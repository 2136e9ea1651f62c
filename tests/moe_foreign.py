"""A plain-DeepSpeed mixture-of-experts model no project code builds: the foreign checkpoint of the MoE tests.

Token embedding, two residual blocks whose MLP is ``deepspeed.moe.layer.MoE`` (8 GELU MLP
experts, top-2, no token dropping) under the attribute name ``ffn`` (not the project's ``mlp``), and an
output head; DeepSpeed's non-pipeline engine, ZeRO-1, fp32, the optimizer groups DeepSpeed's
``split_params_into_different_moe_groups_for_optimizer`` makes (the experts' is ``ep_size_<EP>``). The
saved folder has no ``megatron_ucp`` metadata and no ``universal_checkpoint_info``. Module level: the
workers are pickled by name into spawned ranks (``dist_utils.run_distributed``).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN, VOCAB, EXPERTS, LAYERS, SEQ = 16, 64, 8, 2, 8
TAG = "step2"


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, ep: int) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.ffn = MoE(HIDDEN, Expert(), num_experts=EXPERTS, ep_size=ep, k=2, drop_tokens=False,
                       top2_2nd_expert_sampling=False)

    def forward(self, x):
        y, aux, _ = self.ffn(self.norm(x))
        return x + y, aux


class Model(nn.Module):
    def __init__(self, ep: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block(ep) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids, labels):
        x, aux = self.embed(ids), 0.0
        for block in self.blocks:
            x, a = block(x)
            aux = aux + a
        return F.cross_entropy(self.head(x).reshape(-1, VOCAB), labels.reshape(-1)) + 0.01 * aux


def engine(ep: int):
    """A fresh model at expert parallel size ``ep`` (seed 0) in DeepSpeed's engine."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = Model(ep)
    groups = split_params_into_different_moe_groups_for_optimizer([{"params": list(model.parameters()),
                                                                     "name": "all"}])
    opt = torch.optim.AdamW(groups, lr=1e-2)
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
              "steps_per_print": 10**9}
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return eng


def expert_rank_names(eng, ep: int):
    """Local expert parameter name -> global name on this rank (DeepSpeed's expert-parallel rank)."""
    from deepspeed.utils import groups

    from megatron_ucp.checkpoint.zero import ExpertIndex
    from megatron_ucp.layout.experts import ExpertPlacement

    index = ExpertIndex(group=-1, placement=ExpertPlacement(EXPERTS, ep))
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep}")
    return lambda name: index.global_name(name, ep_rank, "the foreign model")


def dump(eng, ep: int, path: str) -> None:
    """Every parameter's full fp32 master and Adam moments, experts under their global names, written by the
    ranks of expert-data-parallel rank 0 (the rest by rank 0) to ``path``.rank<r>."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = eng.optimizer
    opt._hp_optimizer_states_linked = False  # DeepSpeed links group 2's moments lazily; link them all now
    opt._lazy_init_hp_params_optimizer_state()
    global_name = expert_rank_names(eng, ep)
    rank = dist.get_rank()
    out = {}
    for name, p in eng.module.named_parameters():
        got = {"fp32": safe_get_full_fp32_param(p).clone(),
               "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
               "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
        if ".deepspeed_experts." in name:
            if rank < ep:  # DP rank = rank; expert-data-parallel rank 0 of its expert-parallel rank
                out[global_name(name)] = got
        elif rank == 0:
            out[name] = got
    if out:
        torch.save(out, f"{path}.rank{rank}")


def train_and_save(rank, world_size, ep: int, save_dir: str, dump_path: str) -> None:
    """Two steps of the foreign model at EP ``ep`` over ``world_size`` data-parallel ranks, saved (tag TAG)."""
    eng = engine(ep)
    gen = torch.Generator().manual_seed(1 + rank)
    for _ in range(2):
        ids, labels = (torch.randint(0, VOCAB, (2, SEQ), generator=gen) for _ in range(2))
        eng.backward(eng(ids, labels))
        eng.step()
    eng.save_checkpoint(save_dir, tag=TAG)
    dump(eng, ep, dump_path)


def load_and_dump(rank, world_size, ep: int, universal: str, dump_path: str) -> None:
    """A fresh foreign model at EP ``ep`` loads the universal folder ``universal`` through our sliced reader
    (every parameter whole: TP 1), then dumps its state."""
    from megatron_ucp.checkpoint.rules import MergeRule
    from megatron_ucp.checkpoint.trust import restricted_torch_load
    from megatron_ucp.layout.params import Kind
    from megatron_ucp.training.sliced_load import UniversalSource, sliced_universal_load

    eng = engine(ep)
    source = UniversalSource(universal, rule=lambda name: MergeRule(Kind.REPLICATED))
    # as the trainer does: every file DeepSpeed unpickles goes through the allowlist
    with restricted_torch_load(), sliced_universal_load(eng, source, tp=1, tp_rank=0,
                                                        expert_names=expert_rank_names(eng, ep)) as stats:
        path, _ = eng.load_checkpoint(os.path.dirname(universal), tag=os.path.basename(universal),
                                      load_optimizer_states=True, load_lr_scheduler_states=False)
    assert path is not None and stats.state_bytes > 0
    dump(eng, ep, dump_path)
