"""Pipeline execution of a layer stack (gpipe, circular): stages on a mesh axis, one SPMD program.

The stack's parameters ``[L, ...]`` are stored in *pipeline order* (``titanax.parallel.layer_order``):
device ``s`` of the pipeline axis holds, contiguously, its ``v`` chunks of ``L / (v p)`` layers,
so viewing them as ``[p, v, L / (v p), ...]`` moves nothing. Inside ``jax.shard_map`` over that
axis alone (the other mesh axes stay under GSPMD, so tensor and data parallelism keep working
inside a stage), a ``jax.lax.scan`` over the schedule's ticks runs every stage at once and moves
activations to the next stage with ``ppermute`` — outside every conditional, since a
``ppermute`` under a per-device ``lax.cond`` compiles and then deadlocks.

``gpipe`` and ``circular`` run the forward loop here; their backward is JAX's autodiff of it. A
stage computes only on the ticks its table marks busy: the chunk runs under a ``lax.cond`` (the
branch is the same on every device of a stage, so the tensor-parallel collectives inside it stay
matched), idle ticks pass zeros on, and autodiff turns the conditional into one in the backward
loop too. Idle slots never touch a result (``PP(nan_bubbles=True)`` feeds them NaN to prove it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from titanax.exceptions import PlanError
from titanax.nn.remat import remat
from titanax.parallel.busy import busy_scope
from titanax.parallel.manual import as_varying

__all__ = ["chunk_fn", "from_chunks", "pipeline_forward", "to_chunks"]


def to_chunks(stacked: Any, num_layers: int, stages: int, repeats: int) -> Any:
    """Pipeline-ordered ``[L, ...]`` leaves viewed as ``[stages, repeats, L / (stages * repeats), ...]``
    (a local reshape: each stage's block of the pipeline axis is its chunks).

    Raises:
      PlanError: ``L`` is not a multiple of ``stages * repeats``.
    """
    chunks = stages * repeats
    if num_layers % chunks:
        raise PlanError(
            f"the layer stack has {num_layers} layers, which do not split into {stages} stages x "
            f"{repeats} repeats ({chunks} equal chunks)",
            suggestion=f"use a layer count that is a multiple of {chunks}, or change PP(stages=, repeats=) "
            f"so that stages x repeats divides {num_layers}",
        )
    per_chunk = num_layers // chunks
    return jax.tree.map(lambda a: a.reshape(stages, repeats, per_chunk, *a.shape[1:]), stacked)


def from_chunks(chunked: Any) -> Any:
    """Inverse of :func:`to_chunks`."""
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[3:]), chunked)


def chunk_fn(layer: Callable[[jax.Array, Any], jax.Array], unroll: int | bool) -> Callable[[Any, jax.Array], jax.Array]:
    """``(chunk, h) -> h``: the layers of one chunk (leaves ``[layers, ...]``) in order."""

    def run(chunk: Any, h: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda c, lp: (layer(c, lp), None), h, chunk, unroll=unroll)[0]

    return run


def split_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    """``[B, ...] -> [m, B / m, ...]``: microbatch ``j`` takes rows ``j, j + m, j + 2m, ...``, so each
    device's slice of a batch-split array splits locally, with no data movement."""
    batch = x.shape[0]
    if batch % microbatches:
        raise PlanError(f"a batch of {batch} does not split into PP(microbatches={microbatches})",
                        suggestion=f"use a global batch that is a multiple of {microbatches}")
    return jnp.swapaxes(x.reshape(batch // microbatches, microbatches, *x.shape[1:]), 0, 1)


def merge_microbatches(x_mb: jax.Array) -> jax.Array:
    """Inverse of :func:`split_microbatches`."""
    return jnp.swapaxes(x_mb, 0, 1).reshape(-1, *x_mb.shape[2:])


def pipeline_forward(layer: Callable[[jax.Array, Any], jax.Array], stacked: Any, x: jax.Array, pp: Any,
                     mesh: Mesh, *, unroll: int | bool = 1) -> jax.Array:
    """Run ``x`` through the layer stack as a gpipe or circular pipeline (the forward loop; any
    schedule's forward part, for evaluation).

    Args:
      layer: ``(h, layer_params) -> h``, one layer.
      stacked: the stack's parameters, leaves ``[L, ...]`` in pipeline order.
      x: the stack's input ``[B, ...]`` (the global batch).
      pp: the plan's ``tx.PP``.
      mesh: the mesh holding ``pp.axis``.
      unroll: layers per iteration of the scan over a chunk's layers.

    Returns:
      The stack's output, ``[B, ...]``, equal to running the layers in order.
    """
    axis, p, m, v = pp.axis, pp.stages, pp.microbatches, pp.repeats
    schedule = pp.forward_table()
    ticks = schedule.forward_ticks
    f_mb = jnp.asarray(schedule.forward_mb[:ticks])
    busy = int((schedule.forward_mb[:ticks] >= 0).sum())
    f_rep = jnp.asarray(schedule.forward_repeat[:ticks])
    # The previous tick's row tells stage 0 which microbatch just arrived from the last stage.
    prev_mb = jnp.asarray(np.vstack([np.full((1, p), -1, np.int32), schedule.forward_mb[:ticks - 1]]))
    prev_rep = jnp.asarray(np.vstack([np.zeros((1, p), np.int32), schedule.forward_repeat[:ticks - 1]]))
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    chunked = to_chunks(stacked, num_layers, p, v)
    x_mb = split_microbatches(x, m)
    body_fn = remat(chunk_fn(layer, unroll), pp.remat)
    ring = [(j, (j + 1) % p) for j in range(p)]

    def per_stage(chunks: Any, x_mb: jax.Array) -> jax.Array:
        chunks = jax.tree.map(lambda a: a[0], chunks)  # [v, layers per chunk, ...] of this stage
        # Cast the replicated input to per-stage once, here: read inside the loop instead, the
        # transpose of that implicit cast is a psum over the stages on every backward tick.
        x_mb = as_varying(x_mb, axis)
        s = jax.lax.axis_index(axis)
        first, last = s == 0, s == p - 1
        zeros = as_varying(jnp.zeros_like(x_mb[0]), axis)

        def tick(carry, row):
            arrived, parked, outputs = carry
            mb_row, rep_row, prev_mb_row, prev_rep_row = row
            # A microbatch leaving the last stage before its final repeat waits at stage 0.
            came_back = first & (prev_mb_row[p - 1] >= 0) & (prev_rep_row[p - 1] < v - 1)
            slot = jnp.maximum(prev_mb_row[p - 1], 0)
            parked = parked.at[slot].set(jnp.where(came_back, arrived, parked[slot]))
            i, r = mb_row[s], rep_row[s]
            valid = i >= 0
            i, r = jnp.maximum(i, 0), jnp.maximum(r, 0)
            fresh = jnp.where(r == 0, x_mb[i], parked[i])
            inp = jnp.where(first, fresh, arrived)
            if pp.nan_bubbles:
                inp = jnp.where(valid, inp, jnp.nan)
            chunk = jax.tree.map(lambda a: a[r], chunks)
            with busy_scope("forward", busy, ticks * p):
                y = jax.lax.cond(valid, body_fn, lambda _, h: jnp.zeros_like(h), chunk, inp)
            done = valid & last & (r == v - 1)
            outputs = outputs.at[i].set(jnp.where(done, y, outputs[i]))
            return (jax.lax.ppermute(y, axis, ring), parked, outputs), None

        parked = as_varying(jnp.zeros_like(x_mb) if v > 1 else jnp.zeros_like(x_mb[:1]), axis)
        carry = (zeros, parked, as_varying(jnp.zeros_like(x_mb), axis))
        (_, _, outputs), _ = jax.lax.scan(tick, carry, (f_mb, f_rep, prev_mb, prev_rep),
                                          unroll=pp.unroll_ticks)
        return outputs[None]

    run = jax.shard_map(per_stage, mesh=mesh,
                        in_specs=(jax.tree.map(lambda _: PartitionSpec(axis), chunked), PartitionSpec()),
                        out_specs=PartitionSpec(axis), axis_names=frozenset({axis}))
    y_mb = run(chunked, x_mb)[p - 1]
    return merge_microbatches(y_mb)
