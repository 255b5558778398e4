"""Values inside ``jax.shard_map``: along which manual axes they differ, and casting them to differ.

Shared by the manual-mode training step and the pipeline executors; it works on jax 0.10 (where
the varying set lives on ``manual_axis_type``) through 0.12 (``vma``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["as_varying", "varying_axes"]


def varying_axes(x: Any) -> frozenset[str]:
    """Mesh axes along which ``x`` differs between devices inside ``jax.shard_map``.

    Empty outside a shard_map, and for values replicated (invariant) over every manual axis.
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10: the varying set lives here
    if manual is not None and hasattr(manual, "varying"):
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def as_varying(x: jax.Array, axes: str | Sequence[str]) -> jax.Array:
    """``x`` typed as differing along ``axes`` (a ``pcast`` of only the axes it does not yet vary
    over: casting an already-varying axis again is an error)."""
    wanted = (axes,) if isinstance(axes, str) else tuple(axes)
    missing = tuple(a for a in wanted if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
