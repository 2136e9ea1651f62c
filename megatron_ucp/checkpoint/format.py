"""What our checkpoints carry beside tensors, and what their files are called: one typed, versioned definition.

The trainer, the ZeRO converter, the Hugging Face import and export and the inspection tool all write
or read the same metadata and the same file names; defining them once keeps those from drifting apart.

**Metadata.** Every model-state file holds ``CheckpointMetadata.to_dict()`` (plain JSON data) under
``METADATA_KEY``, inside the client state that ``client_state`` builds; that client state is also the
one place Megatron's ``checkpoint_version`` is written. Checkpoint files are untrusted, so readers go
through ``CheckpointMetadata.from_dict`` (or ``metadata_from_state``), which checks every key and type
and refuses what is wrong with a one-line ``CheckpointError`` naming the key (and the file, when given).

Format versions (``format_version``), each read by ``from_dict``:

* 1 (megatron_ucp 0.1.0): two key sets. The trainer wrote ``train_config``, ``topology``,
  ``pipeline_parts``, ``pipe_entries`` and ``zero_stage`` but no ``source``; the Hugging Face import
  wrote ``source`` and ``hf_source`` instead of those, and no DeepSpeed version.
* 2: one key set, every key present (``null`` where it does not apply), ``source`` always named and
  ``versions.deepspeed`` always present. Older versions are upgraded on reading. Added since, as an
  optional key (absent reads as ``null``): ``hf_source.tokenizer``, the imported tokenizer's identity,
  and ``tokenizer``, the identity of the tokenizer a training run used (its type, files' sha256 and
  vocabulary size).
* 3: ``topology`` records every parallel axis by name (``pp``, ``dp``, ``sp``, ``ep``, ``tp``:
  ``layout.topology.AXES``), not only ``tp``, ``pp`` and ``dp``; formats 1 and 2 read as sp = ep = 1.
  Every other key is format 2's, the optional ``tokenizer`` included.

**Names.** The model-state and optimizer files DeepSpeed 0.19.8 writes and globs (``mp_rank_XX_...``,
``zero_pp_rank_D_mp_rank_XX_...``), and a universal folder's layout: ``zero/<param>/{fp32,exp_avg,
exp_avg_sq,step}.pt`` atoms and ``zero/optimizer_state.pt``, beside the model-state files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

import megatron_ucp
from megatron_ucp.checkpoint.trust import CheckpointError, load_file
from megatron_ucp.config import DTYPES, ModelConfig, TrainConfig
from megatron_ucp.layout.params import PipeEntry
from megatron_ucp.layout.topology import AXES, LEGACY_AXES, ParallelLayout
from megatron_ucp.layout.ucp_info import universal_checkpoint_info

# --- names of files and folders ------------------------------------------------------------------

ZERO_DIR = "zero"  # a universal folder's atoms and global optimizer state
OPTIMIZER_STATE_FILE = "optimizer_state.pt"  # inside ZERO_DIR: param groups, step, loss scaler, ds_version
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # the per-parameter state atoms, weights first
MASTER_KEY = STATE_KEYS[0]  # the fp32 master weights
MOMENT_KEYS = STATE_KEYS[1:]  # Adam's moments: every state atom but the fp32 master
STEP_KEY = "step"  # the per-parameter step atom (ZeRO-1/2 style; a 0-d tensor)
ATOM_KEYS = STATE_KEYS + (STEP_KEY,)
LATEST_FILE = "latest"  # DeepSpeed's tracker: names the newest ``global_stepN`` folder
MEGATRON_TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron's tracker: the newest iteration
HF_EXTRAS_DIR = "hf_extras"  # an HF import's tokenizer and generation files, for the way back
SOURCE_NOTE_FILE = "source.txt"  # an HF import's one-line note of where it came from

MODEL_STATES_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")  # group 1: mp rank
ZERO3_MODEL_STATES_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")  # dp, mp
OPTIM_STATES_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")  # bf16, dp, mp


def step_folder_name(iteration: int) -> str:
    """The folder (DeepSpeed's tag) the trainer saves iteration ``iteration`` into."""
    return f"global_step{iteration}"


def model_states_name(mp_rank: int) -> str:
    """The model-state file of one model-parallel rank (``mp = pp * TP + tp``), as ZeRO-0/1/2 write it."""
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def zero3_model_states_name(mp_rank: int, dp_rank: int = 0) -> str:
    """ZeRO-3's model-state file, one per data-parallel rank; DeepSpeed calls the DP rank ``pp_rank``."""
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt"


def model_state_names(mp_rank: int) -> tuple[str, str]:
    """Both names a universal folder carries one mp rank's model states under: the ZeRO-1/2 loader
    globs the first, the ZeRO-3 loader the second."""
    return model_states_name(mp_rank), zero3_model_states_name(mp_rank)


def optim_states_name(mp_rank: int, dp_rank: int, bf16: bool) -> str:
    """The ZeRO optimizer shard of one (dp, mp) rank; bf16 runs prefix ``bf16_``."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def atom_file(key: str) -> str:
    """The file name of one atom (``fp32``, ``exp_avg``, ``exp_avg_sq`` or ``step``)."""
    return f"{key}.pt"


def zero_dir(folder: str) -> str:
    return os.path.join(folder, ZERO_DIR)


def atom_dir(folder: str, name: str) -> str:
    """The folder of one parameter's atoms in the universal folder ``folder``; ``name`` must be
    checked (``trust.check_name``) when it comes from a file."""
    return os.path.join(folder, ZERO_DIR, name)


def atom_path(folder: str, name: str, key: str) -> str:
    """One atom of one parameter in the universal folder ``folder``."""
    return os.path.join(folder, ZERO_DIR, name, atom_file(key))


def optimizer_state_path(folder: str) -> str:
    return os.path.join(folder, ZERO_DIR, OPTIMIZER_STATE_FILE)


# --- metadata ------------------------------------------------------------------------------------

METADATA_KEY = "megatron_ucp"  # our metadata's key in a model-state file
METADATA_FORMAT_VERSION = 3
CHECKPOINT_VERSION = 3.0  # Megatron's checkpoint_version (QKV layout), in the client state
SOURCE_TRAINING = "training"  # written by our trainer (and copied by our ZeRO converter)
SOURCE_HUGGINGFACE = "huggingface"  # written by hf_to_universal
SOURCES = (SOURCE_TRAINING, SOURCE_HUGGINGFACE)


def _hint_types(hint: Any) -> list[type]:
    """The classes a field annotated ``hint`` allows: ``int | None`` -> [int, NoneType]; ``dict[str, Any]``
    -> [dict]."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return [typing.get_origin(a) or a for a in args]


def _is_a(value: Any, classes: list[type]) -> bool:
    """JSON's view of types: a bool is not an int, an int is a float."""
    if isinstance(value, bool):
        return bool in classes
    return isinstance(value, tuple(classes)) or (isinstance(value, int) and float in classes)


def _check_value(value: Any, hint: Any, where: str) -> Any:
    classes = _hint_types(hint)
    if not _is_a(value, classes):
        names = " or ".join("null" if c is type(None) else c.__name__ for c in classes)
        raise CheckpointError(f"{where}: expected {names}, {_found(value)}")
    return value


def _found(value: Any) -> str:
    """``found <type> <value>``, the value cut short (it comes from an untrusted file)."""
    if value is None:
        return "found null"
    text = repr(value)
    return f"found {type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: expected an object, {_found(value)}")
    for key in value:
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: a key is not a string ({_found(key)})")
    return value


