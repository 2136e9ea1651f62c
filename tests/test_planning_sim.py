"""Planning a direct reshard by simulation (``checkpoint.synthetic``, ``training.simulate``) and the compact
index of a checkpoint's shards (``checkpoint.compact_index``).

* The small-scale twin: the synthetic index of the tiny Llama saved at TP2 PP2 DP2 ZeRO-1 (fp32, the
  session's ``llama_runs``) equals ``open_zero_checkpoint``'s of the real checkpoint: every parameter's
  fragments, shapes and group, every flat partition's size and dtype, the steps, the model states'
  ``param_shapes``. Planning through it for TP1 PP2 DP2 gives, on every target rank, exactly the
  ``preadv`` calls, bytes and files the real direct reshard performed there (counted by the reader).
  Negative control: the synthetic index of another DP differs. The header pickles the simulation builds
  to price a rank's index reads are the real files' sizes to within 5%.
* The compact index the save wrote is used, and indexes the checkpoint exactly as the headers do (byte
  offsets included), so every target rank plans the same reads; a tampered index (an offset past the
  end of its file, a changed shard, an unknown version, a path as a shard's or a parameter's name, bad
  metadata) is ignored in favour of the files, the reason naming the index file.
* ``tools/benchmark_planning.py --tiny`` prints its tables and verdicts (no assertion on its times).
"""

import json
import os
import shutil
import zipfile

import pytest

from dist_utils import run_distributed
from helpers import LLAMA_RESUME_AT, TINY_LLAMA, llama_cfg, load_tool
from megatron_ucp.checkpoint.compact_index import COMPACT_INDEX_FILE
from megatron_ucp.checkpoint.synthetic import partition, synthetic_checkpoint
from megatron_ucp.checkpoint.zero import open_zero_checkpoint
from megatron_ucp.layout.topology import ParallelLayout
from megatron_ucp.training.simulate import index_cost, plan_rank, rank_windows, retarget
from megatron_ucp.training.sliced_load import LoadStats, ZeroSource, _plans

TARGET = ParallelLayout(tp=1, pp=2, dp=2)  # a TP merge: every target rank reads two source TP ranks' shards


@pytest.fixture(scope="module")
def zero(llama_runs):
    return llama_runs(2, 2, 2)["zero"]


def _index(ckpt):
    """What the planner uses of an index, comparable across indexes (steps as (value, dtype))."""
    return {
        "sources": {n: (s.pp, s.group, s.local_shapes, [[(f.dp, f.start, f.numel) for f in fr] for fr in s.fragments])
                    for n, s in ckpt.param_sources.items()},
        "flats": {k: [{key: (r.numel, r.dtype) for key, r in g.items()} for g in v] for k, v in ckpt.flat_refs.items()},
        "steps": {k: [(float(s), s.dtype) for s in v] for k, v in ckpt.steps.items()},
        "files": (ckpt.optim_files, ckpt.model_files),
        "shapes": [[dict(g) for g in st["param_shapes"]] for st in ckpt.model_states],
        "layout": (ckpt.tp, ckpt.pp, ckpt.dp, ckpt.zero_stage, ckpt.bf16_prefix, ckpt.iteration),
    }


def test_partition_pads_to_twice_dp():
    """DeepSpeed's rule: the group's flat buffer is padded to a multiple of 2 x DP; rank r owns [r P, (r+1) P)."""
    p = partition({"a": 5, "b": 7}, 4)  # 12 elements, padded to 16: P = 4
    assert p.size == 4 and p.fragments == {"a": [(0, 0, 4), (1, 0, 1)], "b": [(1, 1, 3), (2, 0, 4)]}
    p = partition({"a": 5, "b": 7}, 2)  # 12 is a multiple of 4: no padding
    assert p.size == 6 and p.fragments == {"a": [(0, 0, 5)], "b": [(0, 5, 1), (1, 0, 6)]}


