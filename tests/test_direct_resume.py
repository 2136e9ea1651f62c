"""Direct resume: ``--load`` of a ZeRO checkpoint at another topology, no universal folder in between.

Each case trains a real fp32 source run (saving every RESUME_AT iterations), resumes from its
iteration-RESUME_AT checkpoint at a new TP/PP/DP/ZeRO stage, and checks:

* the gathered fp32 master weights and both Adam moments right after the load equal the source's
  bitwise, and equal what a universal conversion plus DeepSpeed's own loader gives (that route runs
  here too; DeepSpeed's converter where its output loads at the target, ours where it does not);
* the resumed run's losses follow the source run's (fp32): ≤ 1e-5 relative at the first step and
  ≤ 1e-5 absolute over the following ones;
* the trainer says what it did, and each rank read exactly the bytes of state it owns.

A negative control gives the loader a checkpoint whose metadata records a wrong layout.

The TP2 PP2 DP2 source trains with Megatron's sequence parallelism (``SOURCE_FLAGS``) and its targets run
without it: SP changes where activations live, never the state, so the same bitwise checks apply.
"""

import math
import os
import re
import shutil

import pytest
import torch

from dist_utils import run_distributed
from helpers import GPT4, assemble, ds_args, dump_states, read_losses, run_cfg, train_and_dump
from megatron_ucp.checkpoint.universal import certify_universal, convert_zero_to_universal
from megatron_ucp.config import TrainConfig
from megatron_ucp.layout.slicing import bitwise_equal

pytestmark = [pytest.mark.dist, pytest.mark.slow]

RESUME_AT, ITERS = 3, 23  # resume at 3, then 20 more steps compared with the source's

# name: (zero stage, tp, pp, dp, global batch)
SOURCES = {"z1_tp2pp2dp2": (1, 2, 2, 2, 4), "z1_tp1pp2dp2": (1, 1, 2, 2, 4), "z3_dp4": (3, 1, 1, 4, 4),
           "z1_dp3": (1, 1, 1, 3, 6)}


# Flags of a source run beyond its layout.
SOURCE_FLAGS = {"z1_tp2pp2dp2": {"sequence_parallel": True}}


def _cfg(stage, tp, pp, batch, **kw):
    return run_cfg(tp, pp, **{"zero_stage": stage, "global_batch_size": batch, "train_iters": ITERS,
                              "lr_warmup_iters": 2, "lr_decay_iters": ITERS, **kw})


