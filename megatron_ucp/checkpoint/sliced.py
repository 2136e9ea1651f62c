"""One target rank's piece of a parameter's optimizer state, read straight from a ZeRO checkpoint.

The first building block of direct resume (no universal folder in between): where a target TP rank's
local tensor comes from is the composition of two placements (``layout.placement``). The source's
says which source TP rank holds which slices of the full tensor, and the checkpoint's index which
data-parallel fragment holds which flat range of that rank's tensor, at which byte of which file;
the target's says which slices of the full tensor the target rank holds. A ``read_plan`` lists the
byte ranges that land in the target tensor, and nothing else: the bytes a rank reads are the bytes
it owns (one copy of a replicated parameter; vocabulary padding rows are zeros, not read).

The plans themselves are ``plan``'s (the one walk of the fragments, which the converter shares) and
reading them is ``executors``'; this module keeps the names the loader and tests use.
"""

from megatron_ucp.checkpoint.executors import read_local
from megatron_ucp.checkpoint.plan import Read, ReadPlan, atom_read_plan, read_plan, rebased, state_moves, window_plan

__all__ = ["Read", "ReadPlan", "atom_read_plan", "read_local", "read_plan", "rebased", "state_moves", "window_plan"]
