"""Host-local NumPy batches to global ``jax.Array``s split on the ``batch`` logical axis.

In a multi-process run every process loads only *its* part of the global batch; JAX assembles the
global array from those parts with ``jax.make_array_from_process_local_data``. Which part a process
must load depends on the mesh (which devices it owns) and on the rules (which mesh axes ``batch``
is split over): :func:`process_data_shard` says, and :func:`to_global` builds the arrays.

Processes whose devices hold the same rows of the batch (for example tensor parallelism across
processes) form one *data shard* and must feed identical data; processes in different data shards
feed disjoint parts. With one process there is one data shard and local == global.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.exceptions import ShardingError, TitanaxError
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules
from titanax.parallel.batch import batch_axes, batch_sharding as parallel_batch_sharding

__all__ = ["DataShard", "batch_sharding", "to_global", "process_data_shard", "global_batch_size"]

RulesOrPlan = Rules | Plan


class DataShard(NamedTuple):
    """Which part of every global batch this process loads.

    Attributes:
      index: this process's data-shard index, ``0 <= index < count``; pass it as
        ``ArrayLoader(process_index=...)``.
      count: how many disjoint parts the global batch is cut into across processes; pass it as
        ``ArrayLoader(process_count=...)``. The local batch is ``global_batch // count``.
    """

    index: int
    count: int


class BatchLayout(NamedTuple):
    """What :func:`to_global` needs to know about a (mesh, rules) pair, computed once."""

    mesh: Mesh
    rules: Rules
    axes: tuple[str, ...]  # mesh axes the batch dimension is split over (size-1 axes dropped)
    devices: int  # product of their sizes: the global batch must be a multiple of this
    shard: DataShard


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _resolve(mesh: Mesh | None, rules_or_plan: RulesOrPlan) -> tuple[Mesh, Rules]:
    # Imported here: shard.py imports Flax, which the data module itself does not otherwise need.
    from titanax.parallel.resolve import resolve_mesh, resolve_rules

    mesh = resolve_mesh(mesh)
    _, rules = resolve_rules(rules_or_plan, mesh)
    return mesh, rules


def _data_shard(
    mesh: Mesh,
    axes: tuple[str, ...],
    process_of: Callable[[Any], int],
    me: int,
) -> DataShard:
    """Group processes by the batch rows their devices hold (one row per batch-axis device).

    Args:
      mesh: the mesh.
      axes: mesh axes the batch is split over.
      process_of: device -> process index (``lambda d: d.process_index`` outside tests).
      me: this process's index.
    """
    devices = math.prod(mesh.shape[a] for a in axes)
    if devices == 1:
        return DataShard(0, 1)
    sharding = NamedSharding(mesh, PartitionSpec(_spec_entry(axes)))
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((devices,)).items():
        rows.setdefault(process_of(device), set()).add(index[0].start or 0)
    if me not in rows:
        raise ShardingError(
            f"process {me} owns no device of the mesh, so it holds no part of the batch",
            suggestion="build the mesh over all devices (tx.MeshSpec(...).build() uses jax.devices())",
        )
    # Sorted by first row: with the usual device order, data shard i holds rows [i*L, (i+1)*L) and
    # the assembled global batch is exactly the one a single process would have built.
    groups = sorted({frozenset(r) for r in rows.values()}, key=min)
    sizes = {len(g) for g in groups}
    covered = set().union(*groups)
    if len(sizes) != 1 or sum(len(g) for g in groups) != devices or covered != set(range(devices)):
        layout = {p: sorted(r) for p, r in sorted(rows.items())}
        raise ShardingError(
            f"processes hold overlapping or unequal parts of the batch over mesh axes {axes}: "
            f"batch rows per process {layout}",
            suggestion="order the mesh devices so that each process owns whole blocks along the "
            "batch axes (jax.make_mesh / tx.MeshSpec do this)",
        )
    return DataShard(groups.index(frozenset(rows[me])), len(groups))


def _layout_uncached(mesh: Mesh, rules_or_plan: RulesOrPlan) -> BatchLayout:
    mesh, rules = _resolve(mesh, rules_or_plan)
    axes = batch_axes(rules, mesh.shape)
    shard = _data_shard(mesh, axes, lambda d: d.process_index, jax.process_index())
    return BatchLayout(mesh, rules, axes, math.prod(mesh.shape[a] for a in axes), shard)


@functools.lru_cache(maxsize=64)
def _layout_cached(mesh: Mesh, rules_or_plan: RulesOrPlan) -> BatchLayout:
    return _layout_uncached(mesh, rules_or_plan)


def batch_layout(mesh: Mesh | None, rules_or_plan: RulesOrPlan) -> BatchLayout:
    # Validating the plan and walking the devices once per (mesh, plan), not once per batch.
    if mesh is not None and isinstance(mesh, Hashable) and isinstance(rules_or_plan, Hashable):
        try:
            return _layout_cached(mesh, rules_or_plan)
        except TypeError:  # an unhashable field somewhere inside the plan
            pass
    return _layout_uncached(mesh, rules_or_plan)


def _check_divisible(global_batch: int, layout: BatchLayout, local_batch: int | None = None) -> None:
    if global_batch % layout.devices == 0:
        return
    n = layout.devices
    lower, upper = (global_batch // n) * n, (global_batch // n + 1) * n
    fed = ""
    if local_batch is not None and layout.shard.count > 1:
        fed = f" ({layout.shard.count} data shards x {local_batch} local examples)"
    raise ShardingError(
        f"global batch of {global_batch} examples{fed} does not divide over the batch mesh axes "
        f"{layout.axes} ({n} devices)",
        suggestion=f"use a global batch size that is a multiple of {n}, e.g. "
        + (f"{lower} or {upper}" if lower else f"{upper}"),
    )


def process_data_shard(mesh: Mesh, rules_or_plan: RulesOrPlan) -> DataShard:
    """Which part of each global batch this process must load.

    Args:
      mesh: the mesh the batch is placed on.
      rules_or_plan: a :class:`~titanax.Plan` or :class:`~titanax.Rules` (``batch`` resolves
        through them).

    Returns:
      A :class:`DataShard` ``(index, count)``; ``(0, 1)`` in a single-process run. When each process
      owns a distinct block of the data axes this is ``(jax.process_index(), jax.process_count())``;
      processes that hold the same batch rows (e.g. tensor parallelism across processes) share an
      index and must load the same data.

    Raises:
      ShardingError: the processes' devices do not cut the batch into equal disjoint parts.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> shard = tx.data.process_data_shard(mesh, tx.Plan(data_parallel=tx.DP(axis="data")))
      >>> shard                                           # one process owns the whole batch
      DataShard(index=0, count=1)
      >>> loader = tx.data.ArrayLoader({"x": np.zeros((512, 4))}, batch_size=256,
      ...                              process_index=shard.index, process_count=shard.count)
    """
    return batch_layout(mesh, rules_or_plan).shard


def global_batch_size(local_batch_size: int, mesh: Mesh, rules_or_plan: RulesOrPlan) -> int:
    """The global batch a process's local batch of ``local_batch_size`` examples is part of.

    Args:
      local_batch_size: examples this process feeds per step.
      mesh: the mesh.
      rules_or_plan: a :class:`~titanax.Plan` or :class:`~titanax.Rules`.

    Returns:
      ``local_batch_size * process_data_shard(mesh, rules_or_plan).count``.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> tx.data.global_batch_size(32, mesh, tx.Plan(data_parallel=tx.DP(axis="data")))  # one process
      32
    """
    return int(local_batch_size) * batch_layout(mesh, rules_or_plan).shard.count


def batch_sharding(mesh: Mesh, rules_or_plan: RulesOrPlan, shape: tuple[int, ...]) -> NamedSharding:
    """The sharding of a global array whose leading dimension is the batch.

    The leading dimension carries the logical name ``batch`` and is split over whatever mesh axes
    the rules map it to; the other dimensions are replicated. A 0-d array is replicated.

    Args:
      mesh: the mesh.
      rules_or_plan: a :class:`~titanax.Plan` (its ``resolved_rules()``) or :class:`~titanax.Rules`.
      shape: the *global* shape of the array.

    Returns:
      A ``NamedSharding`` on ``mesh``.

    Raises:
      ShardingError: the batch dimension is not a multiple of the batch mesh axes' size.
      PlanError: the plan does not fit the mesh.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> plan = tx.Plan(data_parallel=tx.DP(axis="data"))
      >>> tx.data.batch_sharding(mesh, plan, (64, 28, 28, 1)).spec
      P('data', None, None, None)
    """
    shape = tuple(int(d) for d in shape)
    layout = batch_layout(mesh, rules_or_plan)
    if not shape:
        return NamedSharding(layout.mesh, PartitionSpec())
    _check_divisible(shape[0], layout)
    return parallel_batch_sharding(layout.mesh, layout.rules, shape, what=f"data batch of shape {shape}")


def _leaf_name(path: tuple) -> str:
    return jax.tree_util.keystr(path) or "<batch>"


def _host_array(path: tuple, leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable:
            raise TitanaxError(
                f"batch leaf {_leaf_name(path)} is already a global jax.Array spanning processes",
                suggestion="feed host-local NumPy arrays (this process's slice); pass global arrays "
                "to the step directly",
            )
    array = np.asarray(leaf)
    if array.dtype.kind not in "biufc":
        raise TitanaxError(
            f"batch leaf {_leaf_name(path)} has dtype {array.dtype}, which cannot go on a device",
            suggestion="convert it to a numeric or boolean NumPy array, or keep it out of the batch",
        )
    return array


def to_global(local_batch: Any, mesh: Mesh, rules_or_plan: RulesOrPlan) -> Any:
    """Turn this process's slice of the global batch into global ``jax.Array``s.

    Every array leaf with at least one dimension is this process's part of a global array whose
    leading dimension is the batch (all such leaves must agree on it); its global batch size is
    ``local * process_data_shard(...).count`` (equal to local with one process). 0-d leaves
    (Python scalars, a step's learning rate) are replicated; every process must feed the same value.

    Arrays are placed with ``jax.make_array_from_process_local_data``, which returns before the copy
    finishes: the caller must not modify a NumPy array it passed in afterwards.

    Args:
      local_batch: a pytree (dict, tuple, ...) of host-local NumPy arrays or scalars.
      mesh: the mesh.
      rules_or_plan: a :class:`~titanax.Plan` or :class:`~titanax.Rules`; ``batch`` resolves
        through them (``plan.resolved_rules()``).

    Returns:
      The same pytree with ``jax.Array`` leaves, split on the batch mesh axes.

    Raises:
      ShardingError: the global batch is not a multiple of the batch mesh axes' size, or leaves
        disagree on the batch size.
      TitanaxError: a leaf is not numeric, or is already a global array.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> batch = tx.data.to_global({"x": np.zeros((64, 784), np.float32)}, mesh,
      ...                   tx.Plan(data_parallel=tx.DP(axis="data")))
      >>> batch["x"].sharding.spec
      P('data', None)
    """
    layout = batch_layout(mesh, rules_or_plan)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(local_batch)
    arrays = [_host_array(path, leaf) for path, leaf in leaves]
    leading = {_leaf_name(path): a.shape[0] for (path, _), a in zip(leaves, arrays) if a.ndim}
    if len(set(leading.values())) > 1:
        raise ShardingError(
            f"batch leaves disagree on the batch (leading) dimension: {leading}",
            suggestion="give every batched array the same leading size; pass non-batched values "
            "(tables, constants) to the step separately, or as 0-d scalars",
        )
    if leading:
        local = next(iter(leading.values()))
        _check_divisible(local * layout.shard.count, layout, local)
    out = []
    for array in arrays:
        if array.ndim == 0:
            global_shape: tuple[int, ...] = ()
        else:
            global_shape = (array.shape[0] * layout.shard.count,) + array.shape[1:]
        sharding = batch_sharding(mesh, rules_or_plan, global_shape)
        out.append(jax.make_array_from_process_local_data(sharding, array, global_shape))
    return jax.tree_util.tree_unflatten(treedef, out)
