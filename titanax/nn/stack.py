"""``LayerStack``: ``num_layers`` copies of an NNX block held as one stacked module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from titanax.exceptions import TitanaxError

__all__ = ["LayerStack"]

LAYERS = "layers"


class LayerStack(nnx.Module):
    """A repeated block stored once, with a leading ``layers`` axis on every variable.

    Each variable of the block gets the logical name ``layers`` in front of its own names, so
    rules place the stack like any other parameter, and the stack runs by one ``jax.lax.scan``
    over that axis: compile time does not grow with depth. The block maps an activation to an
    activation of the same shape (``x -> block(x)``).

    Args:
      make_block: builds one block from an ``nnx.Rngs`` (``lambda rngs: Block(cfg, rngs=rngs)``);
        called once under ``nnx.vmap``, so every layer gets its own initialization.
      num_layers: how many blocks.
      rngs: the random streams; split once per layer.
      unroll: layers per iteration of the scan (``True``: all of them, i.e. no loop); unrolling
        trades compile time for scheduling freedom across layers.

    Example:
      >>> stack = tx.nn.LayerStack(lambda rngs: Block(cfg, rngs=rngs), 12, rngs=nnx.Rngs(0))  # doctest: +SKIP
      >>> y_BTD = stack(x_BTD)
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                 rngs: nnx.Rngs, unroll: int | bool = 1) -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise TitanaxError(f"LayerStack(num_layers={num_layers!r}) must be a positive integer",
                               suggestion="pass the number of blocks, e.g. LayerStack(make_block, 12, rngs=rngs)")
        self.num_layers = num_layers
        self.unroll = unroll

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def create(layer_rngs: nnx.Rngs) -> nnx.Module:
            return make_block(layer_rngs)

        self.layer = create(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(self.layer)

        def layer(carry: jax.Array, layer_state: Any) -> tuple[jax.Array, Any]:
            block = nnx.merge(graphdef, layer_state)
            return block(carry), nnx.state(block)

        with jax.named_scope(f"{type(self.layer).__name__}_stack"):
            y, new_state = jax.lax.scan(layer, x, state, unroll=self.unroll)
        nnx.update(self.layer, new_state)
        return y
