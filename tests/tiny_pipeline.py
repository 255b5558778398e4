"""A tiny pipelined language model, its data and its step, for tests that need a whole run with
pipeline parallelism but little compile time (the reports' tests): an embedding, a
``tx.nn.LayerStack`` of residual MLP blocks (the pipelined part) and the embedding as the head.

A run configuration names them ``tiny_pipeline:TinyStack``, ``tiny_pipeline:tokens`` and
``tiny_pipeline:train_step`` (``tests/`` is on the import path)."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

import titanax as tx

VOCAB, WIDTH, HIDDEN, SEQ = 32, 16, 32, 8


def _init(init, *names):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class Block(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs) -> None:
        normal = nnx.initializers.normal(0.1)
        self.up = nnx.Linear(WIDTH, HIDDEN, rngs=rngs, kernel_init=_init(normal, "embed", "mlp"),
                             bias_init=_init(nnx.initializers.zeros, "mlp"))
        self.down = nnx.Linear(HIDDEN, WIDTH, rngs=rngs, kernel_init=_init(normal, "mlp", "embed"),
                               use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(x)))


class TinyStack(nnx.Module):
    """Tokens -> embedding -> ``num_layers`` blocks -> logits over the vocabulary."""

    def __init__(self, num_layers: int = 4, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs,
                               embedding_init=_init(nnx.initializers.normal(1.0), "vocab", "embed"))
        self.blocks = tx.nn.LayerStack(lambda r: Block(rngs=r), num_layers, rngs=rngs)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return self.embed.attend(self.blocks(self.embed(tokens_BT)))


def tokens(*, batch_size: int, seed: int) -> tx.data.DataSource:
    """Random token sequences (``SEQ + 1`` long: inputs and next-token targets), no held-out set."""
    tokens_BT = np.random.default_rng(seed).integers(0, VOCAB, size=(batch_size, SEQ + 1)).astype(np.int32)
    return tx.data.DataSource(train=lambda: [{"tokens": tokens_BT}], example={"tokens": tokens_BT},
                              vocab_size=VOCAB, tokens_per_example=SEQ)


@tx.step_fn
def train_step(state, batch):
    def loss(params):
        logits_BTV = state.apply(params, batch["tokens"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["tokens"][:, 1:]).mean()

    value, grads = tx.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), {"loss": value}


CONFIG = {
    "model": {"factory": "tiny_pipeline:TinyStack", "args": {"num_layers": 4}},
    "data": {"factory": "tiny_pipeline:tokens", "batch_size": 8},
    "mesh": {"axes": ["pipe", "data", "tensor"], "shape": [2, 2, 2]},
    "plan": {"pipeline_parallel": {"axis": "pipe", "stages": 2, "microbatches": 2, "schedule": "gpipe"},
             "data_parallel": {"axis": "data"}, "tensor_parallel": {"axis": "tensor"}},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "train": {"step": "tiny_pipeline:train_step", "steps": 2},
    "logging": {"every": 1},
}
"""A whole run of the model: PP 2 x DP 2 x TP 2 on 8 devices, gpipe."""
