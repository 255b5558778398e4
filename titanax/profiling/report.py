"""The collectives of a compiled step as HTML: counts and bytes per kind, and per mesh axis.

The figures are :func:`~titanax.profiling.inspect`'s and
:func:`~titanax.profiling.collectives_by_axis`'s (per step and per device, a loop body counted once
per trip), so the rows add up to what ``titanax describe`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from titanax.html import escape, numeric_columns, table
from titanax.profiling.collectives import CollectiveStats
from titanax.units import human_bytes

__all__ = ["axes_label", "collectives_html"]


def axes_label(axes: tuple[str, ...]) -> str:
    """``"data"``, ``"data+tensor"``, or for groups of one device ``"(within one device)"``."""
    return "+".join(axes) if axes else "(within one device)"


def collectives_html(stats: Any, by_axis: Mapping[tuple[str, ...], Mapping[str, CollectiveStats]] | None = None) -> str:
    """Two tables: collectives by kind (``<tr class="tx-coll">``), then by the mesh axes they span
    and kind (``<tr class="tx-coll-axis">``), each row carrying ``data-kind``, ``data-count`` and
    ``data-bytes`` (and ``data-axes``).

    Args:
      stats: the step's :class:`~titanax.profiling.CompiledStats`.
      by_axis: ``collectives_by_axis(compiled, mesh)``, or ``None`` to leave the second table out.

    Returns:
      The HTML; a note when the step has no collective.

    Example:
      >>> stats = tx.profiling.CompiledStats(collectives={"all-reduce": tx.profiling.CollectiveStats(4, 4096, 1, 1024)})
      >>> collectives_html(stats).count('<tr class="tx-coll"')
      1
    """
    kinds = [(kind, c) for kind, c in stats.collectives.items() if c.count]
    if not kinds:
        return '<p class="tx-note">no collectives: every device computes alone</p>'
    at_least = "at least " if stats.unknown_trip_loops else ""
    note = (f'<p class="tx-note">{at_least}{stats.total_collective_count} collectives, {at_least}'
            f"{escape(human_bytes(stats.total_collective_bytes))} per device per step (a loop body counts "
            "once per trip; bytes are each result's size on one device)</p>")
    header = ("kind", "ops per step", "bytes per step", "ops in the program")
    parts = [note, table(header, [(k, c.count, human_bytes(c.bytes), c.static_count) for k, c in kinds],
                         row_class="tx-coll", cell_classes=numeric_columns(4, {1, 2, 3}),
                         row_attrs=[{"kind": k, "count": c.count, "bytes": c.bytes} for k, c in kinds])]
    if by_axis:
        rows, attrs = [], []
        for axes, per_kind in by_axis.items():
            for kind, c in per_kind.items():
                if c.count:
                    rows.append((axes_label(axes), kind, c.count, human_bytes(c.bytes)))
                    attrs.append({"axes": ",".join(axes), "kind": kind, "count": c.count, "bytes": c.bytes})
        parts.append('<p class="tx-note">by the mesh axes each collective\'s device groups span:</p>')
        parts.append(table(("mesh axes", "kind", "ops per step", "bytes per step"), rows, row_class="tx-coll-axis",
                           cell_classes=numeric_columns(4, {2, 3}), row_attrs=attrs))
    return "\n".join(parts)
