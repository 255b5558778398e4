"""Measure what XLA built: per-device memory, FLOPs and collectives of a compiled program.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from titanax import profiling
  >>> stats = profiling.inspect(jax.jit(jnp.sin).lower(jnp.ones((4,))).compile())
  >>> stats.argument_bytes
  16
"""

from titanax.profiling.compiled import (
    COLLECTIVE_KINDS,
    CollectiveStats,
    CompiledStats,
    count_collectives,
    inspect,
    shape_bytes,
)
from titanax.profiling.units import human_bytes, human_count

__all__ = [
    "COLLECTIVE_KINDS",
    "CollectiveStats",
    "CompiledStats",
    "count_collectives",
    "human_bytes",
    "human_count",
    "inspect",
    "shape_bytes",
]
