"""tx.nn.LayerStack: one scanned module equal to a loop over its layers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import titanax as tx
from titanax.nn.remat import REMAT_POLICIES, remat
from examples.gpt_small_tp.model import GPTConfig, gpt


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
    layout = {leaf.path: leaf for leaf in tx.tree_layout(nnx.state(stack, nnx.Param), tx.presets.fsdp("data"), mesh)}
    kernel = layout["layer/dense/kernel"]
    assert kernel.names == ("layers", "embed", "mlp")
    assert kernel.spec == jax.sharding.PartitionSpec(None, "data", None)  # the layers axis stays whole


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_stack_rejects_a_bad_layer_count(bad):
    with pytest.raises(tx.TitanaxError, match="num_layers"):
        tx.nn.LayerStack(Residual, bad, rngs=nnx.Rngs(0))


class Mixer(nnx.Module):
    """A residual block with both kinds of matmul: a projection (no dot_general batch dimension)
    and a batched one (a batch dimension, as attention's), so every remat policy differs."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x_BTD):
        h_BTD = jnp.tanh(self.dense(x_BTD))
        scores_BTT = jnp.einsum("btd,bsd->bts", h_BTD, x_BTD)  # batched over b
        return x_BTD + jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores_BTT), h_BTD)


@functools.cache
def stack_grads(remat: str):
    stack = tx.nn.LayerStack(Mixer, 3, rngs=nnx.Rngs(0), remat=remat)
    graphdef, params = nnx.split(stack)
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x), jax.make_jaxpr(loss)(params, x)


CPU_POLICIES = [p for p in REMAT_POLICIES if p != "offload"]


@pytest.mark.parametrize("remat", CPU_POLICIES)
def test_remat_policies_keep_the_gradients(remat):
    want, _ = stack_grads("none")
    got, jaxpr = stack_grads(remat)
    # Each layer (the scan body) runs under jax.checkpoint, unless the policy is "none".
    assert ("remat" in str(jaxpr)) == (remat != "none")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_stack_rejects_an_unknown_remat_policy():
    with pytest.raises(tx.PlanError, match="LayerStack") as err:
        tx.nn.LayerStack(Residual, 2, rngs=nnx.Rngs(0), remat="everything")
    assert "'everything' is not a remat policy" in str(err.value)
    for name in REMAT_POLICIES:  # the error lists every valid name
        assert name in err.value.suggestion
    with pytest.raises(tx.TitanaxError, match="not a remat policy"):
        remat(jnp.sin, "dots")


def test_offload_is_refused_where_the_backend_cannot_offload():
    # On CPU JAX lowers the copy to host memory to nothing: refused by name, before lowering.
    stack = tx.nn.LayerStack(Residual, 2, rngs=nnx.Rngs(0), remat="offload")
    with pytest.raises(tx.TitanaxError, match="'cpu' backend") as err:
        jax.eval_shape(stack, jnp.zeros((4, 8)))
    assert "save_dots_no_batch" in err.value.suggestion


def test_offload_puts_projection_outputs_in_host_memory():
    # Traced for a GPU (nothing compiled), the policy sends the saved matmul outputs to the host.
    dense = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    f = lambda x: jnp.sum(jnp.tanh(dense(x)) ** 2)
    text = str(jax.make_jaxpr(jax.grad(remat(f, "offload", backend="gpu")))(jnp.ones((4, 8))))
    assert "device_put" in text and "<host>" in text
    assert "<host>" not in str(jax.make_jaxpr(jax.grad(remat(f, "save_dots_no_batch")))(jnp.ones((4, 8))))


def test_run_config_factory_takes_remat():
    # What `model: {args: {remat: full}}` in a run configuration calls.
    assert nnx.eval_shape(lambda: gpt(preset="tiny", remat="full", rngs=nnx.Rngs(0))).blocks.remat == "full"
    with pytest.raises(tx.TitanaxError, match="GPTConfig") as err:
        GPTConfig(remat="everything")
    assert "none, full, save_dots, save_dots_no_batch, offload" in err.value.suggestion
