"""Qwen3-MoE: the Qwen3 block (q/k norms, explicit head dim) with a mixture of SwiGLU experts as its MLP;
HF ``Qwen3MoeForCausalLM``.

Every layer is sparse (``decoder_sparse_step`` 1, no ``mlp_only_layers``: dense layers among sparse ones
are refused); the experts' width is ``moe_intermediate_size`` (our ``--ffn-hidden-size``), and
``intermediate_size``, the width of the dense MLP no layer has here, is kept as the source gave it. The
router renormalises its top-k weights only when ``norm_topk_prob`` is set (``--moe-no-topk-renormalization``
otherwise; transformers' default is false). The expert count is ``num_experts`` in the Hub's configs and
``num_local_experts`` in transformers 5's (both are read; an export writes both). The fused expert
tensors are Mixtral's names; per expert, they are ``mlp.experts.{e}.gate_proj`` / ``up_proj`` /
``down_proj`` beside the router ``mlp.gate.weight``.
"""

from __future__ import annotations

from megatron_ucp.config import ModelConfig
from megatron_ucp.families import Family, llama, mixtral, qwen3, register
from megatron_ucp.layout.hf import UnsupportedConfig, require

RULES = ({k: v for k, v in qwen3.RULES.items() if k not in mixtral.DENSE_MLP}
         | mixtral.moe_rules("mlp", "gate_proj", "up_proj", "down_proj"))


def config_from_hf(hf: dict) -> dict:
    require(hf, "decoder_sparse_step", 1, "every layer is sparse here", 1)
    if hf.get("mlp_only_layers"):
        raise UnsupportedConfig(f"mlp_only_layers={hf['mlp_only_layers']!r} is not supported (dense layers among "
                                "sparse ones are not modelled); expected []")
    counts = {hf[k] for k in ("num_experts", "num_local_experts") if k in hf}
    if len(counts) > 1:
        raise UnsupportedConfig(f"num_experts={hf['num_experts']!r} and num_local_experts={hf['num_local_experts']!r} "
                                "disagree")
    out = qwen3.config_from_hf(dict(hf, intermediate_size=hf["moe_intermediate_size"]))
    experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    return dict(out, moe_renormalize=bool(hf.get("norm_topk_prob", False)),
                **mixtral.moe_config_from_hf(hf, experts, 0.001))  # 0.001: Qwen3MoeConfig's default


def hf_config(cfg: ModelConfig) -> dict:
    out = dict(qwen3.hf_config(cfg), moe_intermediate_size=cfg.ffn_hidden_size, num_experts=cfg.num_experts,
               num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_top_k,
               norm_topk_prob=cfg.moe_renormalize, router_aux_loss_coef=cfg.moe_loss_coeff, decoder_sparse_step=1,
               mlp_only_layers=[])
    del out["intermediate_size"]  # the dense MLP's width: no layer has one
    return out


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
