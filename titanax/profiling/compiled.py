"""What XLA actually built: memory, cost and collectives read from a compiled program.

Everything here is read from the compiled executable, never estimated from the Python program:

* memory from ``Compiled.memory_analysis()`` (XLA's buffer assignment),
* FLOPs, transcendentals and bytes accessed from ``Compiled.cost_analysis()`` (XLA's HLO cost
  model), plus the trips of ``while`` loops that model leaves out (it visits a loop body once),
  costed from the optimized HLO text by the same model's rules (:mod:`titanax.profiling.walk`),
* collectives from the same text: counts and bytes per run of the program (one step), a loop body
  counted once per trip.

All figures are **per device**: after SPMD partitioning every device runs the same program on its
shard, and that one program is what XLA reports on.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from titanax.profiling import inspect
  >>> compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 4)), jnp.ones((4, 2))).compile()
  >>> stats = inspect(compiled)
  >>> stats.argument_bytes, stats.flops
  (160, 128.0)
  >>> stats.count("all-reduce")
  0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax

from titanax.exceptions import TitanaxError
from titanax.profiling.collectives import (
    COLLECTIVE_KINDS,
    CollectiveStats,
    collective_stats,
    count_collectives,
)
from titanax.profiling.hlo import parse_hlo, shape_bytes
from titanax.profiling.stats import CompiledStats
from titanax.profiling.walk import BYTES, FLOPS, TRANSCENDENTALS, program_totals

# The package's names from before it was split in modules, still importable from here.
__all__ = [
    "COLLECTIVE_KINDS",
    "CollectiveStats",
    "CompiledStats",
    "count_collectives",
    "inspect",
    "shape_bytes",
]


def _as_list(value: Any) -> Any:
    """memory_analysis()/cost_analysis() return one object, a list of them (one per
    executable, summed by the callers), or None."""
    if isinstance(value, (list, tuple)):
        items = [v for v in value if v is not None]
        return items or None
    return None if value is None else [value]


def _memory_fields(memory: Any) -> dict[str, int | None]:
    names = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
        "reported_peak_bytes": "peak_memory_in_bytes",
    }
    items = _as_list(memory)
    out: dict[str, int | None] = {field: None for field in names}
    if not items:
        return out
    for field, attr in names.items():
        values = [getattr(m, attr, None) for m in items]
        values = [int(v) for v in values if isinstance(v, (int, float)) and v >= 0]
        if values:
            out[field] = sum(values)
    if not out["reported_peak_bytes"]:
        out["reported_peak_bytes"] = None
    return out


def _cost_fields(cost: Any) -> dict[str, float | None]:
    """Accepts cost_analysis() output: a dict, a list of dicts (older JAX), or None."""
    keys = {"flops": "flops", "bytes_accessed": "bytes accessed",
            "transcendentals": "transcendentals"}
    items = [c for c in (_as_list(cost) or []) if isinstance(c, Mapping)]
    out: dict[str, float | None] = {field: None for field in keys}
    for field, key in keys.items():
        values = [c.get(key) for c in items]
        values = [float(v) for v in values
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v) and v >= 0]
        if values:
            out[field] = sum(values)
    return out


def _per_run(xla: float | None, run: int, once: int) -> float | None:
    """XLA's figure plus the loop trips its cost model leaves out.

    ``run`` and ``once`` are Titanax's restatement of XLA's cost model applied to the HLO text,
    with loop bodies counted once per trip and once: their difference is exactly what XLA's
    figure lacks. Should a backend's cost model already count loops per trip, its figure sits
    nearer ``run`` than ``once`` and is kept as it is.
    """
    if xla is None:  # the backend has no cost model: the restatement alone
        return float(run)
    if run != once and abs(xla - run) < abs(xla - once):
        return xla
    return max(0.0, xla + (run - once))


def _stats_from(memory: Any, cost: Any, hlo_text: str | None) -> CompiledStats:
    """Builds CompiledStats from raw memory_analysis / cost_analysis / HLO text (any may be None)."""
    xla = _cost_fields(cost)
    if not (isinstance(hlo_text, str) and hlo_text):
        return CompiledStats(**_memory_fields(memory), **xla,
                             **{f"xla_{k}": v for k, v in xla.items()})
    module = parse_hlo(hlo_text)
    totals = program_totals(module)
    loop_aware = {field: _per_run(xla[field], totals.per_run[i], totals.once[i])
                  for field, i in (("flops", FLOPS), ("bytes_accessed", BYTES),
                                   ("transcendentals", TRANSCENDENTALS))}
    return CompiledStats(
        **_memory_fields(memory),
        **loop_aware,
        **{f"xla_{k}": v for k, v in xla.items()},
        collectives=collective_stats(totals),
        unknown_trip_loops=totals.unknown_trip_loops,
        conditionals=totals.conditionals,
        module_name=module.name,
        num_partitions=module.num_partitions,
    )


def _call_optional(fn: Any) -> Any:
    """Calls an introspection method; backends that cannot answer give None, not an error."""
    try:
        return fn()
    except (NotImplementedError, RuntimeError):  # jax.errors.JaxRuntimeError is a RuntimeError
        return None


def _resolve(obj: Any) -> jax.stages.Compiled:
    if isinstance(obj, jax.stages.Compiled):
        return obj
    if isinstance(obj, jax.stages.Lowered):
        return obj.compile()
    if isinstance(obj, jax.stages.Traced):
        hint = "call .lower().compile() on it first: jax.jit(f).trace(*args).lower().compile()"
    elif callable(obj) and hasattr(obj, "lower"):
        hint = "lower and compile the jitted function first: jax.jit(f).lower(*args).compile()"
    else:
        hint = "pass jax.jit(f).lower(*args).compile() (or the Lowered from .lower(*args))"
    raise TitanaxError(
        f"inspect expects a jax.stages.Compiled or jax.stages.Lowered, got {type(obj).__name__}",
        suggestion=hint,
    )


def inspect(compiled: jax.stages.Compiled | jax.stages.Lowered) -> CompiledStats:
    """Reads per-device memory, FLOPs and collectives from a compiled JAX program.

    Args:
      compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(*args).compile()``), or a
        ``jax.stages.Lowered``, which is compiled here. Abstract arguments
        (``jax.ShapeDtypeStruct`` with ``sharding=``) are enough: nothing is run.

    Returns:
      A :class:`CompiledStats`. Fields the backend cannot report are ``None`` (memory, cost) or
      an empty ``collectives`` mapping (no HLO text).

    Raises:
      TitanaxError: if ``compiled`` is neither a ``Compiled`` nor a ``Lowered``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> stats = inspect(jax.jit(jnp.sin).lower(jnp.ones((4,))))
      >>> stats.argument_bytes, stats.count("all-gather")
      (16, 0)
      >>> print(stats)  # doctest: +SKIP
    """
    exe = _resolve(compiled)
    memory = _call_optional(exe.memory_analysis)
    cost = _call_optional(exe.cost_analysis)
    text = _call_optional(exe.as_text)
    return _stats_from(memory, cost, text if isinstance(text, str) else None)

