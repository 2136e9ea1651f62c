"""Property-based differential tests: every reader gives exactly what torch.load reads, or refuses in one line.

The oracle is ``torch.load(path, weights_only=True)``. For each example, a reader of ours either gives
exactly the oracle's tensors (names, dtypes, shapes, bits) or raises a one-line ``CheckpointError``
naming the file; it never gives tensors from a file the oracle refuses, never raises anything else,
and never takes more memory than the file's largest real tensor times a small factor plus a constant
(the process's peak resident set, reset before each example through ``/proc/self/clear_refs``).

Inputs:
* forged files (``torchzip_forge``): every storage's dtype, declared size and bytes, every tensor's
  offset, shape and stride, the records' physical order and alignment, unreferenced and missing
  records, and truncation, each drawn by ``hypothesis``;
* a real DeepSpeed ZeRO checkpoint of our trainer, one shard mutated (record order, truncation, a
  metadata value replaced by one of another type), through the converter, the sliced (direct reshard)
  read plans and inspect.

Examples are derandomised: the same ones run every time. The fast tier runs a few of each, the full
suite many more (``FAST`` and ``FULL``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchzip_forge as forge
from megatron_ucp.checkpoint.trust import CheckpointError
from megatron_ucp.hf.reader import BIN_FILE, open_hf_checkpoint
from megatron_ucp.layout.slicing import bitwise_equal

FAST, FULL = 40, 1000
MEMORY_CONSTANT = 64 << 20  # bytes a reader may take beyond a few copies of its largest real tensor
MEMORY_FACTOR = 4
REASONS: list[str] = []  # the refusals' messages (without the file), for the printed summary


def _settings(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (``VmRSS``: resident now; ``VmHWM``: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _peak() -> int:
    return _status_bytes("VmHWM")


def _rss() -> int:
    return _status_bytes("VmRSS")


# --------------------------------------------------------------------------------------------------
# Forged files
_ELEMENT = {d: torch.empty(0, dtype=d).element_size() for d in forge.DTYPES}


@st.composite
def storages(draw) -> forge.Storage:
    dtype = draw(st.sampled_from(forge.DTYPES))
    n = draw(st.integers(0, 24))
    if dtype is torch.bool:
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        data = draw(st.binary(min_size=n * _ELEMENT[dtype], max_size=n * _ELEMENT[dtype]))
    declared = draw(st.sampled_from(["honest"] * 12 + ["other", "huge"]))
    numel = {"honest": n, "other": draw(st.integers(0, 40)), "huge": 2**40 // _ELEMENT[dtype]}[declared]
    return forge.Storage(data, dtype, numel)


@st.composite
def views(draw, key: str, s: forge.Storage) -> forge.View:
    n = len(s.data) // _ELEMENT[s.dtype]
    if draw(st.booleans()):  # the whole storage, as torch.save writes a contiguous tensor
        return forge.View(key, 0, (n,), (1,))
    ndim = draw(st.integers(0, 3))
    size = tuple(draw(st.sampled_from([0, 1, 2, 3, 4, 2**26])) if draw(st.integers(0, 9)) == 0
                 else draw(st.integers(0, 4)) for _ in range(ndim))
    stride = tuple(draw(st.integers(0, 6)) for _ in range(ndim))
    offset = draw(st.sampled_from([0, 0, 0, 1, 3, n, 2**40]))
    return forge.View(key, offset, size, stride)


@st.composite
def forged(draw) -> tuple[forge.Forge, int | None]:
    f = forge.Forge()
    for k in range(draw(st.integers(1, 3))):
        f.storages[str(k)] = draw(storages())
    keys = sorted(f.storages)
    for i in range(len(keys) + draw(st.integers(0, 2))):  # every storage used (an unused one is drawn below)
        key = keys[i] if i < len(keys) else draw(st.sampled_from(keys))
        f.tensors[f"t{i}"] = draw(views(key, f.storages[key]))
    if draw(st.booleans()):
        f.extra["step"] = draw(st.sampled_from([3, 2.5, "x", None, [1, 2]]))
    f.order = draw(st.permutations(sorted(f.storages)))
    f.align = draw(st.sampled_from([64, 1]))
    if draw(st.integers(0, 9)) == 0:
        f.unreferenced[str(len(f.storages) + 1)] = b"\0" * 8
    if draw(st.integers(0, 9)) == 0:
        f.missing = (draw(st.sampled_from(sorted(f.storages))),)
    cut = draw(st.integers(0, 4000)) if draw(st.integers(0, 9)) == 0 else None
    return f, cut


def _write_forged(f: forge.Forge, cut: int | None, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / BIN_FILE
    forge.write(f, path)
    if cut is not None and cut < os.path.getsize(path):
        os.truncate(path, cut)
    return path


def _check_refusal(e: Exception, path: Path) -> None:
    msg = str(e)
    assert isinstance(e, CheckpointError), f"{type(e).__name__} instead of a CheckpointError: {msg}"
    assert "\n" not in msg and str(path) in msg, f"not one line naming {path}: {msg!r}"


def _same_tensors(got: dict, expected: dict, what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: names {sorted(got)} != torch.load's {sorted(expected)}"
    for name, t in expected.items():
        g = got[name]
        assert (g.dtype, tuple(g.shape)) == (t.dtype, tuple(t.shape)), f"{what}: {name} {g.dtype} {tuple(g.shape)}"
        assert bitwise_equal(g.contiguous(), t.contiguous()), f"{what}: {name} differs from torch.load's"


def check_hf_bin_reader(path: Path) -> str:
    """The HF ``.bin`` reader (``HFCheckpoint.read``) against the oracle; returns what happened."""
    expected = forge.oracle(path)
    base = _rss()
    _peak_reset()
    try:
        ckpt = open_hf_checkpoint(str(path.parent))
        got = {name: ckpt.read(name) for name in ckpt.names()}
    except Exception as e:  # noqa: BLE001 - the property: only a one-line CheckpointError
        _check_refusal(e, path)
        outcome = "refused"
        REASONS.append(str(e).split(": ", 1)[1][:60])
    else:
        assert expected is not None, f"torch.load refuses {path}, but the reader read {sorted(got)}"
        _same_tensors(got, {k: v for k, v in expected.items() if torch.is_tensor(v)}, "HF .bin reader")
        outcome = "read"
    _check_peak(base, path.parent)
    return outcome


def check_meta_index(path: Path) -> str:
    """The shard index's reader (``trust.load_file(meta=True)`` and ``FlatRef``) against the oracle: each
    contiguous tensor it locates holds exactly the oracle's bytes."""
    from megatron_ucp.checkpoint.trust import load_file
    from megatron_ucp.checkpoint.zero import FlatRef, read_into

    expected = forge.oracle(path)
    try:
        meta = load_file(str(path), meta=True)
        got = {}
        for name, t in meta.items():
            if not torch.is_tensor(t):
                continue
            if not t.is_contiguous():
                continue  # the shard readers take flat tensors only; HFCheckpoint covers views
            ref = FlatRef.of(str(path), t)
            buf = torch.empty(ref.numel, dtype=ref.dtype)
            read_into(ref, 0, buf)
            got[name] = buf.view(t.shape)
    except Exception as e:  # noqa: BLE001 - the property: only a one-line CheckpointError
        _check_refusal(e, path)
        return "refused"
    assert expected is not None, f"torch.load refuses {path}, but the index read {sorted(got)}"
    _same_tensors(got, {k: v for k, v in expected.items() if k in got}, "shard index")
    return "read"


