"""Small helpers shared by the tests (not a test module: it holds no tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from megatron_ucp.layout.slicing import bitwise_equal

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def assert_equal(actual, expected, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert bitwise_equal(actual, expected), f"{what}: not bitwise equal (max diff {(actual - expected).abs().max()})"


def assert_fails(fn, what: str) -> None:
    """Negative control: ``fn`` is a comparison that must fail, proving the check can see the error."""
    try:
        fn()
    except AssertionError:
        return
    raise AssertionError(f"negative control passed unexpectedly: {what}")


def load_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    assert p.shape == value.shape, f"value shape {tuple(value.shape)} does not fit parameter {tuple(p.shape)}"
    with torch.no_grad():
        p.copy_(value)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def close64(actual, expected, what: str) -> None:
    """float64 TP parity: TP only reorders floating-point sums (~1e-16 relative), while a real mistake (a
    wrong slice, a missing all-reduce, a bias added twice) is O(1)."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def same_forward_and_backward(dense, layer, x: torch.Tensor, g: torch.Tensor):
    """The TP = 1 layer and the TP layer on the same input and output gradient: their outputs and input
    gradients must be close (``close64``). Returns the dense output and the dense layer's parameter
    gradients by name."""
    xd, xl = leaf(x), leaf(x)
    yd = dense(xd)
    yd.backward(g)
    y = layer(xl)
    close64(y, yd.detach(), "layer output")
    y.backward(g)
    close64(xl.grad, xd.grad, "layer input grad")
    return yd, {n: p.grad for n, p in dense.named_parameters()}


def vouch_for(folder) -> None:
    """Mark a deliberately damaged universal folder as verified, so that the trainer loads it: the
    negative controls that use it test what the damage does to training, not the completion marker."""
    from megatron_ucp.checkpoint.publish import write_marker
    from megatron_ucp.checkpoint.universal import UNIVERSAL_KIND

    (Path(folder) / "megatron_ucp_complete.json").unlink(missing_ok=True)
    write_marker(str(folder), UNIVERSAL_KIND, {"test": "damaged on purpose"}, verified=True)


# The tiny GPT most real-checkpoint tests train, and the training settings they share.
TINY_GPT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0)
TINY_TRAIN = dict(micro_batch_size=1, global_batch_size=2, seq_length=16, dtype="fp32", mock_data=True, vocab_size=50,
                  eval_interval=0)


def train_tiny(rank, world_size, cfg_dict):
    """One rank of a training run of ``TINY_GPT`` (module level: ``run_distributed`` pickles it by name)."""
    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training.trainer import train

    train(TINY_GPT, TrainConfig(**cfg_dict))
