"""The NNX model of docs/quickstart.md, annotated as the quickstart shows: built on one device
like any Flax model, then trained by ``tx.Engine`` under DP x TP, with the same parameters as its
one-device run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import titanax as tx


def names(*axes):  # as in docs/quickstart.md
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), axes, eager_sharding=False)


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(64, 256, rngs=rngs, kernel_init=names("embed", "mlp"))
        self.down = nnx.Linear(256, 64, rngs=rngs, kernel_init=names("mlp", "embed"))

    def __call__(self, x_BD):
        return self.down(jax.nn.relu(self.up(x_BD)))


train_step = tx.step_fn(models.regression_step.fn)  # its own compile cache


PLAN = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
STEPS = 10


def _data() -> tx.data.ArrayLoader:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 64)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(64, 64)).astype(np.float32) / 8)
    return tx.data.ArrayLoader({"x": x, "y": y}, batch_size=16, seed=0)


def _train(shape: tuple[int, int]) -> tuple[dict, tx.TrainState]:
    devices = jax.devices()[: shape[0] * shape[1]]
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=shape, devices=devices).build()
    model = NNXMLP(nnx.Rngs(0))  # built on one device, before Titanax sees it
    assert isinstance(model.up.kernel[...], jax.Array) and len(model.up.kernel[...].devices()) == 1
    engine = tx.Engine(mesh=mesh, plan=PLAN, optimizer=tx.optim.adamw(1e-2), log_every=STEPS)
    state = engine.init(model, example=jnp.zeros((16, 64)))  # example= is accepted (and not needed)
    state = engine.fit(train_step, data=_data(), steps=STEPS)
    return jax.tree.map(np.asarray, jax.device_get(state.params)), state


@pytest.fixture(scope="module")
def one_device():
    return _train((1, 1))


def test_the_quickstart_nnx_model_trains_under_dp_tp_as_on_one_device(one_device):
    reference, _ = one_device
    params, state = _train((4, 2))
    assert state.params["up"]["kernel"].sharding.spec == P(None, "tensor")
    assert state.params["down"]["kernel"].sharding.spec == P("tensor", None)
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, reference))
    assert max(differences) < 1e-5
    first = jax.tree.map(np.asarray, jax.device_get(NNXMLP(nnx.Rngs(0)).up.kernel[...]))
    assert np.max(np.abs(params["up"]["kernel"] - first)) > 1e-3  # it trained
