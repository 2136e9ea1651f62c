"""megatron_ucp.launch: free ports, spawned ranks, and commands whose whole process group is ended.

The group tests start real shells with real background grandchildren and check, through /proc, that
no process of the group survives; negative controls show that ending only the direct child, or
skipping the SIGTERM grace, leaves exactly the traces the checks look for.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megatron_ucp.launch import end_group, free_port, rank_env, run_in_group, spawn_ranks, start_in_group


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper that is not us counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_for_pid(path, timeout_s: float = 10.0) -> int:
    """The pid a shell wrote to ``path`` (it appears once the shell started its background child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} never got a pid")


def _gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def _grandchild_cmd(pid_file, exit_code: int | None = None, then: str = "true") -> list[str]:
    """A shell whose background grandchild ignores SIGTERM (as a stuck rank may) and writes its pid;
    the shell then exits with ``exit_code``, or waits a minute and runs ``then`` when None."""
    tail = f"exit {exit_code}" if exit_code is not None else f"sleep 60; {then}"
    return ["sh", "-c", f"(trap '' TERM; exec sleep 60) & echo $! > {pid_file}; {tail}"]


# --------------------------------------------------------------------------------------------------
# free_port, rank_env


def test_free_port_is_bindable_and_a_taken_port_is_not():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free: binds
        s.listen()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # negative control: the same check fails on a taken port


def test_rank_env_is_what_torchrun_sets():
    assert rank_env(2, 4, 29501) == {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501"}


# --------------------------------------------------------------------------------------------------
# spawn_ranks: real ranks talking through gloo


def _gloo_sum(rank, world_size, out_dir):
    """Rendezvous through the environment spawn_ranks set, then a real gloo all-reduce."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// - RANK, WORLD_SIZE, MASTER_ADDR/PORT only
    try:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"sum": t.item(), "env": env, "dist_rank": dist.get_rank()}, f)
    finally:
        dist.destroy_process_group()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one refuses")


def test_spawn_ranks_sets_the_environment_and_ranks_communicate(tmp_path):
    port = free_port()
    spawn_ranks(_gloo_sum, 2, str(tmp_path), port=port)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, g in enumerate(got):
        assert g["sum"] == 3.0 and g["dist_rank"] == r
        assert g["env"] == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_PORT": str(port)}


def test_spawn_ranks_reraises_a_rank_failure(tmp_path, monkeypatch):
    import tempfile

    import torch.multiprocessing as mp

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where torch puts each rank's error file
    with pytest.raises(mp.ProcessRaisedException, match="rank one refuses"):
        spawn_ranks(_fail_on_rank_one, 2)
    assert list(tmp_path.iterdir()) == []  # the failed rank's traceback file is removed, not left behind


# --------------------------------------------------------------------------------------------------
# run_in_group / start_in_group / end_group


def test_run_in_group_returns_exit_codes(tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as out:
        assert run_in_group(["sh", "-c", "echo hi; exit 0"], stdout=out) == 0
        assert run_in_group(["sh", "-c", "exit 3"], stdout=out) == 3
        assert run_in_group(["sh", "-c", "kill -9 $$"], stdout=out) == -signal.SIGKILL
        # popen_kwargs reach Popen: env and cwd
        assert run_in_group(["sh", "-c", 'test "$LAUNCH_PROBE" = yes && test "$(pwd -P)" = "$0"', str(tmp_path.resolve())],
                            env=dict(os.environ, LAUNCH_PROBE="yes"), cwd=str(tmp_path)) == 0
        assert run_in_group(["sh", "-c", 'test "$LAUNCH_PROBE" = yes'], env=dict(os.environ)) == 1
    assert log.read_text() == "hi\n"


def test_timeout_ends_the_whole_group_grandchild_included(tmp_path):
    pid_file = tmp_path / "pid"
    finished = tmp_path / "finished"
    # The shell would wait 60 s and then leave a marker: its absence shows the timeout did not wait for it.
    assert run_in_group(_grandchild_cmd(pid_file, then=f"touch {finished}"), timeout_s=0.5, grace_s=0.5) is None
    assert not finished.exists()
    grandchild = _wait_for_pid(pid_file)
    # It ignores SIGTERM: only the group SIGKILL after the grace period ends it.
    assert _gone(grandchild), f"grandchild {grandchild} survived the timeout"


def test_negative_control_killing_only_the_child_leaves_the_grandchild(tmp_path):
    """What the test above guards against: Popen's own kill() ends the shell, not what it started."""
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen(_grandchild_cmd(pid_file), start_new_session=True)
    grandchild = _wait_for_pid(pid_file)
    proc.kill()
    proc.wait()
    try:
        time.sleep(0.2)
        assert _alive(grandchild), "the check cannot tell a surviving grandchild from a dead one"
    finally:
        end_group(proc, grace_s=0)  # the group id outlives its leader: this still reaches the grandchild
    assert _gone(grandchild)


def test_normal_exit_leaves_nothing_running(tmp_path):
    pid_file = tmp_path / "pid"
    assert run_in_group(_grandchild_cmd(pid_file, exit_code=5)) == 5
    grandchild = _wait_for_pid(pid_file)
    assert _gone(grandchild), f"grandchild {grandchild} outlived its command"


class _Interrupted(Exception):
    pass


def test_an_exception_while_waiting_ends_the_group_and_propagates(tmp_path):
    """A signal arriving while we wait (as the benchmark's SIGTERM -> SystemExit does) ends the group."""
    pid_file = tmp_path / "pid"

    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(_Interrupted):
            run_in_group(_grandchild_cmd(pid_file), timeout_s=30, grace_s=0.2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _gone(_wait_for_pid(pid_file))


def test_end_group_gives_sigterm_a_grace_period_unless_told_not_to(tmp_path):
    """With a grace period the group sees SIGTERM first and can clean up; with grace 0 it cannot."""
    script = "trap 'echo bye > $0; exit 0' TERM; sleep 60 & wait"
    for grace, want in ((5.0, "bye\n"), (0.0, None)):
        marker = tmp_path / f"marker{grace}"
        proc = start_in_group(["sh", "-c", script, str(marker)])
        time.sleep(0.3)  # the shell installs its trap
        assert proc.poll() is None
        end_group(proc, grace_s=grace)
        assert proc.returncode is not None  # reaped
        assert (marker.read_text() if marker.exists() else None) == want, grace


def test_start_in_group_makes_a_new_session(tmp_path):
    proc = start_in_group([sys.executable, "-c", "import os; print(os.getsid(0) == os.getpid())"],
                          stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "True" and os.getsid(0) != proc.pid
