"""Pipeline schedules as data: every table is valid, and its bubble and stash are as designed."""

from __future__ import annotations

import dataclasses

import pytest

import titanax as tx
from titanax.parallel.pipeline_program import compile_schedule
from titanax.parallel.schedules import Schedule, build_schedule

CASES = [("gpipe", p, m, 1) for p, m in [(1, 1), (2, 2), (2, 5), (4, 4), (4, 16)]] + \
        [("circular", p, m, v) for p, m, v in [(2, 2, 2), (4, 4, 2), (4, 8, 3), (2, 3, 4)]] + \
        [("1f1b", p, m, 1) for p, m in [(1, 3), (2, 2), (2, 7), (4, 4), (4, 16)]] + \
        [("interleaved", p, m, v) for p, m, v in [(2, 2, 2), (2, 4, 2), (4, 8, 2), (4, 16, 3)]] + \
        [("zbh1", p, m, 1) for p, m in [(1, 3), (2, 2), (2, 7), (3, 5), (4, 4), (4, 16), (8, 32)]]
ZBH1_CASES = [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 32)]


@pytest.mark.parametrize("name,p,m,v", CASES)
def test_every_microbatch_passes_every_stage_in_order(name, p, m, v):
    schedule = build_schedule(name, p, m, v)  # validates: order, arrival, forward before backward
    fwd, bwd = schedule.events()
    assert len(fwd) == len(bwd) == p * m * v
    for table in (schedule.forward_mb, schedule.backward_mb):  # one op per slot, by construction
        assert table.shape == (schedule.ticks, p)
    # Each (stage, tick) slot holds at most one forward and one backward: events are unique per slot.
    assert len(set(fwd.values())) <= schedule.ticks * p
    weights = schedule.weight_events()
    assert schedule.split_backward == (name == "zbh1") == bool(weights)
    if schedule.split_backward:
        assert len(weights) == p * m * v and all(weights[key] > bwd[key] for key in weights)


@pytest.mark.parametrize("name,p,m,v", [c for c in CASES if c[0] in ("gpipe", "circular")])
def test_autodiff_schedules_have_the_textbook_bubble(name, p, m, v):
    schedule = build_schedule(name, p, m, v)
    assert schedule.forward_ticks == v * m + p - 1
    assert schedule.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
    assert schedule.peak_stash == v * m  # autodiff keeps every microbatch until the backward


@pytest.mark.parametrize("p,m", [(2, 2), (2, 7), (4, 4), (4, 16), (8, 32)])
def test_1f1b_stash_is_bounded_by_stages_not_microbatches(p, m):
    schedule = build_schedule("1f1b", p, m)
    assert schedule.ticks == m + 2 * p - 2
    assert list(schedule.in_flight().max(axis=0)) == [min(m, 2 * (p - s) - 1) for s in range(p)]
    if m >= 4 * p:
        assert schedule.peak_stash < build_schedule("gpipe", p, m).peak_stash


@pytest.mark.parametrize("p,m", [(1, 3), (2, 2), (2, 7), (4, 4), (4, 16), (8, 32)])
def test_1f1b_lockstep_bubble_weighs_the_fused_backward_twice(p, m):
    schedule = build_schedule("1f1b", p, m)
    costs = schedule.tick_costs()
    assert costs.shape == (schedule.ticks,)
    # Warm-up ticks run forwards only (1), the steady state a forward and a fused backward (3),
    # the cool-down backwards only (2).
    assert costs.sum() == (p - 1) * 1 + m * (3 if p > 1 else 1) + (p - 1) * 2 + (0 if p > 1 else 2 * m)
    assert schedule.stage_costs().sum() == 3 * p * m
    assert schedule.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


def test_tick_costs_of_a_small_1f1b_by_hand():
    schedule = build_schedule("1f1b", 2, 2)  # F0 | F1, F0+B0 | B0, F1+B1 | B1
    assert schedule.tick_costs().tolist() == [1, 3, 3, 2]
    assert schedule.bubble_fraction == pytest.approx(1 - 12 / (2 * 9))


@pytest.mark.parametrize("p,m", ZBH1_CASES)
def test_zbh1_runs_one_op_per_tick_in_3m_plus_p_minus_1_ticks(p, m):
    schedule = build_schedule("zbh1", p, m)
    busy = sum((table >= 0).astype(int) for table in (schedule.forward_mb, schedule.backward_mb, schedule.weight_mb))
    assert busy.max() == 1  # one F, B or W per stage per tick: every tick costs 1 while any stage works
    assert schedule.ticks == 3 * m + p - 1
    assert schedule.tick_costs().tolist() == [1] * schedule.ticks
    assert schedule.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1))


