"""The HTML parts of a model's and a plan's report: the per-array layout table, memory per device
as a stacked bar, the plan with its pipeline's Gantt chart.

``ShardedModel.describe()`` and ``Plan.describe()`` return a :class:`~titanax.html.Report`: the
text they always printed, which also renders (``.html()``, ``.save(path)``, a notebook's display)
as the page these functions build. ``titanax describe --html`` adds what only the compiled step
knows (temporaries, collectives) on top of the same parts.
"""

from __future__ import annotations

from typing import Any

from titanax.html import bar, escape, numeric_columns, pre, section, table

__all__ = ["device_capacity", "layout_html", "model_body", "model_memory_html", "plan_html"]


def layout_html(layout: Any) -> str:
    """The layout table: one row per array (path, shape, dtype, logical axes, PartitionSpec,
    bytes per device and in all), then the summary line.

    Rows of parameters are ``<tr class="tx-param">``, rows of other state (batch statistics, RNG
    keys) ``<tr class="tx-state">``; a row of an array held whole on every device of a mesh with
    several also has the class ``tx-replicated``.

    Args:
      layout: a :class:`~titanax.parallel.layout.Layout` (``sm.layout``, ``tx.tree_layout(...)``).

    Returns:
      The table's HTML.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> sm = tx.shard(nn.Dense(2), tx.Plan(data_parallel=tx.DP()), mesh, example=jnp.ones((8, 4)))
      >>> layout_html(sm.layout).count('<tr class="tx-param')
      2
    """
    several = layout.mesh.size > 1
    row_classes = [("tx-param" if e.is_param else "tx-state") + (" tx-replicated" if several and e.replicated else "")
                   for e in layout.entries]
    cells = numeric_columns(len(layout.HEADER), {5, 6})
    cells[0], cells[4] = "tx-mono", "tx-mono tx-spec"
    rows = table(layout.HEADER, layout.rows(), row_classes=row_classes, cell_classes=cells)
    return f'<div class="tx-scroll">{rows}</div>\n<p class="tx-note">{escape(layout.summary())}</p>'


def device_capacity(mesh: Any) -> int | None:
    """The memory of one of ``mesh``'s devices as the device reports it (``bytes_limit``), or
    ``None`` where it reports none (CPUs)."""
    try:
        stats = mesh.devices.flat[0].memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    limit = stats.get("bytes_limit") if stats else None
    return int(limit) if limit else None


def model_memory_html(layout: Any, capacity: int | None = None) -> str:
    """One device's share of a model's arrays as a stacked bar: parameters, then other state.

    Args:
      layout: the model's :class:`~titanax.parallel.layout.Layout`.
      capacity: one device's memory in bytes, drawn as the bar's full width; ``None``: unknown.

    Returns:
      The bar and its legend, with a note that optimizer state and activations come on top.
    """
    params = layout.bytes_per_device(params_only=True)
    state = layout.bytes_per_device(params_only=False) - params
    note = ("parameters and model state only; the optimizer state (about 2x the parameters for "
            "Adam), activations and temporaries come on top: <code>titanax describe --html</code> "
            "measures them from the compiled training step")
    return (bar("one device", [("parameters", params), ("model state", state)], capacity=capacity)
            + f'\n<p class="tx-note">{note}</p>')


def plan_html(text: str, schedule: Any = None) -> str:
    """The plan's text, and under pipeline parallelism its schedule as a Gantt chart.

    Args:
      text: ``Plan.describe``'s text.
      schedule: the pipeline's :class:`~titanax.parallel.schedules.Schedule`, or ``None``.

    Returns:
      The plan's HTML.
    """
    body = pre(text)
    if schedule is not None:
        body += "\n" + section("Pipeline schedule", schedule.describe().body, name="schedule")
    return body


def model_body(plan_text: str | None, schedule: Any, layout: Any, capacity: int | None) -> str:
    """The sections of ``ShardedModel.describe()``'s HTML: plan (and schedule), memory, layout."""
    parts = []
    if plan_text is not None:
        parts.append(section("Plan", plan_html(plan_text, schedule), name="plan"))
    parts.append(section("Memory per device", model_memory_html(layout, capacity), name="memory"))
    parts.append(section("Parameters", layout_html(layout), name="layout"))
    return "\n".join(parts)

