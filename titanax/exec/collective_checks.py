"""The checks every manual-mode collective makes before JAX sees it: axis names that are manual
where the call runs, sizes and dimensions that fit the axis, and values not reduced twice.

:mod:`titanax.exec.collectives` explains what each check saves the user from.
"""

from __future__ import annotations

import contextlib
import difflib
import operator
import warnings
from collections.abc import Iterator
from typing import Any, Union

import jax
from jax.sharding import AxisType

from titanax.exceptions import CollectiveError, TitanaxWarning, user_stacklevel
from titanax.parallel.manual import varying_axes

__all__ = ["AxisName", "axes_size", "check_axes", "dimension_argument", "int_argument", "jax_axis",
           "leaves_with_paths", "refuse_already_reduced", "replication_errors"]

AxisName = Union[str, tuple[str, ...]]
"""One mesh axis name, or a tuple of them (the collective then runs over their product)."""

_MANUAL_HINT = ("run the step in manual mode with @tx.step_fn(manual=True), or wrap the function "
                "in jax.shard_map(f, mesh=mesh, in_specs=..., out_specs=...); in Titanax's default "
                "(GSPMD) mode XLA inserts collectives by itself, so the explicit call can go")


# --------------------------------------------------------------------------- axis checking

def _axis_names(op: str, axis_name: Any) -> tuple[str, ...]:
    """The axis names as a tuple, or a CollectiveError for a malformed ``axis_name``."""
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) for n in names):
        raise CollectiveError(
            f"tx.collectives.{op}: axis_name must be a mesh axis name or a non-empty tuple of "
            f"them, got {axis_name!r}",
            suggestion=f'e.g. tx.collectives.{op}(x, "data") or tx.collectives.{op}(x, ("data", "model"))')
    names = tuple(names)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CollectiveError(
            f"tx.collectives.{op}: axis {dupes[0]!r} appears more than once in {names!r}",
            suggestion=f"name each mesh axis once: {tuple(dict.fromkeys(names))!r}")
    return names


def _bound_elsewhere(name: str) -> bool:
    """Whether ``name`` is bound by something other than a shard_map mesh (e.g. ``jax.vmap``)."""
    try:
        jax.lax.axis_size(name)
    except (NameError, AssertionError, KeyError, ValueError):
        return False
    return True


def check_axes(op: str, axis_name: Any) -> tuple[str, ...]:
    """Validate that every axis in ``axis_name`` is a manual axis here; return them as a tuple."""
    names = _axis_names(op, axis_name)
    mesh = jax.sharding.get_abstract_mesh()
    mesh_axes: tuple[str, ...] = () if mesh.empty else tuple(mesh.axis_names)
    types = () if mesh.empty else tuple(mesh.axis_types)
    manual = tuple(n for n, t in zip(mesh_axes, types) if t == AxisType.Manual)
    for name in names:
        if name in manual or _bound_elsewhere(name):
            continue
        if not manual:
            where = (f"the current mesh ({', '.join(mesh_axes)}) has no manual axis"
                     if mesh_axes else "no mesh axis is bound here")
            raise CollectiveError(
                f"tx.collectives.{op} over axis {name!r} called outside any shard_map: {where}",
                suggestion=_MANUAL_HINT)
        if name in mesh_axes:
            raise CollectiveError(
                f"tx.collectives.{op}: mesh axis {name!r} is automatic, not manual, in this "
                f"shard_map; manual axes here: {', '.join(manual)}",
                suggestion=f"add {name!r} to the shard_map's axis_names (or leave axis_names "
                           f"unset so every mesh axis is manual), or collect over "
                           f"{manual[0]!r} only")
        close = difflib.get_close_matches(name, manual, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CollectiveError(
            f"tx.collectives.{op}: {name!r} is not an axis of the current mesh; "
            f"available axes: {', '.join(manual)}",
            suggestion=f"{hint}use one of {', '.join(repr(m) for m in manual)}, or add the axis "
                       "to the mesh (tx.MeshSpec(axes=...))")
    return names


def jax_axis(names: tuple[str, ...]) -> AxisName:
    return names[0] if len(names) == 1 else names


def axes_size(names: tuple[str, ...]) -> int:
    return int(jax.lax.axis_size(jax_axis(names)))


@contextlib.contextmanager
def replication_errors(op: str, names: tuple[str, ...]) -> Iterator[None]:
    """Turn JAX's replication-type (vma) error for mixed varying/replicated axes into words."""
    try:
        yield
    except ValueError as e:
        text = str(e)
        if "invarying" not in text:
            raise
        raise CollectiveError(
            f"tx.collectives.{op} over {names!r}: the value varies along some of these axes but is "
            "already the same on every device (replicated) along others, so reducing over those "
            "would count each value once per device. JAX says: " + text.splitlines()[0],
            suggestion=f"reduce only over the axes the value varies along (check the "
                       f"shard_map's in_specs), or, if the multiple is intended, mark it varying "
                       f"first: jax.lax.pcast(x, {jax_axis(names)!r}, to='varying')") from e


def refuse_already_reduced(op: str, x: Any, names: tuple[str, ...]) -> None:
    """Refuse (psum) or report (pmean) leaves that are already identical along every axis in
    ``names``; only possible where JAX tracks which values vary (``check_vma=True``)."""
    if not all(n in varying_axes(jax.lax.axis_index(n)) for n in names):
        return  # replication is not tracked here: every value looks replicated
    same = [path for path, leaf in leaves_with_paths(x)
            if isinstance(leaf, jax.Array) and not varying_axes(leaf) & set(names)]
    if not same:
        return
    axis = jax_axis(names)
    n = axes_size(names)
    shown = ", ".join(same[:3]) + (f" and {len(same) - 3} more" if len(same) > 3 else "")
    message = (f"tx.collectives.{op} over {axis!r}: {shown} is already the same on every device "
               f"along {axis!r} (reduced before, e.g. by a pmean or psum, or never split)")
    if op == "psum":
        raise CollectiveError(
            f"{message}, so the sum would multiply it by {n}",
            suggestion="reduce each value once (grads = tx.collectives.pmean(grads, axis) alone); if "
            f"the multiple is intended, write x * tx.collectives.axis_size({axis!r})")
    warnings.warn(f"{message}: the mean returns it unchanged; if an earlier psum reduced it, it is a "
                  "sum, not a mean. Reduce each value once.", TitanaxWarning, stacklevel=user_stacklevel())


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path) or "x", leaf) for path, leaf in flat]


def int_argument(op: str, name: str, value: Any) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise CollectiveError(f"tx.collectives.{op}: {name} must be an int, got {value!r}",
                              suggestion=f"pass a Python int for {name}") from None


def dimension_argument(op: str, arg: str, dim: int, ndim: int, path: str, *, extra: int = 0) -> int:
    """Normalize a (possibly negative) dimension for an array of rank ``ndim + extra``."""
    rank = ndim + extra
    if not -rank <= dim < rank:
        valid = f"{-rank}..{rank - 1}" if rank else "none (the array is a scalar)"
        raise CollectiveError(
            f"tx.collectives.{op}: {arg}={dim} is out of range for leaf {path} of rank {ndim}; "
            f"valid: {valid}",
            suggestion=f"pass {arg} within {valid}" if rank else
                       "reshape the scalar to shape (1,) first, or use tiled=False")
    return dim % rank


# --------------------------------------------------------------------------- collectives
