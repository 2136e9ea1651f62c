"""Mixtral: the Llama block whose MLP is a mixture of SwiGLU experts; HF ``MixtralForCausalLM``.

Every layer's MLP is ``model/moe.py``'s sparse MLP: a router over ``num_local_experts`` experts, the top
``num_experts_per_tok`` of them per token, their weights always renormalised.

Two HF layouts of the router and the experts (``layout.hf.ExpertLayout``), both read, either written:

* fused, transformers 5's modules: ``mlp.gate.weight`` [E, h], ``mlp.experts.gate_up_proj`` [E, 2f, h]
  (each expert's ``[gate; up]``, our ``dense_h_to_4h``) and ``mlp.experts.down_proj`` [E, h, f]; an
  expert of ours is one slice of dim 0;
* per expert, the Hub's files and what transformers 5's ``save_pretrained`` still writes:
  ``block_sparse_moe.gate.weight`` and ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up) and
  ``w2`` (down).

Not modelled, refused by name: router jitter noise (training-time noise on the router's input).
``output_router_logits`` only says what transformers' forward returns (and whether its training adds the
load-balancing loss): accepted either way and kept on export; our training adds
``router_aux_loss_coef`` times that loss (``--moe-loss-coeff``).
"""

from __future__ import annotations

from typing import Any

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, llama, register
from megatron_ucp.layout.experts import EXPERTS, GATE
from megatron_ucp.layout.hf import Combine, HFRule, require
from megatron_ucp.layout.params import Role

L = llama.L
DENSE_MLP: tuple[tuple[Role, str], ...] = ((Role.BLOCK, "mlp.dense_h_to_4h.weight"), (Role.BLOCK, "mlp.dense_4h_to_h.weight"))


def moe_rules(mlp: str, gate: str, up: str, down: str) -> dict[tuple[Role, str], HFRule]:
    """The router and expert rules of a transformers 5 MoE layer (fused), with their per-expert names: ``mlp``
    the MoE module's name in per-expert files, ``gate`` / ``up`` / ``down`` an expert's projections there."""
    expert = L + mlp + ".experts.{e}."
    return {
        (Role.BLOCK, GATE): HFRule((L + "mlp.gate.weight",), per_expert=HFRule((L + mlp + ".gate.weight",))),
        (Role.BLOCK, EXPERTS + "{e}.dense_h_to_4h.weight"): HFRule(
            (L + "mlp.experts.gate_up_proj",), combine=Combine.EXPERT,
            per_expert=HFRule((expert + gate + ".weight", expert + up + ".weight"), combine=Combine.SWIGLU)),
        (Role.BLOCK, EXPERTS + "{e}.dense_4h_to_h.weight"): HFRule(
            (L + "mlp.experts.down_proj",), combine=Combine.EXPERT, per_expert=HFRule((expert + down + ".weight",))),
    }


RULES: dict[tuple[Role, str], HFRule] = ({k: v for k, v in llama.RULES.items() if k not in DENSE_MLP}
                                         | moe_rules("block_sparse_moe", "w1", "w3", "w2"))

OPTIONS: dict[str, Any] = dict(llama.OPTIONS, moe_renormalize=True)


def moe_config_from_hf(hf: dict, experts: int, aux_loss_default: float) -> dict:
    """The MoE fields of an HF config both MoE families read alike (``experts``: the expert count, named
    differently by each)."""
    return dict(num_experts=int(experts), moe_top_k=int(hf["num_experts_per_tok"]),
                moe_loss_coeff=float(hf.get("router_aux_loss_coef", aux_loss_default)))


def config_from_hf(hf: dict) -> dict:
    require(hf, "router_jitter_noise", (0, 0.0), "the router adds no noise to its input in training", 0.0)
    out = llama.config_from_hf(hf)
    window = hf.get("sliding_window")
    if window is not None:
        out["sliding_window"] = int(window)
    return dict(out, **moe_config_from_hf(hf, hf["num_local_experts"], 0.001))  # 0.001: MixtralConfig's default


def hf_config(cfg: ModelConfig) -> dict:
    return dict(llama.hf_config(cfg), sliding_window=cfg.sliding_window, num_local_experts=cfg.num_experts,
                num_experts_per_tok=cfg.moe_top_k, router_aux_loss_coef=cfg.moe_loss_coeff, router_jitter_noise=0.0)


def hf_model(overrides: dict | None = None, **sizes):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = dict(llama.hf_sizes(**sizes), num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
    return MixtralForCausalLM(MixtralConfig(**dict(config, **(overrides or {}))))


FAMILY = register(Family(
    name="mixtral", architecture="MixtralForCausalLM", model_type="mixtral",
    options={k: v for k, v in OPTIONS.items() if k != "sliding_window"}, recipe_flags=llama.RECIPE_FLAGS,
    block=llama.block, hf_rules=RULES, config_from_hf=config_from_hf, hf_config=hf_config, hf_model=hf_model,
    grouped_query=True, moe=True, ignored_hf_suffixes=(".rotary_emb.inv_freq",)))
