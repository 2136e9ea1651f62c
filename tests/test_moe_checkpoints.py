"""MoE checkpoints through our converter and our loaders, at another expert layout, bit for bit.

Each source (``conftest.moe_runs``: the tiny MoE model, 8 experts, top-2, fp32, trained 2 iterations)
is loaded at another layout, by direct resume from its ZeRO folder and through our converter and sliced
universal loader; right after the load every global expert's fp32 master and both Adam moments (and
every other parameter's) must equal the source's, bitwise, gathered per rank under their global names
(``helpers.dump_states``). The run then trains on one iteration. Negative controls: experts loaded
into the wrong expert-parallel ranks, Adam moments taken from the wrong expert-data-parallel rank, and
a corrupted expert in a source shard, each of which the checks must see.
"""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from dist_utils import run_distributed
from helpers import (
    MOE_ITERS,
    MOE_SAVE_AT,
    TINY_MOE,
    assemble,
    assert_fails,
    load_and_dump,
    moe_cfg,
    read_losses,
)

from megatron_ucp.checkpoint.universal import certify_universal, convert_zero_to_universal
from megatron_ucp.checkpoint.zero import CheckpointError, open_zero_checkpoint
from megatron_ucp.layout.slicing import bitwise_equal

pytestmark = pytest.mark.slow

# source -> target (tp, pp, ep, ZeRO stage, world size)
CASES = {
    "ep4_dp4": (2, 2, 2, 1, 8),
    "tp2pp2dp2_ep2": (1, 4, 1, 1, 4),
    "z2_ep2_dp4": (1, 1, 4, 1, 4),
}
SOURCE_TEXT = {"ep4_dp4": "TP1 PP1 DP4 EP4 ZeRO-1", "tp2pp2dp2_ep2": "TP2 PP2 DP2 EP2 ZeRO-1",
               "z2_ep2_dp4": "TP1 PP1 DP4 EP2 ZeRO-2"}
EXPERT = re.compile(r"deepspeed_experts\.(\d+)\.")


def _load(src: dict, target, tmp_path, route: str, reversed_experts: bool = False):
    """Load ``src`` at ``target`` by ``route`` ("direct", "universal" or "deepspeed": DeepSpeed's own
    universal loader); returns (assembled state right after the load, rank 0's printout)."""
    tp, pp, ep, zero, world = target
    dump = tmp_path / "dump"
    dump.mkdir()
    if route == "direct":
        load = {"load": str(src["zero"].parent)}
    else:
        load = {"load": str(src["universal"].parent), "universal_checkpoint": True,
                "universal_loader": "deepspeed" if route == "deepspeed" else "ours"}
    cfg = moe_cfg(tp, pp, ep, zero, train_iters=MOE_ITERS, loss_log=str(tmp_path / "resumed.jsonl"), **load)
    run_distributed(load_and_dump, world, cfg, str(dump), TINY_MOE, str(tmp_path / "rank0.log"),
                    reversed_experts)
    got, _, global_steps, _ = assemble(dump, TINY_MOE)
    assert global_steps == MOE_SAVE_AT
    return got, (tmp_path / "rank0.log").read_text()


def _compare(want: dict, got: dict) -> None:
    """Every parameter's three states, bitwise; the experts' must be there, all of them."""
    assert want.keys() == got.keys()
    experts = {int(EXPERT.search(name).group(1)) for name, _ in want if EXPERT.search(name)}
    assert experts == set(range(TINY_MOE["num_experts"]))
    for key in want:
        assert bitwise_equal(want[key], got[key]), f"{key} differs after the load"


@pytest.mark.parametrize("route", ["direct", "universal"])
@pytest.mark.parametrize("source", list(CASES))
def test_moe_state_survives_an_expert_layout_change(moe_runs, tmp_path, source, route):
    src = moe_runs(source)
    tp, pp, ep, zero, world = CASES[source]
    want, _, _, _ = assemble(src["dump"], TINY_MOE)
    got, log = _load(src, CASES[source], tmp_path, route)
    _compare(want, got)
    dst = f"TP{tp} PP{pp} DP{world // (tp * pp)} EP{ep} ZeRO-{zero} fp32"
    s_ep = int(SOURCE_TEXT[source].split(" EP")[1].split()[0])
    route_line = (f"direct reshard {SOURCE_TEXT[source]} fp32 -> {dst}" if route == "direct"
                  else f"universal checkpoint, sliced loader, experts EP{s_ep} -> EP{ep}")
    assert route_line in log, log
    # training goes on at the new layout: the next loss is the uninterrupted run's, up to summation order
    resumed, baseline = read_losses(tmp_path / "resumed.jsonl"), read_losses(src["losses"])
    assert sorted(resumed) == [MOE_ITERS]
    assert math.isclose(resumed[MOE_ITERS], baseline[MOE_ITERS], rel_tol=1e-5), (resumed, baseline)


