"""The active context: which rules and mesh `tx.constrain` resolves against, and how a pipelined
layer stack runs while ``tx.value_and_grad`` splits a loss around it.

One thread-local object holds all of it, scoped by context managers (``with rules:``, or the
context Titanax enters while tracing a sharded forward or training step), never set globally, so
a model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.exceptions import ShardingError
from titanax.parallel.rules import Rules
from titanax.parallel.scope import STACK as _STACK, pop_rules, push_rules

__all__ = ["constrain", "constraint_record", "current_rules", "current_mesh", "current_stack_split",
           "sharding_context", "stack_split"]


@contextlib.contextmanager
def sharding_context(rules: Rules, mesh: Mesh | None = None) -> Iterator[Rules]:
    """Make ``rules`` (and optionally ``mesh``) the ones ``tx.constrain`` uses inside the block.

    Args:
      rules: the rules to resolve logical names with.
      mesh: the mesh to constrain over; ``None`` uses the mesh set by ``jax.set_mesh``.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> def model_fn(x_BD):
      ...     return tx.constrain(x_BD * 2, ("batch", None))       # a no-op outside a context
      >>> with tx.sharding_context(tx.presets.data_parallel("data"), mesh):
      ...     y_BD = jax.jit(model_fn)(jnp.ones((16, 4)))         # here it resolves to P('data')
      >>> y_BD.sharding.spec
      P('data',)
    """
    push_rules(rules, mesh)
    try:
        yield rules
    finally:
        pop_rules(rules)


@contextlib.contextmanager
def constraint_record(axes: set[str]) -> Iterator[set[str]]:
    """Collect into ``axes`` the mesh axes every ``tx.constrain`` inside the block splits over.

    Titanax uses it to tell a mesh axis that only activations use from one nothing uses.
    """
    _STACK.records.append(axes)
    try:
        yield axes
    finally:
        _STACK.records.pop()


@contextlib.contextmanager
def stack_split(split: Any) -> Iterator[Any]:
    """Inside the block a pipelined layer stack hands its input to ``split`` (its ``record``)
    instead of running; ``tx.value_and_grad`` uses it to cut a loss into the part before the
    stack and the part after it. Nothing is raised through model code."""
    _STACK.splits.append(split)
    try:
        yield split
    finally:
        _STACK.splits.pop()


def current_stack_split() -> Any:
    """The innermost :func:`stack_split` recorder, or ``None``."""
    return _STACK.splits[-1] if _STACK.splits else None


def _record(spec: PartitionSpec) -> None:
    for entry in spec:
        for axis in () if entry is None else (entry,) if isinstance(entry, str) else entry:
            for axes in _STACK.records:
                axes.add(axis)


def current_rules() -> Rules | None:
    """The innermost active rules, or ``None`` outside every Titanax context."""
    return _STACK.frames[-1].rules if _STACK.frames else None


def current_mesh() -> Mesh | jax.sharding.AbstractMesh | None:
    """The mesh of the innermost context, else the one set by ``jax.set_mesh``, else ``None``."""
    for frame in reversed(_STACK.frames):
        if frame.mesh is not None:
            return frame.mesh
    abstract = jax.sharding.get_abstract_mesh()
    if not abstract.empty:
        return abstract
    return None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's layout by logical names (``with_sharding_constraint``).

    In model code, name the dimensions of an intermediate value; the active plan's rules decide
    the mesh axes. Outside every Titanax context (and inside ``jax.shard_map``, where values are
    per-device blocks) it returns ``x`` unchanged, so the model still runs on one device.

    Args:
      x: the array to constrain (inside ``jax.jit`` or eagerly).
      names: one logical name or ``None`` per leading dimension, e.g. ``("batch", "seq", "embed")``.

    Returns:
      ``x``, constrained to the layout the rules give ``names``.

    Raises:
      ShardingError: rules are active but no mesh is (neither a Titanax context nor
        ``jax.set_mesh`` gave one), or ``names`` has more entries than ``x`` has dimensions.

    Example:
      >>> h_BTF = tx.constrain(h_BTF, ("batch", "seq", "mlp"))  # doctest: +SKIP
    """
    rules = current_rules()
    if rules is None:
        return x
    manual = set(jax.sharding.get_abstract_mesh().manual_axes)
    mesh = current_mesh()
    if mesh is None:
        raise ShardingError(
            f"tx.constrain(..., {tuple(names)}) ran with rules active but no mesh",
            suggestion="enter `with jax.set_mesh(mesh):` or use tx.sharding_context(rules, mesh)",
        )
    if manual:
        # Inside jax.shard_map each device holds a block along the manual axes: only the axes
        # still under GSPMD (e.g. the tensor axis inside a pipeline stage) can be hinted, and the
        # manual ones count as size 1 (the block is whole along them).
        if manual >= set(mesh.axis_names):
            return x
        auto_shape = {a: (1 if a in manual else n) for a, n in dict(mesh.shape).items()}
        spec = rules.spec(names, x.shape, auto_shape, what=f"activation {tuple(names)}")
        _record(spec)
        if all(entry is None for entry in spec):
            return x
        return jax.lax.with_sharding_constraint(x, spec)
    spec = rules.spec(names, x.shape, dict(mesh.shape), what=f"activation {tuple(names)}")
    _record(spec)
    return jax.lax.with_sharding_constraint(x, _sharding(mesh, spec))


def _sharding(mesh: Any, spec: PartitionSpec) -> NamedSharding | PartitionSpec:
    # Under jax.set_mesh the abstract mesh suffices: a bare PartitionSpec resolves against it.
    if isinstance(mesh, Mesh):
        return NamedSharding(mesh, spec)
    return spec
