"""The training engine on the MNIST-DP model and scikit-learn's digits (real data, 8 fake devices):
loss parity across layouts, microbatching, manual mode, precision, donation, no recompilation."""

from __future__ import annotations

import csv
import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2]))
from examples.mnist_dp.data import load_dataset  # noqa: E402
from examples.mnist_dp.model import CNN, cross_entropy  # noqa: E402

TOL = 1e-5
BATCH = 64
PARITY_OPTIMIZER = tx.optim.sgd(0.05, momentum=0.9)
STEPS = 20


@functools.cache
def digits():
    x_train, y_train, _, _ = load_dataset(None)
    return x_train, y_train


def batches(n: int, batch: int = BATCH) -> list[dict[str, np.ndarray]]:
    x, y = digits()
    loader = tx.data.ArrayLoader({"image": x, "label": y}, batch_size=batch, seed=0)
    return [next(loader) for _ in range(n)]


def loss_and_accuracy(params, state, batch):
    logits = state.apply(params, batch["image"])
    return cross_entropy(logits, batch["label"]), jnp.mean(jnp.argmax(logits, -1) == batch["label"])


@tx.step_fn
def train_step(state, batch):
    (loss, acc), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(state.params, state, batch)
    return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": acc}


@tx.step_fn(manual=True)
def manual_train_step(state, batch):
    (loss, acc), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(state.params, state, batch)
    grads = tx.collectives.pmean(grads, "data")
    return state.apply_gradients(grads=grads), tx.collectives.pmean({"loss": loss, "accuracy": acc}, "data")


LAYOUTS = {
    "dp8": (tx.MeshSpec(axes=("data",)), lambda k: tx.Plan(data_parallel=tx.DP(axis="data", accumulate_steps=k))),
    "fsdp8": (tx.MeshSpec(axes=("fsdp",)), lambda k: tx.Plan(fsdp=tx.FSDP(axis="fsdp"))),
    "dp4_tp2": (tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)),
                lambda k: tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))),
}


def engine_for(layout: str, *, optimizer=None, precision=None, accumulate: int = 1, loggers=()):
    spec, plan = LAYOUTS[layout]
    return tx.Engine(mesh=spec.build(), plan=plan(accumulate), optimizer=optimizer or tx.optim.adamw(1e-3),
                     precision=precision, log_every=1, loggers=loggers, prefetch=2)


def run(engine, step, data, steps=STEPS):
    """Per-step metrics of ``engine.fit`` (log_every=1), and the final state."""
    seen = []
    state = engine.init(CNN(), example=data[0]["image"], rng=0)
    state = engine.fit(step, iter(data), steps=steps, hooks=[lambda i, s, m: seen.append(m)])
    return seen, state


@functools.cache
def reference_losses() -> tuple[list[float], dict]:
    """One device, no Titanax: plain jax.jit over optax, from the same initial parameters."""
    data = batches(STEPS)
    module = CNN()
    params = jax.device_put(module.init(jax.random.key(0), data[0]["image"])["params"], jax.devices()[0])
    params = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, params,
                          is_leaf=lambda a: hasattr(a, "unbox"))
    opt = PARITY_OPTIMIZER
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return cross_entropy(module.apply({"params": p}, batch["image"]), batch["label"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for batch in data:
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return losses, jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_parity_every_step_against_one_device(layout):
    ref_losses, ref_params = reference_losses()
    # SGD with momentum, so parameters stay comparable too (Adam's 1/sqrt(nu) turns float32 noise in
    # a dead unit's near-zero gradient into lr-sized steps). Parameters get 1e-4: a pre-activation
    # within rounding of a ReLU kink flips a few gradient terms over 20 steps; the losses get 1e-5.
    seen, state = run(engine_for(layout, optimizer=PARITY_OPTIMIZER), train_step, batches(STEPS))
    losses = [m["loss"] for m in seen]
    assert len(losses) == STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=TOL, atol=TOL)
    final = jax.tree.map(np.asarray, state.params)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert int(state.step) == STEPS
    assert ref_losses[-1] < ref_losses[0] * 0.8  # it is learning, so parity is not trivially of constants


def test_optimizer_slots_inherit_parameter_shardings_under_fsdp():
    engine = engine_for("fsdp8")
    state = engine.init(CNN(), example=batches(1)[0]["image"])
    flat_params = dict(jax.tree_util.tree_flatten_with_path(state.params)[0])
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        for ppath, param in flat_params.items():
            if path[-len(ppath):] == ppath and leaf.shape == param.shape:
                assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), path
                checked += 1
    assert checked >= 2 * len(flat_params)  # adam's mu and nu for every parameter
    assert state.params["hidden"]["kernel"].sharding.spec != P()  # FSDP shards it
    assert state.step.sharding.is_fully_replicated


