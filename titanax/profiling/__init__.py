"""Measure what XLA built: per-device memory, FLOPs and collectives of a compiled program, one
step's worth (a loop body counted once per trip).

Modules, in the order they build on each other: ``hlo`` (HLO text -> computations and
instructions), ``op_cost`` (what one instruction costs), ``trip_count`` (how often a loop runs),
``walk`` (one run of the program, added up), ``collectives`` and ``stats`` (the report's values),
``compiled`` (``inspect``: reading a compiled program), ``axes`` (``collectives_by_axis``: the
collectives split by the mesh axes they span).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from titanax import profiling
  >>> stats = profiling.inspect(jax.jit(jnp.sin).lower(jnp.ones((4,))).compile())
  >>> stats.argument_bytes
  16
"""

from titanax.profiling.axes import collectives_by_axis
from titanax.profiling.collectives import (
    COLLECTIVE_KINDS,
    CollectiveStats,
    count_collectives,
)
from titanax.profiling.compiled import inspect
from titanax.profiling.hlo import shape_bytes
from titanax.profiling.stats import CompiledStats
from titanax.profiling.watermark import memory_watermark
from titanax.units import human_bytes, human_count

__all__ = [
    "COLLECTIVE_KINDS",
    "CollectiveStats",
    "CompiledStats",
    "collectives_by_axis",
    "count_collectives",
    "human_bytes",
    "human_count",
    "inspect",
    "memory_watermark",
    "shape_bytes",
]
