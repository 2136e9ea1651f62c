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


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """``get(zero_stage)`` -> (ZeRO folder, its universal conversion): a real checkpoint of the tiny GPT
    (``helpers.TINY_GPT``, TP1 PP1 DP2, fp32, saved at iteration 2), trained on first use and shared by
    every module that asks. They are read only: a test that changes files works on a copy."""
    cache: dict[int, tuple[Path, Path]] = {}

    def get(stage: int = 1) -> tuple[Path, Path]:
        if stage not in cache:
            from dist_utils import run_distributed
            from helpers import TINY_TRAIN, train_tiny
            from megatron_ucp.checkpoint.universal import convert_zero_to_universal

            root = tmp_path_factory.mktemp(f"tiny_zero{stage}")
            run_distributed(train_tiny, 2, dict(TINY_TRAIN, train_iters=2, save=str(root / "ckpt"), save_interval=2,
                                                zero_stage=stage))
            universal = root / "universal" / "global_step2_universal"
            convert_zero_to_universal(str(root / "ckpt" / "global_step2"), str(universal), workers=1)
            cache[stage] = (root / "ckpt" / "global_step2", universal)
        return cache[stage]

    return get
