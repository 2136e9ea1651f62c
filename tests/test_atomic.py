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