def _run(rank, world_size, cfg_dict, dump_dir, dump_when, log_path):
    """Build, load, train; dump the state (DP rank 0 of each model-parallel rank) right after the load
    (``dump_when="load"``) or at the end (``"end"``); keep rank 0's printout in ``log_path``."""
    import contextlib
    import io

    from megatron_ucp.training.trainer import Trainer

    out = io.StringIO()
    with Trainer(GPT4, TrainConfig(**cfg_dict)) as trainer, contextlib.redirect_stdout(out):
        trainer.build()
        trainer.load()
        if dump_when == "load":
            dump_states(trainer, rank, dump_dir)
        trainer.run()
        if dump_when == "end":
            dump_states(trainer, rank, dump_dir)
    if rank == 0 and log_path:
        with open(log_path, "w") as f:
            f.write(out.getvalue())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per source layout: its checkpoint of iteration RESUME_AT with the state dumped there, and the
    losses of the same run continued to ITERS without interruption."""
    root = tmp_path_factory.mktemp("direct")
    out = {}
    for name, (stage, tp, pp, dp, batch) in SOURCES.items():
        dump = root / f"{name}_dump"
        dump.mkdir()
        cfg = _cfg(stage, tp, pp, batch, train_iters=RESUME_AT, save=str(root / name), save_interval=RESUME_AT,
                   **SOURCE_FLAGS.get(name, {}))
        # the source run carries on to ITERS without saving, logging the losses the resumes are compared with
        run_distributed(train_and_dump, tp * pp * dp, cfg, str(dump), GPT4, ITERS, str(root / f"{name}.jsonl"))
        out[name] = {"zero": root / name / f"global_step{RESUME_AT}", "dump": dump,
                     "losses": read_losses(root / f"{name}.jsonl"), "batch": batch}
    assert sorted(out["z1_dp3"]["losses"]) == list(range(RESUME_AT + 1, ITERS + 1))
    return root, out


def _state_bytes(dump_dir, vocab=50) -> int:
    """Bytes of fp32 state (master + two moments) the dumped model-parallel ranks hold, vocabulary
    padding rows excluded (they are zeros, not read)."""
    total = 0
    for f in sorted(os.listdir(dump_dir)):
        d = torch.load(os.path.join(dump_dir, f), weights_only=False)
        _, tp = d["coords"]
        for name, st in d["state"].items():
            t = st["fp32"]
            if "word_embeddings" in name or name.endswith("output_layer.weight"):
                rows = t.shape[0]
                kept = min(vocab, (tp + 1) * rows) - min(vocab, tp * rows)
                total += kept * math.prod(t.shape[1:]) * 3 * 4
            else:
                total += t.numel() * 3 * 4
    return total


# source, target (zero stage, tp, pp, dp), the reference route: converter + loader
CASES = [
    ("z1_tp2pp2dp2", (1, 1, 4, 1), ("deepspeed", "deepspeed")),
    # the same resume (Megatron SP on -> off) through our converter and our sliced loader
    ("z1_tp2pp2dp2", (1, 1, 4, 1), ("ours", "ours")),
    # DeepSpeed's ZeRO-3 loader needs optimizer_state.pt in the form ours writes
    ("z1_tp2pp2dp2", (3, 1, 1, 4), ("ours", "deepspeed")),
    # ZeRO-3 at TP 2 with the padded vocabulary: DeepSpeed's ZeRO-3 loader cannot slice TP (the trainer
    # refuses it there), so the reference is DeepSpeed's converter read by our sliced universal loader
    ("z1_tp1pp2dp2", (3, 2, 1, 2), ("deepspeed", "ours")),
    # DeepSpeed's converter writes ZeRO-3 atoms as raw flat tensors, which its ZeRO-1/2 loader cannot read
    ("z3_dp4", (1, 4, 1, 1), ("ours", "deepspeed")),
    ("z1_dp3", (1, 2, 1, 1), ("deepspeed", "deepspeed")),
]


def _reference(src, route, target, batch, tmp_path):
    """The classic route: converted to a universal folder, then loaded at the target."""
    converter, loader = route
    universal = tmp_path / "universal" / f"global_step{RESUME_AT}_universal"
    if converter == "deepspeed":
        from deepspeed.checkpoint import ds_to_universal

        ds_to_universal.main(ds_args(src["zero"], universal))
        certify_universal(str(src["zero"]), str(universal))
    else:
        assert convert_zero_to_universal(str(src["zero"]), str(universal), verify=True).verified
    stage, tp, pp, dp = target
    dump = tmp_path / "ref_dump"
    dump.mkdir()
    cfg = _cfg(stage, tp, pp, batch, train_iters=RESUME_AT, load=str(universal.parent), universal_checkpoint=True,
               universal_loader=loader)
    run_distributed(_run, tp * pp * dp, cfg, str(dump), "load", None)
    return dump


@pytest.mark.parametrize("source,target,route", CASES, ids=[f"{s}-to-z{t[0]}_tp{t[1]}pp{t[2]}dp{t[3]}-{'+'.join(r)}"
                                                                 for s, t, r in CASES])
def test_direct_resume(sources, tmp_path, source, target, route):
    root, all_src = sources
    src = all_src[source]
    stage, tp, pp, dp = target
    dump = tmp_path / "dump"
    dump.mkdir()
    log = tmp_path / "rank0.log"
    cfg = _cfg(stage, tp, pp, src["batch"], load=str(src["zero"].parent), loss_log=str(tmp_path / "resumed.jsonl"))
    run_distributed(_run, tp * pp * dp, cfg, str(dump), "load", str(log))

    want, _, _, _ = assemble(src["dump"], GPT4)
    got, padding, global_steps, lr_steps = assemble(dump, GPT4)
    ref, _, _, _ = assemble(_reference(src, route, target, src["batch"], tmp_path), GPT4)
    assert want.keys() == got.keys() == ref.keys()
    for key in want:
        assert bitwise_equal(want[key], got[key]), key
        assert bitwise_equal(ref[key], got[key]), key
    for key, pad in padding.items():
        assert not pad.any(), f"vocab padding rows of {key} are not zero"
    assert global_steps == RESUME_AT and lr_steps == RESUME_AT

    text = log.read_text()
    s_stage, s_tp, s_pp, s_dp, _ = SOURCES[source]
    assert (f"direct reshard TP{s_tp} PP{s_pp} DP{s_dp} ZeRO-{s_stage} fp32 -> TP{tp} PP{pp} DP{dp} ZeRO-{stage} fp32"
            in text), text
    per_rank = [int(b.replace(",", "")) for b in re.search(r"state bytes read per rank: ([\d, ]+)", text)
                .group(1).split(", ")]
    # Each model-parallel rank's state was read once per ZeRO partition of it: in all, the target's
    # model-parallel state exactly (tied copies on two stages count twice, padding rows not at all).
    assert len(per_rank) == tp * pp * dp and sum(per_rank) == _state_bytes(dump), per_rank

    resumed, baseline = read_losses(tmp_path / "resumed.jsonl"), src["losses"]
    assert sorted(resumed) == list(range(RESUME_AT + 1, ITERS + 1))
    first = RESUME_AT + 1
    assert abs(resumed[first] - baseline[first]) <= 1e-5 * abs(baseline[first]), (resumed[first], baseline[first])
    for it in resumed:
        assert abs(resumed[it] - baseline[it]) <= 1e-5, (it, resumed[it], baseline[it])


def _tampered(src_folder, dst_root, change):
    """A copy of a checkpoint whose metadata (in every model-state file) is changed by ``change``."""
    dst = dst_root / src_folder.parent.name
    shutil.copytree(src_folder.parent, dst)
    for f in (dst / src_folder.name).glob("*model_states.pt"):
        if "layer_" in f.name:
            continue
        state = torch.load(f, weights_only=False)
        change(state["megatron_ucp"])
        torch.save(state, f)
    return dst


def test_wrong_source_layout_fails(sources, tmp_path):
    """Negative controls: the placement comes from the source's recorded layout. A topology the files
    contradict is refused; a wrong vocabulary size (which rows are padding) loads, and the state
    comparison of the tests above catches it."""
    root, all_src = sources
    src = all_src["z1_tp2pp2dp2"]

    def wrong_topology(meta):
        # consistent in itself, contradicted by the files (format 3: sp and ep kept as the file has them)
        meta["topology"] = dict(meta["topology"], tp=4, pp=1, dp=2)
        meta["pipeline_parts"] = [0, meta["pipeline_parts"][-1]]

    load = _tampered(src["zero"], tmp_path / "topology", wrong_topology)
    cfg = _cfg(1, 1, 4, src["batch"], train_iters=RESUME_AT, load=str(load))
    with pytest.raises(Exception, match="our metadata records TP 4 x PP 1, but DeepSpeed recorded TP 2 x PP 2"):
        run_distributed(_run, 4, cfg, None, None, None)

    def wrong_vocabulary(meta):  # which rows are vocabulary and which padding
        meta["original_vocab_size"] = meta["model_config"]["vocab_size"] = 40

    load = _tampered(src["zero"], tmp_path / "vocab", wrong_vocabulary)
    dump = tmp_path / "dump"
    dump.mkdir()
    run_distributed(_run, 4, _cfg(1, 1, 4, src["batch"], train_iters=RESUME_AT, load=str(load)), str(dump), "load",
                    None)
    want, _, _, _ = assemble(src["dump"], GPT4)
    got, _, _, _ = assemble(dump, GPT4)
    differ = sorted({name for name, key in want if not bitwise_equal(want[(name, key)], got[(name, key)])})
    assert differ == ["tied_modules.embed.word_embeddings.weight"], differ


def _killed_mid_reshard(rank, world_size, cfg_dict, victim, after_reads):
    """A resume in which rank ``victim`` is SIGKILLed in the middle of its reads."""
    import signal

    import megatron_ucp.checkpoint.sliced as sliced
    import megatron_ucp.training.sliced_load as sliced_load

    if rank == victim:
        real, calls = sliced.read_local, [0]

        def read_then_die(plan, *args, **kwargs):
            calls[0] += 1
            if calls[0] > after_reads:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(plan, *args, **kwargs)

        sliced_load.read_local = read_then_die
    _run(rank, world_size, cfg_dict, None, None, None)


def _digest(folder) -> dict:
    import hashlib

    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rank_killed_during_a_direct_reshard_loses_nothing(sources, tmp_path):
    """SIGKILL of one rank mid-reshard: the job fails, the source checkpoint is untouched (the reshard
    writes nothing), and the rerun resumes with the source's state bitwise."""
    _, all_src = sources
    src = all_src["z1_tp2pp2dp2"]
    before = _digest(src["zero"].parent)
    cfg = _cfg(3, 1, 1, src["batch"], train_iters=RESUME_AT, load=str(src["zero"].parent))
    with pytest.raises(Exception, match="process 2 terminated with signal SIGKILL"):
        run_distributed(_killed_mid_reshard, 4, cfg, 2, 20)
    assert _digest(src["zero"].parent) == before
    dump = tmp_path / "dump"
    dump.mkdir()
    run_distributed(_run, 4, cfg, str(dump), "load", None)
    want, _, _, _ = assemble(src["dump"], GPT4)
    got, _, _, _ = assemble(dump, GPT4)
    assert want.keys() == got.keys() and all(bitwise_equal(want[k], got[k]) for k in want)
