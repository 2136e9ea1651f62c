"""Our converter on several processes (``Partition``): the same output, bit for bit, as on one.

The input is a real DeepSpeed checkpoint written by our trainer (GPT, TP2 PP1 DP2, ZeRO-1, fp32). It is
converted by one process, by two (through ``tools/ds_to_universal.py``'s ``main`` in the environment
torchrun sets) and by four (the library function); every output is verified and identical. A tampered
atom written by a process other than 0 stops the publishing in every process.
"""

import filecmp
import json
import os
import random
from pathlib import Path

import pytest

from dist_utils import run_distributed
from megatron_ucp.checkpoint import universal
from megatron_ucp.checkpoint.inspect import compare_universal
from megatron_ucp.checkpoint.publish import COMPLETE_MARKER, require_verified
from megatron_ucp.checkpoint.universal import Partition, assign_params, convert_zero_to_universal
from megatron_ucp.checkpoint.zero import open_zero_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]

NAME = "global_step2_universal"


def _report(rank, result_dir, **fields):
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(fields))


def _convert_by_library(rank, world_size, zero, out, result_dir):
    write, converted = universal.convert_param, []

    def recording(src, *args):
        converted.append(src.name)
        return write(src, *args)

    universal.convert_param = recording
    part = Partition.of_process_group()
    first = convert_zero_to_universal(zero, out, workers=1, partition=part)
    again = convert_zero_to_universal(zero, out, workers=1, partition=part)  # a finished output is kept
    _report(rank, result_dir, verified=first.verified, processes=first.processes, written=first.bytes_written,
            params=first.params, kept=again.notes, converted=converted)


def _convert_by_tool(rank, world_size, zero, out, result_dir):
    import contextlib
    import io

    from helpers import load_tool

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = load_tool("ds_to_universal").main(["--input_folder", zero, "--output_folder", out,
                                                "--num_extract_workers", "1"])
    _report(rank, result_dir, rc=rc, stdout=stdout.getvalue())


def _tamper_and_convert(rank, world_size, zero, out, victim, result_dir):
    """Process 1 changes one value of an atom it has just written; the verification must catch it."""
    import torch

    from megatron_ucp.checkpoint.zero import CheckpointError

    write = universal.convert_param

    def tampering(src, rule, ckpt, atoms_dir):
        n = write(src, rule, ckpt, atoms_dir)
        if src.name == victim:
            path = os.path.join(atoms_dir, victim, "exp_avg_sq.pt")
            atom = torch.load(path, weights_only=False)
            atom["param"].view(-1)[5] += 1.0
            torch.save(atom, path)
        return n

    universal.convert_param = tampering
    try:
        convert_zero_to_universal(zero, out, workers=1, partition=Partition.of_process_group())
        error = None
    except CheckpointError as e:
        error = str(e)
    _report(rank, result_dir, error=error)


