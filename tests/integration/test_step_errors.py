"""Mistakes in and around a training step raise a TitanaxError naming the culprit — never a raw
JAX error, never a crash — and nothing is lost: each check fires before the step runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import models as m
import titanax as tx

FSDP8 = tx.Plan(fsdp=tx.FSDP(axis="fsdp"), strict=True)


def batch(features: int = m.EMBED, rows: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(rows, features)).astype(np.float32),
            "y": rng.normal(size=(rows, m.EMBED)).astype(np.float32)}


def mse(state, params, b):
    return jnp.mean((state.apply(params, b["x"]) - b["y"]) ** 2)


@tx.step_fn
def train_step(state, b):
    loss, grads = jax.value_and_grad(lambda p: mse(state, p, b))(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}


@pytest.fixture(scope="module")
def fsdp():
    mesh = tx.MeshSpec(axes=("fsdp",)).build()
    engine = tx.Engine(mesh=mesh, plan=FSDP8, optimizer=optax.sgd(0.1))
    model = tx.shard(lambda rngs: m.NNXMLP(rngs), FSDP8, mesh)
    return engine, mesh, model


def fresh(fsdp) -> tx.TrainState:
    """A new state of the one sharded model: the same layout, so compiled steps are reused."""
    engine, _, model = fsdp
    return engine.init(model)


def test_reusing_a_donated_state_is_refused_naming_an_array(fsdp):
    state = fresh(fsdp)
    train_step(state, batch())  # donates `state`
    with pytest.raises(tx.TitanaxError, match=r"array 'step' was deleted: the state was donated") as info:
        train_step(state, batch())
    assert "donate=False" in info.value.suggestion


def test_a_state_resharded_by_hand_compiles_for_its_new_layout(fsdp):
    _, mesh, _ = fsdp
    state = fresh(fsdp)
    step = tx.step_fn(train_step.fn, donate=False)
    expected, _ = step(state, batch())  # compiled for the plan's layout
    replicated = state.replace(params=jax.device_put(state.params, NamedSharding(mesh, P())))
    with pytest.warns(tx.RecompileWarning, match=r"state.params\['up'\]\['kernel'\].value: sharding P\('fsdp', None\) -> P\(\)"):
        new_state, _ = step(replicated, batch())  # the same structure, another layout: compiles again
    assert new_state.params["up"]["kernel"][...].sharding.spec == P()  # the layout it was given
    np.testing.assert_allclose(new_state.params["up"]["kernel"][...], expected.params["up"]["kernel"][...],
                               rtol=1e-6, atol=1e-6)


def test_a_batch_placed_on_other_devices_is_named(fsdp):
    state = fresh(fsdp)
    elsewhere = {k: jax.device_put(v, jax.devices()[3]) for k, v in batch().items()}
    with pytest.raises(tx.ShardingError, match=r"batch leaf '(x|y)' is already placed on devices \[3\]"):
        train_step(state, elsewhere)
    train_step(state, batch())  # the state was not donated by the refused call


def test_a_loss_per_example_is_named_with_its_shape(fsdp):
    @tx.step_fn
    def per_example(state, b):
        def loss(p):
            return jnp.mean((state.apply(p, b["x"]) - b["y"]) ** 2, axis=-1)
        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads=grads), {"loss": value.mean()}

    with pytest.raises(tx.TitanaxError, match=r"returns shape \(8,\), not a scalar") as info:
        per_example(fresh(fsdp), batch())
    assert ".mean()" in info.value.suggestion


def test_a_feature_width_change_names_the_leaf_and_both_shapes(fsdp):
    state, _ = train_step(fresh(fsdp), batch())
    with pytest.raises(tx.ShardingError, match=r"batch leaf 'x' of shape \(8, 32\).*now gets shape \(8, 33\)"):
        train_step(state, batch(features=m.EMBED + 1))
    with pytest.warns(tx.RecompileWarning, match=r"batch\['x'\]: shape \(8, 32\) -> \(16, 32\)"):
        train_step(state, batch(rows=16))  # a new batch size works: it compiles once more, and says so


def test_a_non_scalar_eval_metric_is_named(fsdp):
    engine, _, _ = fsdp

    def eval_step(state, b):
        return {"loss": mse(state, state.params, b), "error": state.apply(state.params, b["x"]) - b["y"]}

    with pytest.raises(tx.TitanaxError, match=r"eval step 'eval_step': metric 'error' has shape \(8, 32\)"):
        engine.evaluate(eval_step, fresh(fsdp), [batch()])


def test_float_token_ids_are_named():
    mesh = tx.MeshSpec(axes=("data",)).build()
    engine = tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP(axis="data")), optimizer=optax.sgd(0.1))
    state = engine.init(lambda rngs: m.NNXTransformer(rngs))

    @tx.step_fn
    def lm_step(state, b):
        def loss(p):
            logits = state.apply(p, b["tokens"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean()
        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads=grads), {"loss": value}

    tokens = np.asarray(m.token_batch(8))
    with pytest.raises(tx.TitanaxError, match=r"non-integer ids; batch leaves \['tokens'\] are \['float32'\]"):
        lm_step(state, {"tokens": tokens.astype(np.float32), "targets": tokens})


def test_manual_mode_under_tensor_parallelism_names_a_split_parameter():
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    state = tx.Engine(mesh=mesh, plan=plan, optimizer=optax.sgd(0.1)).init(lambda rngs: m.NNXMLP(rngs))

    @tx.step_fn(manual=True)
    def manual_step(state, b):
        loss, grads = jax.value_and_grad(lambda p: mse(state, p, b))(state.params)
        grads = tx.collectives.pmean(grads, "data")
        return state.apply_gradients(grads=grads), {"loss": tx.collectives.pmean(loss, "data")}

    with pytest.raises(tx.ShardingError, match=r"parameter 'down/kernel' is split by the plan .*\(32, 32\) block of the \(64, 32\)"):
        manual_step(state, batch())


def test_a_mesh_with_manual_axes_is_refused_with_the_fix():
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Manual,))
    with pytest.raises(tx.MeshError, match=r"mesh axes \['fsdp'\] are neither Auto nor Explicit") as info:
        tx.Engine(mesh=mesh, plan=FSDP8, optimizer=optax.sgd(0.1))
    assert "tx.MeshSpec(axes=('fsdp',), shape=(8,), axis_types='auto' or 'explicit')" in info.value.suggestion