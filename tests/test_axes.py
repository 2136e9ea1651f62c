"""Named parallel axes (``layout/topology.py``): for every factorisation of world sizes 1..16 into
pp x dp x sp x ep x tp (ep dividing dp x sp), the groups asked for by axis name are DeepSpeed's
(``ProcessTopology`` with Megatron-DeepSpeed's axis order pipe, data, sequence, model, and its MoE expert
groups) and come in Megatron's order; the process-group registry builds them by name."""

from __future__ import annotations

import itertools

import pytest

from megatron_ucp.layout.topology import AXES, DEEPSPEED_AXES, GRID_AXES, ParallelLayout


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(world_size: int) -> list[ParallelLayout]:
    """Every pp x dp x sp x tp = world_size, with every ep dividing dp x sp."""
    out = []
    for pp, dp, sp in itertools.product(_divisors(world_size), repeat=3):
        if world_size % (pp * dp * sp):
            continue
        tp = world_size // (pp * dp * sp)
        out += [ParallelLayout(tp=tp, pp=pp, dp=dp, sp=sp, ep=ep) for ep in _divisors(dp * sp)]
    return out


def _deepspeed_topology(layout: ParallelLayout):
    from deepspeed.runtime.pipe.topology import ProcessTopology

    return ProcessTopology(axes=[DEEPSPEED_AXES[a] for a in GRID_AXES], dims=[layout.degree(a) for a in GRID_AXES])


def _matching(ds, free: tuple[str, ...]) -> list[list[int]]:
    """DeepSpeed's groups along several axes: the ranks matching each coordinate of the other axes."""
    fixed = [a for a in GRID_AXES if a not in free]
    groups = []
    for values in itertools.product(*(range(ds.get_dim(DEEPSPEED_AXES[a])) for a in fixed)):
        groups.append(sorted(ds.filter_match(**{DEEPSPEED_AXES[a]: v for a, v in zip(fixed, values)})))
    return groups


