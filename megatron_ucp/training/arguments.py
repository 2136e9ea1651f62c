"""The trainer's command line, generated from the config dataclasses, and ``--yaml-cfg``.

Every config flag is a field of ``ModelConfig`` or ``TrainConfig`` whose ``dataclasses.field`` metadata
names the flag (Megatron-DeepSpeed's spelling) and its help (``megatron_ucp.config.cli``); the field's
default is the flag's default. This module only turns those fields into argparse arguments, so a
default or help text is written once. A YAML file holds the same settings, keyed by flag or field name
with dashes or underscores (``num-layers: 4``, ``num_layers: 4``, ``disable_bias_linear: true``,
``bf16: true``); flags on the command line override it.

:func:`configs_from_flags` is what ``python -m megatron_ucp.train`` runs before any distributed
start-up: it parses, builds both configs and runs the checks that need the whole run (the world size
comes from the launcher's ``WORLD_SIZE``), so a bad flag fails once, with one line, and nothing starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import typing
from typing import Any, Mapping, NoReturn, Sequence

import yaml

from megatron_ucp.config import Cli, ModelConfig, TrainConfig, cli_default, cli_fields

CONFIGS = (ModelConfig, TrainConfig)
MODEL_KEYS = tuple(f.name for f, _ in cli_fields(ModelConfig))


class FlagError(ValueError):
    """A bad flag or setting; the entry point prints it as one ``error:`` line and exits with 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`FlagError` instead of printing its usage and exiting.

    The usage of some seventy flags is a page of text around the one line that matters; the entry
    point prints that line alone (once, not once per rank) with argparse's exit code 2.
    """

    def error(self, message: str) -> NoReturn:
        raise FlagError(message)


def flag_fields() -> list[tuple[type, dataclasses.Field, Cli]]:
    """(config class, field, flag spec) of every config flag. Field names are the parsed keys, so unique."""
    out: list[tuple[type, dataclasses.Field, Cli]] = [(cls, f, spec) for cls in CONFIGS for f, spec in cli_fields(cls)]
    names = [f.name for _, f, _ in out]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"flag fields named the same in two configs: {', '.join(clashes)}")
    return out


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves the annotations ``from __future__ import annotations`` keeps as text


def value_type(cls: type, f: dataclasses.Field) -> type:
    """The type a flag converts its text to: the field's annotation without ``| None``."""
    hint = _type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def _add_flag(group, cls: type, f: dataclasses.Field, spec: Cli) -> None:
    """One field's argparse arguments. Every default is None, so YAML and defaults fill what is not given."""
    default = cli_default(f)
    if spec.switches:  # one switch per value: --bf16 --fp16 --fp32
        for flag, value, text in spec.switches:
            group.add_argument(flag, dest=f.name, action="store_const", const=value, default=None,
                               help=_help(text + (" (default)" if value == default else "")))
        return
    typ = value_type(cls, f)
    if typ is bool:
        if default is not spec.negate:  # a switch can only move a field away from its default
            raise TypeError(f"{cls.__name__}.{f.name}: a switch needs default {spec.negate}, has {default!r}")
        group.add_argument(*spec.names, dest=f.name, action="store_const", const=not spec.negate, default=None,
                           help=_help(spec.help))
        return
    shown = "" if default is None else f" (default: {default})"
    group.add_argument(*spec.names, dest=f.name, type=typ, choices=spec.choices, default=None,
                       help=_help(spec.help + shown))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Train a Megatron-style GPT on DeepSpeed (run under torchrun or the deepspeed "
                            "launcher).")
    p.add_argument("--yaml-cfg", default=None, help="YAML file of the same settings as the flags")
    # Not settings: what launchers and Megatron-DeepSpeed recipes pass.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # Megatron-DeepSpeed's: always on here
    for cls, title in ((ModelConfig, "model (ModelConfig)"), (TrainConfig, "training (TrainConfig)")):
        group = p.add_argument_group(title)
        for f, spec in cli_fields(cls):
            _add_flag(group, cls, f, spec)
    flag_fields()  # refuse clashing names
    return p


