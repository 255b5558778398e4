"""A non-finite loss never trains on and never reaches a checkpoint: the step skips its update,
the engine stops after ``on_nonfinite`` bad steps in a row naming the first, and the newest
checkpoint on disk is the last good state, which resumes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models as m
import titanax as tx

PLAN = tx.Plan(data_parallel=tx.DP(axis="data"), strict=True)


def make_batches(n: int, bad: tuple[int, ...] = ()) -> list[dict[str, np.ndarray]]:
    """``n`` batches; the ones for the (1-based) steps in ``bad`` hold a NaN."""
    rng = np.random.default_rng(0)
    out = []
    for step in range(1, n + 1):
        x = rng.normal(size=(16, m.EMBED)).astype(np.float32)
        if step in bad:
            x[3, 5] = np.nan
        out.append({"x": x, "y": rng.normal(size=(16, m.EMBED)).astype(np.float32)})
    return out


train_step = m.regression_step


MESH = tx.MeshSpec(axes=("data",)).build()


def engine(**kwargs) -> tx.Engine:
    return tx.Engine(mesh=MESH, plan=PLAN, optimizer=optax.adam(1e-2), **kwargs)


@functools.cache
def model() -> tx.ShardedModel:
    return tx.shard(lambda rngs: m.NNXMLP(rngs), PLAN, MESH, rng=0)


def init(e: tx.Engine) -> tx.TrainState:
    """A fresh state of one sharded model: every engine here reuses the compiled step."""
    return e.init(model())


def all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree)
               if jnp.issubdtype(leaf.dtype, jnp.inexact))


def test_nan_at_step_4_stops_naming_it_and_the_newest_checkpoint_is_finite_and_resumes(tmp_path):
    ckpt = tx.io.OrbaxCheckpoint(tmp_path / "run", every=1, keep=2)
    e = engine(checkpoint=ckpt, log_every=10)
    init(e)
    with pytest.raises(tx.NonFiniteError, match=r"^step 4: the loss or gradients are not finite") as info:
        e.fit(train_step, iter(make_batches(8, bad=(4,))), steps=8)
    assert info.value.step == 4
    assert "on_nonfinite" in info.value.suggestion
    assert ckpt.all_steps() == [2, 3]  # step 4 was never written; the good ones were not rotated out

    fresh = engine(log_every=1)
    restored, _ = tx.io.OrbaxCheckpoint(tmp_path / "run").restore(init(fresh))
    assert int(restored.step) == 3 and all_finite((restored.params, restored.opt_state))
    losses = []
    final = fresh.fit(train_step, iter(make_batches(8)[3:]), steps=6, state=restored,
                      hooks=[lambda i, s, mt: losses.append(mt["loss"])])
    assert int(final.step) == 6 and len(losses) == 3 and np.isfinite(losses).all() and all_finite(final.params)


def test_an_isolated_bad_step_is_skipped_exactly_and_training_goes_on():
    e = engine(log_every=1, on_nonfinite=2)
    init(e)
    seen: dict[int, tuple] = {}
    logged = []

    def keep(i, state, metrics):
        seen[i] = jax.device_get(state.params)
        logged.append(metrics)

    final = e.fit(train_step, iter(make_batches(7, bad=(3, 6))), steps=7, hooks=[keep])
    assert int(final.step) == 7 and all_finite(final.params)
    for before, after in ((2, 3), (5, 6)):  # a skipped step leaves the parameters bit for bit
        jax.tree.map(np.testing.assert_array_equal, seen[before], seen[after])
    assert not np.allclose(jax.tree.leaves(seen[3])[0], jax.tree.leaves(seen[4])[0])
    assert "skipped_steps" not in logged[1] and logged[2]["skipped_steps"] == 1 and logged[6]["skipped_steps"] == 2


def test_consecutive_bad_steps_up_to_the_limit_stop_the_run():
    e = engine(log_every=10, on_nonfinite=2)
    init(e)
    with pytest.raises(tx.NonFiniteError, match=r"^steps 3 to 4 \(2 in a row\)") as info:
        e.fit(train_step, iter(make_batches(8, bad=(3, 4))), steps=8)
    assert info.value.step == 3


def test_on_nonfinite_must_be_a_positive_integer():
    with pytest.raises(tx.ConfigError, match="on_nonfinite"):
        engine(on_nonfinite=0)
    assert engine().on_nonfinite == 1
    assert engine(precision=tx.Precision(compute="float16", loss_scale="dynamic")).on_nonfinite == 17
