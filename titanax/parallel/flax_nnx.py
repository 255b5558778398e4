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

from titanax.exceptions import ShardingError
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules
from titanax.parallel.shard import ShardedModel, tracing_context
from titanax.parallel.annotations import tree_leaves
from titanax.parallel.sharding import layout_tree, place

__all__ = ["NNXShardedModel", "shard_nnx"]

def _call_factory(factory: Callable[..., Any], rng: Any) -> Any:
    try:
        n_params = len(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        n_params = 0
    module = factory(nnx.Rngs(rng)) if n_params else factory()
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

    def apply_with_state(self, params: nnx.State, model_state: nnx.State, *args: Any,
                         **kwargs: Any) -> Any:
        """Call a copy of the module holding ``params`` and ``model_state``.

        Changes the call makes to non-parameter state are dropped: this is a pure function.
        """
        with self.tracing():
            return nnx.merge(self.graphdef, params, model_state, copy=True)(*args, **kwargs)

    def _state(self) -> Any:
        return nnx.state(self._module)

    def _run(self, state: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        module = nnx.merge(self.graphdef, state)
        out = module(*args, **kwargs)
        rest = nnx.state(module, nnx.Not(nnx.Param))
        rest_shardings = nnx.split_state(self._state_shardings, nnx.Param, ...)[1]
        return out, jax.lax.with_sharding_constraint(rest, rest_shardings)

    def _store(self, new_state: Any) -> None:
        nnx.update(self._module, new_state)


def shard_nnx(model: Any, plan: Plan | None, rules: Rules, mesh: Mesh, *, rng: Any,
              params: Any) -> NNXShardedModel:
    built = isinstance(model, nnx.Module)
    with tracing_context(rules, mesh):
        abstract = model if built else nnx.eval_shape(lambda: _call_factory(model, rng))
    if plan is not None and plan.pipeline_parallel is not None:
        from titanax.parallel.pipeline import check_pipelined_model

        check_pipelined_model(abstract, plan.pipeline_parallel)
    graphdef, state = nnx.split(abstract)
    if built and any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state)):
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
    if built:
        module = model
        if params is not None:
            nnx.update(module, params)
        nnx.update(module, place(nnx.state(module), state_shardings))
    else:
        def create() -> Any:
            built_module = _call_factory(model, rng)
            if params is not None:
                nnx.update(built_module, params)
            return nnx.state(built_module)

        with tracing_context(rules, mesh):
            created = jax.jit(create, out_shardings=state_shardings)()
        module = nnx.merge(graphdef, created)
    return NNXShardedModel(graphdef=graphdef, state_shardings=state_shardings, module=module,
                           mesh=mesh, plan=plan, rules=rules, layout=layout)
