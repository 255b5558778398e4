"""``titanax describe --html``: a run's description as one self-contained page.

The page holds what the text holds, drawn: the mesh and plan (with the pipeline's schedule as a
Gantt chart), memory per device as stacked bars (parameters, optimizer state, model state and the
step's temporaries, against the device's memory when ``--device`` or ``--device-memory`` names it),
the per-parameter layout table, and the collectives by kind and by mesh axis.
"""

from __future__ import annotations

from typing import Any

from titanax.html import bar, escape, pre, section
from titanax.parallel.report import layout_html, plan_html
from titanax.profiling.report import collectives_html
from titanax.units import human_bytes, human_count

__all__ = ["memory_html", "run_html"]


def memory_html(description: Any) -> str:
    """One device's memory as stacked bars: the train state plus the compiled step's temporaries,
    and, when there is an analytic activation figure, the train state plus those activations.

    Args:
      description: a :class:`~titanax.config.describe.RunDescription`.

    Returns:
      The bars, their legends and the verdict (with a device).
    """
    d = description
    state = [("parameters", d.param_bytes), ("optimizer state", d.optimizer_bytes),
             ("model state", d.model_state_bytes)]
    capacity = d.device.bytes if d.device is not None else None
    label = d.device.name if d.device is not None else "device memory"
    parts = []
    if d.stats.temp_bytes is not None:
        parts.append(bar("compiled step", [*state, ("activations/temporaries", d.stats.temp_bytes)],
                         capacity=capacity, capacity_label=label))
    if d.activations is not None:
        parts.append(bar("analytic activations", [*state, ("activations (analytic)", d.activations.per_device_bytes)],
                         capacity=capacity, capacity_label=label))
    if not parts:
        parts.append(bar("train state", state, capacity=capacity, capacity_label=label))
    notes = [f"compiled for the global batch {d.batch_shapes}; temporaries are XLA's scratch buffers for one "
             f"step on the {d.backend} backend"
             + (f", which keeps {d.compute_dtype} activations in float32" if d.backend == "cpu"
                and d.compute_dtype != "float32" else "")]
    if d.device is not None:
        notes.append(d.verdict())
    else:
        notes.append("name the device (--device h100, --device-memory 80GiB) to draw its memory and get a verdict")
    return "\n".join(parts) + "".join(f'\n<p class="tx-note">{escape(n)}</p>' for n in notes)


def run_html(description: Any) -> str:
    """The body of the ``titanax describe`` page.

    Args:
      description: a :class:`~titanax.config.describe.RunDescription`.

    Returns:
      Sections ``mesh``, ``plan``, ``memory``, ``layout`` and ``collectives`` (``data-part``).
    """
    d = description
    layout = layout_html(d.layout_table) if d.layout_table is not None else pre(d.layout)
    params = (f'<p class="tx-note">{escape(human_count(d.parameter_count))} parameters in all, '
              f"{escape(human_bytes(d.param_bytes))} on one device</p>\n")
    flops = (f'<p class="tx-note">FLOPs per step per device {escape(human_count(d.stats.flops))} (XLA cost '
             "model, a loop body counted once per trip)</p>" if d.stats.flops is not None else "")
    footer = (f'<p class="tx-note">compiled in {d.compile_seconds:.1f} s by the {escape(d.backend)} backend; '
              "nothing was allocated or trained</p>")
    return "\n".join([
        section("Mesh", pre(d.mesh), name="mesh"),
        section("Plan", plan_html(d.plan, d.schedule), name="plan"),
        section("Memory per device", memory_html(d), name="memory"),
        section("Parameters", params + layout, name="layout"),
        section("Collectives per step", collectives_html(d.stats, d.collectives_by_axis) + flops, name="collectives"),
        footer,
    ])
