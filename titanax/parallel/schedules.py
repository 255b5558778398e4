"""Pipeline schedules as data: which stage does what at every tick.

A schedule is a table, built by a pure function and checked on its own before any program runs.
Stage ``s`` of ``p`` holds, for each repeat ``r`` of ``v``, the *virtual stage* ``r * p + s``
(layers are split into ``v * p`` consecutive chunks; a microbatch passes virtual stages
``0, 1, ..., v*p - 1`` in order, so it visits the devices ``v`` times around the ring).

Every tick has one **forward slot**, one **backward slot** and one **weight slot** per stage; each
holds a (microbatch, repeat) pair or is idle (``-1``). Within a tick the slots run in that order.
An activation produced at tick ``t`` reaches the next virtual stage at tick ``t + 1``; so does a
cotangent going the other way. In most schedules the backward slot computes both the input and
the weight gradient and the weight slots stay idle; a *split* schedule's backward slot (``B``)
computes only the input gradient, which is all the previous stage waits for, and its weight slot
(``W``) computes the weight gradient later, where the stage would otherwise idle.

The programs run in lockstep: every stage executes tick ``t`` together, so a tick lasts as long
as its busiest stage's work (idle slots cost nothing). :meth:`Schedule.tick_costs` weighs the
slots (forward 1, fused backward 2, split backward 1, weight 1) and
:attr:`Schedule.bubble_fraction` is the idle share of that time.

* ``gpipe``: all forwards, then all backwards (backward by autodiff, which runs the forward
  loop in reverse); ``p - 1`` idle ticks at each end.
* ``circular``: gpipe over ``v`` repeats; each microbatch re-enters stage 0 after stage ``p - 1``
  (needs ``m >= p``); the bubble shrinks to ``(p - 1) / (v m + p - 1)``.
* ``1f1b``: one forward and one backward per tick in the steady state; stage ``s`` keeps at
  most ``2 (p - s) - 1`` microbatch inputs instead of ``m`` (``m + 2p - 2`` ticks); bubble
  ``(p - 1) / (m + p - 1)``.
* ``interleaved``: 1F1B over ``v`` virtual stages per device (Megatron's interleaved order).
* ``zbh1``: zero bubble H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): one
  ``F``, ``B`` or ``W`` per stage per tick, the weight gradients deferred into 1F1B's cool-down
  bubble; ``3m + p - 1`` ticks, bubble ``(p - 1) / (3m + p - 1)`` (a third of 1F1B's for large
  ``m``), at most ``p`` microbatches held per stage, as in 1F1B.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from titanax.exceptions import PlanError
from titanax.html import Report
from titanax.parallel.gantt import schedule_html

__all__ = ["SCHEDULES", "Schedule", "build_schedule"]

SCHEDULES: tuple[str, ...] = ("gpipe", "circular", "1f1b", "interleaved", "zbh1")
IDLE = -1

# Slot costs in units of one chunk's forward: a backward computes two products per matmul (the
# input and the weight gradient), each about the size of the forward's one.
FORWARD_COST = 1
FUSED_BACKWARD_COST = 2
INPUT_GRAD_COST = 1
WEIGHT_GRAD_COST = 1

Events = dict[tuple[int, int, int], int]


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A pipeline schedule: per tick and stage, a forward, a backward and a weight slot.

    Arrays are ``int32 [ticks, stages]``; ``-1`` marks an idle slot. The weight arrays are
    keyword-only; schedules that do not split the backward pass fill them with ``-1``.
    """

    name: str
    """One of :data:`SCHEDULES`."""
    stages: int
    """Pipeline stages ``p`` (devices on the pipeline axis)."""
    microbatches: int
    """Microbatches ``m`` per step."""
    repeats: int
    """Virtual stages per device ``v`` (1 for gpipe, 1f1b and zbh1)."""
    forward_mb: np.ndarray
    """Microbatch in the forward slot."""
    forward_repeat: np.ndarray
    """Repeat (which of the stage's ``v`` layer chunks) in the forward slot."""
    backward_mb: np.ndarray
    """Microbatch in the backward slot (input and weight gradient, or only the input gradient
    when :attr:`split_backward`)."""
    backward_repeat: np.ndarray
    """Repeat in the backward slot."""
    autodiff: bool
    """Backward by autodiff of the forward loop (gpipe, circular) rather than explicit slots."""
    _: dataclasses.KW_ONLY
    weight_mb: np.ndarray
    """Microbatch in the weight slot (weight gradient of a split backward); all ``-1`` unless
    :attr:`split_backward`."""
    weight_repeat: np.ndarray
    """Repeat in the weight slot."""

    @property
    def ticks(self) -> int:
        return int(self.forward_mb.shape[0])

    @property
    def split_backward(self) -> bool:
        """Whether backward slots compute only input gradients and weight slots the rest."""
        return bool((self.weight_mb >= 0).any())

    @property
    def forward_ticks(self) -> int:
        """Ticks of the forward loop (for autodiff schedules: the loop that is compiled)."""
        busy = np.nonzero((self.forward_mb >= 0).any(axis=1))[0]
        return int(busy[-1] + 1) if busy.size else 0

    def stage_costs(self) -> np.ndarray:
        """Work of each stage in each tick, in forward units.

        Returns:
          ``int [ticks, stages]``: the sum of the busy slots' costs (forward 1; backward 2, or 1
          when split; weight 1).
        """
        backward = INPUT_GRAD_COST if self.split_backward else FUSED_BACKWARD_COST
        return (FORWARD_COST * (self.forward_mb >= 0) + backward * (self.backward_mb >= 0)
                + WEIGHT_GRAD_COST * (self.weight_mb >= 0)).astype(np.int64)

    def tick_costs(self) -> np.ndarray:
        """How long each tick lasts in lockstep: its busiest stage's work.

        Returns:
          ``int [ticks]``, in forward units (0 for a tick where every stage idles).
        """
        return self.stage_costs().max(axis=1, initial=0)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the stages' time when the table runs in lockstep.

        ``1 - total work / (stages * sum of tick_costs())``: a stage idles in a tick for the
        difference between the tick's duration and its own work. For gpipe and circular (forward
        ticks 1, reversed backward ticks 2) this is ``(p - 1) / (v m + p - 1)``; for 1f1b it is
        ``(p - 1) / (m + p - 1)``.
        """
        total = float(self.tick_costs().sum())
        return 1.0 - float(self.stage_costs().sum()) / (self.stages * total) if total else 0.0

    def in_flight(self, until: Literal["backward", "weight"] | None = None) -> np.ndarray:
        """Microbatches a stage holds: forward done, and the op that frees them not yet.

        Args:
          until: ``"backward"`` counts each microbatch until its backward slot (the residuals of
            the input gradient), ``"weight"`` until its weight slot (falls back to the backward
            in a schedule that does not split it). ``None``: the last of the two, i.e. as long as
            anything of the microbatch is still needed.

        Returns:
          ``int [ticks, stages]``.
        """
        if until not in (None, "backward", "weight"):
            raise PlanError(f"in_flight(until={until!r})", suggestion="use 'backward', 'weight' or None")
        release = self.weight_mb if self.split_backward and until != "backward" else self.backward_mb
        started = np.cumsum(self.forward_mb >= 0, axis=0)
        finished = np.cumsum(release >= 0, axis=0)
        # The residuals of the op run at tick t are still needed during t.
        finished_before = np.vstack([np.zeros((1, self.stages), int), finished[:-1]])
        return started - finished_before

    @property
    def peak_stash(self) -> int:
        """Most microbatches any stage keeps at once, forward to the op that frees them
        (activation memory grows with it)."""
        return int(self.in_flight().max())

    def _slot_events(self, kind: str, mb: np.ndarray, rep: np.ndarray) -> Events:
        out: Events = {}
        for t, s in zip(*np.nonzero(mb >= 0)):
            key = (int(s), int(mb[t, s]), int(rep[t, s]))
            if key in out:
                raise PlanError(f"schedule {self.name}: stage {key[0]} runs the {kind} of microbatch "
                                f"{key[1]} (repeat {key[2]}) twice",
                                suggestion="a schedule must run each operation once")
            out[key] = int(t)
        return out

    def events(self) -> tuple[Events, Events]:
        """``(forward, backward)``: tick of each ``(stage, microbatch, repeat)``.

        Raises:
          PlanError: an operation appears twice.
        """
        return (self._slot_events("forward", self.forward_mb, self.forward_repeat),
                self._slot_events("backward", self.backward_mb, self.backward_repeat))

    def weight_events(self) -> Events:
        """Tick of each ``(stage, microbatch, repeat)``'s weight slot (empty unless split).

        Raises:
          PlanError: an operation appears twice.
        """
        return self._slot_events("weight gradient", self.weight_mb, self.weight_repeat)

    def validate(self) -> None:
        """Check the table: every microbatch passes every virtual stage once, in order, forward
        before backward, each arriving a tick after the previous virtual stage produced it; in a
        split schedule every backward has one weight slot, in its tick or later.

        Raises:
          PlanError: naming the first violation.
        """
        p, m, v = self.stages, self.microbatches, self.repeats
        tables = (self.forward_mb, self.forward_repeat, self.backward_mb, self.backward_repeat,
                  self.weight_mb, self.weight_repeat)
        if any(table.shape != (self.ticks, p) for table in tables):
            raise PlanError(f"schedule {self.name}: slot tables of shapes {[t.shape for t in tables]}, "
                            f"not all (ticks, {p})", suggestion="build every table as [ticks, stages]")
        fwd, bwd = self.events()
        wgt = self.weight_events()
        split = self.split_backward
        last = v * p - 1
        for i in range(m):
            for vs in range(v * p):
                r, s = divmod(vs, p)
                key = (s, i, r)
                where = f"schedule {self.name}: microbatch {i} at virtual stage {vs} (stage {s}, repeat {r})"
                if key not in fwd or key not in bwd:
                    raise PlanError(f"{where} is never run {'forward' if key not in fwd else 'backward'}",
                                    suggestion="every microbatch must pass every stage")
                if vs > 0:
                    before = fwd[((vs - 1) % p, i, (vs - 1) // p)]
                    if fwd[key] <= before:
                        raise PlanError(f"{where} runs forward at tick {fwd[key]}, before its input arrives "
                                        f"(produced at tick {before})",
                                        suggestion="forward of virtual stage k must follow that of k - 1")
                if vs < last:
                    after = bwd[((vs + 1) % p, i, (vs + 1) // p)]
                    if bwd[key] <= after:
                        raise PlanError(f"{where} runs backward at tick {bwd[key]}, before its cotangent "
                                        f"arrives (produced at tick {after})",
                                        suggestion="backward of virtual stage k must follow that of k + 1")
                elif bwd[key] < fwd[key]:
                    raise PlanError(f"{where} runs backward before forward",
                                    suggestion="the last stage starts the backward after its forward")
                if split:
                    if key not in wgt:
                        raise PlanError(f"{where} never computes its weight gradient",
                                        suggestion="a split backward needs one weight slot per backward slot")
                    # The weight slot runs after the backward slot within a tick, so the same tick is fine.
                    if wgt[key] < bwd[key]:
                        raise PlanError(f"{where} computes its weight gradient at tick {wgt[key]}, before "
                                        f"its backward (tick {bwd[key]})",
                                        suggestion="the weight gradient needs the backward's cotangent")
        expected = p * m * v
        if len(fwd) != expected or len(bwd) != expected or (split and len(wgt) != expected):
            raise PlanError(f"schedule {self.name} has {len(fwd)} forward, {len(bwd)} backward and {len(wgt)} "
                            f"weight slots for {expected} operations", suggestion="remove the extra operations")

    def describe(self) -> Report:
        """The table as text: one row per stage, one column per tick (``F3`` / ``B3`` / ``W3``,
        several slots of a tick joined by ``+``, ``.`` idle); as HTML (``.html()``, ``.save(path)``,
        a notebook's display) a Gantt chart (:func:`~titanax.parallel.gantt.schedule_html`)."""
        def cell(mb: int, rep: int, kind: str) -> str:
            return f"{kind}{mb}" + (f"r{rep}" if self.repeats > 1 else "")

        grid = []
        for s in range(self.stages):
            row = []
            for t in range(self.ticks):
                busy = [cell(int(mb[t, s]), int(rep[t, s]), kind) for kind, mb, rep in (
                    ("F", self.forward_mb, self.forward_repeat), ("B", self.backward_mb, self.backward_repeat),
                    ("W", self.weight_mb, self.weight_repeat)) if mb[t, s] >= 0]
                row.append("+".join(busy) or ".")
            grid.append(row)
        width = max((len(c) for row in grid for c in row), default=1) + 1
        rows = [(f"{self.name}: {self.stages} stages, {self.microbatches} microbatches, "
                 f"{self.repeats} repeat(s), {self.ticks} ticks, bubble {self.bubble_fraction:.1%}, "
                 f"peak stash {self.peak_stash}")]
        rows += [f"stage {s}: " + "".join(c.ljust(width) for c in row).rstrip() for s, row in enumerate(grid)]
        return Report("\n".join(rows), schedule_html(self), title=f"Pipeline schedule {self.name}")

    def __str__(self) -> str:
        return str(self.describe())

    def _repr_html_(self) -> str:
        """The Gantt chart, for notebooks."""
        return self.describe()._repr_html_()


def _tables(ticks: int, p: int, count: int = 6) -> list[np.ndarray]:
    return [np.full((ticks, p), IDLE, np.int32) for _ in range(count)]


def _autodiff(name: str, p: int, m: int, v: int) -> Schedule:
    """gpipe (v = 1) and circular: item k = r m + i enters stage s at tick k + s; the backward is
    the forward loop in reverse."""
    forward_ticks = v * m + p - 1
    fm, fr, bm, br, wm, wr = _tables(2 * forward_ticks, p)
    for s in range(p):
        for r in range(v):
            for i in range(m):
                t = r * m + i + s
                fm[t, s], fr[t, s] = i, r
                back = 2 * forward_ticks - 1 - t
                bm[back, s], br[back, s] = i, r
    return Schedule(name, p, m, v, fm, fr, bm, br, autodiff=True, weight_mb=wm, weight_repeat=wr)


def _one_f_one_b(name: str, p: int, m: int, v: int) -> Schedule:
    """1F1B (v = 1) and interleaved 1F1B with one forward and one backward slot per tick.

    A stage runs its forwards in Megatron's order (groups of ``p`` microbatches sweep the stage's
    ``v`` chunks in turn), the ``k``-th at tick ``k + s``; backwards sweep the chunks in reverse,
    the ``j``-th at tick ``j + (p - 1 - s) + v p - 1``, the earliest at which the last virtual
    stage has its cotangent. In the steady state every tick holds one forward and one backward.
    """
    fwd_ticks = {}
    bwd_ticks = {}
    for i in range(m):
        group, lane = divmod(i, p)
        for r in range(v):
            k = group * v * p + r * p + lane
            j = group * v * p + (v - 1 - r) * p + lane
            for s in range(p):
                fwd_ticks[(s, i, r)] = k + s
                bwd_ticks[(s, i, r)] = j + (p - 1 - s) + v * p - 1
    ticks = max(bwd_ticks.values()) + 1
    fm, fr, bm, br, wm, wr = _tables(ticks, p)
    for (s, i, r), t in fwd_ticks.items():
        fm[t, s], fr[t, s] = i, r
    for (s, i, r), t in bwd_ticks.items():
        bm[t, s], br[t, s] = i, r
    return Schedule(name, p, m, v, fm, fr, bm, br, autodiff=False, weight_mb=wm, weight_repeat=wr)


def _zbh1_order(p: int, m: int, s: int) -> list[tuple[str, int]]:
    """Stage ``s``'s operations in the order ZB-H1 runs them: ``("F" | "B" | "W", microbatch)``.

    ``p - s - 1`` warm-up forwards as in 1F1B; then ``s`` pairs ``F B`` whose weight gradients
    are deferred (the later the stage, the longer its cool-down bubble they fill); then ``F B W``
    while forwards remain; then ``B W``; then the ``s`` deferred ``W``. Each stage therefore
    holds at most ``p - s`` microbatches between forward and backward, and at most ``p`` between
    forward and weight gradient.
    """
    order: list[tuple[str, int]] = []
    f = b = w = 0
    for _ in range(min(p - s - 1, m)):
        order.append(("F", f))
        f += 1
    for _ in range(min(s, m - f)):
        order += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    while f < m:
        order += [("F", f), ("B", b), ("W", w)]
        f, b, w = f + 1, b + 1, w + 1
    while b < m:
        order += [("B", b), ("W", w)]
        b, w = b + 1, w + 1
    order += [("W", k) for k in range(w, m)]
    return order


def _zbh1(name: str, p: int, m: int) -> Schedule:
    """ZB-H1: every stage runs its :func:`_zbh1_order` one operation per tick, each as soon as
    its input is there (list scheduling in lockstep).

    An ``F`` needs the previous stage's ``F`` of the microbatch one tick earlier, a ``B`` the next
    stage's ``B`` (the last stage: its own ``F``) one tick earlier, a ``W`` its own ``B``. For
    ``m >= p`` this gives ``3m + p - 1`` ticks: the last stage starts at tick ``p - 1`` and never
    idles again; the deferred weight gradients fill the ticks 1F1B leaves idle while the last
    cotangents travel to stage 0.
    """
    orders = [_zbh1_order(p, m, s) for s in range(p)]
    done: dict[tuple[str, int, int], int] = {}
    position = [0] * p
    rows: list[list[tuple[str, int] | None]] = []
    while any(position[s] < len(orders[s]) for s in range(p)):
        t = len(rows)
        row: list[tuple[str, int] | None] = [None] * p
        for s in range(p):
            if position[s] == len(orders[s]):
                continue
            kind, i = orders[s][position[s]]
            if kind == "F":
                needs = None if s == 0 else ("F", s - 1, i)
            elif kind == "B":
                needs = ("B", s + 1, i) if s < p - 1 else ("F", s, i)
            else:
                needs = ("B", s, i)
            # What another stage (or this one) produced at tick t - 1 or earlier is here now.
            if needs is None or done.get(needs, t) < t:
                row[s] = (kind, i)
        if not any(row):  # nothing can ever run again: the orders wait on each other
            raise PlanError(f"schedule {name}: no stage can proceed at tick {t}",
                            suggestion="this is a bug in the zbh1 builder; please report it")
        for s, op in enumerate(row):
            if op is not None:
                done[(op[0], s, op[1])] = t
                position[s] += 1
        rows.append(row)
    fm, fr, bm, br, wm, wr = _tables(len(rows), p)
    slots = {"F": (fm, fr), "B": (bm, br), "W": (wm, wr)}
    for t, row in enumerate(rows):
        for s, op in enumerate(row):
            if op is not None:
                mb, rep = slots[op[0]]
                mb[t, s], rep[t, s] = op[1], 0
    return Schedule(name, p, m, 1, fm, fr, bm, br, autodiff=False, weight_mb=wm, weight_repeat=wr)


def build_schedule(name: str, stages: int, microbatches: int, repeats: int = 1) -> Schedule:
    """Build and validate a schedule table.

    Args:
      name: ``gpipe``, ``circular``, ``1f1b``, ``interleaved`` or ``zbh1`` (zero bubble H1:
        split backward, ``3m + p - 1`` single-operation ticks).
      stages: pipeline stages ``p``.
      microbatches: microbatches ``m`` per step (at least ``p``).
      repeats: virtual stages per device ``v`` (circular and interleaved; 1 otherwise).

    Returns:
      The validated :class:`Schedule`.

    Raises:
      PlanError: an unknown name, or counts the schedule cannot run.

    Example:
      >>> build_schedule("gpipe", 2, 2).forward_mb.T.tolist()
      [[0, 1, -1, -1, -1, -1], [-1, 0, 1, -1, -1, -1]]
    """
    if name not in SCHEDULES:
        raise PlanError(f"unknown pipeline schedule {name!r}", suggestion=f"use one of {', '.join(SCHEDULES)}",
                        owner="PP", field="schedule", value=name)
    for what, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"PP({what}={value!r}) must be a positive integer",
                            suggestion="e.g. PP(stages=4, microbatches=8)", owner="PP", field=what, value=value)
    if microbatches < stages:
        raise PlanError(f"PP(microbatches={microbatches}) is fewer than stages={stages}: stages would idle "
                        "for most of the step", suggestion=f"use microbatches >= {stages} (4 x stages keeps the "
                        f"bubble near {(stages - 1) / (5 * stages - 1):.0%})",
                        owner="PP", field="microbatches", value=microbatches)
    if name in ("gpipe", "1f1b", "zbh1") and repeats != 1:
        better = "circular" if name == "gpipe" else "interleaved"
        raise PlanError(f"schedule {name!r} runs one chunk per stage, not repeats={repeats}",
                        suggestion=f"use schedule={better!r} for {repeats} virtual stages per device, "
                        "or repeats=1", owner="PP", field="repeats", value=repeats)
    if name == "interleaved" and microbatches % stages:
        raise PlanError(f"the interleaved schedule needs microbatches ({microbatches}) to be a multiple of "
                        f"stages ({stages})", suggestion=f"use microbatches={stages * max(1, microbatches // stages)}",
                        owner="PP", field="microbatches", value=microbatches)
    if name in ("gpipe", "circular"):
        schedule = _autodiff(name, stages, microbatches, repeats)
    elif name == "zbh1":
        schedule = _zbh1(name, stages, microbatches)
    else:
        schedule = _one_f_one_b(name, stages, microbatches, repeats)
    schedule.validate()
    return schedule
