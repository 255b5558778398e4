"""``ShardedModel``: a Flax model laid out on a mesh, the object ``tx.shard`` returns.

The framework-specific parts (where parameters live, how the model runs) are abstract here and
filled in by ``flax_linen.py`` and ``flax_nnx.py``; the shared parts (batch placement, the jitted
forward, the checks only a traced call can make, the layout table) live here.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.exceptions import ShardingError, TitanaxWarning, user_stacklevel
from titanax.html import Report
from titanax.parallel.batch import batch_axes, batch_sharding
from titanax.parallel.layout import Layout
from titanax.parallel.plan import Plan
from titanax.parallel.report import device_capacity, model_body
from titanax.parallel.rules import Rules
from titanax.parallel.explicit import gather_for_compute
from titanax.parallel.tracing import CallRecord, call_model, has_explicit_axes, mesh_context, tracing_context

__all__ = ["ShardedModel"]


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
      layout: per-array :class:`~titanax.parallel.layout.Layout` (path, spec, bytes).
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
          >>> mesh = tx.MeshSpec(axes=("data",)).build()
          >>> x = jnp.ones((8, 4))
          >>> sm = tx.shard(nn.Dense(2), tx.Plan(data_parallel=tx.DP()), mesh, example=x)
          >>> loss = lambda p, x: jnp.mean(sm.apply(p, x) ** 2)
          >>> grads = jax.jit(jax.grad(loss))(sm.params, sm.shard_batch(x))
          >>> grads["kernel"].shape
          (4, 2)
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

    def _for_compute(self, params: Any) -> Any:
        """``params`` as the model computes with them: on a mesh with Explicit axes, gathered over
        the FSDP axis (:mod:`titanax.parallel.explicit`); elsewhere as they are (XLA gathers)."""
        fsdp = self.plan.fsdp if self.plan is not None else None
        if fsdp is None or not has_explicit_axes(self.mesh):
            return params
        with mesh_context(self.mesh):
            return gather_for_compute(params, (fsdp.axis,))

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
        warnings.warn(f"{message}. {suggestion}", TitanaxWarning, stacklevel=user_stacklevel())

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
          >>> mesh = tx.MeshSpec(axes=("data",)).build()
          >>> sm = tx.shard(nn.Dense(2), tx.Plan(data_parallel=tx.DP()), mesh, example=jnp.ones((8, 4)))
          >>> x = jax.ShapeDtypeStruct((1024, 4), jnp.float32)      # shapes are enough
          >>> stats = tx.profiling.inspect(sm.lower(x))   # per-device bytes, FLOPs, collectives
          >>> stats.argument_bytes > 0
          True
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

    def describe(self) -> Report:
        """The plan and the layout table: per array its path, shape, logical axes, spec and bytes
        per device.

        Returns:
          The text (a ``str``: print it); as HTML (``.html()``, ``.save(path)``, a notebook's
          display) the plan with its pipeline schedule as a Gantt chart, one device's memory as a
          stacked bar (against the device's memory where the device reports it) and the layout
          table, one ``<tr class="tx-param">`` per parameter.

        Example:
          >>> mesh = tx.MeshSpec(axes=("data",)).build()
          >>> sm = tx.shard(nn.Dense(2), tx.Plan(data_parallel=tx.DP()), mesh, example=jnp.ones((8, 4)))
          >>> report = sm.describe()
          >>> "kernel" in report, report.html().count('<tr class="tx-param')
          (True, 2)
          >>> report.save("model.html")     # doctest: +SKIP
        """
        plan_text = self.plan.describe(self.mesh) if self.plan is not None else None
        head = plan_text + "\n\n" if plan_text is not None else ""
        pp = self.plan.pipeline_parallel if self.plan is not None else None
        body = model_body(plan_text, None if pp is None else pp.schedule_table(), self.layout,
                          device_capacity(self.mesh))
        return Report(head + self.layout.describe(), body, title=f"{type(self._module).__name__} on the mesh")

    def _repr_html_(self) -> str:
        """:meth:`describe` as HTML, for notebooks."""
        return self.describe()._repr_html_()

    def __repr__(self) -> str:
        mesh = ", ".join(f"{a}={s}" for a, s in self.mesh.shape.items())
        kind = ", abstract" if self.abstract else ""
        return (f"{type(self).__name__}({type(self._module).__name__}, mesh=({mesh}), "
                f"{len(self.layout)} arrays, {self.layout.bytes_per_device()} param bytes/device{kind})")


def _target_axes(target: Any) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _spec_axes(spec: PartitionSpec) -> set[str]:
    return {a for entry in spec for a in _target_axes(entry)}
