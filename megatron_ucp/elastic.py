"""torchrun's own settings for an elastic job (``--nnodes MIN:MAX``, c10d rendezvous), in one place.

``run_elastic.sh`` and ``tests/test_elastic.py`` both start agents with ``torchrun_command(...)``;
``python -m megatron_ucp.elastic ...`` prints it for the recipe. Nothing here launches or rendezvous: it
only chooses torchrun's flags, ``--rdzv-conf`` keys and one environment variable (torch 2.13's
``torch/distributed/elastic``):

* ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``. By default the node of rendezvous rank 0 hosts one TCPStore
  for its workers' ``init_process_group`` and keeps it for the life of the agent
  (``DynamicRendezvousHandler._shared_tcp_store_server``); workers connect to it with no per-round prefix
  (``torch/distributed/rendezvous.py: _create_c10d_store``). After a restart the new workers find the
  previous round's gloo addresses still in that store and connect to dead peers: "Gloo connectFullMesh
  failed ... Connection refused" with a short process-group timeout, a hang of up to the timeout (30 min
  by default) without. The same handler also caches the workers' address (``_bootstrap_store_info``) and
  rebuilds it only when it becomes rank 0, so a node that drops from rank 0 to rank 1 when another joins
  sends its workers to its own store while the new rank 0's go to another: they never meet. With the
  variable set, every round's rank 0 picks a fresh port and its worker 0 hosts a fresh store.
* ``keep_alive_interval=2,keep_alive_max_attempt=3``: a node whose heartbeat is 6 s old is dead (default
  5 s x 3). The agent notices a lost node through its own workers' failure ("Connection closed by
  peer"), then waits in the rendezvous until the dead node's heartbeat expires.
* ``last_call_timeout=5``: once MIN nodes are in, wait 5 s for more (default 30 s). Agents poll the
  rendezvous every second, so 5 s gathers every node that is re-forming, and a lone survivor waits 5 s,
  not 30.

What torchrun does not let us set: the SIGTERM -> SIGKILL grace when it stops workers for a re-rendezvous
is 30 s, fixed (``LocalElasticAgent._stop_workers`` calls ``_shutdown()`` with its default; ``--shutdown-
timeout`` and ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` apply only when the agent itself ends). An iteration and a
save on ``--exit-signal-handler`` must fit in it.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Sequence

RDZV_CONF = {"keep_alive_interval": 2, "keep_alive_max_attempt": 3, "last_call_timeout": 5}
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
RESTART_GRACE_S = 30  # torch 2.13's fixed SIGTERM -> SIGKILL wait when the agent restarts its workers


def torchrun_flags(*, nnodes: str, nproc_per_node: int, endpoint: str, run_id: str, host: bool | None,
                   max_restarts: int = 3) -> list[str]:
    """torchrun's flags of one elastic agent. ``host``: whether this agent hosts the c10d rendezvous store
    (the job's single point of failure); None leaves it to torch (the agent whose address is the endpoint's)."""
    conf = dict(RDZV_CONF)
    if host is not None:
        conf = {"is_host": int(host), **conf}
    return ["--nnodes", nnodes, "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--max-restarts", str(max_restarts),
            "--rdzv-conf", ",".join(f"{k}={v}" for k, v in conf.items())]


def torchrun_command(python: str, **kwargs) -> list[str]:
    """``env VAR=1 PYTHON -m torch.distributed.run FLAGS``: the agent, its environment included; the caller
    appends the script or ``-m module`` and its arguments."""
    return ["env", *(f"{k}={v}" for k, v in ENV.items()), python, "-m", "torch.distributed.run",
            *torchrun_flags(**kwargs)]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the command of one elastic torchrun agent (the caller "
                                            "appends the training module and its flags).")
    p.add_argument("--python", default="python")
    p.add_argument("--nnodes", default="1:2", help="MIN:MAX nodes")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--rdzv-endpoint", default="127.0.0.1:29400")
    p.add_argument("--rdzv-id", default="megatron_ucp_elastic")
    p.add_argument("--host", choices=("1", "0", "auto"), default="auto",
                   help="1: this node hosts the rendezvous store; auto: the node whose address is the endpoint's")
    p.add_argument("--max-restarts", type=int, default=3)
    a = p.parse_args(argv)
    host = None if a.host == "auto" else a.host == "1"
    print(shlex.join(torchrun_command(a.python, nnodes=a.nnodes, nproc_per_node=a.nproc_per_node,
                                      endpoint=a.rdzv_endpoint, run_id=a.rdzv_id, host=host,
                                      max_restarts=a.max_restarts)))


if __name__ == "__main__":
    main()