@pytest.mark.dist
@pytest.mark.slow
def test_twin_index_equals_the_real_one(zero):
    real = open_zero_checkpoint(str(zero), compact=False)
    syn = synthetic_checkpoint(real.checkpoint_metadata, str(zero))
    assert real.index_note == "file headers" and syn.index_note == "synthetic headers"
    assert _index(syn) == _index(real)
    # negative control: the same model saved at another DP is another index
    other = synthetic_checkpoint(retarget(real.checkpoint_metadata, ParallelLayout(tp=2, pp=2, dp=1)), str(zero))
    assert _index(other)["sources"] != _index(real)["sources"]


@pytest.mark.dist
@pytest.mark.slow
def test_twin_index_bytes_match_the_real_files(zero):
    """The pickles ``index_cost`` builds for the headers are the real files' to within 5%: every byte of a
    file but its tensors' data (what reading its header reads)."""
    real = open_zero_checkpoint(str(zero), compact=False)
    cost = index_cost(real.checkpoint_metadata, repeats=1)

    def header_bytes(path):
        with zipfile.ZipFile(path) as z:
            return os.path.getsize(path) - sum(i.file_size for i in z.infolist() if "/data/" in i.filename)

    model = sum(header_bytes(p) for p in real.model_files)
    shards = sum(header_bytes(p) for p in real.optim_files.values())
    assert (cost.model_files, cost.shard_files) == (len(real.model_files), len(real.optim_files))
    assert abs(cost.model_bytes - model) <= 0.05 * model and abs(cost.shard_bytes - shards) <= 0.05 * shards, \
        (cost, model, shards)
    assert cost.compact_bytes < cost.shard_bytes


def _load_counting(rank, world_size, cfg_dict, out_dir):
    """Build and load (a direct reshard) at the run's layout; write what the reader did on this rank."""
    import contextlib
    import io

    from megatron_ucp.config import TrainConfig
    from megatron_ucp.training import checkpointing
    from megatron_ucp.training.trainer import Trainer

    real = checkpointing.sliced_universal_load
    seen = []

    @contextlib.contextmanager
    def counting(*args, **kwargs):
        with real(*args, **kwargs) as stats:
            seen.append(stats)
            yield stats

    checkpointing.sliced_universal_load = counting
    with Trainer(TINY_LLAMA, TrainConfig(**cfg_dict)) as trainer, contextlib.redirect_stdout(io.StringIO()):
        trainer.build()
        trainer.load()
        state = trainer.state
        coords = [state.rank_in("pp"), state.rank_in("tp"), state.rank_in("dp")]
    (stats,) = seen
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"coords": coords, "calls": stats.reads.calls, "nbytes": stats.reads.nbytes,
                   "files": sorted(os.path.basename(p) for p in stats.reads.files),
                   "state_bytes": stats.state_bytes}, f)


@pytest.mark.dist
@pytest.mark.slow
def test_twin_plans_the_reads_the_real_reshard_performs(zero, tmp_path):
    cfg = llama_cfg(TARGET.tp, TARGET.pp, train_iters=LLAMA_RESUME_AT, load=str(zero.parent))
    run_distributed(_load_counting, TARGET.world_size, cfg, str(tmp_path))
    real = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(TARGET.world_size)]

    meta = open_zero_checkpoint(str(zero)).checkpoint_metadata
    source = ZeroSource(synthetic_checkpoint(meta, str(zero)))
    target = synthetic_checkpoint(retarget(meta, TARGET), str(tmp_path / "target"))
    for done in real:
        plan = plan_rank(source, target, *done["coords"])
        assert (plan.preads, plan.read_bytes, plan.read_bytes) == (done["calls"], done["nbytes"], done["state_bytes"]), \
            (done, plan)
        files = sorted(os.path.basename(p) for p in {r.path for w in rank_windows(target, *done["coords"])
                                                    for p in _plans(source, LoadStats(), w.name, w.local_shape,
                                                                    target.tp, done["coords"][1], w.window).values()
                                                    for r in p.reads})
        assert plan.files == len(done["files"]) and files == done["files"], (files, done["files"])
    assert sum(d["nbytes"] for d in real) > 0 and all(d["calls"] > 0 for d in real)


