"""Model state the forward pass updates — batch statistics, NNX RNG counters — trained through
``tx.Engine`` under DP 8 and DP 4 x TP 2, against plain single-device Flax + optax loops.

Silent wrong training is what these guard against: a dropped update makes every step draw the
same dropout mask and leaves BatchNorm's running statistics where they started."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import titanax as tx

TOL = 1e-5
STEPS = 20
LR = 0.05
IN, HIDDEN = 8, 32

LAYOUTS = {
    "dp8": (tx.MeshSpec(axes=("data",)), tx.Plan(data_parallel=tx.DP(axis="data"), strict=True)),
    "dp4_tp2": (tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)),
                tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"), strict=True)),
}


def _p(init, *names):
    return nnx.with_partitioning(init, names)


class BatchNormDropoutNet(nnx.Module):
    """x_BI -> Linear -> BatchNorm -> ReLU -> Dropout -> Linear -> y_B1, the hidden width named
    ``mlp`` (split under TP)."""

    def __init__(self, rngs: nnx.Rngs, *, rate: float):
        lecun, zeros, ones = (nnx.initializers.lecun_normal(), nnx.initializers.zeros_init(),
                              nnx.initializers.ones_init())
        self.up = nnx.Linear(IN, HIDDEN, rngs=rngs, kernel_init=_p(lecun, "embed", "mlp"),
                             bias_init=_p(zeros, "mlp"))
        self.bn = nnx.BatchNorm(HIDDEN, momentum=0.9, rngs=rngs, scale_init=_p(ones, "mlp"),
                                bias_init=_p(zeros, "mlp"))
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, 1, rngs=rngs, kernel_init=_p(lecun, "mlp", "embed"),
                               bias_init=_p(zeros, "embed"))

    def __call__(self, x_BI, *, train: bool = True):
        h_BH = self.bn(self.up(x_BI), use_running_average=not train)
        return self.down(self.drop(jax.nn.relu(h_BH), deterministic=not train))


def batches(n: int = STEPS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(16, IN)).astype(np.float32),
             "y": rng.normal(size=(16, 1)).astype(np.float32)} for _ in range(n)]


def loss_fn(params, state, batch):
    y, model_state = state.apply(params, batch["x"], train=True, mutable=True)
    return jnp.mean((y - batch["y"]) ** 2), model_state


@tx.step_fn
def train_step(state, batch):
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
    return state.apply_gradients(grads=grads, model_state=model_state), {"loss": loss}


def run_titanax(layout: str, rate: float, data, optimizer=None):
    spec, plan = LAYOUTS[layout]
    engine = tx.Engine(mesh=spec.build(), plan=plan, optimizer=optimizer or optax.sgd(LR), log_every=1)
    engine.init(lambda rngs: BatchNormDropoutNet(rngs, rate=rate), rng=0)
    losses = []
    state = engine.fit(train_step, iter(data), steps=len(data),
                       hooks=[lambda i, s, metrics: losses.append(metrics["loss"])])
    return np.array(losses), state


def run_reference(rate: float, data):
    """The same model and data in a plain single-device NNX + optax loop."""
    with nnx.use_eager_sharding(False):
        model = BatchNormDropoutNet(nnx.Rngs(0), rate=rate)
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, jnp.asarray(b["x"]), jnp.asarray(b["y"]))) for b in data]
    return np.array(losses), model


@pytest.fixture(scope="module", params=[0.0, 0.5], ids=["rate0", "rate0.5"])
def reference(request):
    rate = request.param
    return rate, run_reference(rate, batches())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_batch_statistics_rng_counters_and_losses_match_one_device(reference, layout):
    rate, (ref_losses, ref_model) = reference
    losses, state = run_titanax(layout, rate, batches())
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=TOL)
    bn = state.model_state["bn"]
    for stat in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(bn[stat][...]), np.asarray(getattr(ref_model.bn, stat)[...]),
                                   rtol=TOL, atol=TOL)
    assert not np.allclose(np.asarray(bn["mean"][...]), 0.0)  # the statistics moved
    # One draw per step, carried from step to step (rate 0 draws nothing).
    assert int(state.model_state["drop"]["rngs"]["count"][...]) == (STEPS if rate else 0)
    # Laid out by the plan and kept in the state: replicated statistics, the step's shardings.
    assert bn["mean"][...].sharding.spec == jax.sharding.PartitionSpec(None)


def test_dropout_masks_differ_from_step_to_step():
    # Same batch every step and a learning rate of 0: the loss can only change through the mask.
    data = batches(1) * 4
    losses, _ = run_titanax("dp8", 0.5, data, optimizer=optax.sgd(0.0))
    assert len(set(np.round(losses, 6).tolist())) == len(losses), losses


@tx.step_fn
def step_without_mutable(state, batch):
    def loss(params):
        return jnp.mean((state.apply(params, batch["x"], train=True) - batch["y"]) ** 2)

    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), {"loss": value}


@tx.step_fn
def step_dropping_the_new_state(state, batch):
    (value, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state, batch)
    return state.apply_gradients(grads=grads), {"loss": value}


@pytest.fixture(scope="module")
def dp8_state():
    spec, plan = LAYOUTS["dp8"]
    engine = tx.Engine(mesh=spec.build(), plan=plan, optimizer=optax.sgd(LR))
    return engine.init(lambda rngs: BatchNormDropoutNet(rngs, rate=0.5), rng=0)


def test_a_pure_call_that_changes_nnx_state_is_refused(dp8_state):
    with pytest.raises(tx.TitanaxError, match=r"changed its non-parameter state.*bn/mean.*drop/rngs/count"):
        step_without_mutable(dp8_state, batches(1)[0])


def test_a_new_model_state_the_step_does_not_keep_is_refused(dp8_state):
    with pytest.raises(tx.TitanaxError, match="returned a state without it"):
        step_dropping_the_new_state(dp8_state, batches(1)[0])


def test_inference_calls_change_nothing_and_need_no_mutable(dp8_state):
    sm_out = jax.jit(lambda s, x: s.apply(s.params, x, train=False))(dp8_state, batches(1)[0]["x"])
    assert sm_out.shape == (16, 1)


# ----------------------------------------------------------------------------- Linen BatchNorm
class LinenNet(nn.Module):
    """flax's ImageNet ResNet style: ``BatchNorm(axis_name="batch")``, written for pmap."""

    axis_name: str | None = "batch"

    @nn.compact
    def __call__(self, x_BI, train: bool = True):
        h_BH = nn.Dense(HIDDEN)(x_BI)
        h_BH = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(h_BH)
        return nn.Dense(1)(nn.relu(h_BH))


