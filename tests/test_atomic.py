"""The one atomic writer: the target holds the old content or the new one, never a part."""

import os

import pytest

from megatron_ucp.atomic import atomic_open, atomic_write, temporary_name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "log.jsonl"
    atomic_write(target, "old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(target) as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["log.jsonl"]
    # Control: the same block completing replaces the file.
    with atomic_open(target) as f:
        f.write("new\n")
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["log.jsonl"]


def test_bytes_text_and_names(tmp_path):
    assert atomic_write(tmp_path / "b", b"\x00\x01") == str(tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "t", "é")
    assert (tmp_path / "t").read_bytes() == "é".encode("utf-8")
    assert temporary_name("/x/out").startswith("/x/out.tmp-") and temporary_name("/x/out").endswith(f"-{os.getpid()}")
    with pytest.raises(ValueError, match="not a write mode"):
        with atomic_open(tmp_path / "a", "a"):
            pass


# --- no write through a planted link -------------------------------------------------------------


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def outside(tmp_path):
    """A file outside the folder written to, which a planted link points at."""
    victim = tmp_path / "outside" / "credentials"
    victim.parent.mkdir()
    victim.write_text("secret=1\n")
    return victim, _sha(victim)


def test_a_link_at_the_temporary_name_is_not_followed(tmp_path, outside, monkeypatch):
    import megatron_ucp.atomic as atomic

    victim, digest = outside
    work = tmp_path / "work"
    work.mkdir()
    target = work / "latest"
    # The name earlier versions wrote to (predictable: host and pid) and the next random names.
    randoms = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(atomic, "_random_part", lambda: next(randoms))
    planted = [temporary_name(str(target)), f"{temporary_name(str(target))}-raaaaaaaaaaaa"]
    for name in planted:
        os.symlink(victim, name)
    atomic_write(target, "global_step2")
    assert _sha(victim) == digest  # the link at the first random name was not opened
    assert target.read_text() == "global_step2" and not target.is_symlink()
    assert sorted(os.listdir(work)) == sorted(["latest"] + [os.path.basename(n) for n in planted])
    assert all(os.readlink(n) == str(victim) for n in planted)  # someone else's entries are left alone

    # Negative control: the same write through a plain open() of the predictable name changes the victim.
    with open(planted[0], "w") as f:
        f.write("overwritten")
    assert _sha(victim) != digest


def test_a_name_always_taken_is_refused_in_one_line(tmp_path, outside, monkeypatch):
    import megatron_ucp.atomic as atomic
    from megatron_ucp.checkpoint.trust import one_line

    victim, digest = outside
    target = tmp_path / "marker.json"
    target.write_text("old")
    monkeypatch.setattr(atomic, "_random_part", lambda: "cccccccccccc")
    os.symlink(victim, f"{temporary_name(str(target))}-rcccccccccccc")
    with pytest.raises(FileExistsError) as e:
        atomic_write(target, "new")
    assert one_line(e.value).startswith(f"{target}: ") and "refusing" in one_line(e.value)
    assert "\n" not in one_line(e.value)
    assert _sha(victim) == digest and target.read_text() == "old"


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path, outside):
    victim, digest = outside
    target = tmp_path / "zero_to_fp32.py"
    os.symlink(victim, target)
    atomic_write(target, "print('generated')\n")
    assert _sha(victim) == digest
    assert not target.is_symlink() and target.read_text() == "print('generated')\n"


def test_a_temporary_folder_is_never_a_planted_link(tmp_path, monkeypatch):
    import megatron_ucp.atomic as atomic

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    randoms = iter(["dddddddddddd", "eeeeeeeeeeee"])
    monkeypatch.setattr(atomic, "_random_part", lambda: next(randoms))
    out = tmp_path / "new" / "hf"  # the parent is made
    out.parent.mkdir()
    os.symlink(elsewhere, f"{temporary_name(str(out))}-rdddddddddddd")
    tmp = atomic.make_temporary_folder(str(out))
    assert tmp == f"{temporary_name(str(out))}-reeeeeeeeeeee"
    assert os.path.isdir(tmp) and not os.path.islink(tmp) and os.listdir(elsewhere) == []
