"""Where a batch lives: the one place that decides how inputs are split over the mesh.

A batch array's leading dimension carries the logical name ``batch`` and goes wherever the rules
map it (a plan maps it to its data-parallel and FSDP axes); its other dimensions are replicated,
and a 0-d leaf is replicated. The model's forward, the training step, the data loader and
``titanax describe`` all ask here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.parallel.rules import Rules

__all__ = ["batch_axes", "batch_sharding", "batch_spec"]


def batch_spec(rules: Rules, shape: tuple[int, ...], mesh_shape: Mapping[str, int], *,
               what: str | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of a batch array of global ``shape``.

    Args:
      rules: the resolved rules (``plan.resolved_rules()``).
      shape: the array's global shape; its leading dimension is the batch.
      mesh_shape: mesh axis name -> size.
      what: how to name the array in a warning or error (default: its shape).

    Returns:
      ``P(<batch axes>, None, ...)``, or ``P()`` for a 0-d array.
    """
    shape = tuple(int(d) for d in shape)
    names = ("batch",) if shape else ()
    return rules.spec(names, shape, dict(mesh_shape), what=what or f"batch leaf of shape {shape}")


def batch_sharding(mesh: Mesh, rules: Rules, shape: tuple[int, ...], *, what: str | None = None) -> NamedSharding:
    """:func:`batch_spec` as a ``NamedSharding`` on ``mesh``."""
    return NamedSharding(mesh, batch_spec(rules, shape, dict(mesh.shape), what=what))


def batch_axes(rules: Rules, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes the rules split ``batch`` over, before any divisibility fallback.

    ``Rules.spec`` drops an axis that does not divide a dimension (warning, or error when strict);
    asking with a size every axis divides (the product of all mesh axis sizes) gives the axes the
    rules mean, so callers can check a real batch size against them and say what is wrong.
    """
    mesh_shape = dict(mesh_shape)
    probe = math.prod(mesh_shape.values())
    entry = rules.spec(("batch",), (probe,), mesh_shape, what="the data batch")[0]
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)
