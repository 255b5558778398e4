"""A schedule table compiled for the explicit pipeline loop: per tick and stage, which slot of
each buffer (stage input, stashed residuals, cotangents) every busy F, B and W slot reads and
writes, assigned by reusing a slot once its last reader has run."""

from __future__ import annotations

import dataclasses

import numpy as np

from titanax.parallel.schedules import Schedule

__all__ = ["Program", "compile_schedule"]


@dataclasses.dataclass(frozen=True)
class Program:
    """Per tick and stage, everything the loop body reads (int32 ``[ticks, stages]`` each), and the
    slots of each buffer. An idle slot's writes go to each buffer's last (scratch) slot."""

    columns: dict[str, np.ndarray]
    input_slots: int
    residual_slots: int
    cotangent_slots: int
    layer_cotangent_slots: int


def _assign_slots(intervals: dict[tuple[int, int, int], tuple[int, int]], stages: int) -> tuple[dict, int]:
    """Greedy interval colouring per stage: a slot is reused once its last reader's tick has passed."""
    slots: dict[tuple[int, int, int], int] = {}
    most = 0
    for s in range(stages):
        busy_until: list[int] = []
        for key, (start, end) in sorted(((k, v) for k, v in intervals.items() if k[0] == s), key=lambda kv: kv[1]):
            for slot, until in enumerate(busy_until):
                if until < start:
                    busy_until[slot] = end
                    break
            else:
                slot = len(busy_until)
                busy_until.append(end)
            slots[key] = slot
        most = max(most, len(busy_until))
    return slots, most


def compile_schedule(schedule: Schedule, *, recompute: bool = False) -> Program:
    """Turn an explicit schedule's table into the loop's columns: which slot of which buffer each
    busy slot reads and writes, and where arriving activations and cotangents are kept.

    Args:
      schedule: a validated 1F1B-style table (``1f1b``, ``interleaved``, ``zbh1``).
      recompute: the backward slot recomputes the stage from its stashed input (inputs are then
        kept until the backward, and no residuals are stashed).

    Returns:
      The :class:`Program`.
    """
    p, v = schedule.stages, schedule.repeats
    last_vs = v * p - 1
    fwd, bwd = schedule.events()
    split = schedule.split_backward
    wgt = schedule.weight_events() if split else {}
    vs_of = lambda s, r: r * p + s
    where_of = lambda vs: (vs % p, vs // p)  # (stage, repeat)
    input_iv, res_iv, cot_iv, dh_iv = {}, {}, {}, {}
    for (s, i, r), tf in fwd.items():
        vs = vs_of(s, r)
        if vs > 0:
            ps, pr = where_of(vs - 1)
            input_iv[(s, i, r)] = (fwd[(ps, i, pr)] + 1, bwd[(s, i, r)] if recompute else tf)
        if not recompute:
            res_iv[(s, i, r)] = (tf, wgt[(s, i, r)] if split else bwd[(s, i, r)])
        if vs < last_vs:
            ns, nr = where_of(vs + 1)
            cot_iv[(s, i, r)] = (bwd[(ns, i, nr)] + 1, bwd[(s, i, r)])
        else:
            cot_iv[(s, i, r)] = (tf, bwd[(s, i, r)])
        if split:
            dh_iv[(s, i, r)] = (bwd[(s, i, r)], wgt[(s, i, r)])
    inputs, n_in = _assign_slots(input_iv, p)
    residuals, n_res = _assign_slots(res_iv, p)
    cots, n_cot = _assign_slots(cot_iv, p)
    dhs, n_dh = _assign_slots(dh_iv, p)
    T = schedule.ticks
    scratch = {"in": n_in, "res": n_res, "cot": n_cot, "dh": n_dh}
    columns = {
        "f_mb": schedule.forward_mb, "f_rep": np.maximum(schedule.forward_repeat, 0),
        "b_mb": schedule.backward_mb, "b_rep": np.maximum(schedule.backward_repeat, 0),
        "w_mb": schedule.weight_mb if split else np.full((T, p), -1, np.int32),
        "w_rep": np.maximum(schedule.weight_repeat, 0) if split else np.zeros((T, p), np.int32),
    }
    for name, buffer in (("a_slot", "in"), ("f_in", "in"), ("b_in", "in"), ("f_res", "res"), ("b_res", "res"),
                         ("w_res", "res"), ("f_cot", "cot"), ("c_slot", "cot"), ("b_cot", "cot"),
                         ("b_dh", "dh"), ("w_dh", "dh")):
        columns[name] = np.full((T, p), scratch[buffer], np.int32)
    for (s, i, r), t in fwd.items():
        vs = vs_of(s, r)
        if vs > 0:
            columns["f_in"][t, s] = inputs[(s, i, r)]
        if not recompute:
            columns["f_res"][t, s] = residuals[(s, i, r)]
        if vs == last_vs:
            columns["f_cot"][t, s] = cots[(s, i, r)]  # the tail's cotangent
        elif t + 1 < T:  # the output arrives at the next virtual stage next tick
            ns, nr = where_of(vs + 1)
            columns["a_slot"][t + 1, ns] = inputs[(ns, i, nr)]
    for (s, i, r), t in bwd.items():
        vs = vs_of(s, r)
        if recompute and vs > 0:
            columns["b_in"][t, s] = inputs[(s, i, r)]
        if not recompute:
            columns["b_res"][t, s] = residuals[(s, i, r)]
        columns["b_cot"][t, s] = cots[(s, i, r)]
        if split:
            columns["b_dh"][t, s] = dhs[(s, i, r)]
        if vs > 0 and t + 1 < T:
            ps, pr = where_of(vs - 1)
            columns["c_slot"][t + 1, ps] = cots[(ps, i, pr)]
    for (s, i, r), t in wgt.items():
        columns["w_res"][t, s] = residuals[(s, i, r)]
        columns["w_dh"][t, s] = dhs[(s, i, r)]
    columns = {k: np.asarray(c, np.int32) for k, c in columns.items()}
    return Program(columns, n_in + 1, n_res + 1, n_cot + 1, n_dh + 1)
