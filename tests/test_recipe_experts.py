"""The universal-checkpointing recipes' mixture-of-experts settings (common.sh), without training: the flags
each side passes parse and pass the trainer's whole-run checks at the recipe's world size, the run folders
name the expert layout, and bad settings stop the recipe with one error line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_ucp.training.arguments import check_run, model_kwargs, parse_args, train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = "source examples_deepspeed/universal_checkpointing/common.sh; "


def recipe(tmp_path, script: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, OUTPUT_DIR=str(tmp_path), DATA_PATH=str(tmp_path / "d"),
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env)
    return subprocess.run(["bash", "-c", COMMON + script], cwd=REPO, env=full, capture_output=True, text=True)


def checked(argv: list[str], world_size: int):
    values = parse_args(argv)
    cfg = train_config(values)
    return check_run(model_kwargs(values), cfg, world_size, vocab_size=8000), cfg


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_baseline_and_resume_flags(tmp_path, family):
    """TP2 PP2 DP2 EP2 (8 ranks) -> TP1 PP4 DP2 EP1 (8 ranks): NUM_EXPERTS defaults to 8 for an MoE family."""
    script = ('echo "$(run_name $TP $PP $DP)"; echo "$(run_name 1 4 2 fp32 1 1)"; '
              'echo $(model_args) $(train_args) $(ep_args $EP); echo $(ep_args $TARGET_EP)')
    out = recipe(tmp_path, script, MODEL_FAMILY=family, EP="2", TOPK="2", DTYPE="fp32", MOE_LOSS_COEFF="0.02",
                 TARGET_EP="1")
    assert out.returncode == 0, out.stderr
    base_name, resume_name, base_flags, resume_ep = out.stdout.splitlines()
    assert base_name == f"{family}_fp32_z1_tp2_pp2_dp2_ep2_sp1"
    assert resume_name == f"{family}_fp32_z1_tp1_pp4_dp2_ep1_sp1"
    parallel = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    model, cfg = checked(base_flags.split() + parallel, 8)
    assert (model.model_family, model.num_experts, model.moe_top_k, model.moe_loss_coeff) == (family, 8, 2, 0.02)
    assert cfg.moe_expert_parallel_size == 2
    argv = base_flags.split()
    i = argv.index("--moe-expert-parallel-size")
    resumed = argv[:i] + argv[i + 2:] + resume_ep.split() + ["--tensor-model-parallel-size", "1",
                                                           "--pipeline-model-parallel-size", "4"]
    model_r, cfg_r = checked(resumed, 8)
    assert model_r == model and cfg_r.moe_expert_parallel_size == 1


def test_dense_recipes_pass_no_expert_flags(tmp_path):
    out = recipe(tmp_path, 'echo "$(run_name 1 4 1)"; echo $(model_args) $(ep_args 1)', MODEL_FAMILY="llama")
    assert out.returncode == 0, out.stderr
    name, flags = out.stdout.splitlines()
    assert name == "llama_bf16_z1_tp1_pp4_dp1_sp1" and "expert" not in flags and "--topk" not in flags


@pytest.mark.parametrize("env, message", [
    ({"MODEL_FAMILY": "llama", "NUM_EXPERTS": "8"},
     "error: NUM_EXPERTS=8: MODEL_FAMILY llama is dense; experts need a mixture-of-experts family (mixtral, qwen3_moe)"),
    ({"MODEL_FAMILY": "gpt", "EP": "2"},
     "error: DP=2 EP=2: expert parallelism needs a mixture-of-experts MODEL_FAMILY (mixtral, qwen3_moe), not gpt"),
    ({"MODEL_FAMILY": "mixtral", "EP": "4"},
     "error: DP=2 EP=4: expert parallel size 4 must divide the data parallel size 2 and NUM_EXPERTS 8"),
    ({"MODEL_FAMILY": "mixtral", "NUM_EXPERTS": "6", "EP": "4", "DP": "4"},
     "error: DP=4 EP=4: expert parallel size 4 must divide the data parallel size 4 and NUM_EXPERTS 6"),
])
def test_bad_expert_settings_are_one_error_line(tmp_path, env, message):
    out = recipe(tmp_path, "echo unreachable", **env)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == message


def test_resume_side_checks_target_ep(tmp_path):
    out = recipe(tmp_path, 'check_ep "$TARGET_DP" "$TARGET_EP" "TARGET_DP=$TARGET_DP TARGET_EP=$TARGET_EP"',
                 MODEL_FAMILY="mixtral", EP="2", TARGET_EP="2")  # TARGET_DP defaults to 1
    assert out.returncode == 1
    assert out.stderr.strip() == ("error: TARGET_DP=1 TARGET_EP=2: expert parallel size 2 must divide the data "
                                  "parallel size 1 and NUM_EXPERTS 8")


@pytest.mark.slow
@pytest.mark.dist
def test_moe_baseline_recipe_trains_and_logs_the_load_balancing_loss(tmp_path):
    """run_tp2_pp2.sh with a mixture of experts, small: TP1 PP2 DP2 EP2 (4 ranks), fp32, on the bundled
    corpus. Every training record carries moe_loss, the ZeRO checkpoint has DeepSpeed's per-expert
    files, and the loss-curve tool reads the run with its load-balancing curve."""
    from dist_utils import free_port

    from megatron_ucp.evidence.loss_curves import load_curves

    env = dict(os.environ, OUTPUT_DIR=str(tmp_path), MODEL_FAMILY="mixtral", NUM_EXPERTS="4", EP="2", TP="1",
               PP="2", DP="2", DTYPE="fp32", NUM_LAYERS="2", HIDDEN="32", HEADS="4", KV_HEADS="2", FFN_HIDDEN="16",
               SEQ_LEN="16", GLOBAL_BATCH="4", MICRO_BATCH="1", TRAIN_ITERS="4", SAVE_INTERVAL="2", EVAL_INTERVAL="2",
               EVAL_ITERS="1", LOG_INTERVAL="1", MASTER_PORT=str(free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", os.path.join(REPO, "examples_deepspeed/universal_checkpointing/run_tp2_pp2.sh")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "mixtral_fp32_z1_tp1_pp2_dp2_ep2_sp1"
    assert "baseline run: TP=1 PP=2 DP=2 EP=2 (4 experts, top-2) ZeRO-1 fp32" in proc.stdout
    curves = load_curves(run)
    assert sorted(curves.train) == sorted(curves.moe) == [1, 2, 3, 4]
    assert curves.label == "TP1 PP2 DP2 EP2 ZeRO-1 fp32"
    step = run / "checkpoints" / "global_step2"
    # One MoE layer per pipeline stage (layer index 0 on each), 4 global experts, mp_rank = the stage.
    experts = sorted(p.name for p in step.glob("layer_*_expert_*_model_states.pt"))
    assert experts == [f"layer_0_expert_{e}_mp_rank_0{s}_model_states.pt" for e in range(4) for s in range(2)]


def test_sequence_parallel_knobs(tmp_path):
    """SP (Ulysses) and SEQUENCE_PARALLEL=1 (Megatron's) reach the trainer's flags and the run names; the
    flags pass the whole-run checks at the recipe's world size (TP x PP x DP x SP)."""
    out = recipe(tmp_path, 'echo "$(run_name $TP $PP $DP)"; echo $(model_args) $(train_args) $(sp_args $SP 0); '
                 'echo "$(run_name 2 1 1 fp32 1 1 1 1)"; echo $(sp_args 1 1)',
                 MODEL_FAMILY="llama", SP="2", TP="1", PP="1", DP="2", KV_HEADS="4", DTYPE="fp32")
    assert out.returncode == 0, out.stderr
    name, flags, megatron_name, megatron_flags = out.stdout.splitlines()
    assert name == "llama_fp32_z1_tp1_pp1_dp2_sp2" and megatron_name == "llama_fp32_z1_tp2_pp1_dp1_sp1_seqpar"
    assert megatron_flags == "--sequence-parallel"
    _, cfg = checked(flags.split(), 4)
    assert cfg.ds_sequence_parallel_size == 2 and not cfg.sequence_parallel
    _, cfg = checked(flags.split()[:-2] + [megatron_flags, "--tensor-model-parallel-size", "2"], 2)
    assert cfg.sequence_parallel and cfg.ds_sequence_parallel_size == 1
    for env, says in (({"SP": "0"}, "SP must be a positive integer"),
                      ({"SP": "2", "SEQUENCE_PARALLEL": "1"}, "not built together")):
        bad = recipe(tmp_path, "true", **env)
        assert bad.returncode == 1 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
