"""TrainState: parameters, optimizer state, step and PRNG as one sharded pytree."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titanax.exceptions import CollectiveError
from titanax.parallel.manual import varying_axes
from titanax.exec.precision import LossScale, Precision, scale_cotangent
from titanax.optim import as_optimizer
from titanax.parallel.rules import Rules
from titanax.parallel.sharded_model import ShardedModel
from titanax.parallel.opt_slots import kept_dims, map_param_slots
from titanax.parallel.layout import abstract, path_string

__all__ = ["TrainState", "all_finite", "create_train_state"]


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes, laid out on the mesh.

    Arrays (``step``, ``params``, ``opt_state``, ``rng``, ``model_state``, ``loss_scale``) are
    pytree leaves; the model's apply function, the optimizer, the precision policy and the layout
    are static, so a jitted step is specialised to them.

    Inside a ``@tx.step_fn``, ``rng`` is a fresh key every step (folded from the base key and the
    step number) and :meth:`apply_gradients` accumulates instead of updating while microbatches of
    ``DP(accumulate_steps=k)`` run.
    """

    step: jax.Array
    """Optimizer steps taken (int32 scalar, replicated)."""
    params: Any
    """Parameters in the master dtype, sharded by the plan."""
    opt_state: Any
    """Optimizer state; each slot shaped like a parameter has that parameter's sharding."""
    rng: jax.Array
    """Base PRNG key (inside a step function: this step's key)."""
    model_state: Any
    """Non-parameter model state: Linen collections other than ``params`` (``batch_stats``), or the
    NNX module's other variables."""
    loss_scale: LossScale | None
    """Loss-scaling state when ``Precision(loss_scale=...)`` is set."""
    grad_accum: Any
    """Gradients summed over the microbatches of one step (only while accumulating)."""
    skipped_steps: jax.Array
    """Updates skipped because their gradients were not finite (int32, replicated; counted from
    the start of this run, not stored in checkpoints): such a step leaves parameters, optimizer
    state and model state as they were. ``tx.Engine`` stops after ``on_nonfinite`` in a row."""
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    precision: Precision = struct.field(pytree_node=False)
    mesh: Mesh = struct.field(pytree_node=False)
    rules: Rules = struct.field(pytree_node=False)
    accumulate_steps: int = struct.field(pytree_node=False, default=1)
    accumulating: bool = struct.field(pytree_node=False, default=False)
    manual_axes: tuple[str, ...] = struct.field(pytree_node=False, default=())
    """Inside a manual-mode step: the mesh axes gradients must be reduced over."""
    step_record: Any = struct.field(pytree_node=False, default=None)
    """Inside a ``@tx.step_fn``: notes what the step body did with this state (trace time only)."""
    layer_order: Any = struct.field(pytree_node=False, default=None)
    """The model's :class:`~titanax.parallel.layer_order.LayerOrder` (``ShardedModel.layer_order``):
    under ``PP(repeats>1)`` the layer stack in ``params``, ``opt_state`` and ``model_state`` is in
    pipeline order; ``None``: natural order. Checkpoints are written in natural order."""

    def describe(self) -> str:
        """The state as a table: step, mesh, and per array (parameters, then optimizer state, model
        state) its path, shape, dtype, sharding and bytes per device.

        Example:
          >>> mesh = tx.MeshSpec(axes=("data",)).build()
          >>> engine = tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP()), optimizer=tx.optim.sgd(0.1))
          >>> print(engine.init(nn.Dense(2), example=jnp.ones((8, 4))).describe().splitlines()[0])
          TrainState at step 0 on mesh data=8: 10 parameters in 2 arrays, 40 B per device (optimizer state 0 B)
        """
        from titanax.parallel.layout import bytes_per_device
        from titanax.units import human_bytes, human_count

        def rows(tree: Any, prefix: str) -> list[tuple[str, ...]]:
            out = []
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                sharding = getattr(leaf, "sharding", None)
                spec = str(sharding.spec) if hasattr(sharding, "spec") else "-"
                out.append((prefix + jax.tree_util.keystr(path), str(tuple(leaf.shape)), str(leaf.dtype), spec,
                            human_bytes(bytes_per_device(leaf))))
            return out

        step = "?" if isinstance(self.step, jax.ShapeDtypeStruct) else int(jax.device_get(self.step))
        count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(self.params))
        arrays = len(jax.tree.leaves(self.params))
        mesh = ", ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
        head = (f"TrainState at step {step} on mesh {mesh}: {human_count(count)} parameters in {arrays} arrays, "
                f"{human_bytes(bytes_per_device(self.params))} per device (optimizer state "
                f"{human_bytes(bytes_per_device(self.opt_state))})")
        table = [("array", "shape", "dtype", "spec", "per device"),
                 *rows(self.params, "params"), *rows(self.opt_state, "opt_state"), *rows(self.model_state, "model_state")]
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        lines = [head, ""]
        for i, row in enumerate(table):
            lines.append("  ".join(c.rjust(w) if j == 4 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A notebook cell's last expression (text consoles): :meth:`describe`, not the arrays' values."""
        printer.text(self.describe())

    def _repr_html_(self) -> str:
        """A notebook cell's last expression: :meth:`describe`, preformatted."""
        import html

        from titanax.html import fragment

        return fragment(f"<pre>{html.escape(self.describe())}</pre>")

    def apply(self, params: Any, *args: Any, mutable: Any = False, **kwargs: Any) -> Any:
        """Run the model with ``params`` under the precision policy (use inside your loss).

        Parameters and floating inputs are cast to the compute dtype inside the differentiated
        function, so gradients come back in the master dtype; floating outputs are cast back. Under
        loss scaling, the output carries the scale into the backward pass.

        A model that updates state as it runs — batch statistics, and for NNX the counters of the
        RNG streams ``nnx.Dropout`` draws from — needs ``mutable``: the call then returns the new
        model state too, which the step keeps with ``apply_gradients(..., model_state=...)``. An
        NNX call that changes state without ``mutable`` raises instead of dropping the change
        (Linen raises by itself).

        Args:
          params: the parameters to run with (differentiate with respect to these).
          *args: the model's inputs.
          mutable: ``True`` (Linen also: a collection or list, e.g. ``["batch_stats"]``) to get
            ``(output, new_model_state)``.
          **kwargs: the model's keyword arguments (``train=True``, Linen ``rngs={...}``).

        Returns:
          The model's output, or ``(output, new_model_state)`` with ``mutable``.

        Example:
          >>> mesh = tx.MeshSpec(axes=("data",)).build()
          >>> sm = tx.shard(nn.BatchNorm(use_running_average=False), tx.Plan(data_parallel=tx.DP()),
          ...               mesh, example=jnp.ones((8, 3)))
          >>> state = tx.create_train_state(sm, tx.optim.sgd(0.1))
          >>> x = sm.shard_batch(jnp.arange(24.0).reshape(8, 3))
          >>> def loss_fn(params):
          ...     y, model_state = state.apply(params, x, mutable=True)   # batch statistics move
          ...     return jnp.mean(y ** 2), model_state
          >>> (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
          >>> state = state.apply_gradients(grads=grads, model_state=model_state)
          >>> int(state.step), bool((state.model_state["batch_stats"]["mean"] > 0).all())
          (1, True)
        """
        cast = self.precision.cast_to_compute
        result = self.apply_fn(cast(params), self.model_state, *cast(args), mutable=mutable, **cast(kwargs))
        out, new_model_state = result if mutable is not False else (result, None)
        out = self.precision.cast_to_params(out)
        if self.loss_scale is not None:
            out = scale_cotangent(out, jax.lax.stop_gradient(self.loss_scale.scale))
        if mutable is False:
            return out
        if self.step_record is not None:
            self.step_record.mutable_applied = True
        # Statistics computed in a reduced compute dtype go back in the dtype they are kept in.
        new_model_state = jax.tree.map(_like, new_model_state, self.model_state)
        return out, new_model_state

    def apply_gradients(self, *, grads: Any, **changes: Any) -> TrainState:
        """One optimizer update (or, while accumulating microbatches, add ``grads`` to the sum).

        Under loss scaling the gradients are unscaled first; a step whose gradients are not finite
        leaves parameters and optimizer state unchanged and lowers the scale.

        Args:
          grads: gradients shaped like ``params``.
          **changes: other fields to replace at the same time (e.g. ``model_state=``).

        Returns:
          The new state.
        """
        with jax.named_scope("accumulate_gradients" if self.accumulating else "optimizer_update"):
            return self._apply_gradients(grads, changes)

    def _apply_gradients(self, grads: Any, changes: dict[str, Any]) -> TrainState:
        grads = self.precision.cast_to_params(grads)
        if self.accumulating:
            if self.manual_axes:
                _check_reduced(grads, self.manual_axes)
            return self.replace(grad_accum=jax.tree.map(jnp.add, self.grad_accum, grads), **changes)
        if self.loss_scale is not None:
            inverse = 1.0 / self.loss_scale.scale
            grads = jax.tree.map(lambda g: g * inverse.astype(g.dtype), grads)
        finite = all_finite(grads)
        if self.step_record is not None:  # logged as grad_norm by the step (see StepFunction)
            self.step_record.grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        # A non-finite gradient (a bad batch, a loss-scale overflow) must not reach the state: the
        # step keeps what it had, so no later checkpoint can hold NaN from it.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state = keep(params, self.params), keep(opt_state, self.opt_state)
        if "model_state" in changes:
            changes["model_state"] = keep(changes["model_state"], self.model_state)
        loss_scale = self.loss_scale
        if loss_scale is not None:
            loss_scale = loss_scale.adjust(finite, self.precision)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                            loss_scale=loss_scale,
                            skipped_steps=self.skipped_steps + (~finite).astype(jnp.int32), **changes)


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating value in ``tree`` is finite (a boolean scalar)."""
    finite = jnp.array(True)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            finite = finite & jnp.all(jnp.isfinite(leaf))
    return finite


def _like(new: Any, old: Any) -> Any:
    if jnp.issubdtype(jnp.result_type(new), jnp.floating) and jnp.result_type(new) != jnp.result_type(old):
        return new.astype(jnp.result_type(old))
    return new


def _check_reduced(grads: Any, axes: tuple[str, ...]) -> None:
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        left = varying_axes(g) & set(axes)
        if left:
            raise CollectiveError(
                f"gradient {path_string(path)!r} still differs per device along {sorted(left)}: in "
                "manual mode each device's gradient covers only its slice of the batch",
                suggestion=f"reduce them before the update: grads = tx.collectives.pmean(grads, "
                f"{tuple(sorted(left)) if len(left) > 1 else sorted(left)[0]!r})",
            )


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: Any,
                        abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state, derived from the parameters' layout.

    Each slot that stands for a parameter (Adam's moments, momentum, Adafactor's factored
    statistics) is found structurally by ``optax.tree_map_params`` — exact for chains, wrappers,
    schedules and scan-stacked layers, whatever the state's classes. A slot shaped like its
    parameter gets the parameter's sharding; a factored slot (the parameter's shape with
    dimensions removed) keeps the spec of the dimensions it kept; any other slot, and every
    non-parameter leaf (step counts), is replicated. Optimizers whose ``init`` treats parameters
    leaf by leaf (``optax.masked``, ``optax.multi_transform``) cannot be traced that way: their
    slots are matched by the parameter path they sit under.

    Args:
      optimizer: the optax transformation whose state this is.
      abstract_opt_state: ``jax.eval_shape(optimizer.init, abstract_params)``.
      abstract_params: the parameters (arrays or shapes).
      param_shardings: the parameters' shardings, shaped like ``abstract_params``.
      mesh: the mesh.

    Returns:
      A tree of ``NamedSharding``s shaped like ``abstract_opt_state``.
    """
    replicated = _replicated(mesh)

    def for_slot(slot: Any, param: Any, sharding: NamedSharding) -> NamedSharding:
        return _slot_sharding(tuple(slot.shape), tuple(param.shape), sharding, replicated)

    return map_param_slots(optimizer, for_slot, abstract_opt_state, abstract_params, param_shardings,
                           other=lambda _: replicated)


def _slot_sharding(slot_shape: tuple, param_shape: tuple, sharding: NamedSharding,
                   replicated: NamedSharding) -> NamedSharding:
    if slot_shape == param_shape:
        return sharding
    kept = kept_dims(slot_shape, param_shape)
    if kept is None or not slot_shape:
        return replicated
    spec = tuple(sharding.spec) + (None,) * (len(param_shape) - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(spec[i] for i in kept)))


