"""One reader of torch zip files (``checkpoint/torchzip.py``), checked against ``torch.load``.

Every byte-range reader (ZeRO index, converter, direct resharding, the HF ``.bin`` reader) locates
tensors through ``trust.load_file(meta=True)``. These tests give it files whose records are laid out
as no torch writer does (same names, same bytes: valid zips that ``torch.load`` reads as the
originals) and files that are damaged or crafted (records missing, extra, mis-sized, compressed;
views that are not stored bytes), and check that the converter's differential check
(``checkpoint/crosscheck.py``) catches a reader that computes offsets instead of looking them up.
The slow tests use real DeepSpeed checkpoints of our trainer (ZeRO-1 and ZeRO-3, DP2, fp32).
"""

import json
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
