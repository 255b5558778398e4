"""Linen adapter for ``tx.shard``: annotations from ``nn.LogicallyPartitioned`` / ``nn.Partitioned``
boxes, sharded ``init``, and ``apply`` over the unboxed variables."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from titanax.exceptions import PlanError, ShardingError
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules
from titanax.parallel.sharded_model import ShardedModel
from titanax.parallel.annotations import tree_leaves, unboxed_structure
from titanax.parallel.layout import Leaf, abstract as abstract_like, layout_tree, path_string, place
from titanax.parallel.tracing import tracing_context

__all__ = ["LinenShardedModel", "shard_linen"]


def _split_path(path: tuple) -> tuple[str, str]:
    """``(collection, path)``; the ``params`` collection is left out of the path, others kept."""
    collection = str(path[0].key) if path and isinstance(path[0], jax.tree_util.DictKey) else "params"
    rest = path_string(path[1:])
    return collection, rest if collection == "params" else f"{collection}/{rest}"


def _leaves(boxed: Any) -> tuple[list[Leaf], Any]:
    """Leaves (with their annotations) of a possibly boxed variables tree, and the unboxed treedef."""
    return tree_leaves(boxed, _split_path), unboxed_structure(boxed)


def _as_variables(params: Any) -> dict[str, Any]:
    """Accept the ``params`` collection alone or the full variables dict."""
    if isinstance(params, Mapping) and "params" in params and all(
        isinstance(v, Mapping) for v in params.values()
    ):
        return dict(params)
    return {"params": params}


def _key(rng: Any) -> Any:
    if isinstance(rng, int):
        return jax.random.key(rng)
    return rng


class LinenShardedModel(ShardedModel):
    """A Linen module with its variables laid out on a mesh (see :class:`ShardedModel`)."""

    def __init__(self, *, variables: dict[str, Any], shardings: dict[str, Any], **kwargs: Any):
        super().__init__(**kwargs)
        self.variables = variables
        """All collections (``params``, ``batch_stats``, ...), unboxed and sharded."""
        self._shardings = shardings

    @property
    def params(self) -> Any:
        return self.variables["params"]

    @property
    def param_shardings(self) -> Any:
        return self._shardings["params"]

    @property
    def variable_shardings(self) -> dict[str, Any]:
        """Shardings of every collection, shaped like :attr:`variables`."""
        return self._shardings

    @property
    def model_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.variables.items() if k != "params"}

    @property
    def model_state_shardings(self) -> dict[str, Any]:
        return {k: v for k, v in self._shardings.items() if k != "params"}

    def apply_with_state(self, params: Any, model_state: Any, *args: Any, mutable: Any = False,
                         **kwargs: Any) -> Any:
        """``module.apply`` over ``{**model_state, "params": params}``.

        With ``mutable`` (``True``, a collection name or a list of them, as Linen takes it) the
        result is ``(output, new_model_state)``: ``model_state`` with the collections the call
        changed replaced, so it can go straight back into the train state.
        """
        variables = {**model_state, "params": self._for_compute(params)}
        if mutable is False:
            return self._call(lambda: self._module.apply(variables, *args, **kwargs))
        out, updates = self._call(lambda: self._module.apply(variables, *args, mutable=mutable, **kwargs))
        return out, {**model_state, **{k: v for k, v in updates.items() if k != "params"}}

    def _state(self) -> Any:
        return self.variables

    def _run(self, state: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        return self._call(lambda: self._module.apply(state, *args, **kwargs)), None


def shard_linen(
    module: nn.Module,
    plan: Plan | None,
    rules: Rules,
    mesh: Mesh,
    *,
    example: Any,
    rng: Any,
    params: Any,
    example_kwargs: dict[str, Any],
    abstract: bool = False,
) -> LinenShardedModel:
    if plan is not None and plan.pipeline_parallel is not None:
        raise PlanError(
            "pipeline parallelism runs the model's tx.nn.LayerStack as stages; this Linen model has none",
            suggestion="write the repeated block as an NNX module stacked with tx.nn.LayerStack, or drop "
            "pipeline_parallel from the plan",
        )
    if example is None and params is None:
        raise ShardingError(
            f"cannot lay out {type(module).__name__}: a Linen module has no parameters until it "
            "sees an input",
            suggestion="pass example=<one input batch> (or a tuple of inputs), or params=<existing params>",
        )
    example_args = example if isinstance(example, tuple) else (example,)
    init = functools.partial(module.init, **example_kwargs)
    with tracing_context(rules, mesh):
        declared = jax.eval_shape(init, _key(rng), *example_args) if example is not None else None
    given = _as_variables(params) if params is not None else None
    if given is not None:
        leaves, treedef = _leaves(given)
        if declared is not None:
            leaves = _annotate_from(leaves, treedef, declared)
    else:
        leaves, treedef = _leaves(declared)
    layout = layout_tree(leaves, rules, mesh)
    shardings = jax.tree.unflatten(treedef, layout.shardings)
    if abstract:
        variables = abstract_like(nn.unbox(given if given is not None else declared), shardings)
    elif given is not None:
        variables = place(nn.unbox(given), shardings)
    else:
        with tracing_context(rules, mesh):
            variables = jax.jit(lambda key, *a: nn.unbox(init(key, *a)), out_shardings=shardings)(
                _key(rng), *example_args)
    return LinenShardedModel(variables=variables, shardings=shardings, module=module, mesh=mesh,
                             plan=plan, rules=rules, layout=layout, abstract=abstract)


def _annotate_from(leaves: list[Leaf], treedef: Any, abstract: Any) -> list[Leaf]:
    """Give unboxed user parameters the annotations the module declares for them."""
    declared, declared_def = _leaves(abstract)
    by_path = {(leaf.collection, leaf.path): leaf for leaf in declared}
    result = []
    for leaf in leaves:
        match = by_path.get((leaf.collection, leaf.path))
        if match is None or match.shape != leaf.shape:
            expected = "missing" if match is None else f"shape {match.shape}"
            raise ShardingError(
                f"params= does not fit the module: {leaf.collection} {leaf.path!r} has shape "
                f"{leaf.shape}, the module's init gives {expected}",
                suggestion="pass the parameters this module (with this example input) creates, "
                "e.g. module.init(key, example)['params']",
            )
        result.append(leaf if leaf.names is not None else match)
    return result
