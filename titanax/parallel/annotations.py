"""Reading the names a model gave its arrays: Linen boxes, NNX variable metadata, or none.

Any pytree works — Linen variables (boxed or not), an NNX state, optimizer state, a dict of
``jax.ShapeDtypeStruct`` — so one function turns them all into :class:`Leaf` records for
:func:`~titanax.parallel.layout.layout_tree`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from titanax.parallel.layout import Leaf, path_string

__all__ = ["is_annotated_leaf", "tree_leaves", "unboxed_structure"]

# Metadata keys NNX has used for a variable's partitioning names across Flax versions.
_NNX_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def is_annotated_leaf(x: Any) -> bool:
    """A Linen ``AxisMetadata`` box or an NNX ``Variable``: one array plus its metadata."""
    return isinstance(x, (nn.meta.AxisMetadata, nnx.Variable))


def _read(value: Any) -> tuple[Any, tuple | None, bool, bool, str | None]:
    """``(array, names, names_are_mesh_axes, is_param, nnx_type)`` of one leaf."""
    if isinstance(value, nn.LogicallyPartitioned):
        return value.value, tuple(value.names), False, True, None
    if isinstance(value, nn.Partitioned):
        return value.value, tuple(value.names), True, True, None
    if isinstance(value, nnx.Variable):
        metadata = value.get_metadata()
        names = next((tuple(metadata[k]) for k in _NNX_NAME_KEYS if metadata.get(k) is not None), None)
        return value.get_value(), names, False, isinstance(value, nnx.Param), type(value).__name__
    return value, None, False, True, None


def tree_leaves(
    tree: Any, split_path: Callable[[tuple], tuple[str, str]] | None = None
) -> list[Leaf]:
    """One :class:`Leaf` per array of ``tree``, with the names its annotation carries.

    Args:
      tree: any pytree of arrays or ``ShapeDtypeStruct``s, possibly holding Linen boxes or NNX
        variables.
      split_path: maps a key path to ``(collection, path string)``; by default every leaf is in the
        ``params`` collection (NNX: its variable type) and the path is the whole key path.

    Returns:
      The leaves, in ``jax.tree`` order of the unboxed tree.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_annotated_leaf)
    leaves = []
    for key_path, value in flat:
        array, names, mesh_axes, is_param, nnx_type = _read(value)
        if split_path is not None:
            collection, path = split_path(key_path)
            is_param = is_param and collection == "params"
        else:
            collection, path = nnx_type or "params", path_string(key_path)
        leaves.append(Leaf(path, collection, tuple(array.shape), array.dtype, names, mesh_axes,
                           is_param=is_param))
    return leaves


def unboxed_structure(tree: Any) -> Any:
    """The treedef of ``tree`` with Linen boxes removed (NNX variables stay: they are pytrees)."""
    return jax.tree.structure(nn.unbox(tree))
