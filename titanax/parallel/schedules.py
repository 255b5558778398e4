"""Pipeline schedules as data: which stage does what at every tick.

A schedule is a table, built by a pure function and checked on its own before any program runs.
Stage ``s`` of ``p`` holds, for each repeat ``r`` of ``v``, the *virtual stage* ``r * p + s``
(layers are split into ``v * p`` consecutive chunks; a microbatch passes virtual stages
``0, 1, ..., v*p - 1`` in order, so it visits the devices ``v`` times around the ring).

Every tick has one **forward slot** and one **backward slot** per stage; each holds a
(microbatch, repeat) pair or is idle (``-1``). Within a tick the forward slot runs first. An
activation produced at tick ``t`` reaches the next virtual stage at tick ``t + 1``; so does a
cotangent going the other way.

* ``gpipe``: all forwards, then all backwards (backward by autodiff, which runs the forward
  loop in reverse); ``p - 1`` idle ticks at each end.
* ``circular``: gpipe over ``v`` repeats; each microbatch re-enters stage 0 after stage ``p - 1``
  (needs ``m >= p``); the bubble shrinks to ``(p - 1) / (v m + p - 1)``.
* ``1f1b``: one forward and one backward per tick in the steady state; stage ``s`` keeps at
  most ``2 (p - s) - 1`` microbatch inputs instead of ``m`` (``m + 2p - 2`` ticks).
* ``interleaved``: 1F1B over ``v`` virtual stages per device (Megatron's interleaved order).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from titanax.exceptions import PlanError

__all__ = ["SCHEDULES", "Schedule", "build_schedule"]

SCHEDULES: tuple[str, ...] = ("gpipe", "circular", "1f1b", "interleaved")
IDLE = -1


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """A pipeline schedule: per tick and stage, a forward and a backward slot.

    Arrays are ``int32 [ticks, stages]``; ``-1`` marks an idle slot.
    """

    name: str
    """One of :data:`SCHEDULES`."""
    stages: int
    """Pipeline stages ``p`` (devices on the pipeline axis)."""
    microbatches: int
    """Microbatches ``m`` per step."""
    repeats: int
    """Virtual stages per device ``v`` (1 for gpipe and 1f1b)."""
    forward_mb: np.ndarray
    """Microbatch in the forward slot."""
    forward_repeat: np.ndarray
    """Repeat (which of the stage's ``v`` layer chunks) in the forward slot."""
    backward_mb: np.ndarray
    """Microbatch in the backward slot."""
    backward_repeat: np.ndarray
    """Repeat in the backward slot."""
    autodiff: bool
    """Backward by autodiff of the forward loop (gpipe, circular) rather than explicit slots."""

    @property
    def ticks(self) -> int:
        return int(self.forward_mb.shape[0])

    @property
    def forward_ticks(self) -> int:
        """Ticks of the forward loop (for autodiff schedules: the loop that is compiled)."""
        busy = np.nonzero((self.forward_mb >= 0).any(axis=1))[0]
        return int(busy[-1] + 1) if busy.size else 0

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the forward slots over the forward part of the schedule.

        For gpipe and circular this is ``(p - 1) / (v m + p - 1)``.
        """
        ticks = self.forward_ticks if self.autodiff else self.ticks
        busy = int((self.forward_mb[:ticks] >= 0).sum())
        return 1.0 - busy / (ticks * self.stages)

    def in_flight(self) -> np.ndarray:
        """``[ticks, stages]``: microbatch inputs a stage holds (forward done, backward not yet)."""
        started = np.cumsum(self.forward_mb >= 0, axis=0)
        finished = np.cumsum(self.backward_mb >= 0, axis=0)
        # The input of a backward run at tick t is still needed during t.
        finished_before = np.vstack([np.zeros((1, self.stages), int), finished[:-1]])
        return started - finished_before

    @property
    def peak_stash(self) -> int:
        """Most microbatch inputs any stage keeps at once (activation memory grows with it)."""
        return int(self.in_flight().max())

    def events(self) -> tuple[dict[tuple[int, int, int], int], dict[tuple[int, int, int], int]]:
        """``(forward, backward)``: tick of each ``(stage, microbatch, repeat)``."""
        out: list[dict[tuple[int, int, int], int]] = [{}, {}]
        for table, (mb, rep) in enumerate(((self.forward_mb, self.forward_repeat),
                                           (self.backward_mb, self.backward_repeat))):
            for t, s in zip(*np.nonzero(mb >= 0)):
                key = (int(s), int(mb[t, s]), int(rep[t, s]))
                if key in out[table]:
                    kind = ("forward", "backward")[table]
                    raise PlanError(f"schedule {self.name}: stage {key[0]} runs the {kind} of microbatch "
                                    f"{key[1]} (repeat {key[2]}) twice",
                                    suggestion="a schedule must run each operation once")
                out[table][key] = int(t)
        return out[0], out[1]

    def validate(self) -> None:
        """Check the table: every microbatch passes every virtual stage once, in order, forward
        before backward, each arriving a tick after the previous virtual stage produced it.

        Raises:
          PlanError: naming the first violation.
        """
        p, m, v = self.stages, self.microbatches, self.repeats
        fwd, bwd = self.events()
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
        expected = p * m * v
        if len(fwd) != expected or len(bwd) != expected:
            raise PlanError(f"schedule {self.name} has {len(fwd)} forward and {len(bwd)} backward slots "
                            f"for {expected} operations", suggestion="remove the extra operations")

    def describe(self) -> str:
        """The table as text: one row per stage, one column per tick (``F3`` / ``B3``, ``.`` idle)."""
        def cell(mb: int, rep: int, kind: str) -> str:
            if mb < 0:
                return "."
            return f"{kind}{mb}" + (f"r{rep}" if self.repeats > 1 else "")

        widest = cell(self.microbatches - 1, self.repeats - 1, "F")
        width = (len(widest) if self.autodiff else 2 * len(widest) + 1) + 1
        rows = [f"{self.name}: {self.stages} stages, {self.microbatches} microbatches, "
                f"{self.repeats} repeat(s), {self.ticks} ticks, bubble {self.bubble_fraction:.1%}, "
                f"peak stash {self.peak_stash}"]
        for s in range(self.stages):
            cells = []
            for t in range(self.ticks):
                f = cell(int(self.forward_mb[t, s]), int(self.forward_repeat[t, s]), "F")
                b = cell(int(self.backward_mb[t, s]), int(self.backward_repeat[t, s]), "B")
                cells.append((f if b == "." else b if f == "." else f + "+" + b).ljust(width))
            rows.append(f"stage {s}: " + "".join(cells).rstrip())
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.describe()


def _tables(ticks: int, p: int) -> list[np.ndarray]:
    return [np.full((ticks, p), IDLE, np.int32) for _ in range(4)]


def _autodiff(name: str, p: int, m: int, v: int) -> Schedule:
    """gpipe (v = 1) and circular: item k = r m + i enters stage s at tick k + s; the backward is
    the forward loop in reverse."""
    forward_ticks = v * m + p - 1
    fm, fr, bm, br = _tables(2 * forward_ticks, p)
    for s in range(p):
        for r in range(v):
            for i in range(m):
                t = r * m + i + s
                fm[t, s], fr[t, s] = i, r
                back = 2 * forward_ticks - 1 - t
                bm[back, s], br[back, s] = i, r
    return Schedule(name, p, m, v, fm, fr, bm, br, autodiff=True)


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
    fm, fr, bm, br = _tables(ticks, p)
    for (s, i, r), t in fwd_ticks.items():
        fm[t, s], fr[t, s] = i, r
    for (s, i, r), t in bwd_ticks.items():
        bm[t, s], br[t, s] = i, r
    return Schedule(name, p, m, v, fm, fr, bm, br, autodiff=False)


def build_schedule(name: str, stages: int, microbatches: int, repeats: int = 1) -> Schedule:
    """Build and validate a schedule table.

    Args:
      name: ``gpipe``, ``circular``, ``1f1b`` or ``interleaved``.
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
        raise PlanError(f"unknown pipeline schedule {name!r}", suggestion=f"use one of {', '.join(SCHEDULES)}")
    for what, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"PP({what}={value!r}) must be a positive integer",
                            suggestion="e.g. PP(stages=4, microbatches=8)")
    if microbatches < stages:
        raise PlanError(f"PP(microbatches={microbatches}) is fewer than stages={stages}: stages would idle "
                        "for most of the step", suggestion=f"use microbatches >= {stages} (4 x stages keeps the "
                        f"bubble near {(stages - 1) / (5 * stages - 1):.0%})")
    if name in ("gpipe", "1f1b") and repeats != 1:
        better = "circular" if name == "gpipe" else "interleaved"
        raise PlanError(f"schedule {name!r} runs one chunk per stage, not repeats={repeats}",
                        suggestion=f"use schedule={better!r} for {repeats} virtual stages per device")
    if name == "interleaved" and microbatches % stages:
        raise PlanError(f"the interleaved schedule needs microbatches ({microbatches}) to be a multiple of "
                        f"stages ({stages})", suggestion=f"use microbatches={stages * max(1, microbatches // stages)}")
    if name in ("gpipe", "circular"):
        schedule = _autodiff(name, stages, microbatches, repeats)
    else:
        schedule = _one_f_one_b(name, stages, microbatches, repeats)
    schedule.validate()
    return schedule
