"""A small CNN for handwritten digits, in plain Flax Linen.

No parallelism here: the model only names what its dense dimensions mean (``mlp``), so a plan can
split them; data parallelism needs no names at all.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
    """conv 3x3 (32) -> conv 3x3 (64) -> 2x2 average pool -> dense (128) -> dense (classes)."""

    classes: int = 10
    hidden: int = 128

    @nn.compact
    def __call__(self, images_BHWC: jax.Array) -> jax.Array:
        x = jax.nn.relu(nn.Conv(32, (3, 3), name="conv1")(images_BHWC))
        x = jax.nn.relu(nn.Conv(64, (3, 3), name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x_BD = x.reshape((x.shape[0], -1))
        kernel = nn.initializers.lecun_normal()
        h_BF = nn.Dense(self.hidden, name="hidden",
                        kernel_init=nn.with_logical_partitioning(kernel, (None, "mlp")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x_BD)
        h_BF = jax.nn.relu(h_BF)
        return nn.Dense(self.classes, name="logits",
                        kernel_init=nn.with_logical_partitioning(kernel, ("mlp", None)))(h_BF)


def cross_entropy(logits_BC: jax.Array, labels_B: jax.Array) -> jax.Array:
    logp_BC = jax.nn.log_softmax(logits_BC)
    return -jnp.mean(jnp.take_along_axis(logp_BC, labels_B[:, None], axis=-1))
