"""Test setup: DeepSpeed's CPU accelerator when there is no GPU, the GPU marker, and the real checkpoints
several test modules read (trained once per session)."""

import os
from pathlib import Path

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if not _has_cuda():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


# The files whose few tests take longest (each a minute or more on 2 cores, much of it waiting on rendezvous and
# process start-up), longest first. They are collected first, so that under ``-n 2 --dist loadfile`` one
# worker starts on them while the other works through the many short files; xdist's default order (most
# tests first, pytest.ini turns it off) would leave them for the end, when nothing else can run beside them.
LONG_FILES_FIRST = ("test_elastic.py", "test_hf.py", "test_benchmark_recovery.py", "test_benchmark_training.py",
                    "test_demo.py", "test_crash_safety.py", "test_preemption.py", "test_recipe_experts.py")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """``get(zero_stage, tp)`` -> (ZeRO folder, its universal conversion): a real checkpoint of the tiny GPT
    (``helpers.TINY_GPT`` and ``TINY_TRAIN``: TP ``tp`` PP1 DP2, fp32, saved at iterations 1 and 2; the
    folder is iteration 2's), trained on first use and shared by every module that asks. They are read
    only: a test that changes files works on a copy."""
    cache: dict[tuple[int, int], tuple[Path, Path]] = {}

    def get(stage: int = 1, tp: int = 1) -> tuple[Path, Path]:
        if (stage, tp) not in cache:
            from dist_utils import run_distributed
            from helpers import TINY_TRAIN, train_model
            from megatron_ucp.checkpoint.universal import convert_zero_to_universal

            root = tmp_path_factory.mktemp(f"tiny_zero{stage}_tp{tp}")
            run_distributed(train_model, 2 * tp, dict(TINY_TRAIN, train_iters=2, save=str(root / "ckpt"),
                                                      save_interval=1, zero_stage=stage,
                                                      tensor_model_parallel_size=tp))
            universal = root / "universal" / "global_step2_universal"
            convert_zero_to_universal(str(root / "ckpt" / "global_step2"), str(universal), workers=1)
            cache[stage, tp] = (root / "ckpt" / "global_step2", universal)
        return cache[stage, tp]

    return get


@pytest.fixture(scope="session")
def llama_runs(tmp_path_factory):
    """``get(tp, pp, dp)`` -> {"zero", "universal", "dump", "losses"}: a real fp32 ZeRO-1 run of the tiny
    Llama (``helpers.TINY_LLAMA``, ``llama_cfg``) saved at LLAMA_RESUME_AT, its DP-gathered state dumped
    there and its checkpoint converted (verified); the same run then carries on to LLAMA_ITERS without
    saving, and ``losses`` is its loss log (the reference of a resume). Trained on first use, shared, read
    only."""
    cache: dict[tuple[int, int, int], dict] = {}

    def get(tp: int, pp: int, dp: int) -> dict:
        if (tp, pp, dp) not in cache:
            from dist_utils import run_distributed
            from helpers import LLAMA_ITERS, LLAMA_RESUME_AT, TINY_LLAMA, llama_cfg, train_and_dump
            from megatron_ucp.checkpoint.universal import convert_zero_to_universal

            root = tmp_path_factory.mktemp(f"llama_tp{tp}pp{pp}dp{dp}")
            (root / "dump").mkdir()
            cfg = llama_cfg(tp, pp, train_iters=LLAMA_RESUME_AT, save=str(root / "ckpt"),
                            save_interval=LLAMA_RESUME_AT)
            run_distributed(train_and_dump, tp * pp * dp, cfg, str(root / "dump"), TINY_LLAMA, LLAMA_ITERS,
                            str(root / "losses.jsonl"))
            zero = root / "ckpt" / f"global_step{LLAMA_RESUME_AT}"
            universal = root / "universal" / f"global_step{LLAMA_RESUME_AT}_universal"
            assert convert_zero_to_universal(str(zero), str(universal), verify=True).verified
            cache[tp, pp, dp] = {"zero": zero, "universal": universal, "dump": root / "dump",
                                 "losses": root / "losses.jsonl"}
        return cache[tp, pp, dp]

    return get


# The MoE sources (``helpers.TINY_MOE``): name -> (tp, pp, ep, ZeRO stage, world size).
MOE_SOURCES = {"ep4_dp4": (1, 1, 4, 1, 4), "tp2pp2dp2_ep2": (2, 2, 2, 1, 8), "z2_ep2_dp4": (1, 1, 2, 2, 4)}


@pytest.fixture(scope="session")
def moe_runs(tmp_path_factory):
    """``get(name)`` -> {"zero", "universal", "dump", "losses"}: a real fp32 run of the tiny MoE model at the layout
    ``MOE_SOURCES[name]``, saved at MOE_SAVE_AT with its state dumped there (experts under their global
    names: ``helpers.dump_states``), then carried on to MOE_ITERS without saving (``losses``), converted by our converter (verified). Trained on first use, shared,
    read only."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            from dist_utils import run_distributed
            from helpers import MOE_ITERS, MOE_SAVE_AT, TINY_MOE, moe_cfg, train_and_dump
            from megatron_ucp.checkpoint.universal import convert_zero_to_universal

            tp, pp, ep, zero, world = MOE_SOURCES[name]
            root = tmp_path_factory.mktemp(f"moe_{name}")
            (root / "dump").mkdir()
            # the source run carries on one iteration without saving: the loss a resume is compared with
            run_distributed(train_and_dump, world, moe_cfg(tp, pp, ep, zero, save=str(root / "ckpt")),
                            str(root / "dump"), TINY_MOE, MOE_ITERS, str(root / "losses.jsonl"))
            zero_folder = root / "ckpt" / f"global_step{MOE_SAVE_AT}"
            universal = root / "universal" / f"global_step{MOE_SAVE_AT}_universal"
            assert convert_zero_to_universal(str(zero_folder), str(universal), verify=True).verified
            cache[name] = {"zero": zero_folder, "universal": universal, "dump": root / "dump",
                           "losses": root / "losses.jsonl"}
        return cache[name]

    return get
