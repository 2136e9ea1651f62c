"""The logits check: the same token batch through ``transformers`` and through our model at a TP/PP.

Our side loads a universal folder exactly as a run does (``training.trainer.Trainer``'s ``build`` and
``load`` with ``--universal-checkpoint --finetune`` and mock data, no training) on ``tp * pp * ep`` ranks
spawned by ``megatron_ucp.launch``, runs one ``eval_batch`` on the pipeline engine and gathers the
vocab-parallel logits of the last stage, vocabulary padding stripped. A mixture-of-experts model runs
at expert parallel size ``ep`` with as many data-parallel ranks: each takes its own share of the batch
(so the experts' all-to-all carries different tokens from each rank), and the shares' logits are
gathered back in batch order. Several folders can be checked
in one spawn (``our_logits_many``), since starting ranks costs more than a tiny model's forward pass.

``compare`` reports max |Δlogit|, the KL divergence of ours from the reference per sample (mean over
positions of the sum over the vocabulary: ``batchmean`` with positions as the batch) and top-1
agreement. A mean over the vocabulary as well would make even a broken conversion look small.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Collection, cast

import torch
import torch.nn.functional as F

from megatron_ucp.checkpoint.publish import LATEST_UNIVERSAL, require_verified
from megatron_ucp.training.checkpointing import checkpoint_folder


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of the HF model in ``hf_dir`` (loaded in fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@dataclass(frozen=True)
class LogitsJob:
    """One universal folder to evaluate: ``load`` is the folder holding ``latest_universal``."""

    load: str
    model_kwargs: dict  # ModelConfig fields except vocab_size
    vocab_size: int
    out: str  # where rank 0 of the last stage saves the logits (a tensor file)
    skip_renormalization: bool = False  # a negative control: MoE routers keep the softmax's top-k weights as they are


def model_kwargs_of(universal_folder: str) -> tuple[dict, int]:
    """(ModelConfig kwargs without vocab_size, vocab_size) from a universal folder's metadata."""
    from megatron_ucp.hf.from_universal import read_universal_metadata

    cfg = dict(read_universal_metadata(universal_folder)["model_config"])
    vocab = cfg.pop("vocab_size")
    cfg.update(hidden_dropout=0.0, attention_dropout=0.0)
    return cfg, vocab


def _eval_config(job: LogitsJob, tokens: torch.Tensor, tp: int, pp: int, ep: int = 1):
    """The run that loads ``job.load``: fp32, mock data, one micro batch per data-parallel rank (``ep`` of
    them), of exactly its share of ``tokens``.

    ``finetune`` loads weights and optimizer state but none of the training counters, as a fine-tune
    from this folder would; nothing is trained (``Trainer.run`` is never called).
    """
    from megatron_ucp.config import TrainConfig

    b, s = tokens.shape
    return TrainConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, micro_batch_size=b // ep,
                       global_batch_size=b, seq_length=s, dtype="fp32", mock_data=True, vocab_size=job.vocab_size,
                       load=job.load, universal_checkpoint=True, finetune=True, moe_expert_parallel_size=ep)


def _eval_one(job: LogitsJob, tokens: torch.Tensor, tp: int, pp: int, ep: int = 1) -> None:
    """Build and load through the trainer's own steps, then one ``eval_batch`` of ``tokens``.

    Loading exactly as a run does is the point: the check then covers the trainer's path from a
    universal folder to a model, not a copy of it. Rank 0 of the last stage writes the TP-gathered
    logits, vocabulary padding stripped, to ``job.out``.
    """
    import torch.distributed as dist

    from megatron_ucp.layout.params import Kind
    from megatron_ucp.layout.placement import tp_map
    from megatron_ucp.training.trainer import Trainer

    with Trainer(job.model_kwargs, _eval_config(job, tokens, tp, pp, ep)) as trainer:
        trainer.build()
        trainer.load()
        if job.skip_renormalization:
            from megatron_ucp.model.moe import Router

            for module in trainer.engine.module.modules():
                if isinstance(module, Router):
                    module.renormalize = False
        state = trainer.state
        share = tokens.chunk(ep)[state.rank_in("dp")]  # data-parallel rank d: the d-th share of the batch
        labels = torch.roll(share, -1, dims=1)
        _, logits = trainer.engine.eval_batch(iter([(share, labels)]), return_logits=True, num_micro_batches=1)
        if isinstance(logits, tuple):  # an MoE model's head passes (logits, load-balancing loss)
            logits = logits[0]
        if state.is_last_stage:
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(parts, logits.contiguous(), group=state.tp_group)
            gather = tp_map(Kind.VOCAB, logits.shape[-1] * tp, tp, kept=job.vocab_size, dim=logits.dim() - 1)
            full = gather.inverted().apply(parts, 0).float().contiguous()
            shares = [torch.empty_like(full) for _ in range(ep)] if ep > 1 else [full]
            if ep > 1:
                dist.all_gather(shares, full, group=state.dp_group)
            if state.rank_in("tp") == 0 and state.rank_in("dp") == 0:
                torch.save(torch.cat(shares), job.out)  # logits for the caller, not a checkpoint