def _forged_property(tmp_path_factory, n: int):
    folder = tmp_path_factory.mktemp("forged") / "hf"
    outcomes: dict[str, int] = {}

    @_settings(n)
    @given(forged())
    def prop(example):
        f, cut = example
        path = _write_forged(f, cut, folder)
        key = f"bin {check_hf_bin_reader(path)}, index {check_meta_index(path)}"
        outcomes[key] = outcomes.get(key, 0) + 1

    prop()
    print(f"{n} forged files:", outcomes)
    kinds: dict[str, int] = {}
    for r in REASONS:
        kinds[" ".join(r.split()[:3])] = kinds.get(" ".join(r.split()[:3]), 0) + 1
    print("refusals, by their first words:", kinds)
    REASONS.clear()
    return outcomes


def test_forged_files_read_exactly_or_refused(tmp_path_factory):
    outcomes = _forged_property(tmp_path_factory, FAST)
    assert any("bin read" in k for k in outcomes), outcomes  # the examples include honest files


@pytest.mark.slow
def test_forged_files_read_exactly_or_refused_many(tmp_path_factory):
    outcomes = _forged_property(tmp_path_factory, FULL)
    assert any("bin read" in k for k in outcomes) and any("refused" in k for k in outcomes), outcomes


def test_negative_control_the_property_sees_a_wrong_reader(tmp_path, monkeypatch):
    """A reader that reads the wrong bytes (every tensor from the first record's place) fails the property."""
    from megatron_ucp.hf import reader

    t = {"a": torch.arange(6, dtype=torch.float32), "b": torch.arange(6, dtype=torch.float32) * -1}
    f = forge.honest(t)
    path = _write_forged(f, None, tmp_path / "hf")
    assert check_hf_bin_reader(path) == "read"
    first = {}
    real_read_into = reader.read_into

    def wrong(ref, start, dst):
        first.setdefault("ref", ref)
        return real_read_into(first["ref"], start, dst)

    monkeypatch.setattr(reader, "read_into", wrong)
    with pytest.raises(AssertionError, match="differs from torch.load's"):
        check_hf_bin_reader(path)


