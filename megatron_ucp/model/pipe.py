"""GPTPipe: the GPT model as a DeepSpeed PipelineModule, at every PP degree including 1.

Building the model the same way at every PP keeps parameter names (DeepSpeed's global spec-list
indices, see ``layout.params``) identical across layouts, which is what universal checkpoints key on.
The spec list comes from ``layout.params.pipe_entries``, never from hard-coded offsets. The transformer
block is the caller's (``block``: the model family's builder, ``megatron_ucp.families``); this package
knows no family.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron_ucp.config import ModelConfig
from megatron_ucp.distributed.groups import ParallelState
from megatron_ucp.layout.params import Role, pipe_entries
from megatron_ucp.layout.placement import embedding_rows, vocab_range
from megatron_ucp.model.gpt import EmbeddingLayer, FinalNorm, LMHead, TransformerLayer, carried
from megatron_ucp.model.init import initialize_parameters
from megatron_ucp.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy


# Only the word embedding is shared with the head. The last stage's copy of the position embedding
# never gets a gradient (DeepSpeed skips None gradients in its tied all-reduce, so listing it would
# deadlock); it is declared pipeline-replicated, and converters take the first stage's copy.
TIED_WEIGHT = "word_embeddings.weight"


# DeepSpeed's PipelineModule._synchronize_tied_weights (at construction and in load_state_dir) broadcasts
# the tied Parameter itself, not its ``.data``, with autograd on. c10d::broadcast_ has no autograd kernel,
# so torch's fallback leaves a hook on that leaf which warns, on every backward that reaches it, that
# this "may lead to silently incorrect behavior". The hook only warns: the parameter stays a leaf and
# its gradient is the one autograd computes without the broadcast (tests/test_tied_broadcast.py checks
# it against a single-process computation). So the training step filters exactly this warning.
TIED_BROADCAST_WARNING = r"c10d::broadcast_: an autograd kernel was not registered to the Autograd key"


@contextlib.contextmanager
def tied_broadcast_warning_filtered() -> Iterator[None]:
    """Silence torch's c10d::broadcast_ autograd-fallback warning (only it) inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TIED_BROADCAST_WARNING, category=UserWarning,
                                module=r"torch\.autograd\.graph$")
        yield


def _tied_head(module: EmbeddingLayer, x):
    return carried(module.head, x)


class LMLoss:
    """Mean next-token cross entropy over vocab-parallel logits (padded columns masked).

    An MoE model's head passes ``(logits, aux)``, ``aux`` the sum of its layers' load-balancing losses;
    in training the loss is then ``CE + aux_coeff * aux``, and each micro-batch's ``aux`` is kept in
    ``aux_values`` for the log (``take_aux``). Evaluation reports the cross entropy alone.
    """

    def __init__(self, vocab_start: int, vocab_size: int, group, aux_coeff: float = 0.0) -> None:
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size
        self.group = group
        self.aux_coeff = aux_coeff
        self.training = True
        self.aux_values: list[torch.Tensor] = []

    def __call__(self, logits, labels: torch.Tensor) -> torch.Tensor:
        aux = None
        if isinstance(logits, tuple):
            logits, aux = logits
        loss = vocab_parallel_cross_entropy(logits, labels, self.vocab_start, self.vocab_size, self.group).mean()
        if aux is None or not self.training:
            return loss
        self.aux_values.append(aux.detach().sum())
        return loss + self.aux_coeff * aux.sum().to(loss.dtype)

    def take_aux(self) -> torch.Tensor | None:
        """The mean load-balancing loss of the micro-batches since the last call (None if there were none)."""
        values, self.aux_values = self.aux_values, []
        return torch.stack(values).mean() if values else None


# (cfg, tp, layer_number, ep) -> the LayerSpec of one transformer layer: a family's ``block``
# (``megatron_ucp.families.family_of_model(cfg).block``), which the caller passes in.
BlockBuilder = Callable[[ModelConfig, Any, int, int], LayerSpec]


def block_classes(specs: Sequence[LayerSpec]) -> str:
    """``LlamaLayer``: the blocks' class names, for DeepSpeed's layer partitioning (``type:`` regex)."""
    return "|".join(dict.fromkeys(spec.typename.__name__ for spec in specs))


def padded_vocab_for(cfg: ModelConfig, tp: int, zero_stage: int = 0) -> int:
    """Rows of the embedding and head (``layout.placement.embedding_rows``: unpadded under ZeRO-3)."""
    return embedding_rows(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp, zero_stage)


def topology_of(state: ParallelState) -> PipeModelDataParallelTopology:
    """DeepSpeed's grid: its data axis is dp x sp (the sequence-parallel ranks are data-parallel ones to
    DeepSpeed, ``distributed.groups.ParallelState``), in our rank order (sp inside dp)."""
    layout = state.layout
    return PipeModelDataParallelTopology(num_pp=layout.degree("pp"), num_mp=layout.degree("tp"),
                                         num_dp=layout.degree("dp") * layout.degree("sp"))


class GPTPipe(PipelineModule):
    """Embedding, transformer layers, final norm, head (tied to the embedding or not); vocab-parallel CE."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, seed: int, *, block: BlockBuilder) -> None:
        layout = state.layout
        cfg.check_tensor_parallel(layout.degree('tp'))
        cfg.check_pipeline_parallel(layout.degree('pp'))
        padded_vocab = padded_vocab_for(cfg, layout.degree('tp'))
        tp = state.tp
        specs = []
        blocks = []
        for entry in pipe_entries(cfg):
            if entry.role is Role.EMBED and entry.tied_key:
                specs.append(TiedLayerSpec(entry.tied_key, EmbeddingLayer, cfg, padded_vocab, tp,
                                           tied_weight_attr=[TIED_WEIGHT]))
            elif entry.role is Role.EMBED:
                specs.append(LayerSpec(EmbeddingLayer, cfg, padded_vocab, tp))
            elif entry.role is Role.BLOCK:
                assert entry.layer_number is not None  # pipe_entries numbers every BLOCK entry
                blocks.append(block(cfg, tp, entry.layer_number, layout.degree("ep")))
                specs.append(blocks[-1])
            elif entry.role is Role.FINAL_NORM:
                specs.append(LayerSpec(FinalNorm, cfg, tp))
            elif entry.tied_key:
                specs.append(TiedLayerSpec(entry.tied_key, EmbeddingLayer, cfg, padded_vocab, tp,
                                           forward_fn=_tied_head, tied_weight_attr=[TIED_WEIGHT]))
            else:
                specs.append(LayerSpec(LMHead, cfg, padded_vocab, tp))
        vocab_start, _ = vocab_range(padded_vocab, layout.degree('tp'), state.coords['tp'])
        super().__init__(
            layers=specs,
            loss_fn=LMLoss(vocab_start, cfg.vocab_size, state.tp_group, cfg.moe_loss_coeff),
            topology=topology_of(state),
            # Layers, not parameters: every stage gets whole transformer layers, evenly.
            partition_method="type:" + block_classes(blocks),
        )
        self.model_config = cfg
        self.padded_vocab = padded_vocab
        initialize_parameters(self, cfg, seed, padded_vocab, layout.degree('tp'), state.coords['tp'],
                              ep=(layout.degree('ep'), state.coords['ep']))

    def train(self, mode: bool = True):
        self.loss_fn.training = mode  # evaluation reports the cross entropy alone
        return super().train(mode)

    def stage_parts(self) -> list[int]:
        """Spec-list boundaries DeepSpeed chose: stage i holds entries [parts[i], parts[i+1])."""
        return [int(p) for p in self.parts]
