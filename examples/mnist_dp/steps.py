"""The training and evaluation steps of the digits examples.

``train_step`` is written for the global batch (GSPMD: XLA inserts the gradient all-reduce under
any plan); ``manual_train_step`` sees one device's slice of the batch and writes the data-parallel
collectives itself (``examples/configs/mnist_dp_manual.yaml``).
"""

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


@tx.step_fn(manual=True)
def manual_train_step(state: tx.TrainState, batch: dict):
    """One update written per device (``shard_map``): this device's slice of the batch, gradients
    and metrics averaged over the ``data`` axis by hand. Goes with a data-parallel plan over ``data``."""
    (loss, accuracy), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(state.params, state, batch)
    grads = tx.collectives.pmean(grads, "data")
    metrics = tx.collectives.pmean({"loss": loss, "accuracy": accuracy}, "data")
    return state.apply_gradients(grads=grads), metrics


def eval_step(state: tx.TrainState, batch: dict) -> dict:
    loss, accuracy = loss_and_accuracy(state.params, state, batch)
    return {"loss": loss, "accuracy": accuracy}