# --------------------------------------------------------------------------------------------------
# A real DeepSpeed checkpoint, one file mutated, through the converter, the sliced reads and inspect
REAL_FAST, REAL_FULL = 8, 100
STEP = "global_step2"


@pytest.fixture(scope="module")
def real(tiny_checkpoints):
    """A real ZeRO-1 checkpoint (TP1 PP1 DP2, fp32; shared, read only), its conversion and its parameters'
    full fp32 tensors."""
    zero, ref = tiny_checkpoints(1)
    return zero, ref, _full_tensors(zero)


def _full_tensors(zero: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master as one tensor, through the sliced read plans (the direct reshard's)."""
    from megatron_ucp.checkpoint.sliced import read_local, read_plan
    from megatron_ucp.checkpoint.universal import conversion_rules
    from megatron_ucp.checkpoint.zero import open_zero_checkpoint

    ckpt = open_zero_checkpoint(str(zero))
    rules = conversion_rules(ckpt, strict=True, inject_missing_state=False)
    return {name: read_local(read_plan(ckpt, src, rules[name], "fp32", 1, 0))
            for name, src in ckpt.param_sources.items()}


def _restricted_load(path: Path):
    """torch.load's own reading, through the allowlist (None: refused)."""
    from megatron_ucp.checkpoint.trust import load_file

    try:
        return load_file(str(path), mmap=False)
    except CheckpointError:
        return None


_VALUES = [None, -1, "x", 2**40, [], {}, 1.5, float("inf"), True]


@st.composite
def mutations(draw, files: list[str]):
    name = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["reorder", "reforge", "truncate", "metadata", "record", "symlink"]))
    if kind in ("reorder", "symlink"):
        return name, kind, draw(st.integers(0, 2**16))
    if kind == "reforge":
        return name, kind, draw(st.integers(0, 2**16))
    if kind == "truncate":
        return name, kind, draw(st.integers(0, 10**6))
    if kind == "metadata":
        return name, kind, (draw(st.integers(0, 10**6)), draw(st.sampled_from(_VALUES)))
    change = draw(st.sampled_from(["dtype", "numel", "offset", "stride0", "shape"]))
    return name, kind, (draw(st.integers(0, 10**6)), change, draw(st.sampled_from(forge.DTYPES)))


def _leaf_paths(obj, path=()) -> list[tuple]:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else None
    if items is None:
        return [path]
    return [path] + [p for k, v in items for p in _leaf_paths(v, (*path, k))]


def _replace(obj, path, value):
    if not path:
        return value
    obj[path[0]] = _replace(obj[path[0]], path[1:], value)
    return obj