@pytest.mark.parametrize("p,m", ZBH1_CASES)
def test_zbh1_has_at_most_half_the_bubble_of_1f1b(p, m):
    zbh1, plain = build_schedule("zbh1", p, m), build_schedule("1f1b", p, m)
    assert zbh1.bubble_fraction <= plain.bubble_fraction / 2


@pytest.mark.parametrize("p,m", ZBH1_CASES + [(3, 3), (8, 8)])
def test_zbh1_holds_no_more_microbatches_than_unfused_1f1b(p, m):
    schedule = build_schedule("zbh1", p, m)
    # Forward to input gradient: p - s on stage s, like unfused 1F1B's warm-up; forward to weight
    # gradient: at most p on every stage (1F1B's peak, on stage 0), below fused 1f1b's 2p - 1.
    assert schedule.in_flight("backward").max(axis=0).tolist() == [p - s for s in range(p)]
    assert schedule.in_flight("weight").max(axis=0).tolist() == [p] * p
    assert schedule.peak_stash == p
    assert schedule.in_flight().tolist() == schedule.in_flight("weight").tolist()
    assert schedule.peak_stash <= build_schedule("1f1b", p, m).peak_stash


def test_non_split_schedules_have_idle_weight_slots():
    for name, v in (("gpipe", 1), ("circular", 2), ("1f1b", 1), ("interleaved", 2)):
        schedule = build_schedule(name, 2, 4, v)
        assert not schedule.split_backward and schedule.weight_events() == {}
        assert (schedule.weight_mb == -1).all() and schedule.weight_mb.shape == schedule.forward_mb.shape
        assert schedule.in_flight("weight").tolist() == schedule.in_flight("backward").tolist()


def test_interleaved_shrinks_the_bubble_of_1f1b():
    plain, interleaved = build_schedule("1f1b", 4, 16), build_schedule("interleaved", 4, 16, 2)
    assert interleaved.bubble_fraction < plain.bubble_fraction


def test_a_broken_table_is_rejected():
    good = build_schedule("gpipe", 2, 2)
    early = good.forward_mb.copy()
    early[0, 1], early[1, 1] = 0, -1  # stage 1 runs microbatch 0 in the tick stage 0 produces it
    repeat = good.forward_repeat.copy()
    repeat[0, 1] = 0
    with pytest.raises(tx.PlanError, match="before its input arrives"):
        dataclasses.replace(good, forward_mb=early, forward_repeat=repeat).validate()
    missing = good.backward_mb.copy()
    missing[missing == 1] = -1
    with pytest.raises(tx.PlanError, match="never run backward"):
        dataclasses.replace(good, backward_mb=missing).validate()


def test_a_broken_weight_slot_is_rejected():
    good = build_schedule("zbh1", 2, 2)
    bwd, wgt = good.events()[1], good.weight_events()

    def moved(stage: int, mb: int, to: int | None, keep: bool = False) -> Schedule:
        weight, repeat = good.weight_mb.copy(), good.weight_repeat.copy()
        if not keep:
            weight[wgt[(stage, mb, 0)], stage] = repeat[wgt[(stage, mb, 0)], stage] = -1
        if to is not None:
            weight[to, stage], repeat[to, stage] = mb, 0
        return dataclasses.replace(good, weight_mb=weight, weight_repeat=repeat)

    with pytest.raises(tx.PlanError, match="weight gradient at tick .* before its backward"):
        moved(1, 0, bwd[(1, 0, 0)] - 1).validate()
    with pytest.raises(tx.PlanError, match="never computes its weight gradient"):
        moved(1, 0, None).validate()
    with pytest.raises(tx.PlanError, match="runs the weight gradient of microbatch 0 .* twice"):
        moved(0, 0, good.ticks - 1, keep=True).validate()
    moved(1, 0, bwd[(1, 0, 0)]).validate()  # the weight slot runs after the backward slot of its tick


