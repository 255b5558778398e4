"""``tx.shard``: put a Flax model (Linen or NNX) on a mesh by a plan or rules.

The returned :class:`ShardedModel` holds the sharded parameters, a jitted forward whose inputs are
split on ``batch``, a pure ``apply`` for your own jitted loss and gradient, and the per-parameter
layout table. Framework specifics live in ``flax_linen.py`` and ``flax_nnx.py``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.exceptions import PlanError, ShardingError
from titanax.parallel.context import sharding_context
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules
from titanax.parallel.sharding import Layout, layout_tree

__all__ = ["shard", "ShardedModel", "tree_layout", "tree_shardings", "tracing_context", "resolve_mesh",
           "resolve_rules"]

PlanOrRules = Plan | Rules


def resolve_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh`` if given, else the concrete mesh set by ``jax.set_mesh``.

    Raises:
      ShardingError: neither is there.
    """
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ShardingError(
                f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}",
                suggestion="build one with tx.MeshSpec(axes=...).build()",
            )
        return mesh
    ambient = jax.sharding.get_mesh()
    if isinstance(ambient, Mesh) and not ambient.empty:
        return ambient
    raise ShardingError(
        "no mesh given and none set with jax.set_mesh",
        suggestion="pass mesh=tx.MeshSpec(axes=('data',)).build(), or enter `with jax.set_mesh(mesh):`",
    )


def resolve_rules(plan_or_rules: PlanOrRules, mesh: Mesh) -> tuple[Plan | None, Rules]:
    """Validate a plan (or bare rules) against ``mesh`` and return ``(plan, rules)``."""
    if isinstance(plan_or_rules, Plan):
        plan_or_rules.validate(mesh)
        return plan_or_rules, plan_or_rules.resolved_rules()
    if isinstance(plan_or_rules, Rules):
        plan_or_rules.validate(dict(mesh.shape))
        return None, plan_or_rules
    raise PlanError(
        f"expected a tx.Plan or tx.Rules, got {type(plan_or_rules).__name__}",
        suggestion="pass tx.Plan(data_parallel=tx.DP(axis='data')) or tx.Rules([('batch', 'data')])",
    )


@contextlib.contextmanager
def tracing_context(rules: Rules, mesh: Mesh, pipeline: Any = None) -> Iterator[None]:
    """What model code sees while Titanax traces it on ``mesh``.

    ``tx.constrain`` resolves against ``rules`` and ``mesh``. NNX's eager sharding is off because
    Titanax, not Flax, places every variable. Flax's own logical rules and ``jax.set_mesh`` are
    deliberately not entered: with both active, Linen's boxed initializers constrain parameters
    mid-construction (``DenseGeneral`` under ``nn.scan`` then fails on its flattened kernel).
    """
    from titanax.parallel.pipeline import pipeline_context

    with sharding_context(rules, mesh), nnx.use_eager_sharding(False), pipeline_context(pipeline, mesh):
        yield


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) and not isinstance(x, bool)


