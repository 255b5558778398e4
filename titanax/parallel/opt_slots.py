"""Which leaves of an optimizer state stand for which parameter (Adam's moments, factored
statistics): one mapping shared by the state's layout and the stack's layer order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from titanax.parallel.layout import path_string

__all__ = ["kept_dims", "map_param_slots"]


def kept_dims(slot_shape: tuple, param_shape: tuple) -> tuple[int, ...] | None:
    """The parameter dimensions a factored slot kept (its shape is theirs, in order), if any."""
    kept, i = [], 0
    for size in slot_shape:
        while i < len(param_shape) and param_shape[i] != size:
            i += 1
        if i == len(param_shape):
            return None
        kept.append(i)
        i += 1
    return tuple(kept)


def map_param_slots(optimizer: optax.GradientTransformation, fn: Callable[..., Any], opt_state: Any,
                    params: Any, *rest: Any, other: Callable[[Any], Any]) -> Any:
    """``fn(slot, param, *rest_leaves)`` for every optimizer-state leaf that stands for a parameter,
    ``other(leaf)`` for the others (step counts), as a tree shaped like ``opt_state``.

    Slots are found structurally by ``optax.tree_map_params`` (exact for chains, wrappers and
    scan-stacked layers); optimizers whose ``init`` treats parameters leaf by leaf
    (``optax.masked``, ``optax.multi_transform``) cannot be traced that way, and their slots are
    matched by the longest parameter path they sit under.

    Args:
      optimizer: the optax transformation whose state this is.
      fn: called per parameter slot.
      opt_state: the state (arrays or shapes).
      params: the parameters (arrays or shapes).
      *rest: trees shaped like ``params``, whose leaves ``fn`` also receives.
      other: called per leaf that is not a parameter slot.

    Returns:
      A tree shaped like ``opt_state``.
    """
    try:
        return optax.tree_map_params(optimizer, fn, opt_state, params, *rest,
                                     transform_non_params=lambda v: jax.tree.map(other, v))
    except (ValueError, TypeError, AttributeError):
        pass  # an init that maps over the parameters leaf by leaf: match by path below
    by_path = {path_string(path): (leaf, *extra) for (path, leaf), *extra in
               zip(jax.tree_util.tree_flatten_with_path(params)[0], *(jax.tree.leaves(r) for r in rest))}

    def pick(path: tuple, leaf: Any) -> Any:
        parts = path_string(path).split("/")
        for start in range(len(parts)):  # the longest matching path suffix is the parameter
            match = by_path.get("/".join(parts[start:]))
            if match is not None:
                return fn(leaf, *match)
        return other(leaf)

    return jax.tree_util.tree_map_with_path(pick, opt_state)