def _results(result_dir, world_size):
    return [json.loads(Path(result_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.fixture(scope="module")
def zero(tiny_checkpoints):
    """The session's tiny GPT checkpoint at TP2 (PP1 DP2, ZeRO-1, fp32) of iteration 2."""
    return tiny_checkpoints(1, tp=2)[0]


@pytest.fixture(scope="module")
def outputs(zero, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    one = root / "p1" / NAME
    report = convert_zero_to_universal(str(zero), str(one), workers=1)
    assert report.verified and report.processes == 1
    results = {1: [dict(verified=True, processes=1, written=report.bytes_written, params=report.params)]}
    (root / "r2").mkdir()
    run_distributed(_convert_by_tool, 2, str(zero), str(root / "p2" / NAME), str(root / "r2"))
    results[2] = _results(root / "r2", 2)
    (root / "r4").mkdir()
    run_distributed(_convert_by_library, 4, str(zero), str(root / "p4" / NAME), str(root / "r4"))
    results[4] = _results(root / "r4", 4)
    return {n: root / f"p{n}" / NAME for n in (1, 2, 4)}, results


def _all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_same_output_whatever_the_number_of_processes(outputs):
    folders, results = outputs
    for n in (2, 4):
        cmp = compare_universal(str(folders[1]), str(folders[n]))
        assert cmp.equal and cmp.compared > 100, cmp.summary()
        # Bit for bit: every file but the completion marker (which records when it was written).
        files = _all_files(folders[1])
        assert files == _all_files(folders[n])
        files.remove(COMPLETE_MARKER)
        assert [f for f in files if not filecmp.cmp(folders[1] / f, folders[n] / f, shallow=False)] == []
    for n, folder in folders.items():
        assert require_verified(str(folder))["verified"] is True
        parent = folder.parent
        assert (parent / "latest_universal").read_text() == NAME
        assert sorted(os.listdir(parent)) == [NAME, "latest_universal"]  # no staging folder left over


def test_every_process_converts_its_own_share(outputs, zero):
    _, results = outputs
    ckpt = open_zero_checkpoint(str(zero))
    sizes = {name: sum(f.numel for frags in src.fragments for f in frags) for name, src in ckpt.param_sources.items()}
    shares = assign_params(sizes, 4)
    assert [sorted(res["converted"]) for res in results[4]] == [sorted(share) for share in shares]
    assert sum(len(share) for share in shares) == len(sizes) and all(shares)


def test_every_process_reports_the_published_conversion(outputs):
    _, results = outputs
    written = results[1][0]["written"]
    for r, res in enumerate(results[4]):
        assert res["verified"] and res["processes"] == 4 and res["params"] == results[1][0]["params"], (r, res)
        assert res["written"] == written  # the total over all processes, the same files as one process writes
        assert res["kept"] == ["already converted and verified: kept as it is"]
    assert [res["rc"] for res in results[2]] == [0, 0]
    assert "in each of 2 processes, verified" in results[2][0]["stdout"]  # process 0 prints the summary
    assert results[2][1]["stdout"] == ""


def test_assignment_is_deterministic_and_balanced(zero):
    ckpt = open_zero_checkpoint(str(zero))
    sizes = {name: sum(f.numel for frags in src.fragments for f in frags) for name, src in ckpt.param_sources.items()}
    rng = random.Random(0)
    synthetic = {f"p{i}": rng.choice([1, 7, 64, 1000, 4096, 50_000]) for i in range(300)}
    for table in (sizes, synthetic):
        biggest, total = max(table.values()), sum(table.values())
        for world in (1, 2, 3, 4, 7):
            shares = assign_params(table, world)
            assert len(shares) == world
            assert sorted(n for share in shares for n in share) == sorted(table)  # each parameter exactly once
            shuffled = list(table.items())
            rng.shuffle(shuffled)
            assert assign_params(dict(shuffled), world) == shares  # the input's order does not matter
            for share in shares:
                assert sum(table[n] for n in share) <= total / world + biggest
                assert [table[n] for n in share] == sorted((table[n] for n in share), reverse=True)


def test_a_tampered_atom_of_another_process_stops_publishing(zero, tmp_path):
    ckpt = open_zero_checkpoint(str(zero))
    sizes = {name: sum(f.numel for frags in src.fragments for f in frags) for name, src in ckpt.param_sources.items()}
    victim = next(n for n in assign_params(sizes, 2)[1] if n.endswith(".weight"))  # written by process 1
    out = tmp_path / "u" / NAME
    (tmp_path / "r").mkdir()
    run_distributed(_tamper_and_convert, 2, str(zero), str(out), victim, str(tmp_path / "r"))
    errors = [res["error"] for res in _results(tmp_path / "r", 2)]
    # Process 0 verifies process 1's share and finds the change; process 1 stops too, with the same message.
    assert errors[0].startswith(f"{out}.tmp-") and f"/zero/{victim}/exp_avg_sq.pt: does not match TP rank" in errors[0]
    assert errors[1] == errors[0] + " (in conversion process 0 of 2)"
    assert "\n" not in errors[1]
    assert os.listdir(tmp_path / "u") == []  # no output, no staging folder, no latest_universal


def _convert_in_a_subprocess(rank, world_size, zero, out, extra, result_dir, env_changes=None):
    """Rank 0 of a running job starts the converter as a job script does: a subprocess inheriting the
    job's environment (WORLD_SIZE, RANK, MASTER_ADDR/PORT, and torchrun's run id as under torchrun)."""
    import subprocess
    import sys

    from helpers import REPO

    if rank == 0:
        env = dict(os.environ, TORCHELASTIC_RUN_ID="job-under-torchrun", **(env_changes or {}))
        run = subprocess.run([sys.executable, str(REPO / "tools" / "ds_to_universal.py"), "--input_folder", zero,
                              "--output_folder", out, "--num_extract_workers", "1", "--quiet", *extra],
                             env=env, capture_output=True, text=True, timeout=600)
        _report(rank, result_dir, rc=run.returncode, stdout=run.stdout, stderr=run.stderr,
                world=os.environ["WORLD_SIZE"])


def test_a_converter_started_inside_a_job_converts_alone(zero, outputs, tmp_path):
    folders, _ = outputs
    out = tmp_path / "inside" / NAME
    (tmp_path / "r").mkdir()
    run_distributed(_convert_in_a_subprocess, 2, str(zero), str(out), [], str(tmp_path / "r"))
    res = json.loads((tmp_path / "r" / "rank0.json").read_text())
    assert res["world"] == "2" and res["rc"] == 0, res["stderr"]
    assert "WORLD_SIZE=2 RANK=0" in res["stderr"] and "converting in this process alone" in res["stderr"]
    assert res["stdout"].startswith("converted ") and " processes" not in res["stdout"], res["stdout"]
    cmp = compare_universal(str(folders[1]), str(out))
    assert cmp.equal and cmp.compared > 100, cmp.summary()
    assert require_verified(str(out))["verified"] is True


def test_joining_a_group_that_never_forms_is_one_line_within_the_timeout(zero, tmp_path):
    """Negative control: asked to join (--distributed) the group the inherited variables describe, the
    converter cannot: as rank 0, the job's own store holds the port; as rank 1 of a group whose store never
    comes, it gives up after --join-timeout. Either way one line names the variables it found."""
    from dist_utils import free_port

    for i, (changes, reason) in enumerate([({}, "address already in use"),
                                           ({"RANK": "1", "MASTER_PORT": str(free_port())}, "")]):
        out = tmp_path / f"forced{i}" / NAME
        (tmp_path / f"r{i}").mkdir()
        run_distributed(_convert_in_a_subprocess, 2, str(zero), str(out), ["--distributed", "--join-timeout", "3"],
                        str(tmp_path / f"r{i}"), changes)
        res = json.loads((tmp_path / f"r{i}" / "rank0.json").read_text())
        assert res["rc"] == 2, res
        lines = res["stderr"].strip().splitlines()
        rank = changes.get("RANK", "0")
        assert lines[-1].startswith("error: could not join the other conversion processes within 3 s "
                                    f"(WORLD_SIZE=2 RANK={rank} "), lines
        assert "TORCHELASTIC_RUN_ID=job-under-torchrun" in lines[-1] and reason in lines[-1]
        assert "Traceback" not in res["stderr"] and len(lines) == 1, res["stderr"]
        assert not (tmp_path / f"forced{i}").exists()  # nothing written


def test_torchrun_processes_share_the_conversion(zero, outputs, tmp_path):
    """The real launcher: torchrun's own processes join (the parent is torchrun) and split the work."""
    import subprocess
    import sys

    from dist_utils import free_port
    from helpers import REPO

    folders, _ = outputs
    out = tmp_path / "torchrun" / NAME
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(REPO / "tools" / "ds_to_universal.py"), "--input_folder", str(zero),
                          "--output_folder", str(out), "--num_extract_workers", "1", "--quiet"],
                         env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "in each of 2 processes, verified" in run.stdout, run.stdout
    cmp = compare_universal(str(folders[1]), str(out))
    assert cmp.equal and cmp.compared > 100, cmp.summary()
