"""Node loss on torchrun's elastic agent with the settings of ``megatron_ucp.elastic`` (what ``run_elastic.sh``
starts): two agents on loopback, two gloo workers each (``tests/elastic_loop.py``), the node that does not
host the rendezvous store killed with all of its workers; the host re-forms alone at world 2 and its loop
goes on. With torch's default shared worker store this is where the restarted workers read the dead
round's addresses and hang in ``init_process_group`` (see ``megatron_ucp/elastic.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from elastic_harness import Agent, agents
from megatron_ucp.elastic import torchrun_command
from megatron_ucp.launch import free_port

LOOP = str(Path(__file__).with_name("elastic_loop.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1", LOGLEVEL="INFO")
HANG_S = 300  # a guard against a hang only: nothing here asserts how long a step takes


def _agent(name: str, endpoint: str, run_id: str, host: bool) -> Agent:
    cmd = torchrun_command(sys.executable, nnodes="1:2", nproc_per_node=2, endpoint=endpoint, run_id=run_id,
                           host=host, max_restarts=3)
    return Agent(name, [*cmd, LOOP], env=ENV)


@pytest.mark.slow
def test_losing_the_other_node_reforms_the_host_at_world_2_and_its_loop_goes_on():
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"loss{os.getpid()}"
    with agents() as started:
        host = _agent("host", endpoint, run_id, host=True)
        started.append(host)  # the other's store client retries until the host listens
        other = _agent("other", endpoint, run_id, host=False)
        started.append(other)
        i, _, m = host.wait_for(r"step (\d+) world 4 rank \d sum (\d+)", timeout_s=HANG_S)
        assert m.group(2) == "4"  # all four ranks in the sum
        other.wait_for(r"step \d+ world 4", timeout_s=HANG_S)

        killed_at = other.kill()
        assert not other.workers() and not other.alive()

        j, first, _ = host.wait_for(r"step \d+ world 2 rank 0 sum 2", after=i, timeout_s=HANG_S)
        assert host.wait_for(r"init rank 0 world 2 restart 1", after=i, timeout_s=0)
        k, _, m = host.wait_for(r"step (\d+) world 2 rank 0 sum (\d+)", after=j + 5, timeout_s=HANG_S)
        assert m.group(2) == "2" and host.alive()
        print(f"\nkill -> first all-reduce at world 2: {first.t - killed_at:.1f} s")
