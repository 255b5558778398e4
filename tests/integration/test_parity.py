"""Numerical parity: forward outputs and gradients under every layout equal one device's (fp32).

Also checks the exact PartitionSpec of every parameter against the golden dumps in
``tests/golden`` (regenerate with ``TITANAX_UPDATE_GOLDEN=1``, then review the diff).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from layouts import LAYOUTS, layout

import models as m
import titanax as tx

GOLDEN = pathlib.Path(__file__).parent.parent / "golden"
TOL = 1e-5


def mse(out):
    return jnp.mean(out**2)


def next_token_xent(tokens):
    def loss(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    return loss


# name -> (model or factory, input, loss of the output, extra rules)
CASES = {
    "linen_mlp": (lambda: m.LinenMLP(), m.float_batch, lambda x: mse, None),
    "linen_mlp_plain": (lambda: m.LinenMLP(annotate=False), m.float_batch, lambda x: mse,
                        tx.Rules(params=m.LINEN_MLP_PATH_RULES)),
    "linen_transformer": (lambda: m.LinenTransformer(), m.token_batch, next_token_xent, None),
    "nnx_mlp": (lambda: (lambda rngs: m.NNXMLP(rngs)), m.float_batch, lambda x: mse, None),
    "nnx_mlp_plain": (lambda: (lambda rngs: m.NNXMLP(rngs, annotate=False)), m.float_batch,
                      lambda x: mse, tx.Rules(params=m.NNX_MLP_PATH_RULES)),
    "nnx_transformer": (lambda: (lambda rngs: m.NNXTransformer(rngs)), m.token_batch,
                        next_token_xent, None),
    "nnx_transformer_plain": (lambda: (lambda rngs: m.NNXTransformer(rngs, annotate=False)),
                              m.token_batch, next_token_xent,
                              tx.Rules(params=m.NNX_TRANSFORMER_PATH_RULES)),
}


def build(case: str, layout_name: str) -> tuple[tx.ShardedModel, jax.Array]:
    make, batch, _, extra = CASES[case]
    mesh, plan = layout(layout_name, extra)
    x = batch()
    example = x if case.startswith("linen") else None
    return tx.shard(make(), plan, mesh, example=example, rng=0), x


def host(tree):
    return jax.tree.map(np.asarray, tree)


@functools.cache
def reference(case: str):
    """One-device forward and gradients, from parameters created the ordinary Flax way."""
    make, batch, loss_of, _ = CASES[case]
    x = batch()
    loss = loss_of(x)
    if case.startswith("linen"):
        module = make()
        params = nn.unbox(module.init(jax.random.key(0), x)["params"])

        def run(p, x):
            return module.apply({"params": p}, x)
    else:
        with nnx.use_eager_sharding(False):
            model = make()(nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def run(p, x):
            return nnx.merge(graphdef, p, rest)(x)

    out = jax.jit(run)(params, x)
    grads = jax.jit(jax.grad(lambda p, x: loss(run(p, x))))(params, x)
    return case, host(params), host(out), host(grads)


# Annotated models under every layout; path-rule models under the richest layout (their names
# resolve through the same code as annotations, so one layout covers what differs).
PAIRS = [(case, name) for case in CASES for name in LAYOUTS
         if not case.endswith("_plain") or name == "fsdp4_tp2"]


@pytest.mark.parametrize(("case", "layout_name"), PAIRS)
def test_forward_and_gradients_match_one_device(case, layout_name):
    _, ref_params, ref_out, ref_grads = reference(case)
    sm, x = build(case, layout_name)
    loss = CASES[case][2](x)

    # Sharded initialization draws the same numbers as the plain single-device init.
    chex_close(host(sm.params), ref_params, "params")

    out = sm(x)
    assert out.sharding.mesh == sm.mesh
    chex_close(host(out), ref_out, "forward")

    grad_fn = jax.jit(jax.grad(lambda p, x: loss(sm.apply(p, x))))
    grads = grad_fn(sm.params, sm.shard_batch(x))
    chex_close(host(grads), ref_grads, "gradients")

    for entry in sm.layout:
        leaf = _leaf(sm.params, entry.path)
        assert leaf.sharding.is_equivalent_to(entry.sharding, leaf.ndim), entry.path
    check_golden(f"{case}__{layout_name}", sm.layout.specs())


def _leaf(tree, path):
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if tx.parallel.layout.path_string(key_path) == path:
            return leaf
    raise KeyError(path)


def chex_close(actual, expected, what):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_a == tree_e, f"{what}: tree structures differ"
    worst = 0.0
    for (path, a), (_, e) in zip(flat_a, flat_e):
        np.testing.assert_allclose(a, e, rtol=TOL, atol=TOL, err_msg=f"{what} {jax.tree_util.keystr(path)}")
        worst = max(worst, float(np.max(np.abs(a - e))) if a.size else 0.0)
    return worst


def check_golden(name: str, specs: dict[str, str]) -> None:
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TITANAX_UPDATE_GOLDEN"):
        path.write_text(json.dumps(specs, indent=1, sort_keys=True) + "\n")
    assert path.exists(), f"no golden dump {path.name}; run with TITANAX_UPDATE_GOLDEN=1 and review it"
    assert specs == json.loads(path.read_text()), f"layout of {name} differs from {path.name}"


def test_linen_batchnorm_and_extra_arguments():
    """Non-parameter collections are laid out too, and keyword arguments reach the module."""
    mesh, plan = layout("dp8")
    x = m.float_batch()
    sm = tx.shard(m.LinenBatchNormNet(), plan, mesh, example=x, example_kwargs={"train": False})
    assert set(sm.variables) == {"params", "batch_stats"}
    assert sm.layout["batch_stats/BatchNorm_0/mean"].spec == jax.sharding.PartitionSpec(None)
    module = m.LinenBatchNormNet()
    variables = host(sm.variables)
    ref = module.apply(variables, x, train=False)
    np.testing.assert_allclose(sm(x, train=False), ref, rtol=TOL, atol=TOL)
    out, updates = sm(x, train=True, mutable=["batch_stats"])
    ref_out, ref_updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, ref_out, rtol=TOL, atol=TOL)
    chex_close(host(updates), host(ref_updates), "batch_stats")


def test_nnx_batchnorm_state_updates_in_place():
    """Calling the sharded NNX model updates its batch statistics like calling the module does."""
    mesh, plan = layout("fsdp8")
    x = m.float_batch()
    with nnx.use_eager_sharding(False):
        ref_model = m.NNXBatchNormNet(nnx.Rngs(0))
    sm = tx.shard(lambda rngs: m.NNXBatchNormNet(rngs), plan, mesh, rng=0)
    np.testing.assert_allclose(sm(x, train=False), ref_model(x, train=False), rtol=TOL, atol=TOL)
    before = np.asarray(sm.module.bn.mean[...])
    sm(x, train=True)
    ref_model(x, train=True)
    after = np.asarray(sm.module.bn.mean[...])
    assert not np.allclose(before, after), "train=True must update the running mean"
    np.testing.assert_allclose(after, np.asarray(ref_model.bn.mean[...]), rtol=TOL, atol=TOL)
    mean = sm.module.bn.mean[...]
    assert mean.sharding.is_equivalent_to(sm.layout["bn/mean"].sharding, mean.ndim)
    # The dropout RNG counter advanced the way the eager module's did.
    assert int(sm.module.drop.rngs.count[...]) == int(ref_model.drop.rngs.count[...])


def test_built_nnx_module_is_resharded_in_place():
    mesh, plan = layout("dp4_tp2")
    with nnx.use_eager_sharding(False):
        model = m.NNXMLP(nnx.Rngs(3))
    expected = host(nnx.state(model))
    sm = tx.shard(model, plan, mesh)
    assert sm.module is model
    assert model.up.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    chex_close(host(nnx.state(model)), expected, "state")


def test_linen_existing_params_are_placed_not_reinitialized():
    mesh, plan = layout("fsdp4_tp2")
    x = m.float_batch()
    params = m.LinenMLP().init(jax.random.key(7), x)["params"]
    sm = tx.shard(m.LinenMLP(), plan, mesh, example=x, params=nn.unbox(params))
    chex_close(host(sm.params), host(nn.unbox(params)), "params")
    assert sm.layout["Dense_0/kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
