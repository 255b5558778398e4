"""The training step of the digits examples (GSPMD: written for the global batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import titanax as tx
from examples.mnist_dp.model import cross_entropy


def loss_and_accuracy(params, state: tx.TrainState, batch: dict) -> tuple[jax.Array, jax.Array]:
    logits = state.apply(params, batch["image"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return cross_entropy(logits, batch["label"]), accuracy


@tx.step_fn
def train_step(state: tx.TrainState, batch: dict):
    """One update on the global batch; XLA inserts the gradient all-reduce."""
    (loss, accuracy), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(state.params, state, batch)
    return state.apply_gradients(grads=grads), {"loss": loss, "accuracy": accuracy}


def eval_step(state: tx.TrainState, batch: dict) -> dict:
    loss, accuracy = loss_and_accuracy(state.params, state, batch)
    return {"loss": loss, "accuracy": accuracy}