def defaults() -> dict[str, Any]:
    """Every flag's default, keyed by field name: the dataclass defaults (``cli_default`` where required)."""
    return {f.name: cli_default(f) for _, f, _ in flag_fields()}


def _yaml_setters() -> dict[str, tuple[type, dataclasses.Field, Cli, str | None]]:
    """YAML key -> (class, field, spec, switch value). Keys: field names and flag names, underscored."""
    out: dict[str, tuple[type, dataclasses.Field, Cli, str | None]] = {}
    for cls, f, spec in flag_fields():
        keys = {f.name: None} | {_key(name): None for name in spec.names} | {_key(s): v for s, v, _ in spec.switches}
        for key, switch in keys.items():
            if key in out and out[key][1] is not f:
                raise TypeError(f"YAML key {key!r} would name both {out[key][1].name} and {f.name}")
            out[key] = (cls, f, spec, switch)
    return out


def _key(name: str) -> str:
    return str(name).lstrip("-").replace("-", "_")


def _yaml_value(key: str, value: Any, cls: type, f: dataclasses.Field, spec: Cli) -> Any:
    """A YAML value as its field's type; a negated switch's key (``disable_bias_linear: true``) is inverted."""
    typ = value_type(cls, f)
    if value is None:
        if cli_default(f) is not None:
            raise FlagError(f"setting {key} needs a value")
        return None
    if typ is bool:
        if not isinstance(value, bool):
            raise FlagError(f"setting {key} must be true or false, got {value!r}")
        return (not value) if spec.negate and key != f.name else value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FlagError(f"setting {key}: expected {typ.__name__}, got {value!r}")
    if typ is int and isinstance(value, float):
        raise FlagError(f"setting {key}: expected int, got {value!r}")
    try:
        value = typ(value)  # text as the flag would convert it; 4 -> 4.0 for a float
    except ValueError:
        raise FlagError(f"setting {key}: invalid {typ.__name__} value {value!r}") from None
    if spec.choices and value not in spec.choices:
        raise FlagError(f"setting {key}: {value!r} is not one of {', '.join(spec.choices)}")
    return value


