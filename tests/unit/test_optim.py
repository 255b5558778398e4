"""Optimizer factories, schedules and as_optimizer: values, masks, clipping, dtypes, sharding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from titanax import optim
from titanax.exceptions import TitanaxError


def _params(dtype=jnp.float32):
    return {"dense": {"kernel": jnp.ones((4, 3), dtype), "bias": jnp.ones((3,), dtype)},
            "norm": {"scale": jnp.ones((3,), dtype)}, "temperature": jnp.ones((), dtype)}


def _step(opt, params, grads):
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _zeros(params):
    return jax.tree.map(jnp.zeros_like, params)


def _raises(match: str):
    """pytest.raises for a TitanaxError whose message matches and which carries a suggestion."""

    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(TitanaxError, match=match)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            out = self._cm.__exit__(*exc)
            assert self.info.value.suggestion, f"no suggestion on {self.info.value!r}"
            return out

    return _Ctx()


# ------------------------------------------------------------------------------------ schedules

def test_warmup_cosine_values_at_key_steps():
    lr = optim.warmup_cosine(1.0, warmup_steps=10, total_steps=110, end_value=0.1, init_value=0.2)
    assert float(lr(0)) == pytest.approx(0.2)
    assert float(lr(5)) == pytest.approx(0.6)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx((1.0 + 0.1) / 2, abs=1e-6)   # half way through the cosine
    assert float(lr(35)) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.25)) / 2, abs=1e-6)
    assert float(lr(110)) == pytest.approx(0.1)
    assert float(lr(10_000)) == pytest.approx(0.1)


def test_warmup_cosine_edge_lengths():
    no_warmup = optim.warmup_cosine(2.0, warmup_steps=0, total_steps=10)
    assert float(no_warmup(0)) == pytest.approx(2.0)
    assert float(no_warmup(10)) == pytest.approx(0.0)
    only_warmup = optim.warmup_cosine(2.0, warmup_steps=10, total_steps=10, end_value=0.5)
    assert float(only_warmup(5)) == pytest.approx(1.0)
    assert float(only_warmup(10)) == pytest.approx(0.5)
    assert float(only_warmup(50)) == pytest.approx(0.5)


def test_warmup_linear_values_at_key_steps():
    lr = optim.warmup_linear(1.0, warmup_steps=10, total_steps=30, end_value=0.2)
    got = [float(lr(s)) for s in (0, 5, 10, 20, 30, 100)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.6, 0.2, 0.2], atol=1e-6)
    assert float(optim.warmup_linear(1.0, warmup_steps=0, total_steps=4)(0)) == pytest.approx(1.0)


def test_constant_schedule():
    lr = optim.constant(3e-4)
    assert float(lr(0)) == pytest.approx(3e-4) and float(lr(10**6)) == pytest.approx(3e-4)


@pytest.mark.parametrize("make, match", [
    (lambda: optim.warmup_cosine(1.0, warmup_steps=20, total_steps=10), "longer than total_steps"),
    (lambda: optim.warmup_cosine(1.0, warmup_steps=-1, total_steps=10), "warmup_steps must be >= 0"),
    (lambda: optim.warmup_cosine(1.0, warmup_steps=0, total_steps=0), "total_steps must be >= 1"),
    (lambda: optim.warmup_cosine(1.0, warmup_steps=2.5, total_steps=10), "integer number of steps"),
    (lambda: optim.warmup_cosine(-1.0, warmup_steps=1, total_steps=10), "peak_value must be finite and >= 0"),
    (lambda: optim.warmup_cosine(float("nan"), warmup_steps=1, total_steps=10), "peak_value"),
    (lambda: optim.warmup_cosine(1.0, warmup_steps=1, total_steps=10, end_value=-0.1), "end_value"),
    (lambda: optim.warmup_linear(1.0, warmup_steps=11, total_steps=10), "longer than total_steps"),
    (lambda: optim.warmup_linear(1.0, warmup_steps=True, total_steps=10), "integer number of steps"),
    (lambda: optim.warmup_linear("1e-3", warmup_steps=1, total_steps=10), "must be a real number"),
    (lambda: optim.constant(-1.0), "value must be finite and >= 0"),
    (lambda: optim.constant(float("inf")), "value must be finite"),
])
def test_schedules_reject_bad_arguments(make, match):
    with _raises(match):
        make()


# ------------------------------------------------------------------------------- weight decay mask

def test_default_mask_decays_only_matrices():
    lr, wd = 0.1, 0.5
    params = _params()
    new, _ = _step(optim.adamw(lr, weight_decay=wd), params, _zeros(params))
    np.testing.assert_allclose(new["dense"]["kernel"], 1.0 - lr * wd, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], 1.0)
    np.testing.assert_array_equal(new["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["temperature"], 1.0)
    assert optim.default_decay_mask(params) == {"dense": {"kernel": True, "bias": False},
                                                "norm": {"scale": False}, "temperature": False}


def test_mask_none_decays_everything():
    params = _params()
    new, _ = _step(optim.adamw(0.1, weight_decay=0.5, decay_mask=None), params, _zeros(params))
    for leaf in jax.tree.leaves(new):
        np.testing.assert_allclose(leaf, 0.95, rtol=1e-6)


def test_mask_callable_and_pytree():
    params = _params()
    only_bias = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: jax.tree_util.keystr(path).endswith("['bias']"), p)
    new, _ = _step(optim.adamw(0.1, weight_decay=0.5, decay_mask=only_bias), params, _zeros(params))
    np.testing.assert_allclose(new["dense"]["bias"], 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["kernel"], 1.0)
    tree_mask = {"dense": {"kernel": False, "bias": False}, "norm": {"scale": True}, "temperature": False}
    new, _ = _step(optim.adamw(0.1, weight_decay=0.5, decay_mask=tree_mask), params, _zeros(params))
    np.testing.assert_allclose(new["norm"]["scale"], 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["kernel"], 1.0)


@pytest.mark.parametrize("make", [
    lambda: optim.lion(0.1, weight_decay=0.5),
    lambda: optim.sgd(0.1, weight_decay=0.5),
    lambda: optim.sgd(0.1, momentum=0.9, weight_decay=0.5),
], ids=["lion", "sgd", "sgd-momentum"])
def test_other_optimizers_use_the_same_default_mask(make):
    params = _params()
    new, _ = _step(make(), params, _zeros(params))
    np.testing.assert_allclose(new["dense"]["kernel"], 0.95, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], 1.0)
    np.testing.assert_array_equal(new["norm"]["scale"], 1.0)


def test_adam_has_no_weight_decay_and_sgd_none_by_default():
    params = _params()
    for opt in (optim.adam(0.1), optim.sgd(0.1)):
        new, _ = _step(opt, params, _zeros(params))
        for leaf in jax.tree.leaves(new):
            np.testing.assert_array_equal(leaf, 1.0)


# ------------------------------------------------------------------------------------ clipping

def test_clip_norm_clips_by_global_norm_first():
    params = {"a": jnp.zeros((1,)), "b": jnp.zeros((1,))}
    grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}            # global norm 5
    new, _ = _step(optim.sgd(1.0, clip_norm=1.0), params, grads)
    np.testing.assert_allclose([new["a"][0], new["b"][0]], [-0.6, -0.8], rtol=1e-6)
    new, _ = _step(optim.sgd(1.0), params, grads)
    np.testing.assert_allclose([new["a"][0], new["b"][0]], [-3.0, -4.0])
    new, _ = _step(optim.sgd(1.0, clip_norm=10.0), params, grads)     # under the limit: untouched
    np.testing.assert_allclose([new["a"][0], new["b"][0]], [-3.0, -4.0])


def test_clip_norm_sees_raw_gradients_not_weight_decay():
    # clip first: the decay term added after clipping is not scaled down by the clip.
    params = {"w": jnp.full((2, 2), 10.0)}
    new, _ = _step(optim.sgd(0.1, weight_decay=1.0, clip_norm=1e-3), params, _zeros(params))
    np.testing.assert_allclose(new["w"], 9.0, rtol=1e-6)


@pytest.mark.parametrize("factory", [optim.adamw, optim.adam, optim.lion, optim.adafactor, optim.sgd])
def test_every_factory_accepts_clip_norm_and_a_schedule(factory):
    params = _params()
    opt = factory(optim.warmup_cosine(1e-2, warmup_steps=2, total_steps=10), clip_norm=1.0)
    assert isinstance(opt, optax.GradientTransformation)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
    new, _ = jax.jit(lambda p, g: _step(opt, p, g))(params, grads)
    # the first step uses lr(0) = 0: nothing moves yet
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b)


# ------------------------------------------------------------------------------- moment dtypes

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_moments_keep_the_parameter_dtype_by_default(dtype):
    params = _params(dtype)
    state = optim.adamw(1e-3).init(params)
    for name in ("mu", "nu"):
        moments = optax.tree_utils.tree_get(state, name)
        assert jax.tree.map(lambda x: x.dtype, moments) == jax.tree.map(lambda x: x.dtype, params)
    mu = optax.tree_utils.tree_get(optim.lion(1e-3).init(params), "mu")
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(dtype)}
    trace = optax.tree_utils.tree_get(optim.sgd(0.1, momentum=0.9).init(params), "trace")
    assert {x.dtype for x in jax.tree.leaves(trace)} == {jnp.dtype(dtype)}
    ema = optax.tree_utils.tree_get(optim.adafactor(1e-2, momentum=0.9).init(params), "ema")
    assert {x.dtype for x in jax.tree.leaves(ema)} == {jnp.dtype(dtype)}   # optax alone: float32


def test_moments_follow_each_parameter_in_a_mixed_tree_and_after_updates():
    params = {"w32": jnp.ones((4, 4), jnp.float32), "w16": jnp.ones((4, 4), jnp.bfloat16)}
    opt = optim.adamw(1e-3)
    _, state = _step(opt, params, jax.tree.map(jnp.ones_like, params))
    for name in ("mu", "nu"):
        moments = optax.tree_utils.tree_get(state, name)
        assert moments["w32"].dtype == jnp.float32 and moments["w16"].dtype == jnp.bfloat16


def test_reduced_precision_moments_only_when_asked():
    params = _params(jnp.float32)
    state = optim.adamw(1e-3, moment_dtype="bfloat16").init(params)
    dtypes = lambda name: {x.dtype for x in jax.tree.leaves(optax.tree_utils.tree_get(state, name))}  # noqa: E731
    assert dtypes("mu") == {jnp.dtype(jnp.bfloat16)}
    assert dtypes("nu") == {jnp.dtype(jnp.float32)}   # the second moment is never reduced


# ------------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("make, match", [
    (lambda: optim.adamw(-1e-3), "learning_rate must be finite and >= 0"),
    (lambda: optim.adamw(float("nan")), "learning_rate must be finite"),
    (lambda: optim.adamw("3e-4"), "learning_rate must be a float or an optax schedule"),
    (lambda: optim.adamw(None), "learning_rate must be a float or an optax schedule"),
    (lambda: optim.adamw(1e-3, b1=1.0), "b1=1.0 is out of range"),
    (lambda: optim.adamw(1e-3, b2=-0.1), "b2=-0.1 is out of range"),
    (lambda: optim.adamw(1e-3, eps=0.0), "eps=0.0 is out of range"),
    (lambda: optim.adamw(1e-3, weight_decay=-1.0), "weight_decay=-1.0 is out of range"),
    (lambda: optim.adamw(1e-3, clip_norm=0.0), "clip_norm=0.0 is out of range"),
    (lambda: optim.adamw(1e-3, decay_mask="biases"), "unknown decay_mask 'biases'"),
    (lambda: optim.adamw(1e-3, moment_dtype="int32"), "moment_dtype must be a floating dtype"),
    (lambda: optim.adamw(1e-3, moment_dtype="not-a-dtype"), "is not a dtype"),
    (lambda: optim.sgd(0.1, nesterov=True), "nesterov=True needs momentum"),
    (lambda: optim.sgd(0.1, momentum=1.5), "momentum=1.5 is out of range"),
    (lambda: optim.lion(1e-4, b2=1.0), "b2=1.0 is out of range"),
    (lambda: optim.adafactor(1e-2, min_dim_size_to_factor=0), "min_dim_size_to_factor"),
])
def test_factories_reject_bad_arguments(make, match):
    with _raises(match):
        make()


def test_scalar_array_learning_rate_is_accepted():
    params = _params()
    new, _ = _step(optim.sgd(jnp.float32(0.5)), params, jax.tree.map(jnp.ones_like, params))
    np.testing.assert_allclose(new["dense"]["kernel"], 0.5)


# ------------------------------------------------------------------------------- as_optimizer

def test_as_optimizer_passes_optax_transformations_through():
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    assert optim.as_optimizer(chain) is chain
    plain = optax.GradientTransformation(lambda p: optax.EmptyState(), lambda u, s, p=None: (u, s))
    assert optim.as_optimizer(plain) is plain
    extra = optax.adamw(1e-3)
    assert isinstance(extra, optax.GradientTransformationExtraArgs)
    assert optim.as_optimizer(extra) is extra
    ours = optim.adamw(1e-3, clip_norm=1.0)
    assert optim.as_optimizer(ours) is ours


def _nnx_optimizer():
    from flax import nnx

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    return nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)


@pytest.mark.parametrize("obj, match", [
    (3e-4, "got the number 0.0003"),
    ("adamw", "got the string 'adamw'"),
    (None, "expected an optax.GradientTransformation"),
    (optax.adamw, "callable 'adamw'"),
    (optim.adamw, "callable 'adamw'"),
    ((lambda p: None, lambda u, s, p=None: (u, s)), r"plain \(init, update\) tuple"),
    (optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2), "MultiSteps"),
    ("nnx", "flax.nnx.Optimizer"),
])
def test_as_optimizer_rejects_everything_else(obj, match):
    if obj == "nnx":
        obj = _nnx_optimizer()
    with _raises(match) as info:
        optim.as_optimizer(obj)
    if match.startswith("got the number"):
        assert "tx.optim.adamw(0.0003)" in info.value.suggestion


# --------------------------------------------------------------------- optimizer state sharding

def _spec_equal(a, b, ndim):
    return a.is_equivalent_to(b, ndim)


def _sharded_params(mesh):
    shardings = {"kernel": NamedSharding(mesh, P("data", "model")),
                 "bias": NamedSharding(mesh, P("model")),
                 "scale": NamedSharding(mesh, P())}
    params = {"kernel": jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8),
              "bias": jnp.ones((8,)), "scale": jnp.ones(())}
    return jax.device_put(params, shardings), shardings


def _assert_moments_follow(state, shardings, names=("mu", "nu")):
    for name in names:
        moments = optax.tree_utils.tree_get(state, name)
        for key, sharding in shardings.items():
            leaf = moments[key]
            assert _spec_equal(leaf.sharding, sharding, leaf.ndim), (name, key, leaf.sharding)


def test_opt_state_keeps_param_shardings_on_an_auto_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    params, shardings = _sharded_params(mesh)
    opt = optim.adamw(1e-3, clip_norm=1.0)

    # Eager init: zeros_like keeps each parameter's sharding.
    _assert_moments_follow(opt.init(params), shardings)

    # Under jit on an Auto mesh the zeros do not depend on the params, so their sharding must be
    # given: derive it from the params with optax.tree_map_params (what TrainState does).
    abstract = jax.eval_shape(opt.init, params)
    replicated = NamedSharding(mesh, P())
    state_sh = optax.tree_map_params(opt, lambda _, s: s, abstract, shardings,
                                     transform_non_params=lambda _: replicated)
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    _assert_moments_follow(state, shardings)

    # An update under jit keeps the moments where they are.
    @jax.jit
    def step(p, s):
        grads = jax.tree.map(jnp.ones_like, p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    new_params, new_state = step(params, state)
    _assert_moments_follow(new_state, shardings)
    for key, sharding in shardings.items():
        assert _spec_equal(new_params[key].sharding, sharding, new_params[key].ndim)


def test_opt_state_follows_params_under_jit_on_an_explicit_mesh():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    params, shardings = _sharded_params(mesh)
    opt = optim.adamw(1e-3)
    with jax.set_mesh(mesh):
        state = jax.jit(opt.init)(params)
    _assert_moments_follow(state, shardings)