def test_deepspeed_universal_loader_reads_per_expert_atoms_at_ep1(moe_runs, tmp_path):
    """At EP 1 a target's local expert names are the global ones, which name the atoms' folders."""
    src = moe_runs("tp2pp2dp2_ep2")
    want, _, _, _ = assemble(src["dump"], TINY_MOE)
    got, log = _load(src, CASES["tp2pp2dp2_ep2"], tmp_path, "deepspeed")
    _compare(want, got)
    assert "universal checkpoint, DeepSpeed's loader, experts EP2 -> EP1" in log, log
    resumed, baseline = read_losses(tmp_path / "resumed.jsonl"), read_losses(src["losses"])
    assert math.isclose(resumed[MOE_ITERS], baseline[MOE_ITERS], rel_tol=1e-5), (resumed, baseline)


def test_experts_loaded_into_the_wrong_ranks_fail_the_check(moe_runs, tmp_path):
    src = moe_runs("z2_ep2_dp4")
    want, _, _, _ = assemble(src["dump"], TINY_MOE)
    got, _ = _load(src, CASES["z2_ep2_dp4"], tmp_path, "direct", reversed_experts=True)
    assert_fails(lambda: _compare(want, got), "experts permuted across expert-parallel ranks")
    wrong = [key for key in want if not bitwise_equal(want[key], got[key])]
    assert wrong and all(EXPERT.search(name) for name, _ in wrong), wrong


def test_moments_from_the_wrong_expert_data_parallel_rank_fail_the_check(moe_runs, tmp_path):
    """DP ranks 0 and 2 of the ZeRO-2 EP2 DP4 source are expert-data-parallel ranks 0 and 1 of expert-parallel
    rank 0: swapping their experts' exp_avg partitions is reading each rank's moments from the other."""
    src = moe_runs("z2_ep2_dp4")
    folder = tmp_path / "ckpt" / src["zero"].name
    shutil.copytree(src["zero"], folder)
    (tmp_path / "ckpt" / "latest").write_text(folder.name)
    ckpt = open_zero_checkpoint(str(folder))
    group = ckpt.experts.group
    paths = [ckpt.optim_file(0, 0, dp) for dp in (0, 2)]
    shards = [torch.load(p, weights_only=False) for p in paths]
    states = [s["optimizer_state_dict"]["base_optimizer_state"]["state"][group] for s in shards]
    assert states[0]["exp_avg"].shape == states[1]["exp_avg"].shape
    states[0]["exp_avg"], states[1]["exp_avg"] = states[1]["exp_avg"], states[0]["exp_avg"]
    for s, p in zip(shards, paths):
        torch.save(s, p)
    want, _, _, _ = assemble(src["dump"], TINY_MOE)
    got, _ = _load({"zero": folder}, CASES["z2_ep2_dp4"], tmp_path, "direct")
    assert_fails(lambda: _compare(want, got), "expert moments of the wrong expert-data-parallel rank")
    wrong = {(name, key) for name, key in want if not bitwise_equal(want[name, key], got[name, key])}
    assert wrong and all(key == "exp_avg" and EXPERT.search(name) for name, key in wrong), wrong


def test_a_corrupted_expert_fails_verification_naming_it(moe_runs, tmp_path):
    """One global expert's fp32 master bytes changed in a source shard after conversion: verifying the
    universal folder against the shards fails, naming that expert's atom."""
    src = moe_runs("ep4_dp4")
    folder = tmp_path / "zero"
    shutil.copytree(src["zero"], folder)
    universal = tmp_path / "universal"
    shutil.copytree(src["universal"], universal)
    ckpt = open_zero_checkpoint(str(folder))
    name = next(n for n in ckpt.param_sources if ".deepspeed_experts.5.dense_4h_to_h" in n)
    frag = ckpt.param_sources[name].fragments[0][0]
    ref = ckpt.flat_ref(0, 0, frag.dp, ckpt.param_sources[name].group, "fp32")
    assert frag.dp == 2  # expert 5 of 8 at EP4 lives on expert-parallel rank 2 = DP rank 2
    with open(ref.path, "r+b") as f:
        f.seek(ref.offset + (frag.start + 7) * 4)
        value = f.read(4)
        f.seek(ref.offset + (frag.start + 7) * 4)
        f.write(bytes(b ^ 0x40 for b in value))
    with pytest.raises(CheckpointError, match=re.escape(f"zero/{name}/fp32.pt")):
        certify_universal(str(folder), str(universal))


