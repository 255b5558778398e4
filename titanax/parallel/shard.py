"""``tx.shard``: put a Flax model (Linen or NNX) on a mesh by a plan or rules.

The returned :class:`ShardedModel` holds the sharded parameters, a jitted forward whose inputs are
split on ``batch``, a pure ``apply`` for your own jitted loss and gradient, and the per-parameter
layout table. Framework specifics live in ``flax_linen.py`` and ``flax_nnx.py``.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.exceptions import MeshError, PlanError, ShardingError, TitanaxWarning
from titanax.parallel.batch import batch_axes, batch_sharding
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules
from titanax.parallel.sharding import Layout, layout_tree
from titanax.parallel.tracing import CallRecord, call_model, tracing_context

__all__ = ["shard", "ShardedModel", "tree_layout", "tree_shardings", "resolve_mesh", "resolve_rules"]

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
        return _check_axis_types(mesh)
    ambient = jax.sharding.get_mesh()
    if isinstance(ambient, Mesh) and not ambient.empty:
        return _check_axis_types(ambient)
    raise ShardingError(
        "no mesh given and none set with jax.set_mesh",
        suggestion="pass mesh=tx.MeshSpec(axes=('data',)).build(), or enter `with jax.set_mesh(mesh):`",
    )


def _check_axis_types(mesh: Mesh) -> Mesh:
    """Titanax lays arrays out with GSPMD, which needs every mesh axis ``AxisType.Auto``."""
    explicit = [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                if kind != jax.sharding.AxisType.Auto]
    if explicit:
        kinds = {name: kind.name for name, kind in zip(mesh.axis_names, mesh.axis_types)}
        names = tuple(mesh.axis_names)
        raise MeshError(
            f"mesh axes {explicit} are not AxisType.Auto (axis types: {kinds}); Titanax lays "
            "arrays out by GSPMD sharding constraints, which JAX accepts only on Auto axes "
            "(jax.make_mesh makes Explicit axes by default)",
            suggestion=f"build the mesh with tx.MeshSpec(axes={names!r}, shape={tuple(mesh.devices.shape)!r}).build(), "
            f"or jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * {len(names)})",
        )
    return mesh


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


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)) and not isinstance(x, bool)


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
      abstract: the arrays are ``jax.ShapeDtypeStruct``s carrying their shardings, nothing is
        allocated (``tx.shard(..., abstract=True)``): lower, inspect and describe, but not run.
      layer_order: under ``PP(repeats=v)`` with ``v > 1``, the
        :class:`~titanax.parallel.layer_order.LayerOrder` the ``tx.nn.LayerStack`` is stored in:
        :attr:`params` (and the module's state) then hold the stack in *pipeline order*, each
        device's block of layers being the chunks it runs, not layers ``0..L-1`` in turn (see
        :meth:`natural_params`); ``None`` for every other model (natural order).
    """

    def __init__(self, *, module: Any, mesh: Mesh, plan: Plan | None, rules: Rules, layout: Layout,
                 abstract: bool = False, layer_order: Any = None):
        self.mesh = mesh
        self.layer_order = layer_order
        self.plan = plan
        self.rules = rules
        self.layout = layout
        self.abstract = abstract
        self._module = module
        self._forwards: dict[Any, Callable[..., Any]] = {}
        self._axis_names: set[str] = set()  # pmap-style names the model's collectives use
        self._axes_checked = False
        self._flax_constraints_reported = False

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

    @property
    @abc.abstractmethod
    def model_state_shardings(self) -> Any:
        """A tree like :attr:`model_state` whose leaves are their ``NamedSharding``s."""

    @abc.abstractmethod
    def apply_with_state(self, params: Any, model_state: Any, *args: Any, mutable: Any = False,
                         **kwargs: Any) -> Any:
        """Run the model with ``params`` and ``model_state`` (pure; what a TrainState calls).

        Args:
          params: the parameters.
          model_state: the other state (:attr:`model_state`'s structure).
          *args: the model's inputs.
          mutable: ``False``: the call must not change ``model_state`` (NNX: a change raises
            :class:`~titanax.TitanaxError`, since it would be lost; Linen raises by itself).
            ``True`` (or, Linen, a list of collections such as ``["batch_stats"]``): return the
            changed state too.
          **kwargs: the model's keyword arguments.

        Returns:
          The model's output; with ``mutable``, ``(output, new_model_state)``, where
          ``new_model_state`` has the structure of ``model_state``.
        """

    def apply(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the model with ``params`` and this model's other state.

        Pure: use it inside your own ``jax.jit`` and ``jax.grad``; ``tx.constrain`` calls in the
        model resolve against this model's rules and mesh. Pass ``mutable=True`` when the call
        updates state (batch statistics, NNX RNG counters) to get ``(output, new_model_state)``;
        see :meth:`apply_with_state`.

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
    def natural_params(self, params: Any = None) -> Any:
        """Parameters with the layer stack in natural order (layer ``i`` at index ``i``), e.g. to
        compare with the same model sharded by a plan without ``PP(repeats>1)``.

        Args:
          params: parameters shaped like :attr:`params` (e.g. ``state.params``); default
            :attr:`params`.

        Returns:
          ``params`` in natural order, with their shardings (the same tree when
          :attr:`layer_order` is ``None``).
        """
        params = self.params if params is None else params
        if self.layer_order is None:
            return params
        return self.layer_order.to_natural(params)[0]

    @property
    def specs(self) -> dict[str, PartitionSpec]:
        """``{path: PartitionSpec}`` for every array of the model."""
        return {e.path: e.spec for e in self.layout}

    def batch_sharding(self, x: Any) -> NamedSharding:
        """The sharding of an input whose leading dimension is the batch."""
        shape = np.shape(x)
        return batch_sharding(self.mesh, self.rules, shape, what=f"input of shape {shape}")

    def shard_batch(self, batch: Any) -> Any:
        """Place every array of ``batch`` on the mesh, split along its leading (batch) dimension
        (a ``jax.ShapeDtypeStruct`` gets the sharding instead)."""
        def place_one(x: Any) -> Any:
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.batch_sharding(x))
            return jax.device_put(x, self.batch_sharding(x))

        return jax.tree.map(place_one, batch)

    def tracing(self) -> contextlib.AbstractContextManager[None]:
        """The context to trace model code in (rules, mesh, Flax logical rules)."""
        return tracing_context(self.rules, self.mesh)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run model code as Titanax traces it (see :func:`~titanax.parallel.tracing.call_model`),
        then check what only the traced program shows."""
        out, record = call_model(fn, rules=self.rules, mesh=self.mesh, axis_names=self._axis_names)
        self._check_call(record)
        return out

    def _check_call(self, record: CallRecord) -> None:
        if record.flax_constraints and not self._flax_constraints_reported:
            self._flax_constraints_reported = True
            self._complain(
                f"the model calls Flax's nn.with_logical_constraint ({record.flax_constraints} "
                "time(s) in this call), which resolves against Flax's own global rules and mesh; "
                "Titanax sets neither, so those constraints reach XLA as nothing",
                suggestion="call tx.constrain(x, names) instead: the same logical names, resolved by "
                "this plan's rules (a no-op outside Titanax, like Flax's without rules)",
            )
        if not self._axes_checked:
            self._axes_checked = True
            self._check_axes_used(record.constrained_axes)

    def _check_axes_used(self, constrained: set[str]) -> None:
        """A mesh axis with several devices that splits no parameter, no activation and not the
        batch makes its devices compute the same thing."""
        mesh_shape = dict(self.mesh.shape)
        used = set(constrained) | set(batch_axes(self.rules, mesh_shape))
        for entry in self.layout:
            used |= _spec_axes(entry.spec)
        model_names = sorted({n for e in self.layout if e.names for n in e.names
                              if isinstance(n, str) and n not in mesh_shape})
        for axis, size in mesh_shape.items():
            if size == 1 or axis in used:
                continue
            mapped = [name for name, target in self.rules.rules if axis in _target_axes(target)]
            named = [name for name in mapped if name in model_names]
            if named:
                why = (f"; the rules map {mapped} to it and the model names {named}, but no such "
                       "dimension could be split over it (indivisible, or the axis was taken by "
                       "another dimension of the same array)")
            elif mapped:
                why = f"; the rules map {mapped} to it, but the model's arrays are named only {model_names}"
            else:
                why = "; no rule maps a logical name to it"
            self._complain(
                f"mesh axis {axis!r} ({size} devices) splits no parameter, no activation and not "
                f"the batch: its {size} devices hold the same values and compute the same thing{why}",
                suggestion="name those dimensions in the model (nnx.with_partitioning / "
                "nn.with_logical_partitioning, or path rules tx.Rules(params=[(regex, names)])), "
                f"constrain activations with tx.constrain, or give {axis!r} size 1 in the MeshSpec",
            )

    def _complain(self, message: str, *, suggestion: str) -> None:
        if self.rules.strict:
            raise ShardingError(message, suggestion=suggestion)
        warnings.warn(f"{message}. {suggestion}", TitanaxWarning, stacklevel=4)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Jitted forward. Positional arrays are split on ``batch`` along their first dimension;
        keyword arrays (masks, PRNG keys) are passed as they are; other values are static."""
        if self.abstract:
            raise ShardingError(
                f"this {type(self._module).__name__} was sharded abstract (tx.shard(..., abstract=True)): "
                "its arrays are shapes and shardings, with no values to compute with",
                suggestion="lower it instead (sm.lower(jax.ShapeDtypeStruct(shape, dtype))) and inspect "
                "it with tx.profiling.inspect, or shard without abstract=True to run it",
            )
        forward, call_args = self._prepare(args, kwargs)
        out, new_state = forward(*call_args)
        self._store(new_state)
        return out

    def lower(self, *args: Any, **kwargs: Any) -> jax.stages.Lowered:
        """The forward :meth:`__call__` would run, lowered for these inputs (not run).

        Example:
          >>> stats = tx.profiling.inspect(sm.lower(x))   # per-device bytes, FLOPs, collectives
        """
        forward, call_args = self._prepare(args, kwargs)
        return forward.lower(*call_args)  # inputs may be jax.ShapeDtypeStructs

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
        kind = ", abstract" if self.abstract else ""
        return (f"{type(self).__name__}({type(self._module).__name__}, mesh=({mesh}), "
                f"{len(self.layout)} arrays, {self.layout.bytes_per_device()} param bytes/device{kind})")


