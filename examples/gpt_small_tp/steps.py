"""The GPT example's training and evaluation steps (written for the global batch)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

import titanax as tx
from examples.gpt_small_tp.model import next_token_loss


def loss_of(params: Any, state: tx.TrainState, batch: dict) -> jax.Array:
    """Next-token loss of a batch of ``[B, T + 1]`` token windows."""
    tokens_BT1 = batch["tokens"].astype(jnp.int32)
    return next_token_loss(state.apply(params, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])


@tx.step_fn
def train_step(state: tx.TrainState, batch: dict):
    """One update. ``tx.value_and_grad`` is ``jax.value_and_grad``, except under a 1f1b/interleaved
    pipeline, where it runs forward and backward together with the loss on the last stage."""
    loss, grads = tx.value_and_grad(loss_of)(state.params, state, batch)
    return state.apply_gradients(grads=grads), {"loss": loss}


def eval_step(state: tx.TrainState, batch: dict) -> dict:
    return {"loss": loss_of(state.params, state, batch)}


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """``exp`` of the mean held-out loss (a mean of per-batch perplexities would be wrong)."""
    import math

    return {"perplexity": math.exp(metrics["loss"])}
