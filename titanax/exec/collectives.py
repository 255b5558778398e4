"""Collectives for the manual mode, each checking its mesh axes before JAX sees them.

In Titanax's default mode XLA's SPMD partitioner inserts every collective. In the manual mode
(``@tx.step_fn(manual=True)``, which runs the step under ``jax.shard_map``) the step calls them
itself: ``tx.collectives.psum / pmean / all_gather / reduce_scatter / ppermute / broadcast``, plus
``axis_index`` and ``axis_size``. They compute exactly what the ``jax.lax`` operation of the same
role computes, on any pytree, over one mesh axis name or a tuple of them, and work with
``shard_map``'s replication checking (``check_vma=True``, the default) on or off.

What they add is checking, before tracing the collective:

* the axis must be a *manual* axis where the call runs - an axis of the mesh of the enclosing
  ``jax.shard_map`` (or a ``jax.vmap`` ``axis_name``). The current axes are read from
  ``jax.sharding.get_abstract_mesh()``, whose axes are ``AxisType.Manual`` inside a
  ``shard_map`` body (JAX 0.10 and 0.12 alike); a misspelt axis, an axis the ``shard_map`` left
  automatic, and a call outside any ``shard_map`` each raise
  :class:`~titanax.exceptions.CollectiveError` naming the axis and the ones available (JAX itself
  raises ``NameError`` or a bare ``AssertionError`` here);
* array dimensions and permutations must fit the axis size (``all_gather``, ``reduce_scatter``,
  ``ppermute``, ``broadcast``) - a bad permutation otherwise traces and fails later in XLA;
* a psum over axes along some of which the value is already replicated (it would be counted
  several times) is reported in words instead of as JAX's replication-type error;
* reducing a value over axes along which it is already the same on every device — typically
  reduced twice, ``psum(pmean(grads))`` — is refused by ``psum`` (JAX would silently multiply it
  by the number of devices) and reported by ``pmean`` with a warning (the mean of identical values
  is the value: harmless, unless an earlier ``psum`` made it a sum). Python numbers are exempt:
  ``psum(1, "data")`` is the axis size.

Example:
  >>> import jax, jax.numpy as jnp, titanax as tx
  >>> from jax.sharding import PartitionSpec as P
  >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  >>> def step(x):                       # runs once per device on its block of x
  ...     return tx.collectives.psum(x.sum(), "data")
  >>> f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"), out_specs=P()))
  >>> float(f(jnp.arange(16.0)))
  120.0
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from titanax.exceptions import CollectiveError
from titanax.exec.collective_checks import (
    AxisName,
    axes_size,
    check_axes,
    dimension_argument,
    int_argument,
    jax_axis,
    leaves_with_paths,
    refuse_already_reduced,
    replication_errors,
)
from titanax.parallel.manual import varying_axes

__all__ = [
    "psum",
    "varying_axes",
    "pmean",
    "all_gather",
    "reduce_scatter",
    "ppermute",
    "broadcast",
    "axis_index",
    "axis_size",
    "AxisName",
]


def psum(x: Any, axis_name: AxisName) -> Any:
    """Sum ``x`` over the devices along ``axis_name``: every device gets the total.

    Same result as ``jax.lax.psum``. Under ``check_vma`` a value that is already replicated along
    the axes - reduced before, or never split - is an error, raised as :class:`CollectiveError`:
    it would be counted once per device (``psum(pmean(g))`` is ``n * g``).

    Args:
      x: a pytree of arrays (or Python numbers: ``psum(1, "data")`` is the axis size).
      axis_name: a manual mesh axis name, or a tuple of them.

    Returns:
      A pytree like ``x`` holding the sums.

    Raises:
      CollectiveError: if an axis is not a manual axis here (outside ``shard_map``, misspelt, or
        left automatic), or for the mixed replicated/varying case above.

    Example:
      >>> grads = tx.collectives.psum(grads, "data")          # doctest: +SKIP
    """
    names = check_axes("psum", axis_name)
    refuse_already_reduced("psum", x, names)
    with replication_errors("psum", names):
        return jax.lax.psum(x, jax_axis(names))


def pmean(x: Any, axis_name: AxisName) -> Any:
    """Average ``x`` over the devices along ``axis_name``: every device gets the mean.

    Same result as ``jax.lax.pmean`` (``psum / axis_size``).

    Args:
      x: a pytree of arrays.
      axis_name: a manual mesh axis name, or a tuple of them.

    Returns:
      A pytree like ``x`` holding the means.

    Raises:
      CollectiveError: if an axis is not a manual axis here, or the value is replicated along
        some axes and varying along others.

    Example:
      >>> grads = tx.collectives.pmean(grads, "data")         # doctest: +SKIP
    """
    names = check_axes("pmean", axis_name)
    refuse_already_reduced("pmean", x, names)
    with replication_errors("pmean", names):
        return jax.lax.pmean(x, jax_axis(names))


def all_gather(x: Any, axis_name: AxisName, *, gather_dimension: int = 0,
               tiled: bool = False) -> Any:
    """Collect every device's block of ``x`` along ``axis_name`` on every device.

    Same result as ``jax.lax.all_gather(x, axis_name, axis=gather_dimension, tiled=tiled)``.
    With ``tiled=False`` a new dimension of size ``axis_size`` is inserted at
    ``gather_dimension``; with ``tiled=True`` the blocks are concatenated along the existing
    dimension ``gather_dimension`` (which grows ``axis_size`` times).

    Args:
      x: a pytree of arrays.
      axis_name: a manual mesh axis name, or a tuple of them (device order = their row-major
        product).
      gather_dimension: the array dimension (not mesh axis) to gather into; negative counts from
        the end.
      tiled: concatenate instead of stacking.

    Returns:
      A pytree like ``x`` with the gathered arrays.

    Raises:
      CollectiveError: for an axis that is not manual here, or ``gather_dimension`` out of range
        for a leaf.

    Example:
      >>> full = tx.collectives.all_gather(shard, "model", gather_dimension=-1, tiled=True)  # doctest: +SKIP
    """
    names = check_axes("all_gather", axis_name)
    dim = int_argument("all_gather", "gather_dimension", gather_dimension)
    tiled = bool(tiled)
    dims = []
    for path, leaf in leaves_with_paths(x):
        dims.append(dimension_argument("all_gather", "gather_dimension", dim, jnp.ndim(leaf), path,
                               extra=0 if tiled else 1))
    leaves, treedef = jax.tree.flatten(x)
    with replication_errors("all_gather", names):
        out = [jax.lax.all_gather(leaf, jax_axis(names), axis=d, tiled=tiled)
               for leaf, d in zip(leaves, dims)]
    return jax.tree.unflatten(treedef, out)


def reduce_scatter(x: Any, axis_name: AxisName, *, scatter_dimension: int = 0,
                   tiled: bool = True) -> Any:
    """Sum ``x`` over ``axis_name`` and leave each device one block of the sum.

    Same result as ``jax.lax.psum_scatter``. With ``tiled=True`` (default) dimension
    ``scatter_dimension`` must be divisible by the axis size and shrinks by it; device ``i``
    keeps block ``i``. With ``tiled=False`` that dimension must equal the axis size and is
    removed.

    Args:
      x: a pytree of arrays.
      axis_name: a manual mesh axis name, or a tuple of them.
      scatter_dimension: the array dimension to split; negative counts from the end.
      tiled: keep the dimension (split into blocks) instead of removing it.

    Returns:
      A pytree like ``x`` holding this device's block of the sums.

    Raises:
      CollectiveError: for an axis that is not manual here, a dimension out of range, or a size
        that does not fit the axis size.

    Example:
      >>> grad_shard = tx.collectives.reduce_scatter(grads, "data")   # doctest: +SKIP
    """
    names = check_axes("reduce_scatter", axis_name)
    dim = int_argument("reduce_scatter", "scatter_dimension", scatter_dimension)
    tiled = bool(tiled)
    n = axes_size(names)
    dims = []
    for path, leaf in leaves_with_paths(x):
        shape = jnp.shape(leaf)
        d = dimension_argument("reduce_scatter", "scatter_dimension", dim, len(shape), path)
        if tiled and shape[d] % n:
            raise CollectiveError(
                f"tx.collectives.reduce_scatter: leaf {path} has size {shape[d]} in dimension "
                f"{d}, not divisible by the size {n} of axis {jax_axis(names)!r}",
                suggestion=f"pad dimension {d} to a multiple of {n}, or scatter another "
                           "dimension (scatter_dimension=...)")
        if not tiled and shape[d] != n:
            raise CollectiveError(
                f"tx.collectives.reduce_scatter: with tiled=False dimension {d} of leaf {path} "
                f"must equal the axis size {n}, got {shape[d]}",
                suggestion="use tiled=True to split the dimension into blocks")
        dims.append(d)
    leaves, treedef = jax.tree.flatten(x)
    with replication_errors("reduce_scatter", names):
        out = [jax.lax.psum_scatter(leaf, jax_axis(names), scatter_dimension=d, tiled=tiled)
               for leaf, d in zip(leaves, dims)]
    return jax.tree.unflatten(treedef, out)


def ppermute(x: Any, axis_name: AxisName, perm: Iterable[Sequence[int]]) -> Any:
    """Send each device's ``x`` to another device along ``axis_name``.

    Same result as ``jax.lax.ppermute``: for each pair ``(source, destination)`` in ``perm``
    the destination receives the source's value; a device that is nobody's destination gets
    zeros. Indices are positions along the axis (for a tuple of axes, along their row-major
    product).

    Args:
      x: a pytree of arrays.
      axis_name: a manual mesh axis name, or a tuple of them.
      perm: ``(source, destination)`` pairs; every index in ``[0, axis_size)``, no source and
        no destination twice.

    Returns:
      A pytree like ``x`` with the received values.

    Raises:
      CollectiveError: for an axis that is not manual here or an invalid permutation.

    Example:
      >>> n = tx.collectives.axis_size("pipe")                                  # doctest: +SKIP
      >>> h = tx.collectives.ppermute(h, "pipe", [(i, (i + 1) % n) for i in range(n)])  # doctest: +SKIP
    """
    names = check_axes("ppermute", axis_name)
    n = axes_size(names)
    pairs = _permutation(perm, n, jax_axis(names))
    with replication_errors("ppermute", names):
        return jax.lax.ppermute(x, jax_axis(names), pairs)


def _permutation(perm: Any, n: int, axis: AxisName) -> list[tuple[int, int]]:
    hint = f"pass (source, destination) pairs of ints in [0, {n}), e.g. a ring: " \
           f"[(i, (i + 1) % {n}) for i in range({n})]"
    try:
        raw = list(perm)
    except TypeError:
        raise CollectiveError(f"tx.collectives.ppermute: perm must be a list of "
                              f"(source, destination) pairs, got {perm!r}", suggestion=hint) from None
    pairs = []
    for pair in raw:
        try:
            src, dst = pair
            if isinstance(src, bool) or isinstance(dst, bool):
                raise TypeError
            pairs.append((operator.index(src), operator.index(dst)))
        except (TypeError, ValueError):
            raise CollectiveError(f"tx.collectives.ppermute: perm entry {pair!r} is not a "
                                  "(source, destination) pair of ints", suggestion=hint) from None
    for src, dst in pairs:
        if not (0 <= src < n and 0 <= dst < n):
            raise CollectiveError(
                f"tx.collectives.ppermute: pair ({src}, {dst}) is out of range for axis {axis!r} "
                f"of size {n}", suggestion=hint)
    for which, idx in (("source", 0), ("destination", 1)):
        seen: set[int] = set()
        for pair in pairs:
            if pair[idx] in seen:
                raise CollectiveError(
                    f"tx.collectives.ppermute: device {pair[idx]} is a {which} more than once in "
                    f"perm {pairs!r}",
                    suggestion="each device may send once and receive once; " + hint)
            seen.add(pair[idx])
    return pairs


def broadcast(x: Any, axis_name: AxisName, *, source: int = 0) -> Any:
    """Give every device along ``axis_name`` the value ``x`` has on device ``source``.

    Implemented as a ``psum`` of ``x`` masked to zero everywhere but on ``source``, which is
    exact (adding zeros) and valid with ``check_vma`` on or off. Dtypes are kept (booleans
    included). The result is replicated along ``axis_name``.

    Args:
      x: a pytree of arrays.
      axis_name: a manual mesh axis name, or a tuple of them.
      source: index along the axis (for a tuple, along the row-major product) of the device
        whose value is sent.

    Returns:
      A pytree like ``x`` holding the source device's values.

    Raises:
      CollectiveError: for an axis that is not manual here or ``source`` out of range.

    Example:
      >>> params = tx.collectives.broadcast(params, "data", source=0)   # doctest: +SKIP
    """
    names = check_axes("broadcast", axis_name)
    n = axes_size(names)
    src = int_argument("broadcast", "source", source)
    if not 0 <= src < n:
        raise CollectiveError(
            f"tx.collectives.broadcast: source={src} is out of range for axis "
            f"{jax_axis(names)!r} of size {n}",
            suggestion=f"pass source in [0, {n})")
    is_source = jax.lax.axis_index(jax_axis(names)) == src

    def send(leaf: Any) -> Any:
        leaf = jnp.asarray(leaf)
        wire = leaf.astype(jnp.int32) if leaf.dtype == jnp.bool_ else leaf
        masked = jnp.where(is_source, wire, jnp.zeros_like(wire))
        return jax.lax.psum(masked, jax_axis(names)).astype(leaf.dtype)

    return jax.tree.map(send, x)


def axis_index(axis_name: AxisName) -> jax.Array:
    """This device's position along ``axis_name`` (an int32 scalar).

    Args:
      axis_name: a manual mesh axis name, or a tuple of them (row-major position in their
        product).

    Returns:
      ``jax.lax.axis_index(axis_name)``.

    Raises:
      CollectiveError: if an axis is not a manual axis here.

    Example:
      >>> is_first_stage = tx.collectives.axis_index("pipe") == 0   # doctest: +SKIP
    """
    names = check_axes("axis_index", axis_name)
    return jax.lax.axis_index(jax_axis(names))


def axis_size(axis_name: AxisName) -> int:
    """The number of devices along ``axis_name`` (a Python int, known while tracing).

    Args:
      axis_name: a manual mesh axis name, or a tuple of them (product of their sizes).

    Returns:
      The size as a Python int.

    Raises:
      CollectiveError: if an axis is not a manual axis here.

    Example:
      >>> n = tx.collectives.axis_size(("data", "model"))   # doctest: +SKIP
    """
    return axes_size(check_axes("axis_size", axis_name))

