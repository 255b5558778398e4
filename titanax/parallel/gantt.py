"""A pipeline schedule as a Gantt chart: one row per stage, one column per tick, each cell coloured
by what the stage runs then (forward, backward, weight gradient, or nothing).

The chart is drawn from the schedule's table (:class:`~titanax.parallel.schedules.Schedule`), the
same one the pipeline compiles into its loop, so what it shows is what runs. Each cell is a
``<td class="tx-tick ...">`` with ``data-stage``, ``data-tick`` and ``data-mb`` attributes and one
class per busy slot: ``tx-fwd``, ``tx-bwd``, ``tx-w`` (a tick of 1F1B's steady state holds a forward
and a backward: both classes), or ``tx-idle``.
"""

from __future__ import annotations

from typing import Any

from titanax.html import classes, escape

__all__ = ["SLOT_CLASSES", "schedule_html"]

SLOT_CLASSES: dict[str, str] = {"forward": "tx-fwd", "backward": "tx-bwd", "weight": "tx-w"}
"""The class of a cell whose forward, backward or weight slot is busy."""

_SLOTS = (("forward", "F", "forward_mb", "forward_repeat"),
          ("backward", "B", "backward_mb", "backward_repeat"),
          ("weight", "W", "weight_mb", "weight_repeat"))


def _cell(schedule: Any, tick: int, stage: int) -> str:
    busy = []
    for kind, letter, mb_field, rep_field in _SLOTS:
        mb = int(getattr(schedule, mb_field)[tick, stage])
        if mb >= 0:
            busy.append((kind, letter, mb, int(getattr(schedule, rep_field)[tick, stage])))
    if not busy:
        return (f'<td class="tx-tick tx-idle" data-stage="{stage}" data-tick="{tick}" data-mb="" '
                f'title="stage {stage}, tick {tick}: idle"></td>')
    repeat = schedule.repeats > 1
    what = ", ".join(f"{kind} of microbatch {mb}" + (f" (repeat {rep})" if repeat else "")
                     for kind, _, mb, rep in busy)
    ops = "+".join(f"{letter}{mb}" + (f"r{rep}" if repeat else "") for _, letter, mb, rep in busy)
    cls = classes("tx-tick", *(SLOT_CLASSES[kind] for kind, *_ in busy))
    mbs = "+".join(str(mb) for _, _, mb, _ in busy)
    reps = "+".join(str(rep) for *_, rep in busy)
    return (f'<td class="{cls}" data-stage="{stage}" data-tick="{tick}" data-mb="{mbs}" '
            f'data-repeat="{reps}" data-ops="{ops}" title="stage {stage}, tick {tick}: {escape(what)}">'
            f"{'/'.join(str(mb) for _, _, mb, _ in busy)}</td>")


def schedule_html(schedule: Any) -> str:
    """The schedule as an HTML Gantt chart (needs the stylesheet of :mod:`titanax.html`).

    Args:
      schedule: a :class:`~titanax.parallel.schedules.Schedule` (``build_schedule(...)``,
        ``PP.schedule_table()``).

    Returns:
      A caption, ``<table class="tx-gantt">`` with one ``<tr class="tx-stage">`` per stage and one
      ``<td class="tx-tick ...">`` per tick in it (the microbatch as text), and a legend.

    Example:
      >>> chart = schedule_html(tx.parallel.build_schedule("1f1b", 2, 4))
      >>> chart.count('class="tx-tick'), chart.count("tx-fwd"), chart.count("tx-bwd")
      (12, 8, 8)
    """
    p, ticks = schedule.stages, schedule.ticks
    head = "".join(f"<th>{t}</th>" for t in range(ticks))
    rows = [f'<tr class="tx-stage" data-stage="{s}"><th>stage {s}</th>'
            + "".join(_cell(schedule, t, s) for t in range(ticks)) + "</tr>" for s in range(p)]
    how = ("backward by autodiff: the forward loop run in reverse" if schedule.autodiff else
           "explicit backward slots; weight gradients deferred into W slots" if schedule.split_backward
           else "explicit forward and backward slots")
    caption = (f'<p class="tx-note">{escape(schedule.name)}: {p} stages &times; {schedule.microbatches} '
               f"microbatches &times; {schedule.repeats} repeat(s), {ticks} ticks; bubble "
               f"{schedule.bubble_fraction:.1%}, peak stash {schedule.peak_stash} microbatches per stage; "
               f"{escape(how)}. A cell shows the microbatch.</p>")
    keys = [("fwd", "forward"), ("bwd", "backward" + (" (input gradient)" if schedule.split_backward else ""))]
    if schedule.split_backward:
        keys.append(("w", "W: weight gradient"))
    keys.append(("idle", "idle"))
    legend = "".join(f'<span class="tx-key"><span class="tx-swatch tx-key-{key}"></span>{escape(name)}</span>'
                     for key, name in keys)
    return (f'{caption}\n<div class="tx-scroll"><table class="tx-gantt" data-schedule="{escape(schedule.name)}" '
            f'data-stages="{p}" data-ticks="{ticks}"><thead><tr><th>tick</th>{head}</tr></thead><tbody>\n'
            + "\n".join(rows) + f'\n</tbody></table></div>\n<div class="tx-legend" style="margin-left:0">{legend}</div>')
