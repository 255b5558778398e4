"""``tx.logging.WandB`` in offline mode: a real W&B run written to disk, no network."""

from __future__ import annotations

import glob
import os

import jax.numpy as jnp
import models
import numpy as np
import pytest
from flax import linen as nn

import titanax as tx

wandb = pytest.importorskip("wandb")


regression_step = tx.step_fn(models.regression_step.fn)  # its own compile cache


def test_an_engine_run_logs_to_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = tx.logging.WandB(project="titanax-tests", name="regression", mode="offline", dir=tmp_path,
                              config={"lr": 0.1})
    mesh = tx.MeshSpec(axes=("data",)).build()
    engine = tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP()), optimizer=tx.optim.sgd(0.1),
                       loggers=[logger], log_every=2)
    engine.init(nn.Dense(1), example=jnp.ones((16, 3)))
    data = tx.data.ArrayLoader({"x": np.ones((64, 3), np.float32), "y": np.zeros((64, 1), np.float32)},
                               batch_size=16, seed=0)
    engine.fit(regression_step, data=data, steps=4)
    runs = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, os.listdir(tmp_path)
    record = open(runs[0], "rb").read()
    for key in (b"loss", b"grad_norm", b"lr", b"examples_per_s", b"titanax-tests"):
        assert key in record, key
    assert logger.run is None  # finished when the fit closed its loggers


def test_a_wandb_mode_that_is_not_one_says_which_are():
    with pytest.raises(tx.TitanaxError, match="not a W&B mode") as caught:
        tx.logging.WandB(project="p", mode="offlne")
    assert "'offline'" in caught.value.suggestion