def _worker(rank: int, world_size: int, jobs: list[LogitsJob], tokens: torch.Tensor, tp: int, pp: int,
            ep: int = 1) -> None:
    """One spawned rank (``launch.spawn_ranks`` set its torchrun environment): every job in turn."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        for job in jobs:  # the first build() initialises the default group (NCCL or gloo)
            _eval_one(job, tokens, tp, pp, ep)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def our_logits_many(folders: list[str], tokens: torch.Tensor, tp: int = 1, pp: int = 1, ep: int = 1, *,
                    _skip_renormalization: Collection[int] = ()) -> list[torch.Tensor]:
    """Our fp32 logits [b, s, vocab] for each universal folder (a ``*_universal`` folder or the folder
    holding ``latest_universal``), all on one set of ``tp * pp * ep`` spawned ranks (``ep``: the expert
    parallel size of MoE models, which must divide the batch). ``_skip_renormalization``: the indices of
    folders whose MoE routers skip the renormalisation of their top-k weights (a negative control)."""
    from megatron_ucp.launch import spawn_ranks

    if ep < 1 or tokens.shape[0] % ep:
        raise ValueError(f"expert parallel size {ep} does not divide the batch of {tokens.shape[0]}")

    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, folder in enumerate(folders):
            folder = os.path.abspath(folder)
            if os.path.isfile(os.path.join(folder, LATEST_UNIVERSAL)):
                load = folder
                folder = checkpoint_folder(load, universal=True)
            else:
                load = os.path.dirname(folder)
                if checkpoint_folder(load, universal=True) != folder:
                    raise ValueError(f"{load}/{LATEST_UNIVERSAL} does not name {os.path.basename(folder)}")
            require_verified(folder)  # before any rank starts: a bad folder is one clear error
            kwargs, vocab = model_kwargs_of(folder)
            jobs.append(LogitsJob(load, kwargs, vocab, os.path.join(tmp, f"logits{i}.pt"),
                                  skip_renormalization=i in _skip_renormalization))
        spawn_ranks(_worker, tp * pp * ep, jobs, tokens, tp, pp, ep)
        return [torch.load(job.out, weights_only=True) for job in jobs]  # written just now by our ranks


def our_logits(folder: str, tokens: torch.Tensor, tp: int = 1, pp: int = 1, ep: int = 1) -> torch.Tensor:
    return our_logits_many([folder], tokens, tp, pp, ep)[0]


@dataclass
class LogitsComparison:
    max_abs: float
    kl_per_sample: list[float]
    top1: float  # fraction of positions whose argmax agrees

    @property
    def kl_mean(self) -> float:
        return sum(self.kl_per_sample) / len(self.kl_per_sample)

    def summary(self) -> str:
        kls = ", ".join(f"{k:.3e}" for k in self.kl_per_sample)
        return (f"max |dlogit| {self.max_abs:.3e} | KL(ref || ours) per sample [{kls}] (mean {self.kl_mean:.3e}) | "
                f"top-1 agreement {100 * self.top1:.2f}%")


def compare(reference: torch.Tensor, ours: torch.Tensor) -> LogitsComparison:
    """Compare logits [b, s, v]; KL is batchmean over positions, per sample."""
    if reference.shape != ours.shape:
        raise ValueError(f"logits shapes differ: reference {tuple(reference.shape)}, ours {tuple(ours.shape)}")
    ref, out = reference.double(), ours.double()
    kls = [float(F.kl_div(F.log_softmax(out[i], -1), F.log_softmax(ref[i], -1), log_target=True,
                          reduction="batchmean")) for i in range(ref.shape[0])]
    top1 = float((ref.argmax(-1) == out.argmax(-1)).double().mean())
    return LogitsComparison(float((ref - out).abs().max()), kls, top1)


def check(hf_dir: str, universal_folder: str, *, tp: int = 1, pp: int = 1, ep: int = 1, batch: int = 2,
          seq: int = 16, seed: int = 0) -> LogitsComparison:
    """Random tokens through the HF folder and through the universal folder at TP/PP/EP; their comparison."""
    from megatron_ucp.hf.reader import read_config

    vocab = int(read_config(hf_dir)["vocab_size"])
    tokens = random_tokens(vocab, batch, seq, seed)
    return compare(hf_logits(hf_dir, tokens), our_logits(universal_folder, tokens, tp, pp, ep))


def generate_text(hf_dir: str, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy ``transformers`` ``generate`` on the exported folder; the prompt is encoded with the
    folder's ``tokenizer.model`` (our SentencePiece tokenizer) when present, else ``AutoTokenizer``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sp_model = os.path.join(hf_dir, "tokenizer.model")
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    if os.path.isfile(sp_model):
        from megatron_ucp.data.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(sp_model)
        encode, decode = tok.tokenize, tok.detokenize
    else:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(hf_dir)
        # decode's declared return is str | list[str]; a flat list of ids decodes to one str.
        encode, decode = (lambda t: hf_tok(t)["input_ids"]), cast(Callable[[list[int]], str], hf_tok.decode)
    ids = torch.tensor([encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return decode(out[0, ids.shape[1]:].tolist())