def _check_keys(d: dict[str, Any], required: typing.Iterable[str], where: str,
                optional: typing.Iterable[str] = ()) -> None:
    required = list(required)
    unknown = sorted(set(d) - set(required) - set(optional))
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r}")
    missing = [k for k in required if k not in d]
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}")


_MAX_DEPTH = 32  # nesting of the JSON data we accept (an HF config is a few levels deep)


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Plain JSON data: objects with string keys, lists, strings, numbers, booleans, null."""
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in _object(value, where).items():
            _check_json(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", depth + 1)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise CheckpointError(f"{where}: expected JSON data, found {type(value).__name__}")


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string literal, escapes included
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest (brackets inside strings do not count), found without
    parsing: ``json.loads`` recurses once per level, so a file nested 100,000 deep exhausts the stack."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def read_json(path: str, what: str = "a JSON file") -> Any:
    """The JSON data in the file ``path`` (untrusted): nested at most ``_MAX_DEPTH`` levels, checked before
    it is parsed; a missing, unreadable, too deep or invalid file is a one-line ``CheckpointError``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing file ({what})")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({what}): {e}") from None
    if json_depth(text) > _MAX_DEPTH:
        raise CheckpointError(f"{path}: nested deeper than {_MAX_DEPTH} levels; not {what}")
    try:
        return json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def _check_fields(cls: type, d: dict[str, Any], where: str, strict: bool) -> None:
    """Type-check ``d`` against the fields of dataclass ``cls``. ``strict``: no unknown key and every
    field without a default present; otherwise (a record of another version's config) only the keys
    both know are checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if strict:
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        _check_keys(d, required, where, optional=fields)
    for key, value in d.items():
        if key in fields:
            _check_value(value, hints[key], f"{where}.{key}")


def _parse_flat(cls: type, value: Any, where: str) -> Any:
    """A flat frozen dataclass of JSON data, typed; a field with a default may be absent (a key added later)."""
    d = _object(value, where)
    _check_fields(cls, d, where, strict=True)  # every field without a default present, no unknown key
    return cls(**d)


def legacy_model_family(d: dict[str, Any]) -> str:
    """The family of a model config recorded before ``ModelConfig.model_family`` existed.

    This is the only place a family is derived from the shape of a config: everything written since
    records it, and everything else looks a family up by its name (``megatron_ucp.families``). The rules
    are those the old registry's predicates applied.
    """
    if not (d.get("swiglu") and d.get("normalization") == "rmsnorm" and d.get("use_rotary_position_embeddings")):
        return "gpt"
    if d.get("add_qkv_bias"):
        return "qwen2"
    if d.get("qk_layernorm"):
        return "qwen3"
    return "mistral" if d.get("sliding_window") is not None else "llama"


def _model_config(value: Any, where: str) -> ModelConfig:
    d = _object(value, where)
    _check_fields(ModelConfig, d, where, strict=True)
    if "model_family" not in d:  # written before the family was recorded: derived once, here
        d = dict(d, model_family=legacy_model_family(d))
    try:
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


# The topology's keys: tp, pp, dp first (formats 1 and 2 had only those), then every other axis.
_TOPOLOGY_KEYS = LEGACY_AXES + tuple(a for a in AXES if a not in LEGACY_AXES)


def _topology(value: Any, where: str) -> ParallelLayout:
    d = _object(value, where)
    _check_keys(d, _TOPOLOGY_KEYS, where)
    for axis in _TOPOLOGY_KEYS:
        _check_value(d[axis], int, f"{where}.{axis}")
    try:
        return ParallelLayout(**{axis: d[axis] for axis in _TOPOLOGY_KEYS})
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _int_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: expected a list, {_found(value)}")
    return tuple(_check_value(v, int, f"{where}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class PipeEntryRecord:
    """One entry of the pipeline's layer-spec list, which ``pipeline_parts`` index into."""

    index: int
    role: str
    layer_number: int | None
    tied_key: str | None

    @classmethod
    def of(cls, entry: PipeEntry) -> "PipeEntryRecord":
        return cls(entry.index, entry.role.value, entry.layer_number, entry.tied_key)