def _target_axes(target: Any) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _spec_axes(spec: PartitionSpec) -> set[str]:
    return {a for entry in spec for a in _target_axes(entry)}


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
    abstract: bool = False,
) -> ShardedModel:
    """Lay a Flax model out on a mesh.

    Parameters are created directly sharded (``jax.jit`` with ``out_shardings`` over the abstract
    shapes), never whole on one device, unless you hand over existing ones. With ``abstract=True``
    nothing is created: every array is a ``jax.ShapeDtypeStruct`` carrying its final sharding, so
    a model of any size can be laid out, described and lowered on one CPU.

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
      abstract: allocate nothing (see above); ``tx.create_train_state`` / ``Engine.init`` of an
        abstract model give an abstract state, which a step function can lower.

    Returns:
      A :class:`ShardedModel`.

    Raises:
      PlanError: the plan does not fit the mesh.
      ShardingError: a parameter cannot be laid out (see the message for which and why).

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()                       # doctest: +SKIP
      >>> sm = tx.shard(nn.Dense(16), tx.Plan(data_parallel=tx.DP()), mesh, example=x)
      >>> print(sm.describe())
      >>> big = tx.shard(lambda rngs: GPT(cfg_70b, rngs=rngs), plan, mesh, abstract=True)
    """
    if not isinstance(abstract, bool):
        raise ShardingError(f"abstract={abstract!r} must be True or False",
                            suggestion="pass abstract=True to allocate nothing")
    mesh = resolve_mesh(mesh)
    plan, rules = resolve_rules(plan_or_rules, mesh)
    if isinstance(model, nn.Module):
        from titanax.parallel.flax_linen import shard_linen

        return shard_linen(model, plan, rules, mesh, example=example, rng=rng, params=params,
                           example_kwargs=dict(example_kwargs or {}), abstract=abstract)
    if isinstance(model, nnx.Module) or callable(model):
        if example is not None or example_kwargs:
            raise ShardingError(
                "example= is for Linen modules; an NNX module is already built",
                suggestion="drop example=; call the returned model with your inputs",
            )
        from titanax.parallel.flax_nnx import shard_nnx

        return shard_nnx(model, plan, rules, mesh, rng=rng, params=params, abstract=abstract)
    raise ShardingError(
        f"tx.shard got a {type(model).__name__}, not a Flax model",
        suggestion="pass a flax.linen.Module, a flax.nnx.Module, or a function that builds an NNX module",
    )