def _record_change(change: str, dtype: torch.dtype):
    def mutate(v: forge.View, s: forge.Storage):
        n = max(s.numel, 1)
        if change == "dtype":
            s = forge.Storage(s.data, dtype, len(s.data) // _ELEMENT[dtype])
            return forge.View(v.key, 0, (s.numel,), (1,)), s
        if change == "numel":
            return v, forge.Storage(s.data, s.dtype, s.numel + 1)
        if change == "offset":
            return forge.View(v.key, v.offset + 1, v.size, v.stride), s
        if change == "stride0":
            return forge.View(v.key, 0, (2**26,), (0,)), s
        return forge.View(v.key, 0, (n + 1,), (1,)), s
    return mutate


def _mutate(path: Path, kind: str, arg) -> None:
    from megatron_ucp.checkpoint.trust import load_file

    if kind == "symlink":  # the file becomes a link: to a sibling, or to a copy of itself outside the folder
        siblings = sorted(p for p in path.parent.iterdir() if p.suffix == ".pt")
        target = siblings[arg % len(siblings)]
        if target == path:
            outside = path.parents[2] / "outside" / path.name
            outside.parent.mkdir(exist_ok=True)
            shutil.copy(path, outside)
            target = outside
        path.unlink()
        path.symlink_to(target)
        return
    if kind == "reorder":  # the tensor records shuffled, names and bytes unchanged
        import random

        def shuffled(names: list[str]) -> list[str]:
            data = [n for n in names if n.startswith("data/")]
            random.Random(arg).shuffle(data)
            return [n for n in names if not n.startswith("data/")][:1] + data + \
                [n for n in names if not n.startswith("data/")][1:]

        forge._CRAFT.reorder_zip_records(str(path), str(path.with_suffix(".new")), shuffled)
    elif kind == "truncate":
        size = os.path.getsize(path)
        shutil.copy(path, path.with_suffix(".new"))
        os.truncate(path.with_suffix(".new"), arg % size)
    else:
        obj = load_file(str(path), mmap=False)
        if kind == "reforge":
            forge.reforge(obj, path.with_suffix(".new"), order_seed=arg)
        elif kind == "metadata":
            paths = [p for p in _leaf_paths(obj) if p]
            where, value = arg
            torch.save(_replace(obj, paths[where % len(paths)], value), path.with_suffix(".new"))
        else:
            where, change, dtype = arg
            count = len(forge.tensor_paths(obj))
            forge.reforge(obj, path.with_suffix(".new"), _record_change(change, dtype), at=where % count)
    os.replace(path.with_suffix(".new"), path)


def _digest(folder: Path) -> dict[str, bytes]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_peak(base: int, folder: Path) -> None:
    """The peak resident set since the last reset grew by at most the bound: a few times the largest input
    file (no real tensor is larger than the file that holds it) plus the constant."""
    largest = max(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    grown = _peak() - base
    assert grown <= MEMORY_FACTOR * largest + MEMORY_CONSTANT, f"peak grew by {grown} bytes (largest file {largest})"


def _check_one_line(e: Exception, where: Path) -> None:
    msg = str(e)
    assert isinstance(e, (CheckpointError, ValueError)), f"{type(e).__name__} instead of a one-line refusal: {msg}"
    assert "\n" not in msg and str(where) in msg, f"not one line naming a file in {where}: {msg!r}"


def check_real_mutation(real, work: Path, mutation) -> str:
    from megatron_ucp.checkpoint.inspect import compare_universal, deep_equal, describe_zero
    from megatron_ucp.checkpoint.universal import convert_zero_to_universal

    zero, ref, full = real
    name, kind, arg = mutation
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "ckpt" / STEP
    shutil.copytree(zero, folder)
    _mutate(folder / name, kind, arg)
    before = _digest(work / "ckpt")

    original, mutated = _restricted_load(zero / name), _restricted_load(folder / name)
    same = mutated is not None and deep_equal(original, mutated)
    outcomes = []
    out = work / "out" / f"{STEP}_universal"
    # A link planted where the converter writes latest_universal, to a file outside: it must stay as it was.
    victim = work / "victim"
    victim.write_text("precious")
    (work / "out").mkdir()
    (work / "out" / "latest_universal").symlink_to(victim)
    base = _rss()
    _peak_reset()
    try:
        convert_zero_to_universal(str(folder), str(out), workers=1)
    except Exception as e:  # noqa: BLE001 - the property: only a one-line refusal naming the file
        _check_one_line(e, folder)
        assert not out.exists(), "a refused conversion left its output"
        assert not same, f"{kind} of {name} keeps torch.load's content, but the converter refused: {e}"
        outcomes.append("convert refused")
        (work / "out" / "latest_universal").unlink()
    else:
        if same:  # the atoms by content; the model-state files are copied as they are, so by what they hold
            cmp = compare_universal(str(ref), str(out), include_model_states=False)
            assert cmp.equal and cmp.compared > 10, cmp.summary()
            for p in sorted(ref.glob("*model_states.pt")):
                assert deep_equal(_restricted_load(p), _restricted_load(out / p.name)), p.name
        outcomes.append("converted")
    try:
        got = _full_tensors(folder)
    except Exception as e:  # noqa: BLE001
        _check_one_line(e, folder)
        assert not same, f"{kind} of {name} keeps torch.load's content, but the sliced reads refused: {e}"
        outcomes.append("sliced refused")
    else:
        if same:
            _same_tensors(got, full, "sliced reads")
        outcomes.append("sliced read")
    try:
        describe_zero(str(folder))
        outcomes.append("inspected")
    except Exception as e:  # noqa: BLE001
        _check_one_line(e, folder)
        outcomes.append("inspect refused")
    _check_peak(base, folder)
    assert _digest(work / "ckpt") == before, "the input changed"
    assert victim.read_text() == "precious", "a write went through the planted link"
    assert sorted(p.name for p in work.iterdir() if p.name != "outside") == ["ckpt", "out", "victim"]
    assert sorted(p.name for p in (work / "out").iterdir()) in ([], [out.name, "latest_universal"])
    if out.exists():
        assert not (work / "out" / "latest_universal").is_symlink()
    return f"{kind}{'' if same else '*'}: " + ", ".join(outcomes)


def _real_property(real, tmp_path_factory, n: int):
    zero = real[0]
    files = sorted(p.name for p in zero.iterdir() if p.suffix == ".pt")
    work = tmp_path_factory.mktemp("mutated")
    outcomes: dict[str, int] = {}

    @_settings(n)
    @given(mutations(files))
    def prop(mutation):
        key = check_real_mutation(real, work, mutation)
        outcomes[key] = outcomes.get(key, 0) + 1

    prop()
    print(f"{n} mutations of a real checkpoint (* = torch.load reads other content):", outcomes)
    return outcomes


@pytest.mark.slow
def test_mutated_real_checkpoint_converts_exactly_or_is_refused(real, tmp_path_factory):
    outcomes = _real_property(real, tmp_path_factory, REAL_FAST)
    assert any(k.startswith(("reorder:", "reforge:")) for k in outcomes), outcomes


@pytest.mark.slow
def test_mutated_real_checkpoint_converts_exactly_or_is_refused_many(real, tmp_path_factory):
    _real_property(real, tmp_path_factory, REAL_FULL)


# --------------------------------------------------------------------------------------------------
# A real transformers model: its pytorch_model.bin mutated through the import, an atom through the export
HF_FAST, HF_FULL = 6, 80


@pytest.fixture(scope="module")
def hf_real(tmp_path_factory):
    """A tiny GPT-2 saved by transformers as pytorch_model.bin, its import and the import's export."""
    transformers = pytest.importorskip("transformers")
    from megatron_ucp.hf.from_universal import convert_universal_to_hf
    from megatron_ucp.hf.to_universal import convert_hf_to_universal

    root = tmp_path_factory.mktemp("properties_hf")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(str(root / "hf"))
    # transformers 5 writes safetensors only; the .bin is what 4.x's save_pretrained(safe_serialization=False)
    # wrote: torch.save of the state dict (the tied lm_head left out, as there)
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, root / "hf" / BIN_FILE)
    os.remove(root / "hf" / "model.safetensors")
    convert_hf_to_universal(str(root / "hf"), str(root / "u" / "imported"))
    convert_universal_to_hf(str(root / "u" / "imported"), str(root / "export"))
    return root / "hf", root / "u" / "imported", root / "export"


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as load_safetensors

    out: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_safetensors(str(p)))
    return out