def _read_yaml(path: str) -> dict[str, Any]:
    """Settings of a ``--yaml-cfg`` file, keyed by field name."""
    with open(path) as stream:
        try:
            loaded = yaml.safe_load(stream) or {}
        except yaml.YAMLError as e:
            raise FlagError(f"{path}: not YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise FlagError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    setters = _yaml_setters()
    out: dict[str, Any] = {}
    for key, value in loaded.items():
        if _key(key) not in setters:
            raise FlagError(f"{path}: unknown setting {key!r}")
        cls, f, spec, switch = setters[_key(key)]
        try:
            if switch is not None:  # bf16: true
                if not isinstance(value, bool):
                    raise FlagError(f"setting {key} must be true or false, got {value!r}")
                if value:
                    out[f.name] = switch
            else:
                out[f.name] = _yaml_value(_key(key), value, cls, f, spec)
        except FlagError as e:
            raise FlagError(f"{path}: {e}") from None
    return out


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Flags over YAML over defaults, as one plain dict keyed by config field name.

    Raises :class:`FlagError` for a bad flag or YAML setting (``--help`` still exits 0).
    """
    ns = build_parser().parse_args(argv)
    values = defaults()
    if ns.yaml_cfg:
        values.update(_read_yaml(ns.yaml_cfg))
    for _, f, _ in flag_fields():
        given = getattr(ns, f.name)
        if given is not None:
            values[f.name] = given
    if values["max_position_embeddings"] is None:  # the command line's derived default
        values["max_position_embeddings"] = values["seq_length"]
    return values


def train_config(values: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of parsed flags (validated by its constructor)."""
    return TrainConfig(**{f.name: values[f.name] for f, _ in cli_fields(TrainConfig)})


def model_kwargs(values: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from the flags; the trainer adds vocab_size from the tokenizer."""
    return {k: values[k] for k in MODEL_KEYS}


def launch_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The world size a launcher (torchrun, deepspeed) announces in ``WORLD_SIZE`` before start-up; 1 without."""
    raw = (os.environ if environ is None else environ).get("WORLD_SIZE", "1")
    try:
        world_size = int(raw)
    except ValueError:
        world_size = 0
    if world_size < 1:
        raise FlagError(f"WORLD_SIZE={raw!r} is not a positive integer")
    return world_size


def configs_from_flags(argv: Sequence[str] | None = None,
                       environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], TrainConfig]:
    """(model kwargs, TrainConfig) of the flags, the whole run validated for the launcher's world size.

    Runs before any distributed start-up; raises ValueError (or OSError for an unreadable ``--yaml-cfg``)
    with a one-line message.
    """
    from megatron_ucp.families import family_of_model  # pure: no torch

    values = parse_args(argv)
    cfg = train_config(values)
    kwargs = model_kwargs(values)
    from megatron_ucp.training.elastic import fit_layout

    world = launch_world_size(environ)
    cfg = fit_layout(kwargs, cfg, world)  # this world's layout (--elastic-layout), or which worlds would work
    family_of_model(check_run(kwargs, cfg, world))  # the flags fit the family they name
    check_inputs(cfg)
    return kwargs, cfg


def check_run(model_kwargs: dict[str, Any], cfg: TrainConfig, world_size: int,
              vocab_size: int | None = None) -> ModelConfig:
    """Every check that needs the whole run: both configs and the world size. Returns the ModelConfig.

    The trainer meets each of these only after distributed start-up (building the layout, the model,
    the DeepSpeed config and the LR schedule), where a bad setting fails on every rank. The entry point
    calls this first, with the launcher's world size, so a bad flag fails once and nothing starts. The
    later checks stay for library callers that build configs themselves.

    ``vocab_size`` is the tokenizer's, known only once it is loaded; no check depends on it, so without
    it the mock-data vocabulary (or 1) stands in.
    """
    from megatron_ucp.layout.topology import ParallelLayout  # pure modules: no torch.distributed, no DeepSpeed
    from megatron_ucp.training.schedule import LRSchedule

    model = ModelConfig(vocab_size=vocab_size or cfg.vocab_size or 1, **model_kwargs)
    if model.max_position_embeddings < cfg.seq_length:  # the trainer's own check, worded the same
        raise ValueError(f"seq_length {cfg.seq_length} exceeds max_position_embeddings "
                         f"{model.max_position_embeddings}")
    if model.use_rotary_position_embeddings and model.head_dim % 2:  # the model's own check, worded the same
        raise ValueError(f"rotary embeddings need an even head dim, got {model.head_dim}")
    if cfg.sequence_parallel:
        if cfg.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel splits the sequence over the tensor-parallel ranks: it needs "
                             "--tensor-model-parallel-size > 1")
        if cfg.seq_length % cfg.tensor_model_parallel_size:
            raise ValueError(f"--sequence-parallel: seq_length {cfg.seq_length} is not divisible by tensor parallel "
                             f"{cfg.tensor_model_parallel_size}")
        if model.is_moe:
            raise ValueError("--sequence-parallel is not built for MoE models")
    if cfg.moe_expert_parallel_size > 1 and not model.is_moe:
        raise ValueError(f"--moe-expert-parallel-size {cfg.moe_expert_parallel_size} needs an MoE model (--num-experts)")
    if model.is_moe and cfg.zero_stage == 3:
        raise ValueError("ZeRO stage 3 is not built for MoE models: DeepSpeed 0.19.8 writes no per-expert files under "
                         "stage 3 and this project's loaders do not read its partitioned expert state; use ZeRO "
                         "stage 1 or 2")
    check_ulysses(model, cfg)
    layout = ParallelLayout.from_world_size(world_size, cfg.tensor_model_parallel_size,
                                            cfg.pipeline_model_parallel_size, sp=cfg.ds_sequence_parallel_size,
                                            ep=cfg.moe_expert_parallel_size)
    model.check_expert_parallel(layout.degree("ep"))
    model.check_tensor_parallel(layout.degree("tp"))
    model.check_pipeline_parallel(layout.degree("pp"))
    cfg.gradient_accumulation_steps(layout.degree("dp"))  # global batch = micro batch x accumulation x DP
    assert cfg.lr_decay_iters is not None  # set by TrainConfig.__post_init__
    LRSchedule(cfg.lr, cfg.min_lr, cfg.lr_warmup_iters, cfg.lr_decay_iters, cfg.lr_decay_style)
    return model


