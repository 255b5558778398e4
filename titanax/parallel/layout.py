"""From a tree of (abstract) arrays and their logical names to ``NamedSharding``s, with a report.

This is the one place where a parameter's layout is decided. Frameworks differ only in how they
hand over leaves (:class:`Leaf`); everything after that (path rules, annotations, the unnamed
fallback, validation, the layout table) is shared.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.exceptions import ShardingError, TitanaxWarning, user_stacklevel
from titanax.parallel.rules import Dropped, LogicalNames, Rules, divisible_axes, pad_names, warn_dropped
from titanax.units import human_bytes

__all__ = ["Leaf", "ParamLayout", "Layout", "abstract", "bytes_per_device", "layout_tree", "path_string", "place"]


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works when a sharding spans several processes.

    ``device_put`` only reaches this process's devices; a jitted identity with ``out_shardings``
    lets every process contribute its shards of the same (replicated) host values.

    Args:
      tree: arrays (every process passes the same values).
      shardings: a sharding, or a matching tree of them.

    Returns:
      ``tree`` laid out by ``shardings``.
    """
    leaves = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if all(s.is_fully_addressable for s in leaves):
        return jax.device_put(tree, shardings)
    return jax.jit(lambda t: t, out_shardings=shardings)(tree)


def abstract(tree: Any, shardings: Any) -> Any:
    """``tree``'s arrays (or shapes) as ``jax.ShapeDtypeStruct``s carrying ``shardings``: what
    ``jax.jit(...).lower`` takes to compile for a layout without allocating it.

    Args:
      tree: arrays or anything with ``shape`` and ``dtype``.
      shardings: a sharding, or a matching tree of them.

    Returns:
      ``tree`` with every leaf a ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def path_string(path: Sequence[Any]) -> str:
    """``"Block_0/Dense_0/kernel"`` from a JAX key path (dict keys, attributes, indices)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":  # an NNX Variable's payload, not part of the model's path
                parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array of a model's state, as a framework adapter hands it over."""

    path: str
    """Slash-joined path, e.g. ``"Block_0/Dense_0/kernel"``."""
    collection: str
    """Linen collection (``"params"``, ``"batch_stats"``) or NNX variable type (``"Param"``)."""
    shape: tuple[int, ...]
    dtype: Any
    names: LogicalNames | None = None
    """Names from the model's annotation, if any."""
    names_are_mesh_axes: bool = False
    """True when the annotation names mesh axes (Linen ``nn.with_partitioning``)."""
    is_param: bool = True
    """Trainable parameter (gets the ``unnamed`` fallback) as opposed to other state."""


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How one array is laid out on the mesh, and what it costs."""

    path: str
    collection: str
    shape: tuple[int, ...]
    dtype: Any
    names: LogicalNames | None
    """The logical names the layout came from (after path rules), or ``None``."""
    source: str
    """Where ``names`` came from: ``annotation``, ``mesh annotation``, ``path rule``, ``unnamed``
    (the FSDP fallback) or ``none``."""
    sharding: NamedSharding
    is_param: bool = True
    """A trainable parameter, as opposed to other state (batch statistics, RNG keys)."""

    @property
    def spec(self) -> PartitionSpec:
        return self.sharding.spec

    @property
    def nbytes(self) -> int:
        """Bytes of the whole array."""
        return math.prod(self.shape) * _itemsize(self.dtype)

    @property
    def shards(self) -> int:
        """Number of pieces the array is split into."""
        mesh_shape = self.sharding.mesh.shape
        return math.prod(mesh_shape[a] for entry in self.spec if entry is not None
                         for a in ((entry,) if isinstance(entry, str) else entry))

    @property
    def bytes_per_device(self) -> int:
        return self.nbytes // self.shards

    @property
    def replicated(self) -> bool:
        return self.shards == 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """The layout of every array of a model's state on one mesh."""

    mesh: Mesh
    entries: tuple[ParamLayout, ...]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, path: str) -> ParamLayout:
        for entry in self.entries:
            if entry.path == path:
                return entry
        raise KeyError(path)

    @property
    def shardings(self) -> list[NamedSharding]:
        return [e.sharding for e in self.entries]

    def specs(self, collection: str | None = None) -> dict[str, str]:
        """``{path: "P('data', None)"}``, the form of the golden dumps in ``tests/golden``."""
        return {e.path: _spec_str(e.spec) for e in self.entries
                if collection is None or e.collection == collection}

    def total_bytes(self, params_only: bool = True) -> int:
        return sum(e.nbytes for e in self._selected(params_only))

    def bytes_per_device(self, params_only: bool = True) -> int:
        return sum(e.bytes_per_device for e in self._selected(params_only))

    def replicated_bytes(self, params_only: bool = True) -> int:
        """Bytes of arrays held whole on every device (the first thing to check when memory is short)."""
        return sum(e.nbytes for e in self._selected(params_only) if e.replicated)

    def _selected(self, params_only: bool) -> list[ParamLayout]:
        return [e for e in self.entries if not params_only or e.is_param]

    HEADER = ("path", "shape", "dtype", "logical axes", "spec", "per device", "total")
    """The columns of :meth:`rows`."""

    def rows(self) -> list[tuple[str, ...]]:
        """The table as text cells, one row per array in :attr:`entries`' order (columns
        :attr:`HEADER`); arrays that are not parameters show their collection: ``path <batch_stats>``."""
        rows = []
        for e in self.entries:
            names = "-" if e.names is None else "(" + ", ".join(str(n) for n in e.names) + ")"
            if e.source not in ("annotation", "none"):
                names += f" [{e.source}]"
            path = e.path if e.is_param else f"{e.path} <{e.collection}>"
            rows.append((path, "x".join(map(str, e.shape)) or "()", _dtype_name(e.dtype), names,
                         _spec_str(e.spec), human_bytes(e.bytes_per_device), human_bytes(e.nbytes)))
        return rows

    def summary(self) -> str:
        """One line: the mesh, the parameter arrays and their bytes, in total, per device, replicated."""
        mesh_desc = ", ".join(f"{a}={s}" for a, s in self.mesh.shape.items())
        n_params = sum(1 for e in self._selected(True))
        n_repl = sum(1 for e in self._selected(True) if e.replicated)
        return (f"mesh ({mesh_desc}), {self.mesh.size} devices; {n_params} parameter arrays: "
                f"{human_bytes(self.total_bytes())} total, {human_bytes(self.bytes_per_device())} per device; "
                f"replicated: {human_bytes(self.replicated_bytes())} in {n_repl} arrays")

    def describe(self) -> str:
        """A table: path, shape, dtype, logical names, PartitionSpec, bytes per device and in total."""
        header = self.HEADER
        rows = [header, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        right = {5, 6}
        lines = []
        for i, row in enumerate(rows):
            cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)

    __str__ = describe

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A notebook cell's last expression (text consoles): the table, not the dataclass."""
        printer.text(self.describe())

    def _repr_html_(self) -> str:
        """A notebook cell's last expression: the table as HTML."""
        from titanax.html import fragment
        from titanax.parallel.report import layout_html

        return fragment(layout_html(self))