@dataclass(frozen=True)
class HFSource:
    """Where a Hugging Face import came from: the export back reuses its config and dtype."""

    architecture: str
    dtype: str | None  # config.json's dtype (or torch_dtype), as written there
    config: dict[str, Any]  # config.json as read (JSON data)
    path: str
    # The tokenizer the model came with (``TOKENIZER_RECORD_KEYS``: type, sha256 of its files as
    # ``HFTokenizer.identity`` hashes them, vocab_size or null); null when the folder had none, and in
    # imports written before it was recorded (the key may be absent there).
    tokenizer: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_json(self.config, f"{METADATA_KEY}.hf_source.config")
        if self.tokenizer is not None:
            check_tokenizer_record(self.tokenizer, f"{METADATA_KEY}.hf_source.tokenizer", sidecar=False)


TOKENIZER_RECORD_KEYS = ("type", "sha256", "vocab_size")  # an HF import's record; a dataset's sidecar adds eod
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def describe_tokenizer(record: dict[str, Any]) -> str:
    """``HFTokenizer sha256 0123456789ab..., vocab 8000`` (vocab left out when unknown): a checked record, short."""
    vocab = "" if record.get("vocab_size") is None else f", vocab {record['vocab_size']}"
    return f"{record['type']} sha256 {record['sha256'][:12]}...{vocab}"


def check_tokenizer_record(value: Any, where: str, sidecar: bool) -> dict[str, Any]:
    """A tokenizer's identity as a record (untrusted): ``type``, ``sha256`` (64 hex digits) and ``vocab_size``
    (a positive int; null allowed in an import's record), plus ``eod`` in a dataset's sidecar
    (``data.preprocess.tokenizer_record``). One-line ``CheckpointError`` naming ``where`` and the key."""
    d = _object(value, where)
    _check_keys(d, TOKENIZER_RECORD_KEYS + (("eod",) if sidecar else ()), where)
    _check_value(d["type"], str, f"{where}.type")
    if not isinstance(d["sha256"], str) or not _SHA256.match(d["sha256"]):
        raise CheckpointError(f"{where}.sha256: expected 64 lowercase hex digits, {_found(d['sha256'])}")
    vocab = _check_value(d["vocab_size"], int if sidecar else int | None, f"{where}.vocab_size")
    if vocab is not None and vocab < 1:
        raise CheckpointError(f"{where}.vocab_size: {vocab} is not positive")
    if sidecar:
        _check_value(d["eod"], int, f"{where}.eod")
    return dict(d)


@dataclass(frozen=True)
class Versions:
    """Package versions of the writer, for the record."""

    megatron_ucp: str
    torch: str
    deepspeed: str | None  # None in format-1 HF imports, which did not record it

    @classmethod
    def installed(cls) -> "Versions":
        """This process's versions; DeepSpeed's from its package metadata, so nothing imports it."""
        try:
            ds: str | None = version("deepspeed")
        except PackageNotFoundError:  # pragma: no cover - the trainer cannot run without it either
            ds = None
        return cls(megatron_ucp=megatron_ucp.__version__, torch=str(torch.__version__), deepspeed=ds)


