"""Frozen, validated configuration dataclasses.

argparse lives only in entry points (``megatron_ucp/training/arguments.py``); it converts flags into
these objects once. Checkpoints store ``to_dict()`` (plain JSON), never a pickled namespace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def _from_dict(cls, d: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the GPT model. Numerically the same as Hugging Face GPT-2 by default.

    The Llama family is the same model with ``swiglu``, ``normalization="rmsnorm"``,
    ``use_rotary_position_embeddings``, ``tie_embeddings=False``, ``add_bias_linear=False`` and
    ``num_key_value_heads`` < ``num_attention_heads`` (Megatron-DeepSpeed's flags of those names).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # the tokenizer's vocabulary, before padding
    max_position_embeddings: int
    ffn_hidden_size: int | None = None  # defaults to 4 * hidden_size
    make_vocab_size_divisible_by: int = 128
    layernorm_epsilon: float = 1e-5
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    tie_embeddings: bool = True
    swiglu: bool = False
    normalization: str = "layernorm"  # layernorm | rmsnorm
    use_rotary_position_embeddings: bool = False
    rope_theta: float = 10000.0
    add_bias_linear: bool = True
    num_key_value_heads: int | None = None  # defaults to num_attention_heads (no grouped-query attention)

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
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value}")
        if self.normalization not in ("layernorm", "rmsnorm"):
            raise ValueError(f"normalization must be layernorm or rmsnorm, got {self.normalization!r}")
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

    @property
    def swiglu_family(self) -> bool:
        """True for Llama-shaped models (RMSNorm, rotary embeddings, SwiGLU)."""
        return self.swiglu and self.normalization == "rmsnorm" and self.use_rotary_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

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

    def check_pipeline_parallel(self, pp: int) -> None:
        if self.num_layers < pp:
            raise ValueError(f"pipeline parallel {pp} needs at least {pp} layers, the model has {self.num_layers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d)


DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run that is not the architecture. Validated once."""

    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    zero_stage: int = 1
    # batch and length
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 256
    train_iters: int = 100
    # optimizer and schedule
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # defaults to train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    dtype: str = "bf16"
    seed: int = 1234
    # data
    data_path: str | None = None
    mock_data: bool = False
    split: str = "969,30,1"
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None  # only with mock data (no tokenizer)
    # logging and evaluation
    log_interval: int = 10
    eval_interval: int = 20
    eval_iters: int = 4
    tensorboard_dir: str | None = None
    loss_log: str | None = None
    # checkpoints
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    universal_checkpoint: bool = False
    no_load_rng: bool = False
    trust_checkpoint_code: bool = False  # full pickle for --load files (runs code they carry)
    finetune: bool = False  # after --load: iteration, data position and LR schedule start fresh
    no_pipeline_parallel: bool = False  # the plain model (implied by ZeRO-2/3), same parameter names
    deepspeed_config: str | None = None  # a JSON file whose keys override the generated config
    ds_config_out: str | None = None  # where to write the config used, for the record

    def __post_init__(self) -> None:
        if self.lr_decay_iters is None:
            object.__setattr__(self, "lr_decay_iters", self.train_iters)
        self.validate()

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size",
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
        if self.zero_stage == 3 and self.tensor_model_parallel_size > 1:
            raise ValueError(
                f"ZeRO stage 3 supports tensor parallel size 1 only, got {self.tensor_model_parallel_size}: "
                "DeepSpeed's stage-3 universal loader slices tensor-parallel weights only for AutoTP models"
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
        if self.universal_checkpoint and not self.load:
            raise ValueError("--universal-checkpoint needs --load")
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