@pytest.mark.parametrize("args,match", [
    (("zigzag", 2, 2), "unknown pipeline schedule"),
    (("gpipe", 4, 2), "fewer than stages"),
    (("gpipe", 2, 2, 2), "use schedule='circular'"),
    (("1f1b", 2, 2, 2), "use schedule='interleaved'"),
    (("zbh1", 2, 2, 2), "use schedule='interleaved'"),
    (("zbh1", 4, 3), "fewer than stages"),
    (("interleaved", 4, 6, 2), "multiple of"),
    (("circular", 0, 2, 2), "positive integer"),
])
def test_unrunnable_counts_are_plan_errors(args, match):
    with pytest.raises(tx.PlanError, match=match):
        build_schedule(*args)


EXPLICIT = [c for c in CASES if c[0] in ("1f1b", "interleaved", "zbh1")]


@pytest.mark.parametrize("recompute", [False, True], ids=["stash", "recompute"])
@pytest.mark.parametrize("name,p,m,v", EXPLICIT)
def test_explicit_program_never_overwrites_a_live_slot(name, p, m, v, recompute):
    schedule = build_schedule(name, p, m, v)
    if recompute and schedule.split_backward:
        return  # zbh1's W slot reads stashed residuals: PP refuses recompute for it
    program = compile_schedule(schedule, recompute=recompute)
    c, T, last_vs = program.columns, schedule.ticks, v * p - 1
    sizes = {"in": program.input_slots, "res": program.residual_slots, "cot": program.cotangent_slots,
             "dh": program.layer_cotangent_slots}
    fwd, bwd = schedule.events()
    # What arrives where: activations from the previous virtual stage, cotangents from the next.
    act_arrivals, cot_arrivals = {}, {}
    for (stage, i, r), t in fwd.items():
        vs = r * p + stage
        if vs < last_vs and t + 1 < T:
            act_arrivals[(t + 1, (vs + 1) % p)] = (i, (vs + 1) // p)
    for (stage, i, r), t in bwd.items():
        vs = r * p + stage
        if vs > 0 and t + 1 < T:
            cot_arrivals[(t + 1, (vs - 1) % p)] = (i, (vs - 1) // p)
    for s in range(p):
        held = {name: {} for name in sizes}

        def write(buffer, slot, item):
            if slot != sizes[buffer] - 1:  # the scratch slot takes every idle write
                held[buffer][slot] = item

        def read(buffer, slot, item, what):
            assert slot != sizes[buffer] - 1 and held[buffer].get(slot) == item, (name, s, what, item)

        for t in range(T):
            write("in", int(c["a_slot"][t, s]), act_arrivals.get((t, s)))
            write("cot", int(c["c_slot"][t, s]), cot_arrivals.get((t, s)))
            f = (int(c["f_mb"][t, s]), int(c["f_rep"][t, s]))
            if f[0] >= 0:
                if not (s == 0 and f[1] == 0):
                    read("in", int(c["f_in"][t, s]), f, f"forward at tick {t}")
                if not recompute:
                    write("res", int(c["f_res"][t, s]), f)
                if f[1] * p + s == last_vs:
                    write("cot", int(c["f_cot"][t, s]), f)
            b = (int(c["b_mb"][t, s]), int(c["b_rep"][t, s]))
            if b[0] >= 0:
                if recompute and not (s == 0 and b[1] == 0):
                    read("in", int(c["b_in"][t, s]), b, f"recomputing backward at tick {t}")
                if not recompute:
                    read("res", int(c["b_res"][t, s]), b, f"backward at tick {t}")
                read("cot", int(c["b_cot"][t, s]), b, f"backward at tick {t}")
                if schedule.split_backward:
                    write("dh", int(c["b_dh"][t, s]), b)
            w = (int(c["w_mb"][t, s]), int(c["w_rep"][t, s]))
            if w[0] >= 0:
                read("res", int(c["w_res"][t, s]), w, f"weight gradient at tick {t}")
                read("dh", int(c["w_dh"][t, s]), w, f"weight gradient at tick {t}")
    # Stashed residuals: a slot per microbatch a stage holds at once, no more.
    if not recompute:
        assert program.residual_slots - 1 <= schedule.peak_stash


def test_schedule_prints_as_a_grid():
    text = str(build_schedule("1f1b", 2, 2))
    assert text.splitlines()[0].startswith("1f1b: 2 stages, 2 microbatches")
    assert "F0+B0" in text and text.count("stage ") == 2
    text = str(build_schedule("zbh1", 2, 2))
    assert text.splitlines()[0].startswith("zbh1: 2 stages, 2 microbatches, 1 repeat(s), 7 ticks, bubble 14.3%")
    assert "W1" in text and "+" not in text
