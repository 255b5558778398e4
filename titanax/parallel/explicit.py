"""FSDP on a mesh with Explicit axes: parameters are gathered over the FSDP axes where the model
uses them.

On Auto axes XLA's partitioner inserts FSDP's all-gather before each use of a parameter and the
reduce-scatter of its gradient. On Explicit axes an array's sharding is part of its type, and an
einsum whose operands disagree (an activation split over ``fsdp`` by batch, a weight split over
``fsdp`` by its embedding dimension) is a type error, not a gather. So the model sees each
parameter in its *compute layout* — its sharding without the FSDP axes, tensor parallelism kept —
via ``jax.sharding.reshard``, whose transpose is the gradient's reduce-scatter: FSDP's
communication, written out.

Example:
  >>> compute_spec(P("fsdp", "tensor", None), ("fsdp",)) == P(None, "tensor", None)
  True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["compute_spec", "gather_for_compute"]


def compute_spec(spec: P, gathered: Sequence[str]) -> P:
    """``spec`` without the mesh axes in ``gathered`` (an entry left with no axis is ``None``)."""
    out = []
    for entry in spec:
        axes = entry if isinstance(entry, tuple) else (entry,) if entry is not None else ()
        kept = tuple(a for a in axes if a not in gathered)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def gather_for_compute(params: Any, gathered: Sequence[str]) -> Any:
    """Every array of ``params`` resharded to its compute layout (see the module docstring);
    arrays not split over ``gathered`` stay as they are.

    Args:
      params: a pytree of arrays (traced or not) typed with Explicit-axis shardings.
      gathered: the FSDP mesh axes.

    Returns:
      The same tree, each leaf laid out without the ``gathered`` axes.
    """
    def gather(x: Any) -> Any:
        sharding = getattr(jax.typeof(x), "sharding", None) if isinstance(x, jax.Array) or hasattr(x, "aval") else None
        if not isinstance(sharding, NamedSharding):
            return x
        spec = compute_spec(sharding.spec, gathered)
        return x if spec == sharding.spec else jax.sharding.reshard(x, spec)

    return jax.tree.map(gather, params)
