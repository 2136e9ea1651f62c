"""Multi-process trainer tests on gloo: layout-invariant init, exact resume, DeepSpeed's own converter."""

import os

import pytest
import torch

from dist_utils import run_distributed
from helpers import ds_args, read_losses, run_cfg
from megatron_ucp.config import ModelConfig, TrainConfig
from megatron_ucp.layout.params import model_params
from megatron_ucp.layout.slicing import bitwise_equal, merge, unpad_vocab

pytestmark = [pytest.mark.dist, pytest.mark.slow]

MODEL = dict(num_layers=4, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
             make_vocab_size_divisible_by=8, hidden_dropout=0.1, attention_dropout=0.1)
VOCAB = 50


def _dump_init(rank, world_size, tp, pp, out_dir):
    import deepspeed

    from megatron_ucp.distributed import groups
    from megatron_ucp.families import family_of_model
    from megatron_ucp.layout.topology import ParallelLayout
    from megatron_ucp.model.pipe import GPTPipe

    deepspeed.init_distributed(dist_backend="gloo")
    state = groups.initialize(ParallelLayout.from_world_size(world_size, tp=tp, pp=pp))
    try:
        cfg = ModelConfig(vocab_size=VOCAB, **MODEL)
        model = GPTPipe(cfg, state, seed=1234, block=family_of_model(cfg).block)
        torch.save({"coords": (state.coords.pp, state.coords.tp),
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        groups.destroy()


def _gather_full(out_dir, world_size, tp, tp_order=None):
    """Full, unpadded tensors assembled from every rank's dump (first stage wins for tied copies);
    ``tp_order`` reorders the TP ranks (a negative control)."""
    dumps = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
    cfg = ModelConfig(vocab_size=VOCAB, **MODEL)
    full = {}
    for info in model_params(cfg):
        holders = sorted((d["coords"], d["params"][info.name]) for d in dumps if info.name in d["params"])
        first_pp = holders[0][0][0]
        shards = [t for (pp, _), t in holders if pp == first_pp]
        assert len(shards) == tp, info.name
        if tp_order is not None:
            shards = [shards[r] for r in tp_order]
        t = merge(shards, info.kind)
        full[info.name] = unpad_vocab(t, VOCAB) if info.kind.value == "vocab" else t
    return full


def test_init_is_identical_at_tp1pp1_and_tp2pp2(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    run_distributed(_dump_init, 1, 1, 1, str(a))
    run_distributed(_dump_init, 4, 2, 2, str(b))
    full_a, full_b = _gather_full(a, 1, 1), _gather_full(b, 4, 2)
    assert full_a.keys() == full_b.keys()
    for name in full_a:
        assert bitwise_equal(full_a[name], full_b[name]), name
    # Negative control: the same dumps merged in the wrong TP order differ from TP1 in every sharded
    # parameter, so the equality above depends on each rank holding exactly its own slice.
    swapped = _gather_full(b, 4, 2, tp_order=[1, 0])
    cfg = ModelConfig(vocab_size=VOCAB, **MODEL)
    differing = 0
    for info in model_params(cfg):
        same = torch.equal(swapped[info.name], full_a[info.name])
        constant = info.spec.init.value in ("zeros", "ones")  # biases and norms look the same in any order
        assert same == (info.kind.value == "replicated" or constant), info.name
        differing += not same
    assert differing >= 4 * MODEL["num_layers"] + 1, differing  # QKV, dense, two MLP weights per layer, embedding


def _train(rank, world_size, model_kwargs, cfg_dict, finish_file=None):
    from megatron_ucp.training.trainer import train

    def on_finish(engine, model, state):  # the library hook: runs after the loop, before teardown
        with open(f"{finish_file}.rank{rank}", "w") as f:
            f.write(f"{engine.global_steps} {state.layout.tp} {state.layout.pp}")

    train(model_kwargs, TrainConfig(**cfg_dict), on_finish=on_finish if finish_file else None)


def _cfg(tmp_path, name, **kw):
    """TP2 PP2, six fp32 iterations saved every three, the losses logged to ``{name}.jsonl``."""
    return run_cfg(2, 2, **{"train_iters": 6, "lr_warmup_iters": 2, "save": str(tmp_path / "ckpt"),
                            "save_interval": 3, "loss_log": str(tmp_path / f"{name}.jsonl"), **kw})


def test_same_topology_resume_is_exact_in_fp32(tmp_path):
    """6 uninterrupted steps vs 3 + resume from global_step3: the same fp32 losses, bit for bit.

    Dropout is on, so this also checks the RNG states; the negative control resumes without them.
    """
    run_distributed(_train, 4, MODEL, _cfg(tmp_path, "full"), str(tmp_path / "finished"))
    full = read_losses(tmp_path / "full.jsonl")
    for rank in range(4):  # train()'s on_finish ran on every rank, with the engine after the last step
        assert (tmp_path / f"finished.rank{rank}").read_text() == "6 2 2"
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step6"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"
    resume = tmp_path / "resume"  # from the iteration-3 checkpoint (--load alone takes the newest complete one)
    run_distributed(_train, 4, MODEL, _cfg(tmp_path, "resumed", load=str(ckpt), save=str(resume), ckpt_step=3))
    resumed = read_losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[i] for i in (4, 5, 6)] == [full[i] for i in (4, 5, 6)]

    run_distributed(_train, 4, MODEL, _cfg(tmp_path, "norng", load=str(ckpt), save=str(resume), no_load_rng=True,
                                           ckpt_step=3))
    norng = read_losses(tmp_path / "norng.jsonl")
    assert norng[4] != full[4]  # other dropout masks: resuming without RNG states is detectably different

    # DeepSpeed's own converter accepts the checkpoint as written (no --inject_missing_state).
    from deepspeed.checkpoint import ds_to_universal

    out = tmp_path / "universal" / "global_step3_universal"
    ds_to_universal.main(ds_args(ckpt / "global_step3", out))
    assert (tmp_path / "universal" / "latest_universal").read_text() == "global_step3_universal"
    atom = torch.load(out / "zero" / "tied_modules.embed.word_embeddings.weight" / "fp32.pt", weights_only=False)
    assert atom["param"].shape == (VOCAB, 32) and atom["vocab_tensor"] is True and atom["cat_dim"] == 0
    row = torch.load(out / "zero" / "2.self_attention.dense.weight" / "fp32.pt", weights_only=False)
    assert row["cat_dim"] == 1 and row["param"].shape == (32, 32)
    ln = torch.load(out / "zero" / "5.final_layernorm.weight" / "fp32.pt", weights_only=False)
    assert "cat_dim" not in ln and ln["param"].shape == (32,)