def layout_tree(leaves: Sequence[Leaf], rules: Rules, mesh: Mesh) -> Layout:
    """Decide the sharding of every leaf.

    Args:
      leaves: the model's arrays with their paths and annotations.
      rules: the rules to apply (path rules first, then annotations, then the unnamed fallback).
      mesh: the mesh to lay them out on.

    Returns:
      The :class:`Layout`, in the order of ``leaves``.

    Raises:
      ShardingError: an annotation names a mesh axis the mesh lacks or one twice, has more names
        than dimensions; in strict mode also an unmapped name, an indivisible dimension or a path
        rule that matched no array.
    """
    mesh_shape = dict(mesh.shape)
    mesh_axes = frozenset(mesh.axis_names)
    used_path_rules: set[int] = set()
    entries = []
    for leaf in leaves:
        what = f"parameter {leaf.path!r}" if leaf.is_param else f"{leaf.collection} {leaf.path!r}"
        rule_index = rules.path_rule_for(leaf.path) if leaf.shape else None
        if rule_index is not None:
            used_path_rules.add(rule_index)
            names, source = rules.params[rule_index][1], "path rule"
            entry = rules.resolve(names, leaf.shape, mesh_shape, what=what, mesh_axis_names=mesh_axes)
        elif leaf.names is not None and leaf.names_are_mesh_axes:
            names, source = leaf.names, "mesh annotation"
            entry = _mesh_annotation(leaf, mesh_shape, what, rules.strict)
        elif leaf.names is not None:
            names, source = leaf.names, "annotation"
            entry = rules.resolve(names, leaf.shape, mesh_shape, what=what, mesh_axis_names=mesh_axes)
        elif rules.unnamed is not None and leaf.is_param:
            entry = _largest_divisible(leaf.shape, rules.unnamed, mesh_shape)
            names, source = None, "unnamed" if any(e is not None for e in entry) else "none"
        else:
            names, source, entry = None, "none", (None,) * len(leaf.shape)
        entries.append(ParamLayout(leaf.path, leaf.collection, tuple(leaf.shape), leaf.dtype, names,
                                   source, NamedSharding(mesh, PartitionSpec(*entry)), leaf.is_param))
    _check_replicated(entries, rules, mesh_shape)
    for i, (pattern, names) in enumerate(rules.params):
        if i not in used_path_rules:
            message = f"path rule ({pattern!r}, {names}) matched no array of the model"
            suggestion = ("check the regex against the paths in sm.describe(), e.g. "
                          f"{[leaf.path for leaf in leaves[:3]]}")
            if rules.strict:
                raise ShardingError(message, suggestion=suggestion)
            warnings.warn(f"{message}. {suggestion}", TitanaxWarning, stacklevel=user_stacklevel())
    return Layout(mesh, tuple(entries))


