"""GPTModel: the same network as ``GPTPipe`` as a plain module, for DeepSpeed's non-pipeline engine.

DeepSpeed's pipeline engine refuses ZeRO-2 and ZeRO-3, so those stages train this model. It registers
the very same submodules under the very same names as the PipelineModule at PP=1
(``tied_modules.embed.*``, ``1.input_layernorm.weight``, ..., ``{L+1}.final_layernorm.*``,
``{L+2}.lm_head.weight``): parameter names are the contract of universal checkpoints, so a ZeRO-3
checkpoint of this model resumes on the pipeline model with ZeRO-1 and back.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from megatron_ucp.config import ModelConfig
from megatron_ucp.distributed.groups import ParallelState
from megatron_ucp.layout.params import Role, pipe_entries
from megatron_ucp.layout.placement import vocab_range
from megatron_ucp.model.gpt import EmbeddingLayer, FinalNorm, LMHead, carried
from megatron_ucp.model.init import initialize_parameters
from megatron_ucp.model.pipe import BlockBuilder, LMLoss, padded_vocab_for


class GPTModel(nn.Module):
    """Embedding, transformer layers, final norm and head called in order; returns the mean LM loss."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, seed: int, zero_stage: int = 0, *,
                 block: BlockBuilder) -> None:
        super().__init__()
        layout = state.layout
        if layout.degree('pp') != 1:
            raise ValueError(f"the non-pipeline model needs pipeline parallel size 1, got {layout.degree('pp')}")
        cfg.check_tensor_parallel(layout.degree('tp'))
        padded_vocab = padded_vocab_for(cfg, layout.degree('tp'), zero_stage)
        tp = state.tp
        self.model_config = cfg
        self.padded_vocab = padded_vocab
        self._order: list[str] = []  # module paths in forward order
        self._tied_head: str | None = None
        for entry in pipe_entries(cfg):
            if entry.role is Role.EMBED:
                module = EmbeddingLayer(cfg, padded_vocab, tp)
                if entry.tied_key:
                    self.tied_modules = nn.ModuleDict({entry.tied_key: module})
                    self._order.append(f"tied_modules.{entry.tied_key}")
                else:
                    self.add_module(str(entry.index), module)
                    self._order.append(str(entry.index))
            elif entry.role is Role.BLOCK:
                assert entry.layer_number is not None  # pipe_entries numbers every BLOCK entry
                self.add_module(str(entry.index), block(cfg, tp, entry.layer_number, layout.degree("ep")).build())
                self._order.append(str(entry.index))
            elif entry.role is Role.FINAL_NORM:
                self.add_module(str(entry.index), FinalNorm(cfg, tp))
                self._order.append(str(entry.index))
            elif entry.tied_key:  # the tied head: the embedding module's weight, no parameters of its own
                self._tied_head = f"tied_modules.{entry.tied_key}"
            else:
                self.add_module(str(entry.index), LMHead(cfg, padded_vocab, tp))
                self._order.append(str(entry.index))
        vocab_start, _ = vocab_range(padded_vocab, layout.degree('tp'), state.coords['tp'])
        self.loss_fn = LMLoss(vocab_start, cfg.vocab_size, state.tp_group, cfg.moe_loss_coeff)
        initialize_parameters(self, cfg, seed, padded_vocab, layout.degree('tp'), state.coords['tp'],
                              ep=(layout.degree('ep'), state.coords['ep']))

    def register_tied_head_for_zero3(self) -> None:
        """ZeRO-3 gathers a parameter only inside its own module's forward; the tied head reads the
        word embedding outside it, so it must be declared external to this module."""
        if self._tied_head is not None:
            import deepspeed

            embed = cast(EmbeddingLayer, self.get_submodule(self._tied_head))
            deepspeed.zero.register_external_parameter(self, embed.word_embeddings.weight)

    def _outputs(self, tokens: torch.Tensor):
        """The logits, or ``(logits, aux)`` for an MoE model (``model.pipe.LMLoss``)."""
        x = tokens
        for path in self._order:
            x = self.get_submodule(path)(x)
        if self._tied_head is not None:
            x = carried(cast(EmbeddingLayer, self.get_submodule(self._tied_head)).head, x)
        return x

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """This TP rank's vocab-parallel logits ``[b, s, v]``."""
        out = self._outputs(tokens)
        return out[0] if isinstance(out, tuple) else out

    def train(self, mode: bool = True):
        self.loss_fn.training = mode  # evaluation reports the cross entropy alone
        return super().train(mode)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self._outputs(tokens), labels)

    def stage_parts(self) -> list[int]:
        """One stage holding every spec-list entry (the pipeline model's ``parts`` at PP=1)."""
        return [0, len(pipe_entries(self.model_config))]
