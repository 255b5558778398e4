"""NNX adapter for ``tx.shard``: annotations from variable metadata (``nnx.with_partitioning``),
sharded construction from a factory, in-place resharding of a built module, and a pure ``apply``
through ``nnx.merge`` (hot paths use ``jax.jit``, never ``nnx.jit``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from titanax.exceptions import ShardingError, TitanaxError
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules
from titanax.parallel.sharded_model import ShardedModel
from titanax.parallel.annotations import tree_leaves
from titanax.parallel.layer_order import layer_order_for
from titanax.parallel.pipeline_stack import find_pipelined_stack, pipeline_model
from titanax.parallel.layout import abstract as abstract_like, layout_tree, path_string, place
from titanax.parallel.tracing import tracing_context

__all__ = ["NNXShardedModel", "shard_nnx"]

def _call_factory(factory: Callable[..., Any], rng: Any) -> Any:
    # An nnx.Module class reads (*args, **kwargs) through its metaclass: its __init__ says what it takes.
    is_class = isinstance(factory, type)
    try:
        params = list(inspect.signature(factory.__init__ if is_class else factory).parameters)
    except (TypeError, ValueError):
        params = []
    if is_class:
        params = params[1:]  # self
    if "rngs" in params:
        module = factory(rngs=nnx.Rngs(rng))
    else:
        module = factory(nnx.Rngs(rng)) if params else factory()
    if not isinstance(module, nnx.Module):
        raise ShardingError(
            f"the model factory returned a {type(module).__name__}, not an nnx.Module",
            suggestion="pass `lambda: MyModel(rngs=nnx.Rngs(0))` or the built module itself",
        )
    return module


class NNXShardedModel(ShardedModel):
    """An NNX module whose state is laid out on a mesh (see :class:`ShardedModel`).

    ``module`` is the live object: calling the sharded model updates its non-parameter state
    (batch statistics, RNG counters) as calling the module would.
    """

    def __init__(self, *, graphdef: Any, state_shardings: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.graphdef = graphdef
        self._state_shardings = state_shardings

    @property
    def params(self) -> nnx.State:
        return nnx.state(self._module, nnx.Param)

    @property
    def param_shardings(self) -> nnx.State:
        return nnx.split_state(self._state_shardings, nnx.Param, ...)[0]

    @property
    def state(self) -> nnx.State:
        """All of the module's state (parameters and the rest)."""
        return nnx.state(self._module)

    @property
    def model_state(self) -> nnx.State:
        return nnx.state(self._module, nnx.Not(nnx.Param))

    @property
    def model_state_shardings(self) -> nnx.State:
        return nnx.split_state(self._state_shardings, nnx.Param, ...)[1]

    def apply_with_state(self, params: nnx.State, model_state: nnx.State, *args: Any,
                         mutable: bool = False, **kwargs: Any) -> Any:
        """Call a copy of the module holding ``params`` and ``model_state`` (a pure function).

        NNX modules update their non-parameter variables in place (``nnx.BatchNorm`` statistics,
        the counters of the ``nnx.Rngs`` streams ``nnx.Dropout`` draws from). A pure call cannot
        keep such changes, so it either returns them (``mutable=True``) or refuses to drop them.

        Args:
          params: the parameters (an ``nnx.State`` of ``nnx.Param``).
          model_state: every other variable, as :attr:`model_state` holds them.
          *args: the module's inputs.
          mutable: return ``(output, new_model_state)``.
          **kwargs: the module's keyword arguments.

        Returns:
          The output, or ``(output, new_model_state)`` with ``mutable=True``.

        Raises:
          TitanaxError: the call changed a variable of ``model_state`` and ``mutable`` is false.
        """
        if not isinstance(mutable, bool):
            raise TitanaxError(
                f"mutable={mutable!r}: an NNX model returns all of its changed state or none",
                suggestion="pass mutable=True (NNX has no collections; lists such as "
                "['batch_stats'] are Linen's)",
            )
        changed: list[str] = []

        params = self._for_compute(params)

        def call() -> tuple[Any, nnx.State]:
            module = nnx.merge(self.graphdef, params, model_state, copy=True)
            out = module(*args, **kwargs)
            new_state = nnx.state(module, nnx.Not(nnx.Param))
            # Static bookkeeping while tracing: a variable the call reassigned is a new object.
            changed.extend(_changed_paths(model_state, new_state))
            return out, new_state

        out, new_state = self._call(call)
        if mutable:
            return out, new_state
        if changed:
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise TitanaxError(
                f"the NNX model changed its non-parameter state during a pure call ({shown}): the "
                "change would be lost, so every step would draw the same dropout mask from a "
                "reset RNG counter and batch statistics would never move",
                suggestion="ask for the new state and keep it: `out, model_state = state.apply(params, "
                "x, mutable=True)` in the loss (return model_state as aux), then "
                "`state.apply_gradients(grads=grads, model_state=model_state)`; to evaluate, pass the "
                "model's inference flags in the call (use_running_average=True, deterministic=True, "
                "or your model's train=False)",
            )
        return out

    def _state(self) -> Any:
        return nnx.state(self._module)

    def _run(self, state: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        def call() -> tuple[Any, Any]:
            module = nnx.merge(self.graphdef, state)
            return module(*args, **kwargs), nnx.state(module, nnx.Not(nnx.Param))

        out, rest = self._call(call)
        rest_shardings = nnx.split_state(self._state_shardings, nnx.Param, ...)[1]
        return out, jax.lax.with_sharding_constraint(rest, rest_shardings)

    def _store(self, new_state: Any) -> None:
        nnx.update(self._module, new_state)


def _changed_paths(before: nnx.State, after: nnx.State) -> list[str]:
    old = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    return [path_string(path) for path, leaf in jax.tree_util.tree_flatten_with_path(after)[0]
            if old.get(path) is not leaf]


def shard_nnx(model: Any, plan: Plan | None, rules: Rules, mesh: Mesh, *, rng: Any,
              params: Any, abstract: bool = False) -> NNXShardedModel:
    built = isinstance(model, nnx.Module)
    with tracing_context(rules, mesh):
        shapes = model if built else nnx.eval_shape(lambda: _call_factory(model, rng))
    if plan is not None and plan.pipeline_parallel is not None:
        # The visible transform: the model's LayerStack becomes a PipelinedStack (same variables).
        shapes = pipeline_model(shapes, plan.pipeline_parallel, mesh)
    graphdef, state = nnx.split(shapes)
    if built and not abstract and any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
        raise ShardingError(
            "tx.shard got an abstract NNX module (from nnx.eval_shape): it has no values to place",
            suggestion="pass the function that builds the module instead, e.g. "
            "tx.shard(lambda: MyModel(rngs=nnx.Rngs(0)), plan, mesh)",
        )
    leaves = tree_leaves(state)
    layout = layout_tree(leaves, rules, mesh)
    treedef = jax.tree.structure(state)
    if treedef.num_leaves != len(layout):
        raise ShardingError(
            f"the module's state has {treedef.num_leaves} arrays but {len(layout)} variables",
            suggestion="NNX variables must each hold one array",
        )
    state_shardings = jax.tree.unflatten(treedef, layout.shardings)
    # Under PP(repeats > 1) the stack is stored in pipeline order, so that each device's block of
    # layers is the chunks it runs and no step moves the stack between devices. Shapes do not
    # change: the abstract route has nothing to permute.
    layer_order = None if plan is None or plan.pipeline_parallel is None else \
        layer_order_for(plan, layout, find_pipelined_stack(shapes).param_prefix)
    if abstract:
        # Shapes only (params= would give the same ones); a built module given here is left as it is.
        module = nnx.merge(graphdef, abstract_like(state, state_shardings))
    elif built:
        module = shapes  # the model itself, with its stack pipelined under PP
        if params is not None:
            nnx.update(module, params)
        placed = place(nnx.state(module), state_shardings)
        if layer_order is not None:
            placed = layer_order.to_pipeline(placed)[0]
        nnx.update(module, placed)
    else:
        def create() -> Any:
            built_module = _call_factory(model, rng)
            if params is not None:
                nnx.update(built_module, params)
            created_state = nnx.state(built_module)
            # Created (and params= given) in natural order; stored in pipeline order.
            return created_state if layer_order is None else layer_order.to_pipeline(created_state)[0]

        with tracing_context(rules, mesh):
            created = jax.jit(create, out_shardings=state_shardings)()
        module = nnx.merge(graphdef, created)
    return NNXShardedModel(graphdef=graphdef, state_shardings=state_shardings, module=module,
                           mesh=mesh, plan=plan, rules=rules, layout=layout, abstract=abstract,
                           layer_order=layer_order)
