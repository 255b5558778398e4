"""tx.tree_shardings / tx.tree_layout on any pytree: Linen boxes, NNX state, plain shapes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from layouts import layout

import models as m
import titanax as tx


def test_linen_abstract_variables_to_init_shardings():
    mesh, plan = layout("fsdp4_tp2")
    x = m.float_batch()
    module = m.LinenMLP()
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)
    shardings = tx.tree_shardings(abstract, plan, mesh)
    assert shardings["params"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
    variables = jax.jit(lambda k: nn.unbox(module.init(k, x)), out_shardings=shardings)(jax.random.key(0))
    assert variables["params"]["Dense_1"]["kernel"].sharding.spec == P("tensor", "fsdp")
    # Same layout as tx.shard decides for the same model.
    sm = tx.shard(module, plan, mesh, example=x)
    assert tx.tree_layout(abstract, plan, mesh).specs() == {
        f"params/{k}": v for k, v in sm.layout.specs().items()}


def test_nnx_state_and_plain_shapes():
    mesh, plan = layout("dp4_tp2")
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: m.NNXMLP(nnx.Rngs(0)))
    state = nnx.state(abstract)
    shardings = tx.tree_shardings(state, plan, mesh)
    assert shardings["up"]["kernel"].get_value().spec == P(None, "tensor")

    shapes = {"w_in": jax.ShapeDtypeStruct((32, 64), jnp.float32), "scale": jnp.ones((32,))}
    rules = tx.Rules(params=[(r"w_in$", ("embed", "mlp"))]) + plan.resolved_rules()
    laid = tx.tree_layout(shapes, rules, mesh)
    assert laid.specs() == {"scale": "P(None)", "w_in": "P(None, 'tensor')"}
    placed = jax.device_put(shapes["scale"], tx.tree_shardings(shapes, rules, mesh)["scale"])
    np.testing.assert_array_equal(placed, np.ones(32))
