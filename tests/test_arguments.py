"""The trainer's flags, generated from the config dataclasses, and their validation before start-up.

Flags come from ``dataclasses.field`` metadata of ``ModelConfig``/``TrainConfig``: every flag must land
in its field, every default must be the dataclass's, the flag names of Megatron-DeepSpeed (and every
recipe) must keep working, and a bad flag must stop ``python -m megatron_ucp.train`` with one
``error:`` line and exit code 2 before any distributed start-up.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, TINY_FLAGS
from megatron_ucp import train as train_entry
from megatron_ucp.checkpoint.trust import TRUST_FLAG
from megatron_ucp.config import ModelConfig, TrainConfig, cli_default, cli_fields
from megatron_ucp.training import arguments
from megatron_ucp.training.arguments import (FlagError, build_parser, check_run, configs_from_flags, defaults,
                                             flag_fields, model_kwargs, parse_args, train_config, value_type)

# Every option string the trainer accepted before the flags were generated (the compatibility contract).
FLAGS_BEFORE = """
--adam-beta1 --adam-beta2 --adam-eps --attention-dropout --bf16 --clip-grad --data-path --deepspeed-config
--disable-bias-linear --ds-config-out --eval-interval --eval-iters --ffn-hidden-size --finetune --fp16 --fp32
--global-batch-size --help --hidden-dropout --hidden-size --init-method-std --layernorm-epsilon --load
--local-rank --local_rank --log-interval --loss-log --lr --lr-decay-iters --lr-decay-style --lr-warmup-iters
--make-vocab-size-divisible-by --max-position-embeddings --merge-file --micro-batch-size --min-lr --mock-data
--no-load-rng --no-pipeline-parallel --normalization --num-attention-heads --num-key-value-heads --num-layers
--pipeline-model-parallel-size --rope-theta --save --save-interval --seed --seq-length --split --swiglu
--tensor-model-parallel-size --tensorboard-dir --tokenizer-model --tokenizer-type --train-iters
--trust-checkpoint-code --universal-checkpoint --untie-embeddings-and-output-weights
--use-rotary-position-embeddings --vocab-file --vocab-size --weight-decay --yaml-cfg --zero-stage -h
""".split()



def _option_strings() -> set[str]:
    return {s for a in build_parser()._actions for s in a.option_strings}


def _sample(cls, f, spec) -> tuple[str, object]:
    """A command-line value for a non-switch flag field that differs from its default, and the value parsed."""
    typ = value_type(cls, f)
    default = cli_default(f)
    if spec.choices:
        value = next(c for c in spec.choices if c != default)
        return value, value
    if typ is int:
        return str((default or 0) + 3), (default or 0) + 3
    if typ is float:
        return "0.375", 0.375
    return "some/value", "some/value"


# --- the flag table -----------------------------------------------------------------------------------


def test_flag_names_are_a_superset_of_before_and_megatron_deepspeed():
    names = _option_strings()
    assert not set(FLAGS_BEFORE) - names
    # Megatron-DeepSpeed recipes' spelling of the DeepSpeed flags.
    assert {"--deepspeed", "--deepspeed_config"} <= names
    # The trust flag is the one every tool shares.
    trust = dict(TrainConfig.__dataclass_fields__)["trust_checkpoint_code"].metadata["cli"]
    assert trust.names == (TRUST_FLAG,)


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_every_flag_round_trips_to_its_field(cls):
    base = parse_args([])
    for f, spec in cli_fields(cls):
        if spec.switches:
            for flag, value, _ in spec.switches:
                assert parse_args([flag])[f.name] == value, flag
            continue
        for name in spec.names:  # the flag and each alias
            if value_type(cls, f) is bool:
                values = parse_args([name])
                assert values[f.name] is (not spec.negate), name
            else:
                text, parsed = _sample(cls, f, spec)
                values = parse_args([name, text])
                assert values[f.name] == parsed, name
            # Only this field moved (and the default derived from it: --max-position-embeddings is --seq-length's).
            moved = {k for k, v in values.items() if v != base[k]}
            assert moved - {"max_position_embeddings"} == {f.name} - {"max_position_embeddings"}, (name, moved)


# Every flag at once, with values the dataclasses accept together (a Qwen2-shaped model), set to non-defaults.
FULL_ARGV = [
    "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "16", "--max-position-embeddings", "40",
    "--ffn-hidden-size", "96", "--make-vocab-size-divisible-by", "16", "--layernorm-epsilon", "1e-6",
    "--hidden-dropout", "0.05", "--attention-dropout", "0.0", "--init-method-std", "0.01",
    "--untie-embeddings-and-output-weights", "--swiglu", "--normalization", "rmsnorm",
    "--use-rotary-position-embeddings", "--rope-theta", "500000", "--disable-bias-linear",
    "--num-key-value-heads", "2", "--add-qkv-bias", "--kv-channels", "8", "--qk-layernorm", "--sliding-window", "16",
    "--rope-scaling-type", "llama3", "--rope-scaling-factor", "8", "--rope-low-freq-factor", "2",
    "--rope-high-freq-factor", "8", "--rope-original-max-position-embeddings", "20",
    "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1", "--zero-stage", "2",
    "--micro-batch-size", "2", "--global-batch-size", "12", "--seq-length", "32", "--train-iters", "30",
    "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "3", "--lr-decay-iters", "25",
    "--lr-decay-style", "linear", "--weight-decay", "0.01", "--adam-beta1", "0.8", "--adam-beta2", "0.9",
    "--adam-eps", "1e-6", "--clip-grad", "0.5", "--fp16", "--seed", "7", "--data-path", "d/x", "--mock-data",
    "--split", "90,10,0", "--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model", "t.model",
    "--vocab-file", "v.json", "--merge-file", "m.txt", "--vocab-size", "100", "--log-interval", "2",
    "--eval-interval", "5", "--eval-iters", "1", "--tensorboard-dir", "tb", "--loss-log", "l.jsonl",
    "--save", "s", "--save-interval", "10", "--load", "in", "--universal-checkpoint", "--ckpt-step", "8", "--universal-loader", "deepspeed", "--no-load-rng",
    "--trust-checkpoint-code", "--finetune", "--no-pipeline-parallel", "--deepspeed-config", "ds.json",
    "--ds-config-out", "out.json", "--allow-vocab-extension", "--eval-at-start", "--model-family", "qwen2",
    "--num-experts", "6", "--topk", "1", "--moe-no-topk-renormalization", "--moe-loss-coeff", "0.1",
    "--moe-train-capacity-factor", "2", "--moe-eval-capacity-factor", "3", "--moe-min-capacity", "2",
    "--moe-token-dropping", "--moe-expert-parallel-size", "3", "--create-moe-param-group", "--sequence-parallel",
    "--ds-sequence-parallel-size", "2", "--report-memory", "--save-interval-minutes", "30", "--exit-signal-handler",
    "--elastic-layout", "--distributed-timeout-minutes", "3",
]
FULL_MODEL = dict(num_layers=3, hidden_size=64, num_attention_heads=16, max_position_embeddings=40, ffn_hidden_size=96,
                  make_vocab_size_divisible_by=16, layernorm_epsilon=1e-6, hidden_dropout=0.05, attention_dropout=0.0,
                  init_method_std=0.01, tie_embeddings=False, swiglu=True, normalization="rmsnorm",
                  use_rotary_position_embeddings=True, rope_theta=500000.0, add_bias_linear=False,
                  num_key_value_heads=2, add_qkv_bias=True, kv_channels=8, qk_layernorm=True, sliding_window=16,
                  rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=2.0,
                  rope_high_freq_factor=8.0, rope_original_max_position_embeddings=20, model_family="qwen2",
                  num_experts=6, moe_top_k=1, moe_renormalize=False, moe_loss_coeff=0.1, moe_train_capacity_factor=2.0,
                  moe_eval_capacity_factor=3.0, moe_min_capacity=2, moe_token_dropping=True)
FULL_TRAIN = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, zero_stage=2, micro_batch_size=2,
                  global_batch_size=12, seq_length=32, train_iters=30, lr=1e-3, min_lr=1e-4, lr_warmup_iters=3,
                  lr_decay_iters=25, lr_decay_style="linear", weight_decay=0.01, adam_beta1=0.8, adam_beta2=0.9,
                  adam_eps=1e-6, clip_grad=0.5, dtype="fp16", seed=7, data_path="d/x", mock_data=True,
                  split="90,10,0", tokenizer_type="GPT2BPETokenizer", tokenizer_model="t.model",
                  vocab_file="v.json", merge_file="m.txt", vocab_size=100, log_interval=2, eval_interval=5,
                  eval_iters=1, tensorboard_dir="tb", loss_log="l.jsonl", save="s", save_interval=10, load="in",
                  universal_checkpoint=True, ckpt_step=8, universal_loader="deepspeed", no_load_rng=True, trust_checkpoint_code=True, finetune=True,
                  no_pipeline_parallel=True, deepspeed_config="ds.json", ds_config_out="out.json",
                  allow_vocab_extension=True, eval_at_start=True, moe_expert_parallel_size=3,
                  create_moe_param_group=True, sequence_parallel=True, ds_sequence_parallel_size=2,
                  report_memory=True, save_interval_minutes=30.0, exit_signal_handler=True,
                  elastic_layout=True, distributed_timeout_minutes=3.0)


def test_every_flag_at_once_builds_both_dataclasses():
    values = parse_args(FULL_ARGV)
    model = ModelConfig(vocab_size=100, **model_kwargs(values))
    cfg = train_config(values)
    assert model == ModelConfig(vocab_size=100, **FULL_MODEL)
    assert cfg == TrainConfig(**FULL_TRAIN)
    # Every field that is a flag is set to a non-default here, so each is covered; except the pipeline size,
    # which ZeRO-2 and --no-pipeline-parallel need at 1 (the round-trip test above covers it).
    for cls, expected in ((ModelConfig, FULL_MODEL), (TrainConfig, FULL_TRAIN)):
        for f, _ in cli_fields(cls):
            assert expected[f.name] != cli_default(f) or f.name == "pipeline_model_parallel_size", f.name
        assert set(expected) == {f.name for f, _ in cli_fields(cls)}
    # And the check that needs the world size accepts it at DP 3 (12 = 2 x 2 x 3), in the combinations that are
    # built (MoE, Megatron's and Ulysses' sequence parallelism are refused together): the dense model with
    # Megatron SP, the MoE model without SP, and the dense model with Ulysses SP 2 at TP 1.
    dense = dict(model_kwargs(values), num_experts=None)
    check_run(dense, dataclasses.replace(cfg, moe_expert_parallel_size=1, ds_sequence_parallel_size=1), world_size=6)
    check_run(model_kwargs(values), dataclasses.replace(cfg, sequence_parallel=False, ds_sequence_parallel_size=1),
              world_size=6)
    check_run(dense, dataclasses.replace(cfg, moe_expert_parallel_size=1, sequence_parallel=False,
                                         tensor_model_parallel_size=1), world_size=6)


def test_defaults_are_the_dataclass_defaults():
    values = parse_args([])
    for _, f, spec in flag_fields():
        if f.default is not dataclasses.MISSING and spec.cli_default is dataclasses.MISSING:
            assert values[f.name] == f.default, f.name
    # The one derived default, and the architecture the dataclass requires (a small GPT).
    assert values["max_position_embeddings"] == values["seq_length"] == TrainConfig.seq_length
    assert (values["num_layers"], values["hidden_size"], values["num_attention_heads"]) == (4, 256, 8)
    # So the configs the flags build equal the ones a library caller gets from the same fields.
    mock = ["--mock-data", "--vocab-size", "8"]
    assert train_config(parse_args(mock)) == TrainConfig(mock_data=True, vocab_size=8)
    assert ModelConfig(vocab_size=8, **model_kwargs(parse_args(mock))) == ModelConfig(
        vocab_size=8, num_layers=4, hidden_size=256, num_attention_heads=8, max_position_embeddings=256)
    assert defaults() == {k: v for k, v in parse_args([]).items() if k != "max_position_embeddings"} | {
        "max_position_embeddings": None}


def test_help_shows_the_dataclass_defaults_and_help_once():
    text = build_parser().format_help()
    for _, f, spec in flag_fields():
        for name in spec.names:
            assert name in text
        if spec.help and not spec.switches:
            assert " ".join(spec.help.split()) in " ".join(text.split()), f.name
    assert "(default: 0.0003)" in " ".join(text.split())  # --lr, from TrainConfig.lr


def test_recipe_flags_parse(tmp_path):
    """The flags the universal-checkpointing recipes pass (common.sh), GPT and Llama, baseline and resume."""
    script = ("source examples_deepspeed/universal_checkpointing/common.sh; "
              "model_args; train_args; run_dir_args RUN")
    for family in ("gpt", "llama"):
        env = dict(os.environ, MODEL_FAMILY=family, OUTPUT_DIR=str(tmp_path), DATA_PATH=str(tmp_path / "d"))
        out = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        argv = out.stdout.split() + ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4",
                                     "--zero-stage", "1", "--bf16", "--load", "x", "--universal-checkpoint"]
        values = parse_args(argv)
        cfg = train_config(values)
        assert cfg.pipeline_model_parallel_size == 4 and cfg.universal_checkpoint and cfg.eval_iters == 2
        model = ModelConfig(vocab_size=8000, **model_kwargs(values))
        assert model.swiglu_family == (family == "llama")


def test_launcher_and_megatron_deepspeed_flags_are_accepted():
    values = parse_args(TINY_FLAGS + ["--local_rank=3", "--deepspeed", "--deepspeed_config", "ds.json"])
    assert values["deepspeed_config"] == "ds.json"
    assert parse_args(TINY_FLAGS + ["--local-rank", "0"]) == parse_args(TINY_FLAGS)


# --- YAML ----------------------------------------------------------------------------------------------


def test_yaml_takes_flag_and_field_names_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"num-layers": 3, "hidden_size": 64, "disable_bias_linear": True,
                                    "tie_embeddings": False, "fp32": True, "lr": "3e-3", "rope-theta": 100}))
    values = parse_args(["--yaml-cfg", str(path), "--num-layers", "5"])
    assert values["num_layers"] == 5 and values["hidden_size"] == 64
    assert values["add_bias_linear"] is False and values["tie_embeddings"] is False
    assert values["dtype"] == "fp32" and values["lr"] == 3e-3 and values["rope_theta"] == 100.0


def test_yaml_of_the_hf_importer_rebuilds_the_model(tmp_path):
    """``tools/hf_to_universal.py --model_args_yaml`` writes these settings for ``--yaml-cfg``."""
    from megatron_ucp.hf.to_universal import trainer_model_settings

    cfg = ModelConfig(vocab_size=100, **FULL_MODEL)
    path = tmp_path / "model_args.yaml"
    path.write_text(yaml.safe_dump(trainer_model_settings(cfg), sort_keys=False))
    assert ModelConfig(vocab_size=100, **model_kwargs(parse_args(["--yaml-cfg", str(path)]))) == cfg


@pytest.mark.parametrize("content, message", [
    ({"num_layerz": 2}, "unknown setting 'num_layerz'"),
    ({"num_layers": "two"}, "invalid int value 'two'"),
    ({"num_layers": 2.5}, "expected int"),
    ({"swiglu": "yes"}, "must be true or false"),
    ({"normalization": "batchnorm"}, "not one of layernorm, rmsnorm"),
    ([1, 2], "expected a mapping"),
])
def test_yaml_errors(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(FlagError, match=message):
        parse_args(["--yaml-cfg", str(path)])


# --- validation before start-up ------------------------------------------------------------------------


@pytest.mark.parametrize("argv, world_size, message", [
    (["--num-attention-heads", "3", "--hidden-size", "64"], 1,
     "hidden_size 64 is not divisible by num_attention_heads 3"),
    (["--tensor-model-parallel-size", "3"], 4,
     "world size 4 is not divisible by tensor parallel 3 x pipeline parallel 1"),
    (["--tensor-model-parallel-size", "4", "--num-attention-heads", "2"], 4,
     "tensor parallel 4 does not divide num_attention_heads 2"),
    (["--pipeline-model-parallel-size", "2"], 2, "pipeline parallel 2 needs at least 2 layers"),
    (["--global-batch-size", "6"], 4, "global batch 6 is not divisible by micro batch 1 x data parallel 4"),
    (["--max-position-embeddings", "8"], 1, "seq_length 16 exceeds max_position_embeddings 8"),
    (["--min-lr", "1"], 1, "min lr 1.0 exceeds max lr"),
    (["--lr-decay-style", "step"], 1, "unknown lr decay style 'step'"),
    (["--zero-stage", "2", "--pipeline-model-parallel-size", "2"], 2, "ZeRO stage 2 needs pipeline parallel size 1"),
])
def test_run_checks_fail_before_start_up(argv, world_size, message):
    with pytest.raises(ValueError, match=message):
        configs_from_flags(TINY_FLAGS + argv, environ={"WORLD_SIZE": str(world_size)})


def test_the_same_run_is_valid_at_a_fitting_world_size():
    """Negative control of the world-size checks: the layouts above fit other world sizes."""
    for argv, world_size in ((["--tensor-model-parallel-size", "3", "--num-attention-heads", "3",
                               "--hidden-size", "48", "--global-batch-size", "4"], 6),
                             (["--global-batch-size", "8"], 4)):
        _, cfg = configs_from_flags(TINY_FLAGS + argv, environ={"WORLD_SIZE": str(world_size)})
        assert cfg.gradient_accumulation_steps(world_size // cfg.tensor_model_parallel_size) >= 1


def test_world_size_comes_from_the_launcher():
    assert arguments.launch_world_size({}) == 1
    assert arguments.launch_world_size({"WORLD_SIZE": "8"}) == 8
    with pytest.raises(FlagError, match="WORLD_SIZE='x'"):
        arguments.launch_world_size({"WORLD_SIZE": "x"})


def test_input_files_are_checked(tmp_path):
    data = ["--data-path", str(tmp_path / "d"), "--tokenizer-model", str(tmp_path / "t.model")]
    base = [a for a in TINY_FLAGS if a not in ("--mock-data",)]
    with pytest.raises(ValueError, match=r"--data-path .*d\.bin: no such file"):
        configs_from_flags(base + data, environ={})
    for suffix in (".bin", ".idx"):
        (tmp_path / f"d{suffix}").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--tokenizer-model .*t\.model: no such file"):
        configs_from_flags(base + data, environ={})
    (tmp_path / "t.model").write_bytes(b"")
    configs_from_flags(base + data, environ={})  # negative control: every file there
    with pytest.raises(ValueError, match="bad split"):
        configs_from_flags(base + data + ["--split", "a,b"], environ={})
    with pytest.raises(ValueError, match="--load .*: no such folder"):
        configs_from_flags(TINY_FLAGS + ["--load", str(tmp_path / "nope")], environ={})
    (tmp_path / "ds.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        configs_from_flags(TINY_FLAGS + ["--deepspeed-config", str(tmp_path / "ds.json")], environ={})


def test_main_passes_a_valid_run_to_the_trainer(monkeypatch):
    """Negative control in process: good flags get past validation to ``train`` itself."""
    from megatron_ucp.training import trainer

    calls = []
    monkeypatch.setattr(trainer, "train", lambda kwargs, cfg: calls.append((kwargs, cfg)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_entry.main(TINY_FLAGS + ["--global-batch-size", "4"]) == 0
    (kwargs, cfg), = calls
    assert kwargs["num_layers"] == 1 and cfg.global_batch_size == 4 and cfg.dtype == "fp32"


# --- the entry point as a launcher runs it -------------------------------------------------------------

START_UP_SIGNS = ("deepspeed", "topology", "training tp", "gloo", "process group", "traceback")


def _run_trainer(argv, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        if key not in env:
            full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "megatron_ucp.train", *argv], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


def _assert_refused_once(run: subprocess.CompletedProcess, message: str) -> None:
    output = run.stdout + run.stderr
    assert run.returncode == 2, output
    error_lines = [line for line in output.splitlines() if "error:" in line]
    assert error_lines == [f"error: {message}"], output
    assert output.strip() == error_lines[0], output  # nothing else: no usage page, no start-up
    assert not [s for s in START_UP_SIGNS if s in output.lower()], output


@pytest.mark.parametrize("argv, env, message", [
    (["--num-attention-heads", "3", "--hidden-size", "64"], {},
     "hidden_size 64 is not divisible by num_attention_heads 3"),
    (["--tensor-model-parallel-size", "3"], {"WORLD_SIZE": "4"},
     "world size 4 is not divisible by tensor parallel 3 x pipeline parallel 1"),
    (["--num-layers", "two"], {}, "argument --num-layers: invalid int value: 'two'"),
    (["--num-layer", "2", "--bogus"], {}, "unrecognized arguments: --bogus"),
])
def test_bad_flag_exits_2_with_one_error_line_and_no_start_up(argv, env, message):
    _assert_refused_once(_run_trainer(TINY_FLAGS + argv, **env), message)


def test_only_local_rank_0_prints_the_error():
    run = _run_trainer(TINY_FLAGS + ["--tensor-model-parallel-size", "3"], WORLD_SIZE="4", RANK="1", LOCAL_RANK="1")
    assert run.returncode == 2 and run.stdout + run.stderr == ""


@pytest.mark.slow
def test_good_flags_start_and_train(tmp_path):
    """Negative control of the subprocess checks: the same command line with good flags starts up and trains."""
    from dist_utils import free_port

    run = _run_trainer(TINY_FLAGS, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "error:" not in output
    assert "training TP1-PP1-DP1" in output and "iteration      1/1" in output
    assert [s for s in START_UP_SIGNS if s in output.lower()]  # the signs the refusals must not show
