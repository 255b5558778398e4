"""Rematerialisation of the GPT example's layer stack under DP x TP: every policy gives the same
gradients, ``full`` shrinks the compiled step's temporaries, and it composes with a pipeline's own
remat."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import titanax as tx
from examples.gpt_small_tp.model import GPT, TINY, GPTConfig, gpt, next_token_loss
from titanax.profiling import inspect

CFG = dataclasses.replace(TINY, num_layers=4)
BATCH, SEQ = 8, 128
# The other policies are checked on a small stack in tests/unit/test_stack.py; "offload" needs a GPU or TPU.
POLICIES = ["none", "full"]


def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, 257)


def loss_fn(apply, params, tokens_BT1):
    return next_token_loss(apply(params, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])


def compile_step(plan: tx.Plan, spec: tx.MeshSpec, cfg: GPTConfig):
    """The compiled loss-and-gradient step and its results on the test batch."""
    sm = tx.shard(lambda: GPT(cfg, rngs=nnx.Rngs(0)), dataclasses.replace(plan, strict=True), spec.build())
    batch = sm.shard_batch(tokens())
    compiled = jax.jit(tx.value_and_grad(lambda p, t: loss_fn(sm.apply, p, t))).lower(sm.params, batch).compile()
    return compiled, compiled(sm.params, batch)


@pytest.fixture(scope="module")
def steps():
    """Policy -> (compiled step, (loss, grads)) under data 2 x tensor 4; each compiled once."""
    spec = tx.MeshSpec(axes=("data", "tensor"), shape=(2, 4))
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    cache = {}

    def get(policy: str):
        if policy not in cache:
            cache[policy] = compile_step(plan, spec, dataclasses.replace(CFG, remat=policy))
        return cache[policy]

    return get


def assert_same(got, want, tolerance):
    (loss, grads), (ref_loss, ref_grads) = got, want
    np.testing.assert_allclose(loss, ref_loss, rtol=tolerance, atol=tolerance)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    assert len(jax.tree.leaves(grads)) == len(flat_ref)
    for (path, b), a in zip(flat_ref, jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_every_policy_gives_the_gradients_of_none(policy, steps):
    assert_same(steps(policy)[1], steps("none")[1], 1e-6)


def test_full_remat_shrinks_the_steps_temporaries(steps):
    # 4 layers, [8, 128] tokens: 14.3 MB of temporaries per device without remat, 3.5 MB with
    # "full" (jax 0.10.2, CPU); each layer then keeps its input only.
    temp = {policy: inspect(steps(policy)[0]).temp_bytes for policy in ("none", "full")}
    assert temp["full"] * 2 < temp["none"], temp


def test_pipeline_remat_composes_with_the_stacks(steps):
    # PP(remat=) wraps each stage; the stack's policy each layer inside it.
    spec = tx.MeshSpec(axes=("pipe", "data", "tensor"), shape=(2, 2, 2))
    plan = tx.Plan(pipeline_parallel=tx.PP(stages=2, microbatches=2, remat="full"),
                   data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    _, got = compile_step(plan, spec, dataclasses.replace(CFG, remat="full"))
    assert_same(got, steps("none")[1], 1e-5)


def test_run_config_factory_takes_remat():
    # What `model: {args: {remat: full}}` in a run configuration calls.
    assert nnx.eval_shape(lambda: gpt(preset="tiny", remat="full", rngs=nnx.Rngs(0))).blocks.remat == "full"
    with pytest.raises(tx.TitanaxError, match="GPTConfig") as err:
        GPTConfig(remat="everything")
    assert "none, full, save_dots, save_dots_no_batch, offload" in err.value.suggestion