def linen_loss(params, state, batch):
    y, model_state = state.apply(params, batch["x"], mutable=["batch_stats"])
    return jnp.mean((y - batch["y"]) ** 2), model_state


@tx.step_fn
def linen_step(state, batch):
    (loss, model_state), grads = jax.value_and_grad(linen_loss, has_aux=True)(state.params, state, batch)
    return state.apply_gradients(grads=grads, model_state=model_state), {"loss": loss}


def test_pmap_style_batchnorm_axis_name_trains_like_one_device():
    data = batches(5)
    engine = tx.Engine(mesh=tx.MeshSpec(axes=("data",)).build(), plan=LAYOUTS["dp8"][1],
                       optimizer=optax.sgd(LR), log_every=1)
    engine.init(LinenNet(), example=data[0]["x"], example_kwargs={"train": False}, rng=0)
    losses = []
    state = engine.fit(linen_step, iter(data), steps=len(data), hooks=[lambda i, s, m: losses.append(m["loss"])])

    plain = LinenNet(axis_name=None)
    variables = plain.init(jax.random.key(0), data[0]["x"], train=False)
    tx_ = optax.sgd(LR)
    opt_state = tx_.init(variables["params"])
    ref_losses = []
    for b in data:
        def f(p):
            y, upd = plain.apply({**variables, "params": p}, b["x"], mutable=["batch_stats"])
            return jnp.mean((y - b["y"]) ** 2), upd
        (loss, upd), grads = jax.value_and_grad(f, has_aux=True)(variables["params"])
        updates, opt_state = tx_.update(grads, opt_state)
        variables = {"params": optax.apply_updates(variables["params"], updates), **upd}
        ref_losses.append(float(loss))
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(state.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                               variables["batch_stats"]["BatchNorm_0"]["mean"], rtol=TOL, atol=TOL)


def test_pmap_style_axis_name_in_manual_mode_names_the_data_axis():
    @tx.step_fn(manual=True)
    def manual_step(state, batch):
        (loss, model_state), grads = jax.value_and_grad(linen_loss, has_aux=True)(state.params, state, batch)
        grads = tx.collectives.pmean(grads, "data")
        return state.apply_gradients(grads=grads, model_state=model_state), {"loss": tx.collectives.pmean(loss, "data")}

    data = batches(1)
    engine = tx.Engine(mesh=tx.MeshSpec(axes=("data",)).build(), plan=LAYOUTS["dp8"][1], optimizer=optax.sgd(LR))
    state = engine.init(LinenNet(), example=data[0]["x"], example_kwargs={"train": False})
    with pytest.raises(tx.ShardingError, match=r"axis name 'batch'.*manual-mode") as info:
        manual_step(state, data[0])
    assert "axis_name='data'" in info.value.suggestion