# --- A plain-DeepSpeed MoE checkpoint (tests/moe_foreign.py): no project model code, no metadata ---------

def _foreign_states(prefix) -> dict:
    """The per-rank dumps of ``moe_foreign.dump`` merged: {(name, state): tensor}."""
    out = {}
    for path in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        for name, states in torch.load(path, weights_only=False).items():
            out.update({(name, key): t for key, t in states.items()})
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """The foreign model trained 2 steps at EP2 over 4 DP ranks (ZeRO-1) and saved, its state dumped, and our
    converter's universal folder of it (DeepSpeed's defaults for the missing universal_checkpoint_info)."""
    import moe_foreign

    root = tmp_path_factory.mktemp("moe_foreign")
    run_distributed(moe_foreign.train_and_save, 4, 2, str(root / "ckpt"), str(root / "source"))
    zero = root / "ckpt" / moe_foreign.TAG
    universal = root / "universal" / f"{moe_foreign.TAG}_universal"
    report = convert_zero_to_universal(str(zero), str(universal), inject_missing_state=True)
    assert report.verified and report.topology == {"tp": 1, "pp": 1, "dp": 4, "ep": 2}
    return {"root": root, "zero": zero, "universal": universal, "source": _foreign_states(root / "source")}


def test_foreign_checkpoint_converts_and_loads_at_ep4_bitwise(foreign, tmp_path):
    """Our converter reads the plain-DeepSpeed folder (EP from its ep_size_2 group); a fresh plain-DeepSpeed
    model at EP4 loads the atoms through our sliced reader, every global expert's three states bitwise."""
    import moe_foreign

    want = foreign["source"]
    experts = {name for name, _ in want if ".deepspeed_experts." in name}
    assert len(experts) == moe_foreign.LAYERS * moe_foreign.EXPERTS * 2  # up and down of every global expert
    atoms = {p.name for p in (foreign["universal"] / "zero").iterdir()} - {"optimizer_state.pt"}
    assert atoms == {name for name, _ in want}
    for (name, key), t in want.items():  # the atoms hold the source's live state
        atom = torch.load(foreign["universal"] / "zero" / name / f"{key}.pt", weights_only=False)["param"]
        assert bitwise_equal(atom, t), (name, key)
    run_distributed(moe_foreign.load_and_dump, 4, 4, str(foreign["universal"]), str(tmp_path / "loaded"))
    got = _foreign_states(tmp_path / "loaded")
    assert got.keys() == want.keys()
    for key in want:
        assert bitwise_equal(got[key], want[key]), key