def test_accumulate_steps_equals_one_large_batch():
    data = batches(5, batch=BATCH)
    one, s1 = run(engine_for("dp8", optimizer=tx.optim.sgd(0.1)), train_step, data, steps=5)
    four, s4 = run(engine_for("dp8", optimizer=tx.optim.sgd(0.1), accumulate=4), train_step, data, steps=5)
    np.testing.assert_allclose([m["loss"] for m in four], [m["loss"] for m in one], rtol=TOL, atol=TOL)
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


def test_manual_mode_with_explicit_pmean_equals_gspmd():
    data = batches(10)
    gspmd, s_auto = run(engine_for("dp8"), train_step, data, steps=10)
    manual, s_manual = run(engine_for("dp8"), manual_train_step, data, steps=10)
    np.testing.assert_allclose([m["loss"] for m in manual], [m["loss"] for m in gspmd], rtol=TOL, atol=TOL)
    for a, b in zip(jax.tree.leaves(s_manual.params), jax.tree.leaves(s_auto.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


def test_manual_mode_without_reducing_gradients_is_a_collective_error():
    @tx.step_fn(manual=True)
    def forgot(state, batch):
        (loss, _), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(state.params, state, batch)
        return state.apply_gradients(grads=grads), {"loss": tx.collectives.pmean(loss, "data")}

    engine = engine_for("dp8")
    state = engine.init(CNN(), example=batches(1)[0]["image"])
    with pytest.raises(tx.CollectiveError, match="still differs per device") as err:
        forgot(state, tx.data.to_global(batches(1)[0], engine.mesh, engine.plan))
    assert "pmean" in err.value.suggestion


def test_bf16_compute_keeps_fp32_master_weights():
    engine = engine_for("dp8", precision=tx.Precision(compute="bfloat16"))
    data = batches(3)
    seen, state = run(engine, train_step, data, steps=3)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree.leaves(state.opt_state))
    grads = jax.grad(lambda p: loss_and_accuracy(p, state, data[0])[0])(state.params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    jaxpr = str(jax.make_jaxpr(lambda p: state.apply(p, data[0]["image"]))(state.params))
    assert "bf16[" in jaxpr and "conv_general_dilated" in jaxpr
    assert np.isfinite(seen[-1]["loss"])


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_continues():
    engine = engine_for("dp8", precision=tx.Precision(compute="float16", loss_scale="dynamic"),
                        optimizer=tx.optim.sgd(0.05))
    data = batches(4)
    poisoned = dict(data[1], image=data[1]["image"] * np.float32(1e6))  # overflows float16
    seen = []
    state = engine.init(CNN(), example=data[0]["image"])
    params_before = {}

    def remember(i, s, m):
        seen.append(m)
        params_before[i] = jax.tree.map(np.asarray, s.params)

    state = engine.fit(train_step, iter([data[0], poisoned, data[2], data[3]]), steps=4, hooks=[remember])
    scales = [m["loss_scale"] for m in seen]
    assert [m["skipped_steps"] for m in seen] == [0, 1, 1, 1]
    assert scales[1] == scales[0] / 2 and scales[2] == scales[1]
    for a, b in zip(jax.tree.leaves(params_before[2]), jax.tree.leaves(params_before[1])):
        np.testing.assert_array_equal(a, b)  # the poisoned step changed nothing
    changed = any(not np.array_equal(a, b) for a, b in
                  zip(jax.tree.leaves(params_before[4]), jax.tree.leaves(params_before[2])))
    assert changed and np.isfinite(seen[-1]["loss"])
    assert int(state.step) == 4


def test_step_donates_its_state_and_compiles_once():
    engine = engine_for("dp8")
    state = engine.init(CNN(), example=batches(1)[0]["image"])
    data = [tx.data.to_global(b, engine.mesh, engine.plan) for b in batches(10)]
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = state
            state, _ = train_step(state, data[0])
            assert jax.tree.leaves(old.params)[0].is_deleted()  # donated: buffers reused
            first = compiles.count("/jax/core/compile/backend_compile_duration")
            for batch in data[1:]:
                state, metrics = train_step(state, batch)
            jax.block_until_ready(metrics)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 1
    assert compiles.count("/jax/core/compile/backend_compile_duration") == first  # no recompilation
    assert not [w for w in caught if "donat" in str(w.message).lower()], [str(w.message) for w in caught]


def test_fresh_rng_every_step_and_reproducible():
    @tx.step_fn
    def noisy(state, batch):
        return state.apply_gradients(grads=jax.tree.map(jnp.zeros_like, state.params)), {
            "noise": jax.random.uniform(state.rng)}

    engine = engine_for("dp8")
    seen, _ = run(engine, noisy, batches(3), steps=3)
    again, _ = run(engine_for("dp8"), noisy, batches(3), steps=3)
    noise = [m["noise"] for m in seen]
    assert len(set(noise)) == 3
    assert noise == [m["noise"] for m in again]


def test_csv_logger_records_what_the_engine_logged(tmp_path):
    path = tmp_path / "metrics.csv"
    engine = engine_for("dp8", loggers=[tx.logging.CSV(str(path))])
    seen, _ = run(engine, train_step, batches(4), steps=4)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    np.testing.assert_allclose([float(r["loss"]) for r in rows], [m["loss"] for m in seen], rtol=1e-6)


def test_engine_reports_a_step_function_that_returns_the_wrong_thing():
    @tx.step_fn
    def wrong(state, batch):
        return {"loss": 0.0}

    engine = engine_for("dp8")
    state = engine.init(CNN(), example=batches(1)[0]["image"])
    with pytest.raises(tx.TitanaxError, match="must return") as err:
        engine.fit(wrong, iter(batches(1)), steps=1, state=state)
    assert err.value.suggestion


def test_fit_accepts_global_batches_and_reports_data_running_out():
    engine = engine_for("dp8")
    state = engine.init(CNN(), example=batches(1)[0]["image"])
    placed = [tx.data.to_global(b, engine.mesh, engine.plan) for b in batches(3)]
    state = engine.fit(train_step, placed, steps=3, state=state)
    assert int(state.step) == 3
    with pytest.raises(tx.TitanaxError, match="ran out") as err:
        engine.fit(train_step, iter(batches(2)), steps=6, state=state)
    assert "ArrayLoader" in err.value.suggestion


def test_throughput_and_mfu_from_given_or_compiled_flops():
    for flops_per_example in (2.0e6, None):
        spec, plan = LAYOUTS["dp8"]
        engine = tx.Engine(mesh=spec.build(), plan=plan(1), optimizer=tx.optim.sgd(0.01), log_every=5,
                           flops_per_example=flops_per_example, peak_flops=1e12)
        seen, _ = run(engine, train_step, batches(10), steps=10)
        last = seen[-1]
        assert last["examples_per_s"] > 0
        if flops_per_example is not None:
            expected = last["examples_per_s"] * flops_per_example / (8 * 1e12)
            assert last["mfu"] == pytest.approx(expected, rel=1e-6)
        else:  # read from the compiled step's cost analysis
            assert 0 < last["mfu"] < 1


def test_max_steps_in_flight_must_be_positive():
    mesh = tx.MeshSpec(axes=("data",)).build()
    with pytest.raises(tx.ConfigError, match="max_steps_in_flight") as error:
        tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP()), optimizer=tx.optim.sgd(0.1),
                  max_steps_in_flight=0)
    assert error.value.suggestion
