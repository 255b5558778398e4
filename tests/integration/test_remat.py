"""Rematerialisation of the GPT example's layer stack composes with a pipeline's own remat, and the run
configuration reaches it. (That a policy keeps the gradients and ``full`` shrinks the step's
temporaries is run by docs/language-models.md and, per policy, tests/unit/test_stack.py.)"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import titanax as tx
from examples.gpt_small_tp.model import GPT, TINY, GPTConfig, gpt, next_token_loss

CFG = dataclasses.replace(TINY, num_layers=4)
BATCH, SEQ = 8, 128


def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, 257)


def loss_and_grads(plan: tx.Plan, spec: tx.MeshSpec, cfg: GPTConfig):
    """The loss and gradients of the GPT example on the test batch, compiled under ``plan``."""
    sm = tx.shard(lambda: GPT(cfg, rngs=nnx.Rngs(0)), dataclasses.replace(plan, strict=True), spec.build())
    loss = lambda p, t: next_token_loss(sm.apply(p, t[:, :-1]), t[:, 1:])  # noqa: E731
    return jax.jit(tx.value_and_grad(loss))(sm.params, sm.shard_batch(tokens()))


def test_pipeline_remat_composes_with_the_stacks():
    # PP(remat=) wraps each stage; the stack's policy each layer inside it.
    spec = tx.MeshSpec(axes=("pipe", "data", "tensor"), shape=(2, 2, 2))
    plan = tx.Plan(pipeline_parallel=tx.PP(stages=2, microbatches=2, remat="full"),
                   data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    loss, grads = loss_and_grads(plan, spec, dataclasses.replace(CFG, remat="full"))
    reference = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    ref_loss, ref_grads = loss_and_grads(reference, tx.MeshSpec(axes=("data", "tensor"), shape=(2, 4)), CFG)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_run_config_factory_takes_remat():
    # What `model: {args: {remat: full}}` in a run configuration calls.
    assert nnx.eval_shape(lambda: gpt(preset="tiny", remat="full", rngs=nnx.Rngs(0))).blocks.remat == "full"
    with pytest.raises(tx.TitanaxError, match="GPTConfig") as err:
        GPTConfig(remat="everything")
    assert "none, full, save_dots, save_dots_no_batch, offload" in err.value.suggestion
