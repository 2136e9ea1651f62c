"""Frozen, validated configuration dataclasses, and the command-line flags they are set by.

Each field that is a flag carries its flag name(s) and help text in its ``dataclasses.field`` metadata
(:func:`cli`), next to its default: one place for both. ``megatron_ucp/training/arguments.py`` generates
the argparse parser from these fields and converts flags into these objects once; its ``check_run``
holds the checks that need the whole run (both configs and the world size), so the entry point can
run them before any distributed start-up. This module imports nothing else of the package (a leaf,
checked by ``lint-imports``). Checkpoints store ``to_dict()`` (plain JSON), never a pickled
namespace.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field
from typing import Any

CLI = "cli"  # the dataclasses.field metadata key of a field that is a command-line flag


@dataclass(frozen=True)
class Cli:
    """How one config field is spelled on the command line (Megatron-DeepSpeed's flag names).

    The field's dataclass default is the flag's default; ``cli_default`` exists only for fields the
    dataclass requires (the architecture: a library caller must say it, a command-line user gets a
    small model) or that the command line derives (``None``: computed from other flags).
    """

    names: tuple[str, ...]  # the flag, then any aliases
    help: str
    cli_default: Any = MISSING
    negate: bool = False  # a switch that sets the field False: --disable-bias-linear -> add_bias_linear
    choices: tuple[str, ...] | None = None
    switches: tuple[tuple[str, Any, str], ...] = ()  # (flag, value, help): --bf16 -> dtype="bf16"


def cli(*names: str, help: str, cli_default: Any = MISSING, negate: bool = False,
        choices: tuple[str, ...] | None = None, switches: tuple[tuple[str, Any, str], ...] = ()) -> dict[str, Cli]:
    """Field metadata that makes a config field a command-line flag: ``field(default=..., metadata=cli(...))``."""
    return {CLI: Cli(names, help, cli_default, negate, choices, switches)}


def cli_fields(cls) -> list[tuple[dataclasses.Field, Cli]]:
    """The fields of a config dataclass that are command-line flags, in declaration order."""
    return [(f, f.metadata[CLI]) for f in dataclasses.fields(cls) if CLI in f.metadata]


def cli_default(f: dataclasses.Field) -> Any:
    """The command-line default of a flag field: its ``cli_default`` if set, else the dataclass default."""
    spec: Cli = f.metadata[CLI]
    if spec.cli_default is not MISSING:
        return spec.cli_default
    if f.default is MISSING:
        raise TypeError(f"{f.name} is a required field: its cli() needs a cli_default")
    return f.default


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    return cls(**d)


NORMALIZATIONS = ("layernorm", "rmsnorm")
ROPE_SCALINGS = ("none", "linear", "llama3")  # rotary frequency scalings, as transformers computes them


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the GPT model. Numerically the same as Hugging Face GPT-2 by default.

    The Llama family (``model_family="llama"``) is the same model with ``swiglu``,
    ``normalization="rmsnorm"``, ``use_rotary_position_embeddings``, ``tie_embeddings=False``,
    ``add_bias_linear=False`` and ``num_key_value_heads`` < ``num_attention_heads`` (Megatron-DeepSpeed's
    flags of those names). Which fields a family fixes is declared in ``megatron_ucp.families``.
    """

    num_layers: int = field(metadata=cli("--num-layers", help="transformer layers", cli_default=4))
    hidden_size: int = field(metadata=cli("--hidden-size", help="hidden size", cli_default=256))
    num_attention_heads: int = field(metadata=cli("--num-attention-heads", help="attention heads", cli_default=8))
    vocab_size: int  # the tokenizer's vocabulary, before padding (--vocab-size of TrainConfig with mock data)
    max_position_embeddings: int = field(metadata=cli(
        "--max-position-embeddings", help="position embeddings (default: --seq-length)", cli_default=None))
    ffn_hidden_size: int | None = field(default=None, metadata=cli(
        "--ffn-hidden-size", help="MLP hidden size (default: 4 x --hidden-size)"))
    make_vocab_size_divisible_by: int = field(default=128, metadata=cli(
        "--make-vocab-size-divisible-by", help="pad the vocabulary to a multiple of this x TP"))
    layernorm_epsilon: float = field(default=1e-5, metadata=cli("--layernorm-epsilon", help="LayerNorm epsilon"))
    hidden_dropout: float = field(default=0.1, metadata=cli(
        "--hidden-dropout", help="dropout on embeddings and residual branches"))
    attention_dropout: float = field(default=0.1, metadata=cli(
        "--attention-dropout", help="dropout on attention probabilities"))
    init_method_std: float = field(default=0.02, metadata=cli(
        "--init-method-std", help="std of the normal initialisation"))
    tie_embeddings: bool = field(default=True, metadata=cli(
        "--untie-embeddings-and-output-weights", help="a separate output head", negate=True))
    swiglu: bool = field(default=False, metadata=cli("--swiglu", help="SwiGLU MLP (Llama family)"))
    normalization: str = field(default="layernorm", metadata=cli(
        "--normalization", help="layernorm | rmsnorm", choices=NORMALIZATIONS))
    use_rotary_position_embeddings: bool = field(default=False, metadata=cli(
        "--use-rotary-position-embeddings", help="rotary position embeddings instead of learned ones"))
    rope_theta: float = field(default=10000.0, metadata=cli("--rope-theta", help="rotary base"))
    add_bias_linear: bool = field(default=True, metadata=cli(
        "--disable-bias-linear", help="no biases in linear layers", negate=True))
    num_key_value_heads: int | None = field(default=None, metadata=cli(
        "--num-key-value-heads", help="key/value heads for grouped-query attention (default: all heads)"))
    add_qkv_bias: bool = field(default=False, metadata=cli(
        "--add-qkv-bias", help="biases on the query, key and value projections only (the Qwen2 family)"))
    kv_channels: int | None = field(default=None, metadata=cli(
        "--kv-channels", help="attention head dimension (default: hidden size / attention heads)"))
    qk_layernorm: bool = field(default=False, metadata=cli(
        "--qk-layernorm", help="RMSNorm on each query and key head before rotary embeddings (the Qwen3 family)"))
    sliding_window: int | None = field(default=None, metadata=cli(
        "--sliding-window", help="each token attends to itself and the previous N-1 tokens (the Mistral family)"))
    rope_scaling_type: str = field(default="none", metadata=cli(
        "--rope-scaling-type", help="rotary frequency scaling: none | linear | llama3", choices=ROPE_SCALINGS))
    rope_scaling_factor: float = field(default=1.0, metadata=cli(
        "--rope-scaling-factor", help="linear and llama3 scaling factor"))
    rope_low_freq_factor: float = field(default=1.0, metadata=cli(
        "--rope-low-freq-factor", help="llama3 scaling: low_freq_factor"))
    rope_high_freq_factor: float = field(default=4.0, metadata=cli(
        "--rope-high-freq-factor", help="llama3 scaling: high_freq_factor"))
    rope_original_max_position_embeddings: int | None = field(default=None, metadata=cli(
        "--rope-original-max-position-embeddings",
        help="llama3 scaling: the context length of pre-training (default: --max-position-embeddings)"))
    # Mixture of experts (the families mixtral and qwen3_moe): Megatron-DeepSpeed's flags. Each block's MLP is
    # DeepSpeed's MoE layer (model/moe.py): a router picks ``moe_top_k`` of ``num_experts`` SwiGLU experts
    # of width --ffn-hidden-size per token; the load-balancing loss is added with weight ``moe_loss_coeff``.
    num_experts: int | None = field(default=None, metadata=cli(
        "--num-experts", help="experts per MoE layer (default: a dense MLP); the families mixtral and qwen3_moe"))
    moe_top_k: int = field(default=2, metadata=cli("--topk", help="experts each token is routed to"))
    moe_renormalize: bool = field(default=True, metadata=cli(
        "--moe-no-topk-renormalization", negate=True,
        help="keep the router probabilities of the chosen experts as they are (norm_topk_prob false in "
             "Qwen3 MoE configs) instead of renormalising them to sum to 1 (Mixtral)"))
    moe_loss_coeff: float = field(default=0.01, metadata=cli(
        "--moe-loss-coeff", help="weight of the load-balancing loss, summed over MoE layers"))
    moe_train_capacity_factor: float = field(default=1.0, metadata=cli(
        "--moe-train-capacity-factor", help="expert capacity in training, x tokens x top-k / experts (with token "
                                             "dropping)"))
    moe_eval_capacity_factor: float = field(default=1.0, metadata=cli(
        "--moe-eval-capacity-factor", help="expert capacity in evaluation (with token dropping)"))
    moe_min_capacity: int = field(default=4, metadata=cli(
        "--moe-min-capacity", help="the least expert capacity (with token dropping)"))
    moe_token_dropping: bool = field(default=False, metadata=cli(help="tokens over an expert's capacity", switches=(
        ("--moe-token-dropping", True, "drop the tokens routed to an expert beyond its capacity"),
        ("--disable-moe-token-dropping", False, "every token reaches its experts: no capacity limit"))))
    # The family is declared, never inferred from the other fields: megatron_ucp.families holds one spec
    # per name (block, HF mapping, the options it requires) and checks the config against it. A
    # checkpoint records it with the rest of this config.
    model_family: str = field(default="gpt", metadata=cli(
        "--model-family", help="the model family, by name (python -m megatron_ucp.families lists them)"))

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self.validate()

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "ffn_hidden_size", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not _finite(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("layernorm_epsilon", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if not _finite(self.init_method_std) or self.init_method_std < 0:
            raise ValueError(f"ModelConfig.init_method_std must be a finite number >= 0, got {self.init_method_std!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be {' or '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        if not isinstance(self.num_key_value_heads, int) or self.num_key_value_heads < 1 or \
                self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads {self.num_key_value_heads} must divide num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_key_value_heads != self.num_attention_heads and not self.swiglu_family:
            raise ValueError("grouped-query attention (num_key_value_heads < num_attention_heads) is only built for "
                             "the Llama family: add --swiglu --normalization rmsnorm --use-rotary-position-embeddings")
        llama_flags = (self.swiglu, self.normalization == "rmsnorm", self.use_rotary_position_embeddings)
        if any(llama_flags) and not all(llama_flags):
            raise ValueError("the Llama family needs --swiglu, --normalization rmsnorm and "
                             "--use-rotary-position-embeddings together")
        if self.swiglu_family and self.add_bias_linear:
            raise ValueError("the Llama family is built without linear biases: add --disable-bias-linear")
        if self.add_qkv_bias and not self.swiglu_family:
            raise ValueError("--add-qkv-bias is for the Llama-shaped families (Qwen2); GPT's linear biases "
                             "already include the QKV projection")
        if not isinstance(self.model_family, str) or not self.model_family:
            raise ValueError(f"ModelConfig.model_family must be a family name, got {self.model_family!r}")
        self._validate_attention()
        self._validate_moe()

    def _validate_moe(self) -> None:
        if self.num_experts is None:
            return
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"ModelConfig.num_experts must be a positive integer or None, got {self.num_experts!r}")
        if not self.swiglu_family:
            raise ValueError("--num-experts is built for the Llama-shaped families (SwiGLU experts): the families "
                             "mixtral and qwen3_moe")
        if not isinstance(self.moe_top_k, int) or not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"--topk {self.moe_top_k} must be between 1 and --num-experts {self.num_experts}")
        for name in ("moe_train_capacity_factor", "moe_eval_capacity_factor"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if not _finite(self.moe_loss_coeff) or self.moe_loss_coeff < 0:
            raise ValueError(f"ModelConfig.moe_loss_coeff must be a finite number >= 0, got {self.moe_loss_coeff!r}")
        if not isinstance(self.moe_min_capacity, int) or self.moe_min_capacity < 0:
            raise ValueError(f"ModelConfig.moe_min_capacity must be an integer >= 0, got {self.moe_min_capacity!r}")

    def _validate_attention(self) -> None:
        """Head dimension, q/k norms, sliding window and rotary scaling (the Llama-shaped families)."""
        llama_only = {"--kv-channels": self.kv_channels is not None, "--qk-layernorm": self.qk_layernorm,
                      "--sliding-window": self.sliding_window is not None,
                      "--rope-scaling-type": self.rope_scaling_type != "none"}
        for flag, used in llama_only.items():
            if used and not self.swiglu_family:
                raise ValueError(f"{flag} is for the Llama-shaped families (rotary embeddings, RMSNorm, SwiGLU)")
        for name in ("kv_channels", "sliding_window", "rope_original_max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.rope_scaling_type not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling_type must be one of {', '.join(ROPE_SCALINGS)}, got "
                             f"{self.rope_scaling_type!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling_type != "none" and not self.rope_scaling_factor > 0:
            raise ValueError(f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
        if self.rope_scaling_type == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")

    @property
    def swiglu_family(self) -> bool:
        """True for Llama-shaped models (RMSNorm, rotary embeddings, SwiGLU)."""
        return self.swiglu and self.normalization == "rmsnorm" and self.use_rotary_position_embeddings

    @property
    def head_dim(self) -> int:
        """Per-head width: ``kv_channels`` when set (Qwen3, some Llamas), else hidden / heads."""
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def attention_width(self) -> int:
        """Width of the attention output before the dense projection: heads x head dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def rope_original_context(self) -> int:
        """The pre-training context of llama3 scaling (its ``original_max_position_embeddings``)."""
        return self.rope_original_max_position_embeddings or self.max_position_embeddings

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise ValueError when ``tp`` cannot split this model evenly."""
        assert self.num_key_value_heads is not None and self.ffn_hidden_size is not None  # set by __post_init__
        if self.num_attention_heads % tp:
            raise ValueError(f"tensor parallel {tp} does not divide num_attention_heads {self.num_attention_heads}")
        if self.num_key_value_heads % tp:
            raise ValueError(f"tensor parallel {tp} does not divide num_key_value_heads {self.num_key_value_heads}: "
                             "each rank must hold whole key/value groups")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tensor parallel {tp} does not divide ffn_hidden_size {self.ffn_hidden_size}")

    def check_expert_parallel(self, ep: int) -> None:
        """Raise ValueError when ``ep`` cannot hold this model's experts evenly (or the model has none)."""
        if ep == 1:
            return
        if self.num_experts is None:
            raise ValueError(f"expert parallel size {ep} needs an MoE model (--num-experts)")
        if self.num_experts % ep:
            raise ValueError(f"expert parallel size {ep} does not divide --num-experts {self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def check_pipeline_parallel(self, pp: int) -> None:
        if self.num_layers < pp:
            raise ValueError(f"pipeline parallel {pp} needs at least {pp} layers, the model has {self.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d)


def _finite(value: Any) -> bool:
    """An int or float (not a bool) that is neither infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the architecture. Validated once."""

    # parallelism
    tensor_model_parallel_size: int = field(default=1, metadata=cli(
        "--tensor-model-parallel-size", help="tensor parallel degree"))
    pipeline_model_parallel_size: int = field(default=1, metadata=cli(
        "--pipeline-model-parallel-size", help="pipeline parallel degree"))
    zero_stage: int = field(default=1, metadata=cli(
        "--zero-stage", help="DeepSpeed ZeRO stage (2 and 3 train the non-pipeline model, PP 1; 3 needs TP 1)"))
    sequence_parallel: bool = field(default=False, metadata=cli(
        "--sequence-parallel", help="Megatron's sequence parallelism (TP > 1): norms, dropout and residuals run on "
                                    "each TP rank's slice of the sequence"))
    ds_sequence_parallel_size: int = field(default=1, metadata=cli(
        "--ds-sequence-parallel-size", help="DeepSpeed-Ulysses sequence parallel degree: each rank holds a slice of "
                                            "every sample's sequence; attention exchanges sequence for heads"))
    moe_expert_parallel_size: int = field(default=1, metadata=cli(
        "--moe-expert-parallel-size", help="expert parallel degree: ranks that share out one MoE layer's experts "
                                           "(carved out of the data parallel ranks)"))
    create_moe_param_group: bool = field(default=False, metadata=cli(
        "--create-moe-param-group", help="accepted for Megatron DeepSpeed recipes: an MoE model always puts its "
                                         "experts in an optimizer group of their own, which ZeRO partitions over "
                                         "the ranks holding the same experts"))
    # batch and length
    micro_batch_size: int = field(default=1, metadata=cli(
        "--micro-batch-size", help="samples per micro batch per data-parallel rank"))
    global_batch_size: int = field(default=8, metadata=cli(
        "--global-batch-size", help="samples per optimizer step, fixed whatever the layout"))
    seq_length: int = field(default=256, metadata=cli("--seq-length", help="tokens per sample"))
    train_iters: int = field(default=100, metadata=cli("--train-iters", help="optimizer steps to train to"))
    # optimizer and schedule
    lr: float = field(default=3e-4, metadata=cli("--lr", help="peak learning rate"))
    min_lr: float = field(default=3e-5, metadata=cli("--min-lr", help="learning rate at the end of decay"))
    lr_warmup_iters: int = field(default=0, metadata=cli("--lr-warmup-iters", help="linear warmup steps"))
    lr_decay_iters: int | None = field(default=None, metadata=cli(
        "--lr-decay-iters", help="steps of decay (default: --train-iters)"))
    lr_decay_style: str = field(default="cosine", metadata=cli(
        "--lr-decay-style", help="cosine | linear | constant"))
    weight_decay: float = field(default=0.1, metadata=cli(
        "--weight-decay", help="AdamW weight decay (not on biases and norms)"))
    adam_beta1: float = field(default=0.9, metadata=cli("--adam-beta1", help="Adam beta1"))
    adam_beta2: float = field(default=0.95, metadata=cli("--adam-beta2", help="Adam beta2"))
    adam_eps: float = field(default=1e-8, metadata=cli("--adam-eps", help="Adam epsilon"))
    clip_grad: float = field(default=1.0, metadata=cli(
        "--clip-grad", help="gradient clipping by global norm (0 disables)"))
    dtype: str = field(default="bf16", metadata=cli(help="training precision", switches=(
        ("--bf16", "bf16", "bf16 mixed precision"),
        ("--fp16", "fp16", "fp16 with dynamic loss scaling"),
        ("--fp32", "fp32", "full fp32"))))
    seed: int = field(default=1234, metadata=cli("--seed", help="random seed"))
    # data
    data_path: str | None = field(default=None, metadata=cli(
        "--data-path", help="prefix of a preprocessed dataset (.bin/.idx)"))
    mock_data: bool = field(default=False, metadata=cli(
        "--mock-data", help="deterministic random tokens instead of a dataset"))
    split: str = field(default="969,30,1", metadata=cli("--split", help="train,valid,test weights over documents"))
    tokenizer_type: str = field(default="SentencePieceTokenizer", metadata=cli(
        "--tokenizer-type", help="SentencePieceTokenizer | GPT2BPETokenizer | HFTokenizer"))
    tokenizer_model: str | None = field(default=None, metadata=cli(
        "--tokenizer-model", help="SentencePiece model file, or a local Hugging Face tokenizer folder"))
    vocab_file: str | None = field(default=None, metadata=cli("--vocab-file", help="GPT-2 vocab.json"))
    merge_file: str | None = field(default=None, metadata=cli("--merge-file", help="GPT-2 merges.txt"))
    vocab_size: int | None = field(default=None, metadata=cli(  # only with mock data (no tokenizer)
        "--vocab-size", help="vocabulary size for --mock-data"))
    allow_vocab_extension: bool = field(default=False, metadata=cli(
        "--allow-vocab-extension",
        help="a tokenizer other than the --load checkpoint's (new tokens, a larger vocabulary) is deliberate: "
             "rows the checkpoint lacks are initialised as a fresh model's"))
    # logging and evaluation
    log_interval: int = field(default=10, metadata=cli("--log-interval", help="iterations between progress lines"))
    report_memory: bool = field(default=False, metadata=cli(
        "--report-memory", help="every rank prints, after each iteration, the peak memory of that iteration above "
                                "what it held when the iteration began (CUDA: allocated tensors; CPU: resident set)"))
    eval_interval: int = field(default=20, metadata=cli(
        "--eval-interval", help="iterations between validations (0 disables)"))
    eval_iters: int = field(default=4, metadata=cli("--eval-iters", help="global batches per validation"))
    eval_at_start: bool = field(default=False, metadata=cli(
        "--eval-at-start", help="also validate before the first step: the loss the run starts from"))
    tensorboard_dir: str | None = field(default=None, metadata=cli(
        "--tensorboard-dir", help="TensorBoard event folder"))
    loss_log: str | None = field(default=None, metadata=cli(
        "--loss-log", help="loss.jsonl path (full-precision losses)"))
    # checkpoints
    save: str | None = field(default=None, metadata=cli("--save", help="checkpoint folder"))
    save_interval: int | None = field(default=None, metadata=cli(
        "--save-interval", help="iterations between checkpoints"))
    save_interval_minutes: float | None = field(default=None, metadata=cli(
        "--save-interval-minutes", help="also save when this many minutes passed since the last save (rank 0's "
                                        "clock decides, every rank saves the same iteration)"))
    exit_signal_handler: bool = field(default=False, metadata=cli(
        "--exit-signal-handler", help="on SIGTERM finish the current iteration, save (with --save) and exit 0; "
                                      "a second SIGTERM ends the process at once"))
    elastic_layout: bool = field(default=False, metadata=cli(
        "--elastic-layout", help="when the world size does not fit TP x PP (or the global batch), lower TP or PP to "
                                 "the largest that fits instead of stopping (an elastic job that lost nodes)"))
    distributed_timeout_minutes: float = field(default=10.0, metadata=cli(
        "--distributed-timeout-minutes", help="how long a collective waits for a peer before failing (a peer that "
                                              "is gone without closing its connections)"))
    load: str | None = field(default=None, metadata=cli(
        "--load", help="checkpoint folder to resume from: its newest complete checkpoint (none yet: start from "
                       "scratch, when it is also --save)"))
    universal_checkpoint: bool = field(default=False, metadata=cli(
        "--universal-checkpoint", help="--load is a universal checkpoint (any topology)"))
    ckpt_step: int | None = field(default=None, metadata=cli(
        "--ckpt-step", help="resume from the checkpoint of this iteration in --load (default: the one its "
                            "'latest' file names)"))
    universal_loader: str = field(default="ours", metadata=cli(
        "--universal-loader", choices=("ours", "deepspeed"),
        help="how --load state is read at a new topology: ours (each rank reads only the bytes it owns, from "
             "a universal folder or straight from a ZeRO checkpoint) or deepspeed (its universal loader: whole "
             "atoms; a ZeRO checkpoint at another topology must be converted first)"))
    no_load_rng: bool = field(default=False, metadata=cli(
        "--no-load-rng", help="do not restore RNG states on resume"))
    # checkpoint.trust.TRUST_FLAG (tests/test_arguments.py checks the spelling; importing it here would import torch)
    trust_checkpoint_code: bool = field(default=False, metadata=cli(
        "--trust-checkpoint-code",
        help="unpickle --load files with full pickle, which runs any code they carry (default: an allowlist)"))
    finetune: bool = field(default=False, metadata=cli(
        "--finetune", help="after --load, start iteration, data position and LR schedule fresh"))
    no_pipeline_parallel: bool = field(default=False, metadata=cli(  # implied by ZeRO-2/3, same parameter names
        "--no-pipeline-parallel", help="train the non-pipeline model (same parameter names; PP 1)"))
    deepspeed_config: str | None = field(default=None, metadata=cli(
        "--deepspeed-config", "--deepspeed_config", help="JSON whose keys override the generated DeepSpeed config"))
    ds_config_out: str | None = field(default=None, metadata=cli(
        "--ds-config-out", help="write the DeepSpeed config used here, for the record"))

    def __post_init__(self) -> None:
        if self.lr_decay_iters is None:
            object.__setattr__(self, "lr_decay_iters", self.train_iters)
        self.validate()

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "moe_expert_parallel_size",
                     "ds_sequence_parallel_size",
                     "micro_batch_size",
                     "global_batch_size", "seq_length", "log_interval", "eval_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.train_iters, int) or self.train_iters < (0 if self.load else 1):
            raise ValueError(f"train_iters must be a positive integer (or 0 with --load: load and stop), "
                             f"got {self.train_iters!r}")
        if self.eval_interval < 0:
            raise ValueError(f"eval_interval must be >= 0 (0 disables validation), got {self.eval_interval}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.zero_stage > 1 and self.pipeline_model_parallel_size > 1:
            raise ValueError(
                f"ZeRO stage {self.zero_stage} needs pipeline parallel size 1 (DeepSpeed's pipeline engine refuses "
                f"ZeRO-2/3), got {self.pipeline_model_parallel_size}; use ZeRO stage 0 or 1 with pipeline parallelism"
            )
        if self.no_pipeline_parallel and self.pipeline_model_parallel_size > 1:
            raise ValueError("--no-pipeline-parallel needs --pipeline-model-parallel-size 1")
        if self.zero_stage == 3 and self.tensor_model_parallel_size > 1 and self.universal_loader == "deepspeed":
            raise ValueError(
                f"ZeRO stage 3 with --universal-loader deepspeed supports tensor parallel size 1 only, got "
                f"{self.tensor_model_parallel_size}: DeepSpeed's stage-3 universal loader slices tensor-parallel "
                "weights only for AutoTP models (our loader, the default, has no such limit)"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global batch {self.global_batch_size} is not a multiple of micro batch {self.micro_batch_size}"
            )
        if not self.mock_data and not self.data_path:
            raise ValueError("give --data-path (a preprocessed dataset prefix) or --mock-data")
        if self.mock_data and not self.vocab_size:
            raise ValueError("--mock-data needs --vocab-size")
        assert self.lr_decay_iters is not None  # set by __post_init__
        if not 0 <= self.lr_warmup_iters <= self.lr_decay_iters:
            raise ValueError(f"need 0 <= lr_warmup_iters ({self.lr_warmup_iters}) <= lr_decay_iters "
                             f"({self.lr_decay_iters})")
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"save_interval must be positive, got {self.save_interval}")
        if self.save_interval_minutes is not None:
            if not _finite(self.save_interval_minutes) or self.save_interval_minutes <= 0:
                raise ValueError(f"save_interval_minutes must be a positive number, got {self.save_interval_minutes!r}")
            if not self.save:
                raise ValueError("--save-interval-minutes needs --save")
        if not _finite(self.distributed_timeout_minutes) or self.distributed_timeout_minutes <= 0:
            raise ValueError("distributed_timeout_minutes must be a positive number, got "
                             f"{self.distributed_timeout_minutes!r}")
        if self.universal_checkpoint and not self.load:
            raise ValueError("--universal-checkpoint needs --load")
        if self.ckpt_step is not None and (not self.load or self.ckpt_step < 0):
            raise ValueError(f"--ckpt-step needs --load and an iteration >= 0, got {self.ckpt_step}")
        if self.universal_loader not in ("ours", "deepspeed"):
            raise ValueError(f"universal_loader must be ours or deepspeed, got {self.universal_loader!r}")
        if self.finetune and not self.load:
            raise ValueError("--finetune needs --load")

    @property
    def use_pipeline_engine(self) -> bool:
        """DeepSpeed's pipeline engine (ZeRO 0/1) unless ZeRO-2/3 or --no-pipeline-parallel ask for the plain one."""
        return self.zero_stage <= 1 and not self.no_pipeline_parallel

    def gradient_accumulation_steps(self, dp: int) -> int:
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global batch {self.global_batch_size} is not divisible by micro batch {self.micro_batch_size}"
                f" x data parallel {dp}"
            )
        return self.global_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d)