@pytest.mark.parametrize("inject", [False, True])
def test_deepspeed_converter_refuses_the_foreign_moe_checkpoint(foreign, tmp_path, inject):
    """DeepSpeed 0.19.8's own converter: without universal_checkpoint_info it refuses; with
    --inject_missing_state it merges both expert-parallel ranks' fragments of a local expert name into
    one atom and fails reshaping it (twice the elements)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(foreign["zero"]),
           "--output_folder", str(tmp_path / "ds"), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(cmd + (["--inject_missing_state"] if inject else []), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    # an expert's up [32, 16] or down [16, 32] weight (512 elements), whichever a worker merges first
    want = (r"RuntimeError: shape '\[(32, 16|16, 32)\]' is invalid for input of size 1024" if inject else
            r"AssertionError: Required universal_checkpoint_info state is missing in checkpoint")
    assert re.search(want, done.stderr), done.stderr[-2000:]


def test_deepspeeds_expert_files_catch_an_index_that_misplaces_experts(moe_runs, tmp_path, monkeypatch):
    """Verification against the shards shares the index that names experts globally with the writer; the
    per-expert files DeepSpeed saved from the modules do not. An index that swaps the expert-parallel
    ranks converts into atoms that match the shards as indexed but not those files."""
    from megatron_ucp.checkpoint.zero import ExpertIndex

    src = moe_runs("ep4_dp4")
    real = ExpertIndex.global_name

    def swapped(self, local, dp, where):
        return real(self, local, self.placement.ep - 1 - dp % self.placement.ep, where)

    monkeypatch.setattr(ExpertIndex, "global_name", swapped)
    with pytest.raises(CheckpointError, match=r"deepspeed_experts\.\d+\.[\w.]+/fp32\.pt: does not match global "
                                              r"expert \d+'s weight in .*layer_\d+_expert_\d+_mp_rank_00"):
        convert_zero_to_universal(str(src["zero"]), str(tmp_path / "universal"))
    assert not (tmp_path / "universal").exists()


def test_a_foreign_folder_whose_expert_parallel_size_cannot_be_told_is_refused(foreign, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(foreign["zero"], folder)
    for path in folder.glob("*_optim_states.pt"):
        saved = torch.load(path, weights_only=False)
        groups = saved["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        assert [g["name"] for g in groups] == ["all", "ep_size_2"]
        groups[1]["name"] = "experts"
        torch.save(saved, path)
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: cannot tell the expert "
                                              r"parallel size: optimizer group 1 is marked moe but named 'experts'"):
        open_zero_checkpoint(str(folder))


@pytest.mark.parametrize("source", ["z2_ep2_dp4", "tp2pp2dp2_ep2"])
def test_same_layout_moe_resume_is_deepspeeds_native_path(moe_runs, tmp_path, source):
    """At the source's own layout the trainer leaves the load to DeepSpeed (its expert files read by the
    target's ep rank; the pipeline engine's module load for the PP2 source): the same state, bitwise."""
    src = moe_runs(source)
    tp, pp, ep = {"z2_ep2_dp4": (1, 1, 2), "tp2pp2dp2_ep2": (2, 2, 2)}[source]
    zero, world = (2, 4) if source == "z2_ep2_dp4" else (1, 8)
    want, _, _, _ = assemble(src["dump"], TINY_MOE)
    got, log = _load(src, (tp, pp, ep, zero, world), tmp_path, "direct")
    _compare(want, got)
    assert f"same layout ({SOURCE_TEXT[source]} fp32)" in log, log
    resumed, baseline = read_losses(tmp_path / "resumed.jsonl"), read_losses(src["losses"])
    assert resumed[MOE_ITERS] == baseline[MOE_ITERS]  # the same layout: the same arithmetic


@pytest.mark.parametrize("ep", [1, 4])
def test_route_names_the_expert_layout_and_refuses_deepspeeds_loader_above_ep1(moe_runs, ep):
    """DeepSpeed's universal loader would read global experts 0..E/ep-1 on every expert-parallel rank (the
    atoms are per global expert, it asks by local name): refused at EP > 1, named at EP 1."""
    from types import SimpleNamespace

    from megatron_ucp.config import TrainConfig
    from megatron_ucp.layout.topology import ParallelLayout
    from megatron_ucp.training.checkpointing import load_route

    src = moe_runs("z2_ep2_dp4")
    state = SimpleNamespace(layout=ParallelLayout(tp=1, pp=1, dp=4, ep=ep))
    cfg = TrainConfig(**moe_cfg(1, 1, ep, 1, load=str(src["universal"].parent), universal_checkpoint=True,
                                universal_loader="deepspeed"))
    if ep == 1:
        assert load_route(str(src["universal"]), True, state, cfg) == (
            "universal checkpoint, DeepSpeed's loader, experts EP2 -> EP1", None)
        return
    with pytest.raises(CheckpointError, match=r"_universal: DeepSpeed's universal loader reads each expert's atom by "
                                              r"this run's local parameter name, which at EP 4 is another global "
                                              r"expert on every expert-parallel rank but the first"):
        load_route(str(src["universal"]), True, state, cfg)


def test_loading_benchmark_moe_part_quick(tmp_path):
    """``tools/benchmark_loading.py --quick --parts moe``: direct and sliced within the criterion at EP4 and EP1,
    every loader's state equal to the direct resume's, DeepSpeed's loader only at EP1."""
    import json

    from helpers import load_tool

    bl = load_tool("benchmark_loading")
    out = tmp_path / "moe.json"
    assert bl.main(["--quick", "--parts", "moe", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["moe"]["rows"]
    assert [(r["target"], r["loader"]) for r in rows] == [
        ("TP1 PP1 DP4 EP4 ZeRO-1", "direct"), ("TP1 PP1 DP4 EP4 ZeRO-1", "sliced"),
        ("TP1 PP1 DP4 EP1 ZeRO-1", "direct"), ("TP1 PP1 DP4 EP1 ZeRO-1", "sliced"),
        ("TP1 PP1 DP4 EP1 ZeRO-1", "deepspeed")]
    assert all(r["criterion"] == "PASS" for r in rows if r["loader"] != "deepspeed")
    assert rows[0]["route"] == ("direct reshard TP1 PP1 DP4 EP2 ZeRO-1 fp32 -> TP1 PP1 DP4 EP4 ZeRO-1 fp32")