@st.composite
def hf_mutations(draw):
    route = draw(st.sampled_from(["import", "export"]))
    kind = draw(st.sampled_from(["reorder", "reforge", "truncate", "record"] + (["metadata"] * (route == "import"))))
    if kind in ("reorder", "reforge", "truncate"):
        return route, kind, draw(st.integers(0, 10**6))
    if kind == "metadata":
        return route, kind, (draw(st.integers(0, 10**6)), draw(st.sampled_from(_VALUES)))
    change = draw(st.sampled_from(["dtype", "numel", "offset", "stride0", "shape"]))
    return route, kind, (draw(st.integers(0, 10**6)), change, draw(st.sampled_from(forge.DTYPES)))


def check_hf_mutation(hf_real, work: Path, mutation) -> str:
    from megatron_ucp.checkpoint.inspect import compare_universal, deep_equal
    from megatron_ucp.hf.from_universal import convert_universal_to_hf
    from megatron_ucp.hf.to_universal import convert_hf_to_universal

    hf, imported, export = hf_real
    route, kind, arg = mutation
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if route == "import":
        src = work / "hf"
        shutil.copytree(hf, src)
        target = src / BIN_FILE
    else:
        src = work / "u" / "imported"
        shutil.copytree(imported, src)
        atoms = sorted((src / "zero").glob("*/fp32.pt"))
        target = atoms[(arg if isinstance(arg, int) else arg[0]) % len(atoms)]
    original = _restricted_load(target)
    _mutate(target, kind, arg)
    mutated = _restricted_load(target)
    same = mutated is not None and deep_equal(original, mutated)
    before = _digest(src)
    out = work / "out" / "result"
    base = _rss()
    _peak_reset()
    try:
        if route == "import":
            convert_hf_to_universal(str(src), str(out))
        else:
            convert_universal_to_hf(str(src), str(out))
    except Exception as e:  # noqa: BLE001 - the property: only a one-line refusal naming the file
        _check_one_line(e, src)
        assert not out.exists(), "a refused conversion left its output"
        assert not same, f"{kind} of {target.name} keeps torch.load's content, but the {route} refused: {e}"
        outcome = "refused"
    else:
        if same and route == "import":  # the tensors; the model states name the input's folder, which differs
            cmp = compare_universal(str(imported), str(out), include_model_states=False)
            assert cmp.equal and cmp.compared > 10, cmp.summary()
        elif same:
            _same_tensors(_hf_tensors(out), _hf_tensors(export), "export")
        outcome = "converted"
    _check_peak(base, src)
    assert _digest(src) == before, "the input changed"
    return f"{route} {kind}{'' if same else '*'}: {outcome}"


