"""Two-"node" elastic jobs on one machine, for the tests: the watched torchrun agents of
``megatron_ucp.watch`` (shared with ``tools/benchmark_recovery.py``), under the name the tests import."""

from megatron_ucp.watch import Agent, Line, agents, held

__all__ = ["Agent", "Line", "agents", "held"]