def check_ulysses(model: ModelConfig, cfg: TrainConfig) -> None:
    """What DeepSpeed-Ulysses (``--ds-sequence-parallel-size``) needs: whole sequence slices, and whole query
    and key/value heads per rank after its all-to-all (within each TP rank's heads)."""
    sp, tp = cfg.ds_sequence_parallel_size, cfg.tensor_model_parallel_size
    if sp == 1:
        return
    assert model.num_key_value_heads is not None  # set by ModelConfig.__post_init__
    if cfg.seq_length % sp:
        raise ValueError(f"--ds-sequence-parallel-size {sp} does not divide seq_length {cfg.seq_length}")
    if (model.num_attention_heads // tp) % sp:
        raise ValueError(f"--ds-sequence-parallel-size {sp} does not divide the {model.num_attention_heads // tp} "
                         f"attention heads of a tensor-parallel rank")
    if (model.num_key_value_heads // tp) % sp:
        raise ValueError(f"--ds-sequence-parallel-size {sp} does not divide the {model.num_key_value_heads // tp} "
                         f"key/value heads of a tensor-parallel rank (grouped-query attention): each sequence-"
                         "parallel rank must hold whole key/value groups")
    if model.is_moe:
        raise ValueError("--ds-sequence-parallel-size is not built for MoE models")
    if cfg.sequence_parallel:
        raise ValueError("--ds-sequence-parallel-size and --sequence-parallel are not built together")


def check_inputs(cfg: TrainConfig) -> None:
    """The files a run reads exist: dataset (and its --split), tokenizer, --load folder, --deepspeed-config.

    Each is otherwise opened after distributed start-up, on every rank. Existence only: their contents
    are checked by their readers.
    """
    import json

    from megatron_ucp.data.gpt_dataset import parse_split
    from megatron_ucp.data.indexed_dataset import data_file_path, index_file_path
    from megatron_ucp.data.tokenizer import SUPPORTED_TOKENIZERS

    def need(path: str, flag: str) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")

    if not cfg.mock_data:
        assert cfg.data_path is not None  # TrainConfig.validate: --data-path unless --mock-data
        need(data_file_path(cfg.data_path), "--data-path")
        need(index_file_path(cfg.data_path), "--data-path")
        parse_split(cfg.split)
        if cfg.tokenizer_type not in SUPPORTED_TOKENIZERS:
            raise ValueError(f"unknown tokenizer type {cfg.tokenizer_type!r}; supported: "
                             f"{', '.join(SUPPORTED_TOKENIZERS)}")
        files = ({"--tokenizer-model": cfg.tokenizer_model} if cfg.tokenizer_type != "GPT2BPETokenizer"
                 else {"--vocab-file": cfg.vocab_file, "--merge-file": cfg.merge_file})
        for flag, path in files.items():
            if path is None:
                raise ValueError(f"--tokenizer-type {cfg.tokenizer_type} needs {flag}")
            if cfg.tokenizer_type == "HFTokenizer":  # a folder of tokenizer files
                if not os.path.isdir(path):
                    raise ValueError(f"{flag} {path}: no such folder")
            else:
                need(path, flag)
    restart = cfg.save is not None and cfg.load is not None and os.path.abspath(cfg.load) == os.path.abspath(cfg.save)
    if cfg.load and not os.path.isdir(cfg.load) and not restart:  # the same --load and --save: a job's first start
        raise ValueError(f"--load {cfg.load}: no such folder")
    if cfg.deepspeed_config:
        need(cfg.deepspeed_config, "--deepspeed-config")
        try:
            with open(cfg.deepspeed_config) as f:
                overrides = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--deepspeed-config {cfg.deepspeed_config}: {e}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--deepspeed-config {cfg.deepspeed_config}: expected a JSON object, "
                             f"got {type(overrides).__name__}")