@dataclass(frozen=True)
class CheckpointMetadata:
    """Our metadata of one checkpoint (``METADATA_FORMAT_VERSION``); read back with ``from_dict``.

    Training checkpoints (``source == "training"``) carry the run's configs, topology, ZeRO stage and
    pipeline partition; Hugging Face imports carry ``hf_source`` instead, and ``None`` for those.
    """

    source: str  # SOURCE_TRAINING or SOURCE_HUGGINGFACE
    model_config: ModelConfig
    original_vocab_size: int  # the tokenizer's vocabulary (= model_config.vocab_size)
    padded_vocab_size: int  # rows of the embedding and head as trained
    dtype: str  # training precision: bf16, fp16 or fp32 (fp32 for HF imports)
    iteration: int
    consumed_train_samples: int
    versions: Versions
    train_config: dict[str, Any] | None = None  # TrainConfig.to_dict() of the run that saved it
    topology: ParallelLayout | None = None  # TP, PP, DP of that run
    pipeline_parts: tuple[int, ...] | None = None  # stage i holds pipe entries [parts[i], parts[i + 1])
    pipe_entries: tuple[PipeEntryRecord, ...] | None = None
    zero_stage: int | None = None
    hf_source: HFSource | None = None
    tokenizer: dict[str, Any] | None = None  # the training run's tokenizer record (an import's: hf_source's)

    def __post_init__(self) -> None:
        _check_relations({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, METADATA_KEY)

    # -- writing --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, every key present (``null`` where it does not apply)."""
        return {
            "format_version": METADATA_FORMAT_VERSION,
            "source": self.source,
            "model_config": self.model_config.to_dict(),
            "train_config": copy.deepcopy(self.train_config),
            "topology": (None if self.topology is None
                         else {axis: self.topology.degree(axis) for axis in _TOPOLOGY_KEYS}),
            "original_vocab_size": self.original_vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "pipeline_parts": None if self.pipeline_parts is None else list(self.pipeline_parts),
            "pipe_entries": (None if self.pipe_entries is None
                             else [dataclasses.asdict(e) for e in self.pipe_entries]),
            "dtype": self.dtype,
            "zero_stage": self.zero_stage,
            "iteration": self.iteration,
            "consumed_train_samples": self.consumed_train_samples,
            "hf_source": None if self.hf_source is None else copy.deepcopy(dataclasses.asdict(self.hf_source)),
            "versions": dataclasses.asdict(self.versions),
            "tokenizer": copy.deepcopy(self.tokenizer),
        }

    # -- reading --------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, where: str = METADATA_KEY) -> "CheckpointMetadata":
        """Check ``data`` (untrusted) and build the metadata it describes, upgrading older format versions.

        ``where`` prefixes every error (``"<file>: megatron_ucp"`` names the file); each error is one
        line naming the key and what is wrong with it.
        """
        d = _object(data, where)
        if "format_version" not in d:
            raise CheckpointError(f"{where}: missing key 'format_version'")
        fv = d["format_version"]
        if not _is_a(fv, [int]) or fv < 1:
            raise CheckpointError(f"{where}.format_version: expected a positive int, {_found(fv)}")
        if fv > METADATA_FORMAT_VERSION:
            raise CheckpointError(f"{where}.format_version: {fv} is newer than this megatron_ucp reads "
                                  f"({METADATA_FORMAT_VERSION}); upgrade megatron_ucp to read this checkpoint")
        while fv < METADATA_FORMAT_VERSION:
            d, fv = _UPGRADES[fv](d, where), fv + 1
        _check_keys(d, _V3_REQUIRED, where, optional=_V3_OPTIONAL)

        def optional(key: str, parse):
            return None if d[key] is None else parse(d[key], f"{where}.{key}")

        fields: dict[str, Any] = {}
        for key in ("source", "dtype"):
            fields[key] = _check_value(d[key], str, f"{where}.{key}")
        for key in ("original_vocab_size", "padded_vocab_size", "iteration", "consumed_train_samples"):
            fields[key] = _check_value(d[key], int, f"{where}.{key}")
        fields["zero_stage"] = _check_value(d["zero_stage"], int | None, f"{where}.zero_stage")
        fields["model_config"] = _model_config(d["model_config"], f"{where}.model_config")
        fields["train_config"] = optional("train_config", _train_config)
        fields["topology"] = optional("topology", _topology)
        fields["pipeline_parts"] = optional("pipeline_parts", _int_list)
        fields["pipe_entries"] = optional("pipe_entries", _pipe_entries)
        fields["hf_source"] = optional("hf_source", _hf_source)
        if d.get("tokenizer") is not None:
            fields["tokenizer"] = check_tokenizer_record(d["tokenizer"], f"{where}.tokenizer", sidecar=False)
        fields["versions"] = _parse_flat(Versions, d["versions"], f"{where}.versions")
        _check_relations(fields, where)  # as __post_init__ will, but naming where the data came from
        return cls(**fields)


_TRAINING_ONLY = ("train_config", "topology", "pipeline_parts", "pipe_entries", "zero_stage")


def _check_relations(m: dict[str, Any], where: str) -> None:
    """Relations between the (typed) fields of a CheckpointMetadata, for writers and readers alike."""
    source = m["source"]
    if source not in SOURCES:
        raise CheckpointError(f"{where}.source: {source!r} is not one of {', '.join(SOURCES)}")
    if m["dtype"] not in DTYPES:
        raise CheckpointError(f"{where}.dtype: {m['dtype']!r} is not one of {', '.join(DTYPES)}")
    if m["original_vocab_size"] != m["model_config"].vocab_size:
        raise CheckpointError(f"{where}.original_vocab_size: {m['original_vocab_size']}, but model_config has "
                              f"vocab_size {m['model_config'].vocab_size}")
    if m["padded_vocab_size"] < m["original_vocab_size"]:
        raise CheckpointError(f"{where}.padded_vocab_size: {m['padded_vocab_size']} is smaller than the original "
                              f"vocabulary of {m['original_vocab_size']}")
    for name in ("iteration", "consumed_train_samples"):
        if m[name] < 0:
            raise CheckpointError(f"{where}.{name}: {m[name]} is negative")
    if m["zero_stage"] is not None and m["zero_stage"] not in (0, 1, 2, 3):
        raise CheckpointError(f"{where}.zero_stage: {m['zero_stage']} is not 0-3")
    if m["train_config"] is not None:
        _check_json(m["train_config"], f"{where}.train_config")
    imported = source == SOURCE_HUGGINGFACE
    for name in _TRAINING_ONLY + ("hf_source",):
        wanted = imported == (name == "hf_source")
        if wanted and m[name] is None:
            raise CheckpointError(f"{where}.{name}: a {source} checkpoint needs it, found null")
        if not wanted and m[name] is not None:
            raise CheckpointError(f"{where}.{name}: must be null in a {source} checkpoint")
    if imported and m.get("tokenizer") is not None:
        raise CheckpointError(f"{where}.tokenizer: must be null in a {source} checkpoint (its tokenizer is "
                              "hf_source.tokenizer)")
    parts, topology = m["pipeline_parts"], m["topology"]
    if parts is not None and topology is not None:
        pp = topology.degree("pp")
        if len(parts) != pp + 1 or parts[0] != 0 or any(b < a for a, b in zip(parts, parts[1:])):
            raise CheckpointError(f"{where}.pipeline_parts: {list(parts)} are not PP {pp}'s "
                                  f"{pp + 1} ascending stage boundaries from 0")


def _hf_source(value: Any, where: str) -> HFSource:
    _check_json(value, where)
    if isinstance(value, dict) and value.get("tokenizer") is not None:  # named where it was read
        check_tokenizer_record(value["tokenizer"], f"{where}.tokenizer", sidecar=False)
    return _parse_flat(HFSource, value, where)


def _train_config(value: Any, where: str) -> dict[str, Any]:
    """The run's ``TrainConfig.to_dict()``: kept as a record, so keys of other versions' configs are
    accepted; the keys this version knows must have its types."""
    d = _object(value, where)
    _check_json(d, where)
    _check_fields(TrainConfig, d, where, strict=False)
    return copy.deepcopy(d)


def _pipe_entries(value: Any, where: str) -> tuple[PipeEntryRecord, ...]:
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: expected a list, {_found(value)}")
    return tuple(_parse_flat(PipeEntryRecord, e, f"{where}[{i}]") for i, e in enumerate(value))


_V3_KEYS = ("format_version",) + tuple(f.name for f in dataclasses.fields(CheckpointMetadata))
_V3_OPTIONAL = ("tokenizer",)  # added within format 2: absent reads as null
_V3_REQUIRED = tuple(k for k in _V3_KEYS if k not in _V3_OPTIONAL)
_V2_KEYS = _V3_KEYS  # format 3 changed what ``topology`` holds, not which keys there are
_V1_REQUIRED = ("format_version", "model_config", "original_vocab_size", "padded_vocab_size", "dtype",
                "iteration", "consumed_train_samples", "versions")
_V1_OPTIONAL = ("source", "hf_source", "train_config", "topology", "pipeline_parts", "pipe_entries", "zero_stage")


def _upgrade_1_to_2(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Format 1 had two key sets (trainer, HF import); format 2 has their union, every key present."""
    _check_keys(d, _V1_REQUIRED, where, optional=_V1_OPTIONAL)
    out = {key: d.get(key) for key in _V2_KEYS}
    out["format_version"] = 2
    out["source"] = d.get("source", SOURCE_TRAINING)
    versions = d["versions"]
    if isinstance(versions, dict) and "deepspeed" not in versions:
        out["versions"] = dict(versions, deepspeed=None)
    return out


def _upgrade_2_to_3(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Format 2's topology had tp, pp and dp only; format 3's names every axis, the others of degree 1."""
    _check_keys(d, _V3_REQUIRED, where, optional=_V3_OPTIONAL)
    out = dict(d, format_version=3)
    topology = d["topology"]
    if isinstance(topology, dict):  # null in an import; anything else is refused by _topology
        _check_keys(_object(topology, f"{where}.topology"), LEGACY_AXES, f"{where}.topology")
        out["topology"] = dict(topology, **{axis: 1 for axis in AXES if axis not in LEGACY_AXES})
    return out


_UPGRADES = {1: _upgrade_1_to_2, 2: _upgrade_2_to_3}  # format_version -> the function that lifts it one version


# --- model-state files ----------------------------------------------------------------------------


def client_state(metadata: CheckpointMetadata, *, tokens: int, rng_state: list | None = None) -> dict[str, Any]:
    """The client state our trainer merges into every model-state file, and the HF import writes:
    counters, Megatron's ``checkpoint_version`` (written only here), the RNG states when there are
    any, ``universal_checkpoint_info`` from the parameter table, and our metadata."""
    state: dict[str, Any] = {
        "iteration": metadata.iteration,
        "consumed_train_samples": metadata.consumed_train_samples,
        "tokens": tokens,
        "checkpoint_version": CHECKPOINT_VERSION,
    }
    if rng_state is not None:
        state["rng_state"] = rng_state
    state["universal_checkpoint_info"] = universal_checkpoint_info(metadata.model_config, metadata.padded_vocab_size)
    state[METADATA_KEY] = metadata.to_dict()
    return state


def metadata_from_state(state: Any, path: str) -> CheckpointMetadata | None:
    """Our metadata in the loaded model-state dict of ``path``; None when it carries none (a checkpoint
    we did not write)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of model states, found {type(state).__name__}")
    if state.get(METADATA_KEY) is None:
        return None
    return CheckpointMetadata.from_dict(state[METADATA_KEY], where=f"{path}: {METADATA_KEY}")


def read_metadata(path: str) -> CheckpointMetadata | None:
    """Our metadata in the model-state file ``path`` (read through the restricted unpickler)."""
    return metadata_from_state(load_file(path, meta=True), path)


# --- DeepSpeed's files: the structure our readers rely on ----------------------------------------
#
# DeepSpeed's model-state and optimizer files are pickles of nested dicts. Each reader checks, once,
# where it reads a file, that the entries it uses have the types and ranges it relies on; an error
# names the file and the key path (``optimizer_state_dict.base_optimizer_state.param_groups[0].lr``).


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: expected a dict, {_found(value)}")
    return value


def _list(value: Any, where: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"{where}: expected a list, {_found(value)}")
    return value


def _key(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise CheckpointError(f"{where}: missing key {key!r}")
    return d[key]


def _count(value: Any, where: str, minimum: int = 0) -> int:
    """An int (not a bool) >= ``minimum``; a DeepSpeed enum (``ZeroStageEnum``, or its stand-in) counts as its value."""
    if hasattr(value, "args") and type(value).__name__ == "ZeroStageEnum":  # trust._DeepSpeedStub
        value = value.args[0] if value.args else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: expected an int, {_found(value)}")
    if value < minimum:
        raise CheckpointError(f"{where}: {value} is {'negative' if minimum == 0 else f'less than {minimum}'}")
    return int(value)


def _float_tensor(value: Any, where: str, fp32: bool = True) -> torch.Tensor:
    """A tensor of fp32: the master weights and Adam's moments are kept in fp32 whatever the training precision.
    ``fp32=False``: any tensor (a ZeRO-3 shard's dtypes are checked against DP rank 0's by its index)."""
    if not torch.is_tensor(value):
        raise CheckpointError(f"{where}: expected a tensor, {_found(value)}")
    if fp32 and value.dtype != torch.float32:
        raise CheckpointError(f"{where}: expected a torch.float32 tensor, found {value.dtype}")
    return value


def _number(value: Any, where: str, low: float, high: float | None = None, *, low_open: bool = False) -> Any:
    """A finite int or float (not a bool) in [low, high) (``low_open``: (low, high)); a one-element real
    tensor (torch optimizers accept tensor hyperparameters) is taken as it is, its value unread."""
    import math

    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise CheckpointError(f"{where}: expected a number or a one-element real tensor, found {value.dtype} "
                                  f"{tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where}: expected a finite number, {_found(value)}")
    if value < low or (low_open and value == low) or (high is not None and value >= high):
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'})"
        raise CheckpointError(f"{where}: {value!r} is outside {bounds}")
    return value


def _step_value(value: Any, where: str) -> None:
    """An optimizer step: a number, not negative, or a 0-d (or one-element) real tensor."""
    _number(value, where, 0.0)


# The hyperparameters an Adam-family param group holds, with the values its step can take.
_GROUP_NUMBERS = {"lr": (0.0, None, False), "eps": (0.0, None, True), "weight_decay": (0.0, None, False),
                  "initial_lr": (0.0, None, False)}
_GROUP_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay", "bias_correction",
                "adam_w_mode")


def check_param_groups(value: Any, where: str) -> list[dict]:
    """An optimizer's ``param_groups``: a list of dicts whose hyperparameters have the types and ranges
    Adam's step needs (keys of other optimizers are left alone)."""
    groups = _list(value, where)
    for i, group in enumerate(groups):
        at = f"{where}[{i}]"
        group = _dict(group, at)
        for key, (low, high, low_open) in _GROUP_NUMBERS.items():
            if key in group:
                _number(group[key], f"{at}.{key}", low, high, low_open=low_open)
        if "betas" in group:
            betas = _list(group["betas"], f"{at}.betas")
            if len(betas) != 2:
                raise CheckpointError(f"{at}.betas: expected 2 numbers, found {len(betas)}")
            for j, beta in enumerate(betas):
                _number(beta, f"{at}.betas[{j}]", 0.0, 1.0)
        if "step" in group:
            _step_value(group["step"], f"{at}.step")
        for key in _GROUP_FLAGS:
            if key in group and not isinstance(group[key], bool):
                raise CheckpointError(f"{at}.{key}: expected a bool, {_found(group[key])}")
        if "params" in group:
            for j, p in enumerate(_list(group["params"], f"{at}.params")):
                _count(p, f"{at}.params[{j}]")
    return list(groups)


def _check_adam_state(value: Any, where: str, fp32: bool = True) -> dict:
    """An optimizer's ``state``: group (or parameter) index -> {exp_avg, exp_avg_sq: fp32 tensors, step}."""
    state = _dict(value, where)
    for g, entry in state.items():
        at = f"{where}[{g!r}]"
        _count(g, f"{where}: key {g!r}")
        entry = _dict(entry, at)
        for key in MOMENT_KEYS:
            if key in entry:
                _float_tensor(entry[key], f"{at}.{key}", fp32)
        if "step" in entry and entry["step"] is not None:
            _step_value(entry["step"], f"{at}.step")
    return state


def _check_fragment_address(value: Any, where: str) -> None:
    """DeepSpeed's ``fragment_address`` (or its stand-in): ``start`` and ``numel``, both ints >= 0."""
    for attr in ("start", "numel"):
        if not hasattr(value, attr):
            raise CheckpointError(f"{where}: expected a fragment address (start, numel), {_found(value)}")
        _count(getattr(value, attr), f"{where}.{attr}")


def check_optimizer_shard(value: Any, path: str, stage3: bool | None = False, lenient: bool = False) -> dict:
    """A ZeRO optimizer file of ``path`` (1/2: ``param_slice_mappings`` and ``single_partition_of_fp32_groups``;
    ``stage3``: ``fp32_flat_groups``; None: whichever it holds): the entries our readers use, typed; returns
    its ``optimizer_state_dict``. ``lenient``: for a file DeepSpeed's own loader reads, entries it may lack
    (an elastic checkpoint's) are not required, and those present are checked."""
    top = _dict(value, path)
    where = f"{path}: optimizer_state_dict"
    osd = _dict(_key(top, "optimizer_state_dict", path), where)
    if "zero_stage" in osd:
        _count(osd["zero_stage"], f"{where}.zero_stage")
    if stage3 is None:
        stage3 = "fp32_flat_groups" in osd
    if stage3:
        if "fp32_flat_groups" not in osd:
            raise CheckpointError(f"{path}: no fp32_flat_groups (not a ZeRO-3 optimizer file)")
        # dtypes: zero._index_zero3_fragments checks every rank's against DP rank 0's fp32 master
        for i, t in enumerate(_list(osd["fp32_flat_groups"], f"{where}.fp32_flat_groups")):
            _float_tensor(t, f"{where}.fp32_flat_groups[{i}]", fp32=False)
        inner_where = f"{where}.optimizer_state_dict"
        inner = _dict(_key(osd, "optimizer_state_dict", where), inner_where)
        _check_adam_state(_key(inner, "state", inner_where), f"{inner_where}.state", fp32=False)
        check_param_groups(_key(inner, "param_groups", inner_where), f"{inner_where}.param_groups")
        return osd
    if "param_slice_mappings" not in osd and not lenient:
        raise CheckpointError(f"{path}: no param_slice_mappings (ZeRO-3 or an elastic checkpoint?)")
    for g, mapping in enumerate(_list(osd.get("param_slice_mappings", []), f"{where}.param_slice_mappings")):
        at = f"{where}.param_slice_mappings[{g}]"
        for name, address in _dict(mapping, at).items():
            _check_fragment_address(address, f"{at}[{name!r}]")
    partitions = f"{where}.single_partition_of_fp32_groups"
    if not lenient or "single_partition_of_fp32_groups" in osd:
        for i, t in enumerate(_list(_key(osd, "single_partition_of_fp32_groups", where), partitions)):
            _float_tensor(t, f"{partitions}[{i}]")
    base_where = f"{where}.base_optimizer_state"
    if lenient and not isinstance(osd.get("base_optimizer_state"), dict):  # absent, or an elastic list
        return osd
    base = _dict(_key(osd, "base_optimizer_state", where), base_where)
    if not isinstance(_key(base, "state", base_where), dict):
        raise CheckpointError(f"{path}: base_optimizer_state['state'] is not a dict "
                              "(zero_optimization.elastic_checkpoint must be false)")
    _check_adam_state(base["state"], f"{base_where}.state")
    check_param_groups(_key(base, "param_groups", base_where), f"{base_where}.param_groups")
    return osd


def check_global_optimizer_state(value: Any, path: str) -> dict:
    """A universal folder's ``zero/optimizer_state.pt``: its param groups (and ZeRO-3 entry), typed."""
    top = _dict(value, path)
    check_param_groups(_key(top, "param_groups", path), f"{path}: param_groups")
    if top.get("optimizer_state_dict") is not None:
        where = f"{path}: optimizer_state_dict"
        inner = _dict(top["optimizer_state_dict"], where)
        if "state" in inner:
            _check_adam_state(inner["state"], f"{where}.state")
        if "param_groups" in inner:
            check_param_groups(inner["param_groups"], f"{where}.param_groups")
    return top


def _check_shape(value: Any, where: str) -> None:
    for i, d in enumerate(_list(value, where)):
        _count(d, f"{where}[{i}]")


def check_model_states(value: Any, path: str) -> dict:
    """A model-state file of ``path`` (DeepSpeed's ``mp_rank_XX`` or ZeRO-3's): the counters, degrees and
    ``param_shapes`` our readers use, typed and in range (each may be absent: not every writer writes it)."""
    state = _dict(value, path)
    for key in ("iteration", "global_steps", "skipped_steps", "consumed_train_samples"):
        if state.get(key) is not None:
            _count(state[key], f"{path}: {key}")
    for key in ("dp_world_size", "mp_world_size"):
        if state.get(key) is not None:
            _count(state[key], f"{path}: {key}", minimum=1)
    dims = state.get("checkpoint_parallel_dimensions")
    if dims:
        where = f"{path}: checkpoint_parallel_dimensions"
        dims = _dict(dims, where)
        for key in ("tp_degree", "pp_degree"):
            _count(_key(dims, key, where), f"{where}.{key}", minimum=1)
    if state.get("param_shapes") is not None:
        where = f"{path}: param_shapes"
        for g, group in enumerate(_list(state["param_shapes"], where)):
            for name, shape in _dict(group, f"{where}[{g}]").items():
                _check_shape(shape, f"{where}[{g}][{name!r}]")
    info = state.get("universal_checkpoint_info")
    if info is not None:
        check_ucp_info(info, f"{path}: universal_checkpoint_info")
    return state


def _pattern(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: expected a regular expression string, {_found(value)}")
    try:
        re.compile(value)
    except re.error as e:
        raise CheckpointError(f"{where}: {value[:60]!r} is not a regular expression ({e})") from None


def check_ucp_info(value: Any, where: str) -> dict:
    """DeepSpeed's ``universal_checkpoint_info``: pattern lists of regular expressions (or, for sub-parameter
    entries, dicts whose ``patterns`` are), integer vocabulary sizes."""
    info = _dict(value, where)
    for key, entry in info.items():
        at = f"{where}.{key}"
        if key in ("original_vocab_size", "padded_vocab_size") and entry is not None:
            _count(entry, at, minimum=1)
        elif isinstance(entry, (list, tuple)):
            for i, item in enumerate(entry):
                if isinstance(item, dict):
                    for j, p in enumerate(_list(_key(item, "patterns", f"{at}[{i}]"), f"{at}[{i}].patterns")):
                        _pattern(p, f"{at}[{i}].patterns[{j}]")
                else:
                    _pattern(item, f"{at}[{i}]")
    return info


def check_state_atom(value: Any, path: str) -> torch.Tensor:
    """A universal state atom (``fp32``, ``exp_avg``, ``exp_avg_sq``): an fp32 tensor, bare (DeepSpeed's
    ZeRO-3 atoms) or under ``param`` beside its merge keys."""
    if isinstance(value, dict):
        return _float_tensor(_key(value, "param", path), f"{path}: param")
    return _float_tensor(value, path)


def check_atom(value: Any, path: str, key: str) -> None:
    """The universal atom ``<param>/<key>.pt``: a state atom, or for ``step`` a number or one-element tensor."""
    if key == STEP_KEY:
        _step_value(value, path)
    else:
        check_state_atom(value, path)
