"""DeepSpeed's tied-weight broadcast and torch's "c10d::broadcast_: an autograd kernel was not
registered ... may lead to silently incorrect behavior" warning.

At PP > 1 DeepSpeed's PipelineModule broadcasts the tied word embedding Parameter itself (not its
``.data``) with autograd on; torch's autograd fallback then leaves a hook on that leaf that warns on
every backward reaching it. These checks show, on the first and on the last stage of a PP2 GPTPipe,
that the warning comes from that parameter and that its gradient is nevertheless exactly the gradient
of the same computation in one process with no broadcast, which is why the trainer filters the warning
(``model.pipe.tied_broadcast_warning_filtered``) and only it.
"""

import os
import warnings

import pytest
import torch

from dist_utils import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
             make_vocab_size_divisible_by=8, hidden_dropout=0.0, attention_dropout=0.0)
VOCAB = 50


def _broadcast_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("c10d::broadcast_")]


class _Call(torch.nn.Module):
    """``module.<name>(x)`` as a forward, so that ``functional_call`` can swap the tied weight."""

    def __init__(self, module, name):
        super().__init__()
        self.module, self.name = module, name

    def forward(self, x):
        return getattr(self.module, self.name)(x)


def _tied_gradient(rank, world_size, out_dir):
    import deepspeed
    from torch.func import functional_call

    from megatron_ucp.config import ModelConfig
    from megatron_ucp.distributed import groups
    from megatron_ucp.families import family_of_model
    from megatron_ucp.layout.topology import ParallelLayout
    from megatron_ucp.model.pipe import TIED_WEIGHT, GPTPipe, tied_broadcast_warning_filtered

    deepspeed.init_distributed(dist_backend="gloo")
    state = groups.initialize(ParallelLayout.from_world_size(world_size, tp=1, pp=2))
    try:
        cfg = ModelConfig(vocab_size=VOCAB, **MODEL)
        model = GPTPipe(cfg, state, seed=1234, block=family_of_model(cfg).block)
        (comm,) = model.tied_comms.values()  # the one tie: word embedding <-> head
        module = comm["module"]  # this stage's EmbeddingLayer
        weight = module.get_parameter(TIED_WEIGHT)
        gen = torch.Generator().manual_seed(7)
        if state.coords.pp == 0:  # the first stage looks tokens up
            inputs, name = torch.randint(0, VOCAB, (2, 8), generator=gen), "forward"
        else:  # the last stage computes logits with the same weight
            inputs, name = torch.randn(2, 8, cfg.hidden_size, generator=gen), "head"
        fn = module if name == "forward" else module.head
        out = fn(inputs)
        probe = torch.randn(out.shape, generator=gen)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (out * probe).sum().backward()
        assert _broadcast_warnings(caught), [str(w.message) for w in caught]  # this is the warning's source
        assert weight.is_leaf and weight.grad_fn is None

        # The same computation in one process, with a fresh leaf in place of the broadcast parameter.
        ref = weight.detach().clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref_out = functional_call(_Call(module, name), {f"module.{TIED_WEIGHT}": ref}, (inputs,))
            (ref_out * probe).sum().backward()
        assert not _broadcast_warnings(caught)
        assert torch.equal(out, ref_out)
        assert weight.grad is not None and weight.grad.abs().sum() > 0
        assert torch.equal(weight.grad, ref.grad), (weight.grad - ref.grad).abs().max()

        # The filter silences exactly this warning: another UserWarning still gets through.
        weight.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with tied_broadcast_warning_filtered():
                (fn(inputs) * probe).sum().backward()
                warnings.warn("another warning", UserWarning)
        assert [str(w.message) for w in caught] == ["another warning"]
        assert torch.equal(weight.grad, ref.grad)
        with open(os.path.join(out_dir, f"rank{rank}.ok"), "w") as f:
            f.write(name)
    finally:
        groups.destroy()


def test_tied_weight_broadcast_warns_but_its_gradient_is_exact(tmp_path):
    run_distributed(_tied_gradient, 2, str(tmp_path))
    assert sorted(p.read_text() for p in tmp_path.glob("rank*.ok")) == ["forward", "head"]
