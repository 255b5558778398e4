"""``tx.shard``: put a Flax model (Linen or NNX) on a mesh by a plan or rules.

The returned :class:`~titanax.parallel.sharded_model.ShardedModel` holds the sharded parameters,
a jitted forward whose inputs are split on ``batch``, a pure ``apply`` for your own jitted loss
and gradient, and the per-parameter layout table. ``tree_layout`` and ``tree_shardings`` do the
same for any pytree. Framework specifics live in ``flax_linen.py`` and ``flax_nnx.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import Mesh

from titanax.exceptions import ShardingError
from titanax.parallel.annotations import tree_leaves, unboxed_structure
from titanax.parallel.flax_linen import shard_linen
from titanax.parallel.flax_nnx import shard_nnx
from titanax.parallel.layout import Layout, layout_tree
from titanax.parallel.resolve import PlanOrRules, resolve_mesh, resolve_rules
from titanax.parallel.sharded_model import ShardedModel

__all__ = ["shard", "tree_layout", "tree_shardings"]


def tree_layout(tree: Any, plan_or_rules: PlanOrRules, mesh: Mesh | None = None) -> Layout:
    """The layout of any pytree of arrays (or their abstract shapes) under a plan or rules.

    Leaves may be plain arrays or ``jax.ShapeDtypeStruct`` (named by path rules, or the FSDP
    fallback), Linen boxes (``nn.with_logical_partitioning``) or NNX variables (their metadata).

    Args:
      tree: the pytree, e.g. ``jax.eval_shape(model.init, key, x)`` or an ``nnx.State``.
      plan_or_rules: a :class:`~titanax.Plan` or :class:`~titanax.Rules`.
      mesh: the mesh; ``None`` takes the one set by ``jax.set_mesh``.

    Returns:
      The :class:`~titanax.parallel.layout.Layout`, one entry per leaf in tree order.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()
      >>> shapes = {"w": jax.ShapeDtypeStruct((64, 256), jnp.float32)}
      >>> rules = tx.Rules(params=[("w$", ("embed", "mlp"))]) + tx.presets.tensor_parallel()
      >>> tx.tree_layout(shapes, rules, mesh).specs()
      {'w': "P(None, 'tensor')"}
    """
    mesh = resolve_mesh(mesh)
    _, rules = resolve_rules(plan_or_rules, mesh)
    return layout_tree(tree_leaves(tree), rules, mesh)


def tree_shardings(tree: Any, plan_or_rules: PlanOrRules, mesh: Mesh | None = None) -> Any:
    """``NamedSharding``s for every leaf of ``tree``, shaped like it (Linen boxes removed).

    Use them as ``jax.jit`` ``in_shardings``/``out_shardings`` or with ``jax.device_put``; see
    :func:`tree_layout` for the leaves accepted.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> model, x = nn.Dense(16), jnp.ones((8, 4))
      >>> abstract = jax.eval_shape(model.init, jax.random.key(0), x)
      >>> shardings = tx.tree_shardings(abstract, tx.presets.fsdp("data"), mesh)
      >>> variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), x)
      >>> variables["params"]["kernel"].sharding.spec     # created sharded, never whole
      P(None, 'data')
    """
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
      example: Linen, to initialize: the first positional input, or a tuple of them. An NNX model
        needs none (one given is not used).
      rng: Linen: seed, PRNG key, or a dict of keys for ``init``; NNX factories taking an
        ``nnx.Rngs`` get ``nnx.Rngs(rng)``.
      params: existing parameters to place instead of initializing (Linen: the ``params``
        collection or the full variables dict; NNX: a state to load into the module).
      example_kwargs: Linen: keyword arguments for ``init`` (``train=False``, masks); not used for NNX.
      abstract: allocate nothing (see above); ``tx.create_train_state`` / ``Engine.init`` of an
        abstract model give an abstract state, which a step function can lower.

    Returns:
      A :class:`ShardedModel`.

    Raises:
      PlanError: the plan does not fit the mesh.
      ShardingError: a parameter cannot be laid out (see the message for which and why).

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> x = jnp.ones((8, 4))
      >>> sm = tx.shard(nn.Dense(16), tx.Plan(data_parallel=tx.DP()), mesh, example=x)
      >>> sm(x).shape
      (8, 16)
      >>> big = tx.shard(lambda rngs: nnx.Linear(16384, 16384, rngs=rngs),   # 1 GiB, not allocated
      ...                tx.Plan(fsdp=tx.FSDP(axis="data")), mesh, abstract=True)
      >>> big.layout.bytes_per_device()                    # 1/8 of the kernel and bias per device
      134225920
    """
    if not isinstance(abstract, bool):
        raise ShardingError(f"abstract={abstract!r} must be True or False",
                            suggestion="pass abstract=True to allocate nothing")
    mesh = resolve_mesh(mesh)
    plan, rules = resolve_rules(plan_or_rules, mesh)
    if isinstance(model, nn.Module):
        return shard_linen(model, plan, rules, mesh, example=example, rng=rng, params=params,
                           example_kwargs=dict(example_kwargs or {}), abstract=abstract)
    if isinstance(model, nnx.Module) or callable(model):
        # An NNX module is built by its constructor, not from an input: an example (passed so that
        # one call serves Linen and NNX models alike) is not needed.
        return shard_nnx(model, plan, rules, mesh, rng=rng, params=params, abstract=abstract)
    raise ShardingError(
        f"tx.shard got a {type(model).__name__}, not a Flax model",
        suggestion="pass a flax.linen.Module, a flax.nnx.Module, or a function that builds an NNX module",
    )