def _hf_property(hf_real, tmp_path_factory, n: int):
    work = tmp_path_factory.mktemp("hf_mutated")
    outcomes: dict[str, int] = {}

    @_settings(n)
    @given(hf_mutations())
    def prop(mutation):
        key = check_hf_mutation(hf_real, work / "w", mutation)
        outcomes[key] = outcomes.get(key, 0) + 1

    prop()
    print(f"{n} mutations of a real transformers model and its import (* = torch.load reads other content):",
          outcomes)
    return outcomes


def test_mutated_hf_files_import_and_export_exactly_or_are_refused(hf_real, tmp_path_factory):
    _hf_property(hf_real, tmp_path_factory, HF_FAST)


@pytest.mark.slow
def test_mutated_hf_files_import_and_export_exactly_or_are_refused_many(hf_real, tmp_path_factory):
    _hf_property(hf_real, tmp_path_factory, HF_FULL)


def test_negative_control_the_memory_bound_sees_an_allocation(tmp_path):
    """What the bound guards against: a reader that materialises more than the file holds shows in the peak."""
    (tmp_path / "small").write_bytes(b"x" * 1000)
    base = _rss()
    _peak_reset()
    big = torch.ones(MEMORY_CONSTANT // 4 + (8 << 20))  # touched: resident
    with pytest.raises(AssertionError, match="peak grew by"):
        _check_peak(base, tmp_path)
    del big


@pytest.mark.slow
def test_negative_control_the_real_property_sees_a_wrong_reader(real, tmp_path, monkeypatch):
    """With torch's computed offsets and no cross-check, a reordered shard converts to wrong atoms and is
    published; the property fails on it. With our reader the same mutation passes."""
    from megatron_ucp.checkpoint import torchzip, universal

    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert check_real_mutation(real, tmp_path / "ok", (name, "reorder", 1)).startswith("reorder: converted")
    monkeypatch.setattr(torchzip, "FORCE_COMPUTED_OFFSETS", True)
    monkeypatch.setattr(universal, "crosscheck_files", lambda *a, **k: 0)
    with pytest.raises(AssertionError):
        check_real_mutation(real, tmp_path / "wrong", (name, "reorder", 1))
