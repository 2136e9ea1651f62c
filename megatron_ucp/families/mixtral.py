"""Mixtral: the Llama block whose MLP is a mixture of SwiGLU experts; HF ``MixtralForCausalLM``.

Every layer's MLP is ``model/moe.py``'s sparse MLP: a router over ``num_local_experts`` experts, the top
``num_experts_per_tok`` of them per token, their weights always renormalised. transformers (5.x) keeps a
layer's experts fused, ``mlp.experts.gate_up_proj`` [E, 2f, h] (each expert's ``[gate; up]``, our
``dense_h_to_4h``) and ``mlp.experts.down_proj`` [E, h, f]; the router is ``mlp.gate.weight`` [E, h].
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

# An expert's tensors are one slice (dim 0, the expert) of the layer's fused HF tensor.
MOE_RULES: dict[tuple[Role, str], HFRule] = {
    (Role.BLOCK, GATE): HFRule((L + "mlp.gate.weight",)),
    (Role.BLOCK, EXPERTS + "{e}.dense_h_to_4h.weight"): HFRule((L + "mlp.experts.gate_up_proj",),
                                                              combine=Combine.EXPERT),
    (Role.BLOCK, EXPERTS + "{e}.dense_4h_to_h.weight"): HFRule((L + "mlp.experts.down_proj",),
                                                              combine=Combine.EXPERT),
}
RULES: dict[tuple[Role, str], HFRule] = {k: v for k, v in llama.RULES.items() if k not in DENSE_MLP} | MOE_RULES

OPTIONS: dict[str, Any] = dict(llama.OPTIONS, moe_renormalize=True)


def config_from_hf(hf: dict) -> dict:
    require(hf, "output_router_logits", False, "the router logits are not returned", False)
    out = llama.config_from_hf(hf)
    window = hf.get("sliding_window")
    if window is not None:
        out["sliding_window"] = int(window)
    return dict(out, num_experts=int(hf["num_local_experts"]), moe_top_k=int(hf["num_experts_per_tok"]),
                moe_loss_coeff=float(hf.get("router_aux_loss_coef", 0.02)))


def hf_config(cfg: ModelConfig) -> dict:
    return dict(llama.hf_config(cfg), sliding_window=cfg.sliding_window, num_local_experts=cfg.num_experts,
                num_experts_per_tok=cfg.moe_top_k, router_aux_loss_coef=cfg.moe_loss_coeff,
                output_router_logits=False, router_jitter_noise=0.0)


def hf_model(overrides: dict | None = None, **sizes):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = dict(llama.hf_sizes(**sizes), num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
    return MixtralForCausalLM(MixtralConfig(**dict(config, **(overrides or {}))))


FAMILY = register(Family(
    name="mixtral", architecture="MixtralForCausalLM", model_type="mixtral",
    options={k: v for k, v in OPTIONS.items() if k != "sliding_window"}, recipe_flags=llama.RECIPE_FLAGS,
    block=llama.block, hf_rules=RULES, config_from_hf=config_from_hf, hf_config=hf_config, hf_model=hf_model,
    grouped_query=True, moe=True, ignored_hf_suffixes=(".rotary_emb.inv_freq",)))
