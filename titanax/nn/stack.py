"""``LayerStack``: ``num_layers`` copies of an NNX block held as one stacked module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.nnx import spmd

from titanax.exceptions import PlanError, TitanaxError
from titanax.nn.remat import check_policy, remat

__all__ = ["LayerStack"]

LAYERS = "layers"


class LayerStack(nnx.Module):
    """A repeated block stored once, with a leading ``layers`` axis on every variable.

    Each variable of the block gets the logical name ``layers`` in front of its own names, so
    rules place the stack like any other parameter, and the stack runs by one ``jax.lax.scan``
    over that axis: compile time does not grow with depth. The block maps an activation to an
    activation of the same shape (``x -> block(x)``).

    ``remat`` decides what each layer keeps for the backward pass: the scan body (one layer) runs
    under ``jax.checkpoint`` with that policy, so ``"full"`` keeps only each layer's input and
    recomputes the rest of the layer when its gradient is needed.

    The stack knows nothing of parallelism: under a plan with ``tx.PP``, ``tx.shard`` replaces it
    by a ``titanax.parallel.PipelinedStack`` holding the same variables, which runs the layers as
    pipeline stages (the per-layer policy still applies inside each stage).

    Args:
      make_block: builds one block from an ``nnx.Rngs`` (``lambda rngs: Block(cfg, rngs=rngs)``);
        traced once and run once per layer with that layer's keys, so every layer gets its own
        initialization.
      num_layers: how many blocks.
      rngs: the random streams; split once per layer.
      unroll: layers per iteration of the scan (``True``: all of them, i.e. no loop); unrolling
        trades compile time for scheduling freedom across layers.
      remat: what each layer keeps for the backward pass, a key of
        ``tx.nn.REMAT_POLICIES``: ``none`` (everything), ``full`` (only the layer's
        input), ``save_dots``, ``save_dots_no_batch``, ``offload`` (GPU/TPU).

    Raises:
      TitanaxError: ``num_layers`` is not a positive integer.
      PlanError: ``remat`` is not a policy name (the error lists them).

    Example:
      >>> block = lambda rngs: nnx.Linear(16, 16, rngs=rngs)     # any NNX module, x -> x
      >>> stack = tx.nn.LayerStack(block, 12, rngs=nnx.Rngs(0), remat="full")
      >>> stack(jnp.ones((2, 8, 16))).shape                       # 12 layers, one scan
      (2, 8, 16)
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                 rngs: nnx.Rngs, unroll: int | bool = 1, remat: str = "none") -> None:
        if not isinstance(num_layers, int) or num_layers < 1:
            raise TitanaxError(f"LayerStack(num_layers={num_layers!r}) must be a positive integer",
                               suggestion="pass the number of blocks, e.g. LayerStack(make_block, 12, rngs=rngs)")
        self.num_layers = num_layers
        self.unroll = unroll
        self.remat = check_policy(remat, "LayerStack(remat=...)")

        self.layer = _create_layers(make_block, num_layers, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(self.layer)

        def layer(carry: jax.Array, layer_state: Any) -> tuple[jax.Array, Any]:
            block = nnx.merge(graphdef, layer_state)
            return block(carry), nnx.state(block)

        with jax.named_scope(f"{type(self.layer).__name__}_stack"):
            y, new_state = jax.lax.scan(remat(layer, self.remat), x, state, unroll=self.unroll)
        nnx.update(self.layer, new_state)
        return y

    def layer_fn(self) -> tuple[Callable[[jax.Array, Any], jax.Array], Any]:
        """``(layer, params)``: one layer as a pure function ``layer(h, layer_params) -> h`` (under
        the stack's remat policy) and the stacked parameters (leaves ``[num_layers, ...]``).

        What a pipeline runs chunk by chunk; the stack's non-parameter state would have to be
        carried between microbatches and stages, so a block holding any is refused.

        Raises:
          PlanError: the block holds variables other than parameters (dropout RNG counters,
            batch statistics).
        """
        graphdef, params, rest = nnx.split(self.layer, nnx.Param, ...)
        if jax.tree.leaves(rest):
            names = sorted({type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))})
            raise PlanError(
                f"a pipelined LayerStack must hold parameters only; its block also has {', '.join(names)} state",
                suggestion="drop dropout/batch statistics from the repeated block, or train without PP",
            )

        def layer(h: jax.Array, layer_params: Any) -> jax.Array:
            return nnx.merge(graphdef, layer_params, rest)(h)

        return remat(layer, self.remat), params


def _create_layers(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` blocks stacked on a leading ``layers`` axis, created one layer at a time.

    The values are those of ``nnx.vmap`` over the split keys (the same keys, drawn per layer); a
    loop instead of a batch keeps initialization's temporaries to one layer's worth: drawn all at
    once, a device would hold random bits for every layer of the stack, several times its shard
    of the output, before keeping its shard.
    """
    graphdefs: list[Any] = []
    with nnx.split_rngs(rngs, splits=num_layers):
        rngs_graphdef, layer_keys = nnx.split(rngs)

        def one(keys: Any) -> Any:
            graphdef, state = nnx.split(make_block(nnx.merge(rngs_graphdef, keys)))
            graphdefs.append(graphdef)
            return state

        stacked = jax.lax.map(one, layer_keys)

    # As nnx.vmap(transform_metadata=...) does: each variable's logical names gain ``layers``.
    return nnx.merge(graphdefs[0], spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS}))
