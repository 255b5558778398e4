"""Pipeline schedules as data: every table is valid, and its bubble and stash are as designed."""

from __future__ import annotations

import dataclasses

import pytest

import titanax as tx
from titanax.parallel.pipeline_explicit import compile_schedule
from titanax.parallel.schedules import build_schedule

CASES = [("gpipe", p, m, 1) for p, m in [(1, 1), (2, 2), (2, 5), (4, 4), (4, 16)]] + \
        [("circular", p, m, v) for p, m, v in [(2, 2, 2), (4, 4, 2), (4, 8, 3), (2, 3, 4)]] + \
        [("1f1b", p, m, 1) for p, m in [(1, 3), (2, 2), (2, 7), (4, 4), (4, 16)]] + \
        [("interleaved", p, m, v) for p, m, v in [(2, 2, 2), (2, 4, 2), (4, 8, 2), (4, 16, 3)]]


@pytest.mark.parametrize("name,p,m,v", CASES)
def test_every_microbatch_passes_every_stage_in_order(name, p, m, v):
    schedule = build_schedule(name, p, m, v)  # validates: order, arrival, forward before backward
    fwd, bwd = schedule.events()
    assert len(fwd) == len(bwd) == p * m * v
    for table in (schedule.forward_mb, schedule.backward_mb):  # one op per slot, by construction
        assert table.shape == (schedule.ticks, p)
    # Each (stage, tick) slot holds at most one forward and one backward: events are unique per slot.
    assert len(set(fwd.values())) <= schedule.ticks * p


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


@pytest.mark.parametrize("args,match", [
    (("zigzag", 2, 2), "unknown pipeline schedule"),
    (("gpipe", 4, 2), "fewer than stages"),
    (("gpipe", 2, 2, 2), "use schedule='circular'"),
    (("1f1b", 2, 2, 2), "use schedule='interleaved'"),
    (("interleaved", 4, 6, 2), "multiple of"),
    (("circular", 0, 2, 2), "positive integer"),
])
def test_unrunnable_counts_are_plan_errors(args, match):
    with pytest.raises(tx.PlanError, match=match):
        build_schedule(*args)


@pytest.mark.parametrize("name,p,m,v", [c for c in CASES if c[0] in ("1f1b", "interleaved")])
def test_explicit_program_never_overwrites_a_live_stash_slot(name, p, m, v):
    schedule = build_schedule(name, p, m, v)
    program = compile_schedule(schedule)
    c = program.columns
    # Replay the slot traffic: every read must find the item that was written for it.
    for s in range(p):
        stash: dict[int, tuple[int, int]] = {}
        arrivals = {}
        for (stage, i, r), t in schedule.events()[0].items():
            vs = r * p + stage
            if vs < v * p - 1 and t + 1 < schedule.ticks:
                nxt = ((vs + 1) % p, i, (vs + 1) // p)
                arrivals[(t + 1, nxt[0])] = (nxt[1], nxt[2])
        for t in range(schedule.ticks):
            if c["a_valid"][t, s]:
                stash[int(c["a_slot"][t, s])] = arrivals[(t, s)]
            for kind in ("f", "b"):
                mb, rep = int(c[f"{kind}_mb"][t, s]), int(c[f"{kind}_rep"][t, s])
                if mb >= 0 and not (s == 0 and rep == 0):
                    assert stash[int(c[f"{kind}_slot"][t, s])] == (mb, rep), (name, s, t, kind)
    assert program.stash_slots <= schedule.peak_stash


def test_schedule_prints_as_a_grid():
    text = str(build_schedule("1f1b", 2, 2))
    assert text.splitlines()[0].startswith("1f1b: 2 stages, 2 microbatches")
    assert "F0+B0" in text and text.count("stage ") == 2