def _check_replicated(entries: list[ParamLayout], rules: Rules, mesh_shape: dict[str, int]) -> None:
    """Flag large parameters replicated by accident: no names, or names some rule would shard
    (so competition for a mesh axis or divisibility left them whole)."""
    limit = rules.max_replicated_bytes
    if limit is None:
        return
    for e in entries:
        if not e.is_param or not e.replicated or e.nbytes <= limit:
            continue
        if e.names is not None and not any(n is not None and rules.shards_name(n, mesh_shape)
                                           for n in e.names):
            continue  # every name is replicated on purpose
        why = ("it has no logical names (no annotation, no path rule)" if e.names is None else
               f"its names {e.names} found no free mesh axis")
        message = (f"parameter {e.path!r} ({human_bytes(e.nbytes)}) is fully replicated on every device: "
                   f"{why}")
        suggestion = ("annotate it (nn.with_logical_partitioning / nnx.with_partitioning), add a path "
                      f"rule (r'{e.path}$', (...names...)), or raise max_replicated_bytes")
        if rules.strict:
            raise ShardingError(message, suggestion=suggestion)
        warnings.warn(f"{message}. {suggestion}", TitanaxWarning, stacklevel=user_stacklevel())


def _mesh_annotation(leaf: Leaf, mesh_shape: dict[str, int], what: str, strict: bool) -> tuple:
    names = pad_names(leaf.names, leaf.shape, what)
    flat = [a for entry in names if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    for axis in flat:
        if axis not in mesh_shape:
            raise ShardingError(
                f"{what} is annotated with mesh axis {axis!r}, which the mesh {mesh_shape} does not have",
                suggestion=f"rename the axis to one of {list(mesh_shape)}, or annotate with logical "
                "names (nn.with_logical_partitioning) and map them with tx.Rules",
            )
    if len(set(flat)) != len(flat):
        raise ShardingError(
            f"{what} is annotated {names}: the same mesh axis appears twice",
            suggestion="name each mesh axis at most once per array",
        )
    spec = []
    dropped: list[Dropped] = []
    for dim, entry in enumerate(names):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        kept = divisible_axes(axes, dim, leaf.shape, mesh_shape, what, "/".join(axes), strict,
                              dropped) if axes else ()
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    warn_dropped(dropped, tuple(spec))
    return tuple(spec)


def _largest_divisible(shape, unnamed, mesh_shape) -> tuple:
    axes = (unnamed,) if isinstance(unnamed, str) else tuple(unnamed)
    axes = tuple(a for a in axes if mesh_shape.get(a, 1) > 1)
    size = math.prod(mesh_shape[a] for a in axes)
    spec: list = [None] * len(shape)
    candidates = [d for d in range(len(shape)) if shape[d] % size == 0] if axes else []
    if candidates:
        dim = max(candidates, key=lambda d: (shape[d], -d))
        spec[dim] = axes[0] if len(axes) == 1 else axes
    return tuple(spec)


def _itemsize(dtype: Any) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        # PRNG key dtypes: the key data's size (threefry: two uint32).
        return getattr(dtype, "itemsize", 8)


def _dtype_name(dtype: Any) -> str:
    return getattr(dtype, "name", str(dtype))


def _spec_str(spec: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(e) for e in spec) + ")"


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of the arrays in ``tree`` (the largest shard of each array)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype") or jax.dtypes.issubdtype(
                leaf.dtype, jax.dtypes.extended):  # a PRNG key: a few bytes, no NumPy dtype
            continue
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