def _hashable(value: Any) -> Any:
    """Lists (Flax's ``mutable=["batch_stats"]``) become tuples so they can key the jit cache."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _all_arrays(value: Any) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(_is_array(leaf) for leaf in leaves)


class ShardedModel(abc.ABC):
    """A Flax model laid out on a mesh: what :func:`shard` returns.

    Attributes:
      mesh: the mesh the model lives on.
      plan: the plan it was sharded by (``None`` when bare rules were given).
      rules: the rules every layout decision came from.
      layout: per-array :class:`~titanax.parallel.sharding.Layout` (path, spec, bytes).
    """

    def __init__(self, *, module: Any, mesh: Mesh, plan: Plan | None, rules: Rules, layout: Layout):
        self.mesh = mesh
        self.plan = plan
        self.rules = rules
        self.layout = layout
        self._module = module
        self._forwards: dict[Any, Callable[..., Any]] = {}

    # -------------------------------------------------------------- framework-specific parts
    @property
    def module(self) -> Any:
        """The model: the Linen module, or the NNX module whose state is now sharded."""
        return self._module

    @property
    @abc.abstractmethod
    def params(self) -> Any:
        """The sharded trainable parameters (Linen ``params`` collection, or NNX ``nnx.State``)."""

    @property
    @abc.abstractmethod
    def param_shardings(self) -> Any:
        """A tree like :attr:`params` whose leaves are their ``NamedSharding``s."""

    @property
    @abc.abstractmethod
    def model_state(self) -> Any:
        """Non-parameter state: Linen collections other than ``params``, or NNX's other variables."""

    @abc.abstractmethod
    def apply_with_state(self, params: Any, model_state: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the model with ``params`` and ``model_state`` (pure; what a TrainState calls)."""

    def apply(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the model with ``params`` and this model's other state.

        Pure: use it inside your own ``jax.jit`` and ``jax.grad``; ``tx.constrain`` calls in the
        model resolve against this model's rules and mesh.

        Example:
          >>> loss = lambda p, x: jnp.mean(sm.apply(p, x) ** 2)               # doctest: +SKIP
          >>> grads = jax.jit(jax.grad(loss))(sm.params, sm.shard_batch(x))
        """
        return self.apply_with_state(params, self.model_state, *args, **kwargs)

    @abc.abstractmethod
    def _state(self) -> Any:
        """Everything the jitted forward reads (params and other collections)."""

    @abc.abstractmethod
    def _run(self, state: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """Pure forward on the full state: ``(output, new_state_or_None)``."""

    def _store(self, new_state: Any) -> None:
        """Keep state the forward changed (NNX batch statistics, RNG counters)."""

    # ------------------------------------------------------------------------ shared parts
    @property
    def specs(self) -> dict[str, PartitionSpec]:
        """``{path: PartitionSpec}`` for every array of the model."""
        return {e.path: e.spec for e in self.layout}

    def batch_sharding(self, x: Any) -> NamedSharding:
        """The sharding of an input whose leading dimension is the batch."""
        shape = np.shape(x)
        names = ("batch",) if shape else ()
        spec = self.rules.spec(names, shape, dict(self.mesh.shape), what=f"input of shape {shape}")
        return NamedSharding(self.mesh, spec)

    def shard_batch(self, batch: Any) -> Any:
        """Place every array of ``batch`` on the mesh, split along its leading (batch) dimension."""
        return jax.tree.map(lambda x: jax.device_put(x, self.batch_sharding(x)), batch)

    def tracing(self) -> contextlib.AbstractContextManager[None]:
        """The context to trace model code in (rules, mesh, Flax logical rules)."""
        pipeline = self.plan.pipeline_parallel if self.plan is not None else None
        return tracing_context(self.rules, self.mesh, pipeline)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Jitted forward. Positional arrays are split on ``batch`` along their first dimension;
        keyword arrays (masks, PRNG keys) are passed as they are; other values are static."""
        forward, call_args = self._prepare(args, kwargs)
        with self.tracing():
            out, new_state = forward(*call_args)
        self._store(new_state)
        return out

    def lower(self, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
        """The forward :meth:`__call__` would run, lowered for these inputs (not run).

        Example:
          >>> stats = tx.profiling.inspect(sm.lower(x))   # per-device bytes, FLOPs, collectives
        """
        forward, call_args = self._prepare(args, kwargs)
        with self.tracing():
            return forward.lower(*call_args)

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[Any, tuple]:
        dynamic_pos = tuple(i for i, a in enumerate(args) if _all_arrays(a))
        static_pos = tuple((i, _hashable(a)) for i, a in enumerate(args) if i not in dynamic_pos)
        dynamic_kw = tuple(sorted(k for k, v in kwargs.items() if _all_arrays(v)))
        static_kw = tuple(sorted((k, _hashable(v)) for k, v in kwargs.items() if k not in dynamic_kw))
        key = (len(args), dynamic_pos, static_pos, dynamic_kw, static_kw)
        try:
            forward = self._forwards.get(key)
        except TypeError:
            raise ShardingError(
                "a non-array argument of the forward is not hashable",
                suggestion="pass arrays (jax.Array or numpy) or hashable Python values",
            ) from None
        if forward is None:
            forward = self._forwards[key] = self._build_forward(key)
        placed = tuple(self.shard_batch(args[i]) for i in dynamic_pos)
        return forward, (self._state(), placed, {k: kwargs[k] for k in dynamic_kw})

    def _build_forward(self, key: tuple) -> Callable[..., Any]:
        n_args, dynamic_pos, static_pos, _, static_kw = key

        def forward(state, dynamic_args, dynamic_kwargs):
            args: list[Any] = [None] * n_args
            for i, value in zip(dynamic_pos, dynamic_args):
                args[i] = value
            for i, value in static_pos:
                args[i] = value
            return self._run(state, tuple(args), {**dynamic_kwargs, **dict(static_kw)})

        return jax.jit(forward)

    def describe(self) -> str:
        """The layout table: per array its path, shape, logical axes, spec and bytes per device."""
        head = self.plan.describe(self.mesh) + "\n\n" if self.plan is not None else ""
        return head + self.layout.describe()

    def __repr__(self) -> str:
        mesh = ", ".join(f"{a}={s}" for a, s in self.mesh.shape.items())
        return (f"{type(self).__name__}({type(self._module).__name__}, mesh=({mesh}), "
                f"{len(self.layout)} arrays, {self.layout.bytes_per_device()} param bytes/device)")


def tree_layout(tree: Any, plan_or_rules: PlanOrRules, mesh: Mesh | None = None) -> Layout:
    """The layout of any pytree of arrays (or their abstract shapes) under a plan or rules.

    Leaves may be plain arrays or ``jax.ShapeDtypeStruct`` (named by path rules, or the FSDP
    fallback), Linen boxes (``nn.with_logical_partitioning``) or NNX variables (their metadata).

    Args:
      tree: the pytree, e.g. ``jax.eval_shape(model.init, key, x)`` or an ``nnx.State``.
      plan_or_rules: a :class:`~titanax.Plan` or :class:`~titanax.Rules`.
      mesh: the mesh; ``None`` takes the one set by ``jax.set_mesh``.

    Returns:
      The :class:`~titanax.parallel.sharding.Layout`, one entry per leaf in tree order.

    Example:
      >>> shapes = {"w": jax.ShapeDtypeStruct((64, 256), jnp.float32)}       # doctest: +SKIP
      >>> rules = tx.Rules(params=[("w$", ("embed", "mlp"))]) + tx.rules.tensor_parallel()
      >>> print(tx.tree_layout(shapes, rules, mesh))
    """
    from titanax.parallel.annotations import tree_leaves

    mesh = resolve_mesh(mesh)
    _, rules = resolve_rules(plan_or_rules, mesh)
    return layout_tree(tree_leaves(tree), rules, mesh)


def tree_shardings(tree: Any, plan_or_rules: PlanOrRules, mesh: Mesh | None = None) -> Any:
    """``NamedSharding``s for every leaf of ``tree``, shaped like it (Linen boxes removed).

    Use them as ``jax.jit`` ``in_shardings``/``out_shardings`` or with ``jax.device_put``; see
    :func:`tree_layout` for the leaves accepted.

    Example:
      >>> abstract = jax.eval_shape(model.init, jax.random.key(0), x)        # doctest: +SKIP
      >>> shardings = tx.tree_shardings(abstract, plan, mesh)
      >>> variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x)
    """
    from titanax.parallel.annotations import unboxed_structure

    return jax.tree.unflatten(unboxed_structure(tree), tree_layout(tree, plan_or_rules, mesh).shardings)


def shard(
    model: Any,
    plan_or_rules: PlanOrRules,
    mesh: Mesh | None = None,
    example: Any = None,
    rng: int | jax.Array | Mapping[str, jax.Array] = 0,
    params: Any = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
) -> ShardedModel:
    """Lay a Flax model out on a mesh.

    Parameters are created directly sharded (``jax.jit`` with ``out_shardings`` over the abstract
    shapes), never whole on one device, unless you hand over existing ones.

    Args:
      model: a Linen module; an NNX module (its state is resharded in place); or a function
        returning an NNX module, optionally taking an ``nnx.Rngs`` (created directly sharded).
      plan_or_rules: a :class:`~titanax.Plan`, or bare :class:`~titanax.Rules`.
      mesh: the mesh; ``None`` takes the one set by ``jax.set_mesh``.
      example: Linen only, to initialize: the first positional input, or a tuple of them.
      rng: Linen: seed, PRNG key, or a dict of keys for ``init``; NNX factories taking an
        ``nnx.Rngs`` get ``nnx.Rngs(rng)``.
      params: existing parameters to place instead of initializing (Linen: the ``params``
        collection or the full variables dict; NNX: a state to load into the module).
      example_kwargs: Linen only: keyword arguments for ``init`` (``train=False``, masks).

    Returns:
      A :class:`ShardedModel`.

    Raises:
      PlanError: the plan does not fit the mesh.
      ShardingError: a parameter cannot be laid out (see the message for which and why).

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()                       # doctest: +SKIP
      >>> sm = tx.shard(nn.Dense(16), tx.Plan(data_parallel=tx.DP()), mesh, example=x)
      >>> print(sm.describe())
    """
    mesh = resolve_mesh(mesh)
    plan, rules = resolve_rules(plan_or_rules, mesh)
    if isinstance(model, nn.Module):
        from titanax.parallel.flax_linen import shard_linen

        return shard_linen(model, plan, rules, mesh, example=example, rng=rng, params=params,
                           example_kwargs=dict(example_kwargs or {}))
    if isinstance(model, nnx.Module) or callable(model):
        if example is not None or example_kwargs:
            raise ShardingError(
                "example= is for Linen modules; an NNX module is already built",
                suggestion="drop example=; call the returned model with your inputs",
            )
        from titanax.parallel.flax_nnx import shard_nnx

        return shard_nnx(model, plan, rules, mesh, rng=rng, params=params)
    raise ShardingError(
        f"tx.shard got a {type(model).__name__}, not a Flax model",
        suggestion="pass a flax.linen.Module, a flax.nnx.Module, or a function that builds an NNX module",
    )
