"""What XLA built, read from the compiled programs: per-device parameter bytes under FSDP, the
collectives of a data-parallel step and of a Megatron tensor-parallel MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from layouts import layout

import models as m
import titanax as tx


def _nbytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    ("name", "make", "batch"),
    [
        ("linen_transformer", m.LinenTransformer, m.token_batch),
        ("nnx_transformer", lambda: (lambda rngs: m.NNXTransformer(rngs)), m.token_batch),
        ("nnx_mlp_plain", lambda: (lambda rngs: m.NNXMLP(rngs, annotate=False)), m.float_batch),
    ],
)
def test_fsdp8_parameter_bytes_per_device_are_an_eighth(name, make, batch):
    mesh, plan = layout("fsdp8")
    x = batch()
    sm = tx.shard(make(), plan, mesh, example=x if name.startswith("linen") else None)
    stats = tx.profiling.inspect(sm.lower(x).compile())
    total = _nbytes(sm.params)
    params_per_device = stats.argument_bytes - x.nbytes // 8
    assert abs(params_per_device - total / 8) <= 0.01 * total / 8, (params_per_device, total)
    assert sm.layout.bytes_per_device() == total // 8
    assert sm.layout.replicated_bytes() == 0


def test_dp8_train_step_all_reduces_exactly_the_gradients():
    mesh, plan = layout("dp8")
    x = m.float_batch()
    sm = tx.shard(m.LinenMLP(), plan, mesh, example=x)

    def train_step(params, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(sm.apply(p, x) ** 2))(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    step = jax.jit(train_step, in_shardings=(sm.param_shardings, sm.batch_sharding(x)),
                   out_shardings=(sm.param_shardings, NamedSharding(mesh, P())), donate_argnums=0)
    stats = tx.profiling.inspect(step.lower(sm.params, sm.shard_batch(x)).compile())
    grad_bytes = _nbytes(sm.params)
    assert stats.count("all-gather") == 0
    assert stats.count("reduce-scatter") == 0
    assert stats.count("all-reduce") >= 1
    assert abs(stats.bytes("all-reduce") - grad_bytes) <= 0.01 * grad_bytes, stats.describe()


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize("tensor", [2, 4])
def test_megatron_mlp_forward_has_one_all_reduce_of_the_activation(framework, tensor):
    mesh = tx.MeshSpec(axes=("tensor",), devices=jax.devices()[:tensor]).build()
    plan = tx.Plan(tensor_parallel=tx.TP(axis="tensor"), strict=True)
    x = m.float_batch()
    if framework == "linen":
        sm = tx.shard(m.LinenMLP(), plan, mesh, example=x)
        first, second = sm.layout["Dense_0/kernel"], sm.layout["Dense_1/kernel"]
    else:
        sm = tx.shard(lambda rngs: m.NNXMLP(rngs), plan, mesh)
        first, second = sm.layout["up/kernel"], sm.layout["down/kernel"]
    assert first.spec == P(None, "tensor")   # column-parallel
    assert second.spec == P("tensor", None)  # row-parallel
    stats = tx.profiling.inspect(sm.lower(x).compile())
    assert stats.count("all-reduce") == 1, stats.describe()
    assert stats.bytes("all-reduce") == x.size * x.dtype.itemsize  # the [batch, embed] output
    assert stats.total_collective_count == 1, stats.describe()
    np.testing.assert_allclose(sm(x), sm.module.apply({"params": jax.tree.map(np.asarray, sm.params)}, x)
                               if framework == "linen" else sm.apply(sm.params, x), rtol=1e-5, atol=1e-5)