def create_train_state(
    model: ShardedModel,
    optimizer: optax.GradientTransformation,
    *,
    precision: Precision | None = None,
    rng: int | jax.Array = 0,
    accumulate_steps: int | None = None,
    donate_params: bool = False,
) -> TrainState:
    """A :class:`TrainState` for a sharded model, every array created directly sharded.

    Every sharding comes from the model's layout: parameters and model state as laid out,
    optimizer slots derived from their parameters (:func:`opt_state_shardings`), scalars
    replicated. For an abstract model (``tx.shard(..., abstract=True)``) nothing is allocated: the
    state's arrays are ``jax.ShapeDtypeStruct``s with those shardings, which a step function can
    lower (``train_step.lower(state, batch)``) to read memory and communication at any scale.

    Args:
      model: what :func:`tx.shard` returned.
      optimizer: any optax ``GradientTransformation`` (e.g. ``tx.optim.adamw(3e-4)``).
      precision: the precision policy; float32 throughout by default.
      rng: seed or key for the per-step PRNG.
      accumulate_steps: microbatches per step; default from the plan's ``DP(accumulate_steps=)``.
      donate_params: hand the model's parameter buffers to the state instead of copying them
        (when they are already in the master dtype), so one copy of the parameters exists; the
        sharded model can then no longer run with its own parameters (use
        ``model.apply(state.params, x)``). ``Engine.init`` does this for a model it shards itself.

    Returns:
      The state: parameters cast to the master dtype, optimizer slots with their parameter's
      sharding, scalars replicated.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> sm = tx.shard(lambda rngs: nnx.Linear(8192, 8192, rngs=rngs),    # 256 MiB, not allocated
      ...               tx.Plan(fsdp=tx.FSDP(axis="data")), mesh, abstract=True)
      >>> state = tx.create_train_state(sm, tx.optim.adamw(3e-4))
      >>> adam = state.opt_state[0]                       # moments sharded like their parameter
      >>> adam.mu["kernel"].value.sharding.spec, adam.mu["kernel"].value.shape
      (P('data', None), (8192, 8192))
    """
    precision = precision or Precision()
    optimizer = as_optimizer(optimizer)
    mesh = model.mesh
    if accumulate_steps is None:
        dp = model.plan.data_parallel if model.plan is not None else None
        accumulate_steps = dp.accumulate_steps if dp is not None else 1
    key = jax.random.key(rng) if isinstance(rng, int) else rng

    def build(params: Any, model_state: Any, key: jax.Array) -> dict[str, Any]:
        params = precision.cast_to_params(params)
        return {"step": jnp.zeros((), jnp.int32), "skipped_steps": jnp.zeros((), jnp.int32),
                "params": params, "opt_state": optimizer.init(params), "rng": key,
                "model_state": model_state, "loss_scale": precision.initial_loss_scale()}

    shapes = jax.eval_shape(build, model.params, model.model_state, key)
    shardings = _state_shardings(shapes, model, optimizer, mesh)
    if model.abstract:
        arrays = abstract(shapes, shardings)
    else:
        # One program, each output created in its final layout; model state passes through as is.
        same_dtype = all(jnp.result_type(a) == b.dtype for a, b in
                         zip(jax.tree.leaves(model.params), jax.tree.leaves(shapes["params"])))
        donate = (0,) if donate_params and same_dtype else ()
        arrays = jax.jit(build, out_shardings=shardings, donate_argnums=donate)(
            model.params, model.model_state, key)
    return TrainState(
        **arrays,
        grad_accum=None,
        apply_fn=model.apply_with_state,
        optimizer=optimizer,
        precision=precision,
        mesh=mesh,
        rules=model.rules,
        accumulate_steps=accumulate_steps,
        layer_order=getattr(model, "layer_order", None),
    )


def _state_shardings(shapes: dict[str, Any], model: ShardedModel, optimizer: optax.GradientTransformation,
                     mesh: Mesh) -> dict[str, Any]:
    replicated = _replicated(mesh)
    param_shardings = model.param_shardings
    return {
        "step": replicated,
        "skipped_steps": replicated,
        "params": param_shardings,
        "opt_state": opt_state_shardings(optimizer, shapes["opt_state"], shapes["params"],
                                         param_shardings, mesh),
        "rng": replicated,
        "model_state": model.model_state_shardings,
        "loss_scale": jax.tree.map(lambda _: replicated, shapes["loss_scale"]),
    }