def _megatron_groups(layout: ParallelLayout) -> dict[tuple[str, ...], list[list[int]]]:
    """Megatron(-DeepSpeed)'s ``initialize_model_parallel`` loops, in their creation order. Megatron-DeepSpeed
    strides its data-parallel groups by ``tp_or_sp_size`` (only one of them above 1); with both, the
    stride is their product, sp outside tp."""
    world, tp, sp, pp = layout.world_size, layout.tp, layout.sp, layout.pp
    per_stage = world // pp  # num_pipeline_model_parallel_groups
    dp_groups = [list(range(i * per_stage + j, (i + 1) * per_stage, sp * tp)) for i in range(pp)
                 for j in range(sp * tp)]
    groups = {
        ("tp",): [list(range(i * tp, (i + 1) * tp)) for i in range(world // tp)],
        ("pp",): [list(range(i, world, per_stage)) for i in range(per_stage)],
        ("dp",): dp_groups,
        ("sp",): [list(range(block * sp * tp + t, (block + 1) * sp * tp, tp)) for block in range(world // (sp * tp))
                  for t in range(tp)],
        ("dp", "sp"): [list(range(i * per_stage + j, (i + 1) * per_stage, tp)) for i in range(pp) for j in range(tp)],
    }
    if sp == 1:  # model-parallel groups: the i-th rank of every data-parallel group
        groups[("pp", "tp")] = [sorted(g[i] for g in dp_groups) for i in range(layout.dp)]
    return groups


def _expert_slot(layout: ParallelLayout, rank: int) -> tuple[int, int]:
    """(pp, which group of ep ranks among the dp x sp ranks): what one ep x tp group shares."""
    c = layout.coords(rank)
    return c["pp"], (c["dp"] * layout.sp + c["sp"]) // layout.ep


@pytest.mark.parametrize("world_size", range(1, 17))
def test_groups_by_name_are_deepspeeds_and_megatrons(world_size):
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    layouts = _layouts(world_size)
    assert layouts and all(layout.world_size == world_size for layout in layouts)
    for layout in layouts:
        ds = _deepspeed_topology(layout)
        for rank in range(world_size):
            c, theirs = layout.coords(rank), ds.get_coord(rank)
            assert {a: c[a] for a in GRID_AXES} == {a: getattr(theirs, DEEPSPEED_AXES[a]) for a in GRID_AXES}
            assert layout.rank_of({a: c[a] for a in GRID_AXES}) == rank == ds.get_rank(**theirs._asdict())
        for axis in GRID_AXES:  # one axis: DeepSpeed's comm lists, each ascending, in first-rank order
            assert layout.groups(axis) == sorted(ds.get_axis_comm_lists(DEEPSPEED_AXES[axis])) or (
                layout.degree(axis) == 1 and layout.groups(axis) == [[r] for r in range(world_size)])
        for axes in (("dp", "sp"), ("pp", "tp"), ("pp", "dp", "sp", "tp")):
            assert layout.groups(*axes) == sorted(_matching(ds, axes)), (layout, axes)
        for axes, groups in _megatron_groups(layout).items():
            assert layout.groups(*axes) == groups, (layout, axes)  # the same lists, created in the same order
        # Expert parallelism is carved out of the dp x sp ranks of each (pp, tp) slice, as DeepSpeed's MoE does.
        ep_groups, _ = _get_expert_parallel_ranks(world_size, layout.tp, layout.ep, layout.pp)
        assert layout.groups("ep") == sorted(ep_groups), layout
        slots = sorted({_expert_slot(layout, r) for r in range(world_size)})
        assert sorted(layout.groups("ep", "tp")) == sorted(
            [r for r in range(world_size) if _expert_slot(layout, r) == slot] for slot in slots)
        for rank in range(world_size):
            c = layout.coords(rank)
            assert c["ep"] == layout.group_of(rank, "ep").index(rank)
            assert all(c[a] == layout.group_of(rank, a).index(rank) for a in GRID_AXES)


def test_the_legacy_names_are_the_named_groups():
    layout = ParallelLayout(tp=2, pp=2, dp=3)
    assert layout.tp_groups() == layout.groups("tp") and layout.dp_groups() == layout.groups("dp")
    assert layout.pp_groups() == layout.groups("pp") and layout.mp_groups() == layout.groups("pp", "tp")
    assert layout.degrees == {"pp": 2, "dp": 3, "sp": 1, "ep": 1, "tp": 2} and tuple(layout.degrees) == AXES
    assert [layout.degree(a) for a in ("tp", "pp", "dp")] == [layout.tp, layout.pp, layout.dp]
    assert layout.rank(1, 2, 1) == layout.rank_of({"pp": 1, "dp": 2, "tp": 1}) == 11


def test_records_and_names_are_unchanged_at_sp_ep_1():
    """What is printed and logged (``to_dict``, ``str``) is what it was before sp and ep existed."""
    layout = ParallelLayout.from_world_size(8, tp=2, pp=2)
    assert layout.to_dict() == {"tp": 2, "pp": 2, "dp": 2} and list(layout.to_dict()) == ["tp", "pp", "dp"]
    assert str(layout) == "TP2-PP2-DP2"
    assert ParallelLayout.from_dict(layout.to_dict()) == layout == ParallelLayout.from_dict(layout.degrees)
    wide = ParallelLayout.from_world_size(16, tp=2, sp=2, ep=4)
    assert wide.to_dict() == {"tp": 2, "pp": 1, "dp": 4, "sp": 2, "ep": 4} and str(wide) == "TP2-PP1-DP4-SP2-EP4"
    assert ParallelLayout.from_dict(wide.to_dict()) == wide


def test_bad_axes_are_refused():
    with pytest.raises(ValueError, match="parallel degree sp must be a positive integer, got 0"):
        ParallelLayout(sp=0)
    with pytest.raises(ValueError, match=r"parallel degree ep 4 does not divide dp x sp = 6"):
        ParallelLayout(dp=3, sp=2, ep=4)
    with pytest.raises(ValueError, match="world size 12 is not divisible by tensor parallel 2 x pipeline parallel 1 "
                                         "x sequence parallel 4"):
        ParallelLayout.from_world_size(12, tp=2, sp=4)
    layout = ParallelLayout(dp=2, sp=2, ep=2)
    with pytest.raises(ValueError, match="unknown parallel axis 'cp'"):
        layout.groups("cp")
    with pytest.raises(ValueError, match="axis ep is carved out of dp x sp; a group cannot run along both ep and dp"):
        layout.groups("ep", "dp")
    with pytest.raises(ValueError, match="at least one axis"):
        layout.groups()
    with pytest.raises(ValueError, match="sp coordinate 2 outside degree 2"):
        layout.rank_of({"sp": 2})


def test_the_registry_builds_every_group_by_name():
    from megatron_ucp.distributed import groups

    state = groups.single_process_state()
    assert set(state.groups) == set(groups.GROUP_AXES) >= {"tp", "dp", "pp", "mp"}
    assert all(set(axes) <= set(AXES) for axes in groups.GROUP_AXES.values())
    assert state.tp_group is state.group("tp") is None and state.get_data_parallel_group() is None
    assert (state.get_tensor_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()) == (1, 0)
    with pytest.raises(KeyError, match="unknown process group 'xp'"):
        state.group("xp")
