"""One reader of torch zip files (``checkpoint/torchzip.py``), checked against ``torch.load``.

Every byte-range reader (ZeRO index, converter, direct resharding, the HF ``.bin`` reader) locates
tensors through ``trust.load_file(meta=True)``. These tests give it files whose records are laid out
as no torch writer does (same names, same bytes: valid zips that ``torch.load`` reads as the
originals) and files that are damaged or crafted (records missing, extra, mis-sized, compressed;
views that are not stored bytes), and check that the converter's differential check
(``checkpoint/crosscheck.py``) catches a reader that computes offsets instead of looking them up.
The slow tests use real DeepSpeed checkpoints of our trainer (ZeRO-1 and ZeRO-3, DP2, fp32).
"""

import math
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from helpers import REPO, assert_fails, load_tool
from megatron_ucp.checkpoint import torchzip
from megatron_ucp.checkpoint.crosscheck import crosscheck_file
from megatron_ucp.checkpoint.trust import CheckpointError, load_file
from megatron_ucp.checkpoint.zero import FlatRef, read_into


@pytest.fixture(scope="module")
def craft():
    return load_tool("untrusted_inputs")


@pytest.fixture
def computed_offsets(monkeypatch):
    """The negative control: meta loads take torch's computed offsets, as before the reader existed."""
    monkeypatch.setattr(torchzip, "FORCE_COMPUTED_OFFSETS", True)


