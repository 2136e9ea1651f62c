"""Qwen3-MoE: the Qwen3 block (q/k norms, explicit head dim) with a mixture of SwiGLU experts as its MLP;
HF ``Qwen3MoeForCausalLM``.

Every layer is sparse (``decoder_sparse_step`` 1, no ``mlp_only_layers``); the experts' width is
``moe_intermediate_size`` (our ``--ffn-hidden-size``). The router renormalises its top-k weights only
when ``norm_topk_prob`` is set (``--moe-no-topk-renormalization`` otherwise). The HF tensor names of
the router and the fused experts are Mixtral's (``mixtral.MOE_RULES``).
"""

from __future__ import annotations

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, llama, mixtral, qwen3, register
from megatron_ucp.layout.hf import require

RULES = {k: v for k, v in qwen3.RULES.items() if k not in mixtral.DENSE_MLP} | mixtral.MOE_RULES


def config_from_hf(hf: dict) -> dict:
    require(hf, "decoder_sparse_step", 1, "every layer is sparse here", 1)
    if hf.get("mlp_only_layers"):
        raise ValueError(f"mlp_only_layers {hf['mlp_only_layers']}: dense layers among sparse ones are not modelled")
    require(hf, "output_router_logits", False, "the router logits are not returned", False)
    out = qwen3.config_from_hf(dict(hf, intermediate_size=hf["moe_intermediate_size"]))
    experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]  # transformers 5 writes the latter
    return dict(out, num_experts=int(experts), moe_top_k=int(hf["num_experts_per_tok"]),
                moe_renormalize=bool(hf.get("norm_topk_prob", False)),
                moe_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)))


def hf_config(cfg: ModelConfig) -> dict:
    return dict(qwen3.hf_config(cfg), moe_intermediate_size=cfg.ffn_hidden_size, num_experts=cfg.num_experts,
                num_experts_per_tok=cfg.moe_top_k, norm_topk_prob=cfg.moe_renormalize,
                router_aux_loss_coef=cfg.moe_loss_coeff, decoder_sparse_step=1, mlp_only_layers=[],
                output_router_logits=False)


def hf_model(overrides: dict | None = None, **sizes):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    base = llama.hf_sizes(**sizes)
    config = dict(base, moe_intermediate_size=base["intermediate_size"], num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=True)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**dict(config, **(overrides or {}))))


FAMILY = register(Family(
    name="qwen3_moe", architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe", options=dict(llama.OPTIONS, qk_layernorm=True),
    recipe_flags=llama.RECIPE_FLAGS, block=llama.block, hf_rules=RULES, config_from_hf=config_from_hf,
    hf_config=hf_config, hf_model=hf_model, grouped_query=True, moe=True,
    ignored_hf_suffixes=(".rotary_emb.inv_freq",)))
