"""tx.nn.LayerStack: one scanned module equal to a loop over its layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import titanax as tx


class Residual(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"), eager_sharding=False)
        self.dense = nnx.Linear(8, 8, rngs=rngs, kernel_init=init)

    def __call__(self, x):
        return x + jnp.tanh(self.dense(x))


@pytest.mark.parametrize("unroll", [1, True])
def test_stack_equals_a_loop_over_its_layers(unroll):
    stack = tx.nn.LayerStack(Residual, 3, rngs=nnx.Rngs(0), unroll=unroll)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    kernels = stack.layer.dense.kernel[...]
    biases = stack.layer.dense.bias[...]
    assert kernels.shape == (3, 8, 8)
    assert not np.allclose(kernels[0], kernels[1])  # each layer initialized on its own
    want = x
    for kernel, bias in zip(kernels, biases):
        want = want + jnp.tanh(want @ kernel + bias)
    np.testing.assert_allclose(stack(x), want, rtol=1e-6, atol=1e-6)


def test_stack_prefixes_layers_to_every_name():
    stack = tx.nn.LayerStack(Residual, 2, rngs=nnx.Rngs(0))
    mesh = tx.MeshSpec(axes=("data",)).build()
    layout = {leaf.path: leaf for leaf in tx.tree_layout(nnx.state(stack, nnx.Param), tx.rules.fsdp("data"), mesh)}
    kernel = layout["layer/dense/kernel"]
    assert kernel.names == ("layers", "embed", "mlp")
    assert kernel.spec == jax.sharding.PartitionSpec(None, "data", None)  # the layers axis stays whole


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_stack_rejects_a_bad_layer_count(bad):
    with pytest.raises(tx.TitanaxError, match="num_layers"):
        tx.nn.LayerStack(Residual, bad, rngs=nnx.Rngs(0))