def _varied() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {"fp32": torch.randn(33, generator=g), "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
            "int64": torch.arange(7), "column": base[:, 2], "shared": base, "block": base[1:4, 2:6],
            "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "nested": [{"x": torch.ones(2, dtype=torch.float16)}]}


def _stored(path: str, t: torch.Tensor) -> torch.Tensor:
    """The meta tensor ``t`` of ``path`` with its bytes read where our reader says its storage is."""
    storage = t.untyped_storage()
    whole = torch.empty(storage.nbytes() // t.element_size(), dtype=t.dtype)
    read_into(FlatRef(path, storage._checkpoint_offset, whole.numel(), t.dtype), 0, whole)
    return whole.as_strided(t.shape, t.stride(), t.storage_offset())


def _all_read_as_torch_load(path: str) -> bool:
    want = dict(torchzip.tensors(torch.load(path, weights_only=True)))
    got = dict(torchzip.tensors(load_file(path, meta=True)))
    assert sorted(map(str, got)) == sorted(map(str, want))
    return all(torch.equal(_stored(path, t), want[where]) for where, t in got.items())


def _one_line_error(fn) -> str:
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- reordered records -------------------------------------------------------------------------------


def test_reordered_records_read_as_torch_load_reads_them(craft, tmp_path, monkeypatch):
    path = str(tmp_path / "varied.pt")
    torch.save(_varied(), path)
    order = craft.reorder_zip_records(path, path)
    assert order.index("data/0") > order.index("data/1")  # physically reversed
    assert _all_read_as_torch_load(path)
    assert crosscheck_file(path, every=True) > 0
    from megatron_ucp.checkpoint import trust
    monkeypatch.setattr(trust, "_trusted", True)  # --trust-checkpoint-code: full pickle, the same offsets
    assert _all_read_as_torch_load(path)
    monkeypatch.setattr(trust, "_trusted", False)
    monkeypatch.setattr(torchzip, "FORCE_COMPUTED_OFFSETS", True)  # negative control: torch's computed offsets
    assert not _all_read_as_torch_load(path)
    with pytest.raises(CheckpointError, match=rf"^{path}: the bytes our reader located .* differ from torch\.load's"):
        crosscheck_file(path)


def test_records_swapped_in_place_fool_only_the_computed_reader(craft, tmp_path, monkeypatch):
    """Two records of one size trade places, every other byte unchanged: torch.load reads the file as
    before, and so does our reader; the computed offsets read each one's bytes for the other."""
    path = str(tmp_path / "swapped.pt")
    a, b, c = torch.arange(10.0), torch.arange(10.0) + 100, torch.arange(10.0) + 200
    torch.save({"a": a, "b": b, "c": c}, path)
    craft.swap_records_in_place(path, "data/1", "data/2")
    assert all(torch.equal(torch.load(path, weights_only=True)[k], v) for k, v in dict(a=a, b=b, c=c).items())
    assert _all_read_as_torch_load(path)
    monkeypatch.setattr(torchzip, "FORCE_COMPUTED_OFFSETS", True)
    got = load_file(path, meta=True)
    assert torch.equal(_stored(path, got["a"]), a)  # data/0: torch looks its offset up
    assert torch.equal(_stored(path, got["b"]), c) and torch.equal(_stored(path, got["c"]), b)  # the bug


# --- damaged or crafted records ----------------------------------------------------------------------


def _saved(tmp_path, name="t.pt") -> str:
    path = str(tmp_path / name)
    torch.save({"a": torch.arange(10.0), "b": torch.ones(4, dtype=torch.bfloat16)}, path)
    return path


def test_an_unreferenced_record_is_refused(craft, tmp_path):
    path = _saved(tmp_path)
    craft.rewrite_torch_zip(path, path, add={"data/7": bytes(64)})
    assert torch.load(path, weights_only=True)["a"].sum() == 45  # torch.load ignores it
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: record t/data/7 is not referenced by the pickle (1 such records)"


def test_a_missing_record_is_refused(craft, tmp_path):
    path = _saved(tmp_path)
    craft.rewrite_torch_zip(path, path, drop=["data/1"])
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: the pickle references record t/data/1, which is missing"


def test_a_record_of_another_size_than_declared_is_refused(craft, tmp_path):
    path = _saved(tmp_path)
    data = torch.arange(11.0).numpy().tobytes()  # one element more than the pickle declares
    craft.rewrite_torch_zip(path, path, replace={"data/0": data})
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: record t/data/0 holds 44 bytes, but the pickle declares 10 torch.float32 elements (40 bytes) there"
    # the element size is the referencing storage's own: bf16's 4 elements are 8 bytes
    craft.rewrite_torch_zip(path, path, replace={"data/0": torch.arange(10.0).numpy().tobytes(), "data/1": bytes(16)})
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: record t/data/1 holds 16 bytes, but the pickle declares 4 torch.bfloat16 elements (8 bytes) there"


def test_a_compressed_record_is_refused(craft, tmp_path):
    path = _saved(tmp_path)
    craft.rewrite_torch_zip(path, path, compress=["data/0"])
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: record t/data/0 is compressed (method 8); torch.save stores records uncompressed"


def test_a_big_endian_file_is_refused(craft, tmp_path):
    path = _saved(tmp_path)
    craft.rewrite_torch_zip(path, path, replace={"byteorder": b"big"})
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: stored big-endian (record t/byteorder); only little-endian checkpoints are read"


def test_a_local_header_naming_another_record_is_refused(tmp_path):
    path = _saved(tmp_path)
    _, records = torchzip.read_records(path)
    raw = bytearray(open(path, "rb").read())
    at = records["data/1"].header_offset + 30 + len("t/data/")
    raw[at:at + 1] = b"9"
    open(path, "wb").write(raw)
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: record t/data/1: its local header names it 't/data/9'"


def test_records_in_two_archive_folders_are_refused(tmp_path):
    path = _saved(tmp_path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("u/extra", b"1")
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: records in 2 archive folders (['t', 'u']); a torch.save file has exactly one"


# --- views that are not stored bytes -----------------------------------------------------------------


@pytest.mark.parametrize("view,problem", [
    (lambda: torch.zeros(1).expand(1 << 20), "addresses some elements more than once"),
    (lambda: torch.zeros(4, 1).expand(4, 5), "addresses some elements more than once"),
    (lambda: torch.arange(10.0).as_strided((4, 3), (2, 1)), "addresses some elements more than once"),
])
def test_expanded_or_overlapping_views_are_refused_by_both_paths(tmp_path, view, problem):
    path = str(tmp_path / "view.pt")
    torch.save({"ok": torch.ones(2), "param": view()}, path)
    for meta in (True, False):
        msg = _one_line_error(lambda: load_file(path, meta=meta))
        assert msg.startswith(f"{path}: the tensor at param (shape ") and problem in msg, msg


def test_plain_views_are_accepted(tmp_path):
    path = str(tmp_path / "views.pt")
    base = torch.arange(60.0).view(5, 12)
    views = {"t": base.t(), "cols": base[:, ::3], "rows": base[1:3], "one": base[2, 5], "same": base[:1].expand(1, 12)}
    torch.save(views, path)
    assert _all_read_as_torch_load(path)


def test_a_view_beyond_its_storage_is_refused(craft, tmp_path):
    """A storage of 100 elements viewed as 150: torch.load refuses it (its storage cannot grow), while
    torch's meta loading grows the meta storage without a word; ours refuses it by the record's size."""
    path = str(tmp_path / "beyond.pt")
    torch.save({"p": torch.arange(200.0)[:150]}, path)
    assert _all_read_as_torch_load(path)  # the control
    pickled = zipfile.ZipFile(path).read("beyond/data.pkl")
    assert pickled.count(b"K\xc8") == 1  # BININT1 200: the storage's declared elements
    craft.rewrite_torch_zip(path, path, replace={"data.pkl": pickled.replace(b"K\xc8", b"K\x64"),
                                                 "data/0": torch.arange(100.0).numpy().tobytes()})
    with pytest.raises(RuntimeError, match="not resizable"):
        torch.load(path, weights_only=True, mmap=True)
    assert _one_line_error(lambda: load_file(path, meta=True)) == \
        f"{path}: the tensor at p (shape (150,), strides (1,)) needs 600 bytes of a storage of 400; refused"


_MEASURE = textwrap.dedent("""
    import resource, subprocess, sys
    p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    sys.stderr.write(p.stderr)
""")


def _run_measured(argv: list[str]) -> tuple[int, int, str]:
    """(exit status, the tool's peak RSS in KiB, its stderr), the tool run by a fresh launcher process so that
    RUSAGE_CHILDREN covers nothing else."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable] + argv, capture_output=True, text=True,
                       env=env, timeout=600)
    rc, rss = p.stdout.split()
    return int(rc), int(rss), p.stderr


@pytest.fixture(scope="module")
def tiny_hf(craft, tmp_path_factory):
    """A tiny real GPT-2 (transformers' save_pretrained) with its weights as a pytorch_model.bin."""
    pytest.importorskip("transformers")
    folder = str(tmp_path_factory.mktemp("hf") / "gpt2")
    craft.build_tiny_hf_gpt2(folder)
    tensors = craft._hf_tensors(folder)
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    return folder


@pytest.mark.parametrize("numel", [1 << 26, 1 << 40])
def test_a_stride0_bin_bomb_is_refused_in_little_memory(craft, tiny_hf, tmp_path, numel):
    folder = str(tmp_path / "bomb")
    craft._copy_hf_side_files(tiny_hf, folder)
    tensors = torch.load(os.path.join(tiny_hf, "pytorch_model.bin"), weights_only=True)
    tensors["transformer.h.0.ln_1.bias"] = torch.zeros(1).expand(numel)
    bomb = os.path.join(folder, "pytorch_model.bin")
    torch.save(tensors, bomb)
    assert os.path.getsize(bomb) < 200_000
    rc, rss_kib, err = _run_measured([os.path.join(REPO, "tools", "hf_to_universal.py"), "--hf_checkpoint_dir",
                                      folder, "--save_dir", str(tmp_path / "out")])
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {bomb}: the tensor at transformer.h.0.ln_1.bias (shape ({numel},), "
                               "strides (0,)) addresses some elements more than once"), err
    assert rss_kib < 300 * 1024, f"peak RSS {rss_kib} KiB"
    assert not os.path.exists(tmp_path / "out")


# --- a reordered pytorch_model.bin through import and export --------------------------------------


def test_a_reordered_bin_imports_and_exports_as_torch_load_reads_it(craft, tiny_hf, tmp_path, monkeypatch):
    from megatron_ucp.checkpoint.inspect import compare_universal
    from megatron_ucp.hf.from_universal import convert_universal_to_hf
    from megatron_ucp.hf.to_universal import convert_hf_to_universal

    folder = str(tmp_path / "reordered")
    craft._copy_hf_side_files(tiny_hf, folder, weights=True)
    bin_path = os.path.join(folder, "pytorch_model.bin")
    craft.reorder_zip_records(bin_path, bin_path)
    want = torch.load(bin_path, weights_only=True)
    plain = str(tmp_path / "u_plain" / "step0")
    convert_hf_to_universal(tiny_hf, plain)
    ours = str(tmp_path / "u" / "step0")
    convert_hf_to_universal(folder, ours)
    same = compare_universal(plain, ours, include_model_states=False)
    assert same.equal and same.compared > 0, same.summary()
    exported = str(tmp_path / "hf_out")
    convert_universal_to_hf(ours, exported, dtype="fp32")
    back = craft._hf_tensors(exported)
    assert back and set(back) <= set(want)
    for name, t in back.items():
        assert torch.equal(t, want[name]), name


def _twin_records(path: str) -> tuple[str, str]:
    """Two tensor records of one size and name length, neither data/0 (whose offset even torch's computed
    reader looks up)."""
    _, records = torchzip.read_records(path)
    by_size: dict[tuple[int, int], list[str]] = {}
    for name, rec in records.items():
        if name.startswith("data/") and name != "data/0":
            by_size.setdefault((rec.size, len(name)), []).append(name)
    pair = next(names for names in by_size.values() if len(names) >= 2)
    return pair[0], pair[1]


def test_computed_offsets_fail_the_bin_import_only_through_the_crosscheck(craft, tiny_hf, tmp_path, monkeypatch):
    """Negative control: two equal records of a .bin swapped in place. With torch's computed offsets the
    import reads each one's bytes for the other, and its own verification (the same reader) passes:
    only the comparison with torch.load refuses to publish."""
    from megatron_ucp.checkpoint.inspect import compare_universal
    from megatron_ucp.hf import to_universal

    folder = str(tmp_path / "swapped")
    craft._copy_hf_side_files(tiny_hf, folder, weights=True)
    bin_path = os.path.join(folder, "pytorch_model.bin")
    craft.swap_records_in_place(bin_path, *_twin_records(bin_path))
    plain = str(tmp_path / "u_plain" / "step0")
    to_universal.convert_hf_to_universal(tiny_hf, plain)
    right = str(tmp_path / "u_right" / "step0")
    to_universal.convert_hf_to_universal(folder, right)  # our reader: the same atoms
    assert compare_universal(plain, right, include_model_states=False).equal
    monkeypatch.setattr(torchzip, "FORCE_COMPUTED_OFFSETS", True)
    with pytest.raises(CheckpointError, match=rf"^{bin_path}: the bytes our reader located .* differ from torch\.load's"):
        to_universal.convert_hf_to_universal(folder, str(tmp_path / "u_wrong" / "step0"))
    assert not (tmp_path / "u_wrong" / "step0").exists()
    assert not (tmp_path / "u_wrong" / "latest_universal").exists()
    monkeypatch.setattr(to_universal, "crosscheck_files", lambda paths, every=False: 0)
    unchecked = str(tmp_path / "u_unchecked" / "step0")
    to_universal.convert_hf_to_universal(folder, unchecked)  # verified, and wrong
    assert not compare_universal(plain, unchecked, include_model_states=False).equal


def test_a_stride0_atom_is_refused_by_the_export(tiny_hf, tmp_path):
    from megatron_ucp.hf.from_universal import convert_universal_to_hf
    from megatron_ucp.hf.to_universal import convert_hf_to_universal

    universal = str(tmp_path / "u" / "step0")
    convert_hf_to_universal(tiny_hf, universal)
    atom = os.path.join(universal, "zero", "3.final_layernorm.weight", "fp32.pt")
    saved = torch.load(atom, weights_only=True)
    shape = tuple(saved["param"].shape)
    torch.save(dict(saved, param=torch.zeros(1).expand(shape)), atom)
    msg = _one_line_error(lambda: convert_universal_to_hf(universal, str(tmp_path / "hf")))
    assert msg == (f"{atom}: the tensor at param (shape {shape}, strides (0,)) addresses some elements more "
                   "than once (an expanded or overlapping view); refused")
    assert not (tmp_path / "hf").exists()


# --- real DeepSpeed checkpoints ------------------------------------------------------------------------

STAGES = {"zero1": 1, "zero3": 3}


@pytest.fixture(scope="module")
def real(tiny_checkpoints):
    """ZeRO-1 and ZeRO-3 checkpoints of our trainer (TP1 PP1 DP2, fp32; shared, read only) and their
    conversions."""
    return {name: tiny_checkpoints(stage) for name, stage in STAGES.items()}


def _reordered_copy(craft, folder, dst):
    shutil.copytree(folder, dst)
    for name in sorted(os.listdir(dst)):
        if name.endswith(".pt"):
            craft.reorder_zip_records(str(dst / name), str(dst / name))
    return dst


def _flat_by_torch_load(path: str, stage3: bool, group: int, key: str) -> torch.Tensor:
    osd = load_file(path, mmap=True, stub_deepspeed=True)["optimizer_state_dict"]
    if stage3:
        return osd["fp32_flat_groups"][group] if key == "fp32" else osd["optimizer_state_dict"]["state"][group][key]
    if key == "fp32":
        return osd["single_partition_of_fp32_groups"][group]
    return osd["base_optimizer_state"]["state"][group][key]


def _plans(ckpt, rules, tps=(1, 2)):
    """Every (parameter, state, target TP, target rank) read plan of ``ckpt``, also split in two DP windows,
    and as the direct loader makes the moments' plans: the fp32 master's, moved (``sliced.rebased``)."""
    from megatron_ucp.checkpoint.format import MASTER_KEY, MOMENT_KEYS
    from megatron_ucp.checkpoint.sliced import read_plan, rebased
    from megatron_ucp.training.sliced_load import ZeroSource

    source = ZeroSource(ckpt)
    for name, src in ckpt.param_sources.items():
        for key in (MASTER_KEY,) + tuple(MOMENT_KEYS):
            for tp in tps:
                for r in range(tp):
                    plan = read_plan(ckpt, src, rules[name], key, tp, r)
                    n = math.prod(plan.local_shape)
                    yield (name, key, tp, r), plan
                    yield (name, key, tp, r, "low"), read_plan(ckpt, src, rules[name], key, tp, r, window=(0, n // 3))
                    yield (name, key, tp, r, "high"), read_plan(ckpt, src, rules[name], key, tp, r, window=(n // 3, n))
                    if key != MASTER_KEY:
                        master = read_plan(ckpt, src, rules[name], MASTER_KEY, tp, r)
                        yield (name, key, tp, r, "moved"), rebased(master, source.moves(name, MASTER_KEY, key))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage", list(STAGES))
def test_reordered_shards_convert_and_reshard_as_torch_load_reads_them(real, craft, tmp_path, stage):
    from megatron_ucp.checkpoint.inspect import compare_universal
    from megatron_ucp.checkpoint.sliced import read_local
    from megatron_ucp.checkpoint.universal import conversion_rules, convert_zero_to_universal
    from megatron_ucp.checkpoint.zero import STATE_KEYS, open_zero_checkpoint

    zero, universal = real[stage]
    moved = _reordered_copy(craft, zero, tmp_path / "global_step2")
    out = tmp_path / "u" / "global_step2_universal"
    assert convert_zero_to_universal(str(moved), str(out)).verified
    same = compare_universal(str(universal), str(out), include_model_states=False)
    assert same.equal and same.compared > 0, same.summary()

    original, ckpt = open_zero_checkpoint(str(zero)), open_zero_checkpoint(str(moved))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    plans = dict(_plans(original, rules))
    for where, plan in _plans(ckpt, rules):
        assert torch.equal(read_local(plan), read_local(plans[where])), where
    for name, src in ckpt.param_sources.items():  # at the source's own layout: exactly what torch.load reads
        for key in STATE_KEYS:
            flat = [_flat_by_torch_load(ckpt.optim_file(0, 0, f.dp), stage == "zero3", src.group, key)
                    [f.start:f.start + f.numel] for f in src.fragments[0]]
            local = torch.cat(flat).view(src.local_shapes[0])
            got = read_local(plans[(name, key, 1, 0)])
            rows = rules[name].vocab_rows or local.shape[0]
            assert torch.equal(got[:rows], local[:rows]), (name, key)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stage", list(STAGES))
def test_no_planned_read_leaves_its_partition(real, stage):
    """Every byte range a direct reshard plans for a state lies inside that state's flat partition of one
    shard, at every target TP and in every DP window."""
    from megatron_ucp.checkpoint.universal import conversion_rules
    from megatron_ucp.checkpoint.zero import open_zero_checkpoint

    ckpt = open_zero_checkpoint(str(real[stage][0]))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    partitions: dict[str, list[tuple[str, int, int]]] = {}
    for groups in ckpt.flat_refs.values():
        for refs in groups:
            for key, ref in refs.items():
                partitions.setdefault(key, []).append((ref.path, ref.offset, ref.offset + ref.numel * ref.dtype.itemsize))
    reads = 0
    for where, plan in _plans(ckpt, rules):
        for r in plan.reads:
            end = r.offset + r.numel * plan.dtype.itemsize
            assert any(p == r.path and lo <= r.offset and end <= hi for p, lo, hi in partitions[where[1]]), (where, r)
            reads += 1
    assert reads > 100


@pytest.mark.slow
@pytest.mark.dist
def test_computed_offsets_fail_the_crosscheck_and_nothing_is_published(real, craft, tmp_path, monkeypatch, capsys):
    """Negative control: in one optimizer shard two equal-size records (Adam's two moments, or whichever
    pair is not data/0) trade places. Our reader converts it as the original; torch's computed offsets
    read each record's bytes for the other, and the converter's verification, reading with the same
    reader, passes: only the comparison with torch.load sees it, and the tool publishes nothing."""
    from megatron_ucp.checkpoint import universal as universal_mod
    from megatron_ucp.checkpoint.inspect import compare_universal

    zero, universal = real["zero1"]
    swapped = tmp_path / "global_step2"
    shutil.copytree(zero, swapped)
    shard = str(swapped / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    craft.swap_records_in_place(shard, *_twin_records(shard))
    right = tmp_path / "right" / "global_step2_universal"
    assert universal_mod.convert_zero_to_universal(str(swapped), str(right)).verified
    assert compare_universal(str(universal), str(right), include_model_states=False).equal

    monkeypatch.setattr(torchzip, "FORCE_COMPUTED_OFFSETS", True)
    tool = load_tool("ds_to_universal")
    parent = tmp_path / "wrong"
    parent.mkdir()
    rc = tool.main(["--input_folder", str(swapped), "--output_folder", str(parent / "global_step2_universal"),
                    "--quiet"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {shard}: the bytes our reader located for the tensor at "), err
    assert "differ from torch.load's" in lines[0]
    assert os.listdir(parent) == []  # no output folder, no staging leftovers, no latest_universal
    rc = tool.main(["--input_folder", str(swapped), "--output_folder", str(right), "--certify"])
    assert rc == 2 and f"error: {shard}: the bytes our reader located" in capsys.readouterr().err

    monkeypatch.setattr(universal_mod, "crosscheck_files", lambda paths, every=False: 0)
    unchecked = tmp_path / "unchecked" / "global_step2_universal"
    assert universal_mod.convert_zero_to_universal(str(swapped), str(unchecked)).verified  # verified, and wrong
    assert not compare_universal(str(universal), str(unchecked), include_model_states=False).equal


@pytest.mark.slow
@pytest.mark.dist
def test_a_zero3_shard_with_mixed_dtypes_is_refused_by_name(real, craft, tmp_path):
    """A ZeRO-3 shard whose exp_avg is bf16 beside fp32 states (elements no longer bytes / 4): refused
    when indexed, and, with an unreferenced record after it, for that record; a plan whose pieces mix
    dtypes is refused too, rather than read at one element size past a partition."""
    from megatron_ucp.checkpoint.sliced import read_plan
    from megatron_ucp.checkpoint.universal import conversion_rules
    from megatron_ucp.checkpoint.zero import open_zero_checkpoint

    zero, _ = real["zero3"]
    bad = tmp_path / "global_step2"
    shutil.copytree(zero, bad)
    shard = str(bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    first = str(bad / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    state = load_file(shard, mmap=False)
    inner = state["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]
    inner["exp_avg"] = inner["exp_avg"].to(torch.bfloat16)
    torch.save(state, shard)
    assert _one_line_error(lambda: open_zero_checkpoint(str(bad))) == \
        (f"{shard}: sub-group 0's exp_avg partition is stored as torch.bfloat16, but the fp32 master in {first} "
         "as torch.float32; mixed dtypes are not read")
    craft.rewrite_torch_zip(shard, shard, add={"data/999": bytes(26688)})
    assert _one_line_error(lambda: open_zero_checkpoint(str(bad))).startswith(
        f"{shard}: record zero_pp_rank_1_mp_rank_00_optim_states/data/999 is not referenced by the pickle")

    state = load_file(first, mmap=False)  # the whole sub-group of DP rank 0 in bf16: the others differ from it
    for key in ("exp_avg", "exp_avg_sq"):
        inner = state["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]
        inner[key] = inner[key].to(torch.bfloat16)
    flats = state["optimizer_state_dict"]["fp32_flat_groups"]
    flats[0] = flats[0].to(torch.bfloat16)
    shutil.copy(zero / "zero_pp_rank_1_mp_rank_00_optim_states.pt", shard)
    torch.save(state, first)
    assert _one_line_error(lambda: open_zero_checkpoint(str(bad))) == \
        (f"{shard}: sub-group 0's fp32 partition is stored as torch.float32, but the fp32 master in {first} "
         "as torch.bfloat16; mixed dtypes are not read")

    ckpt = open_zero_checkpoint(str(zero))  # the plan's own check, on an index changed in memory
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    ref = ckpt.flat_refs[(1, 0)][0]["exp_avg"]
    ckpt.flat_refs[(1, 0)][0]["exp_avg"] = FlatRef(ref.path, ref.offset, ref.numel, torch.bfloat16)
    name = next(n for n, s in ckpt.param_sources.items() if any(f.dp == 1 for f in s.fragments[0]))
    msg = _one_line_error(lambda: read_plan(ckpt, ckpt.param_sources[name], rules[name], "exp_avg", 1, 0))
    assert msg.startswith(f"{ref.path}: holds exp_avg of {name} as torch.bfloat16, but "), msg