def _all_plans(ckpt, target):
    """Every target rank's read plans through ``ckpt``."""
    source = ZeroSource(ckpt)
    out = []
    for pp in range(target.pp):
        for tp in range(target.tp):
            for dp in range(target.dp):
                for w in rank_windows(target, pp, tp, dp):
                    out.append(_plans(source, LoadStats(), w.name, w.local_shape, target.tp, tp, w.window))
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_compact_index_plans_the_same_reads(zero):
    assert (zero / COMPACT_INDEX_FILE).is_file()  # the save wrote it
    compact = open_zero_checkpoint(str(zero))
    headers = open_zero_checkpoint(str(zero), compact=False)
    assert compact.index_note == f"compact index {zero / COMPACT_INDEX_FILE}"
    assert compact.flat_refs == headers.flat_refs  # byte offsets included
    assert _index(compact) == _index(headers)
    target = synthetic_checkpoint(retarget(headers.checkpoint_metadata, TARGET), "/synthetic/target")
    assert _all_plans(compact, target) == _all_plans(headers, target)


def _shard(index: dict, i: int = 0) -> dict:
    return index["shards"][sorted(index["shards"])[i]]


def _bad_offset(index):
    _shard(index)["groups"][0]["exp_avg"][0] = _shard(index)["size"]


def _rename_shard(index):
    name = sorted(index["shards"])[0]
    index["shards"]["../" + name] = index["shards"].pop(name)


def _path_param(index):
    params = _shard(index)["groups"][0]["params"]
    params[0][0] = "../../escape"


def _model_entries(index: dict) -> dict:
    return index["model_states"][sorted(index["model_states"])[0]]["entries"]


def _bad_topology(index):
    _model_entries(index)["megatron_ucp"]["topology"]["tp"] = "two"


def _path_in_shapes(index):
    _model_entries(index)["param_shapes"][0][0][0] = "../escape"


def _version(index):
    index["version"] = 99


TAMPERED = {
    "offset_past_the_end": (_bad_offset, "runs past the end of"),
    "unknown_version": (_version, "not a megatron_ucp.zero_index version 1 file"),
    "path_as_shard_name": (_rename_shard, "not one of this folder's shards files"),
    "metadata_topology": (_bad_topology, "megatron_ucp.topology"),
    "path_in_param_shapes": (_path_in_shapes, "escape"),
    "path_as_param_name": (_path_param, "escape"),
}


@pytest.fixture
def copy(zero, tmp_path):
    dst = tmp_path / zero.name
    shutil.copytree(zero, dst)  # copy2: the shards keep their times, so the copied index still matches
    assert open_zero_checkpoint(str(dst)).index_note.startswith("compact index")  # the control
    return dst


@pytest.mark.parametrize("name", sorted(TAMPERED))
@pytest.mark.dist
@pytest.mark.slow
def test_tampered_compact_index_is_ignored(copy, zero, name):
    change, reason = TAMPERED[name]
    path = copy / COMPACT_INDEX_FILE
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))
    ckpt = open_zero_checkpoint(str(copy))
    assert ckpt.index_note.startswith(f"file headers ({path}: ") and reason in ckpt.index_note, ckpt.index_note
    assert "\n" not in ckpt.index_note
    assert _index(ckpt)["sources"] == _index(open_zero_checkpoint(str(zero), compact=False))["sources"]


@pytest.mark.dist
@pytest.mark.slow
def test_a_changed_shard_outdates_the_compact_index(copy):
    shard = sorted(copy.glob("*optim_states.pt"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))  # rewritten in place, same size
    note = open_zero_checkpoint(str(copy)).index_note
    assert note.startswith(f"file headers ({copy / COMPACT_INDEX_FILE}: ") and "changed or copied" in note, note


def test_benchmark_prints_its_tables(capsys):
    tool = load_tool("benchmark_planning")
    assert tool.main(["--tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| case" in out and "| target rank" in out and "read / owned" in out and "before: files" in out
    assert out.count("TP2 PP2 DP2 -> TP2 PP2 DP1 | busiest") == 1 and out.count("| median") == 2
    verdicts = [line for line in out.splitlines() if line.endswith(": met") or line.endswith(": NOT met")]
    assert len(verdicts) == 8, out
