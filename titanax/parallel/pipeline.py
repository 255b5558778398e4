"""Pipeline execution of a ``tx.nn.LayerStack``: stages on a mesh axis, one SPMD program.

The stack's parameters ``[L, ...]`` are viewed as ``[v, p, L / (v p), ...]`` (repeat, stage,
layers of one chunk); the stage axis is split over the pipeline axis. Inside ``jax.shard_map``
over that axis alone (the other mesh axes stay under GSPMD, so tensor and data parallelism keep
working inside a stage), a ``jax.lax.scan`` over the schedule's ticks runs every stage at once and
moves activations to the next stage with ``ppermute`` — outside every conditional, since a
``ppermute`` under a per-device ``lax.cond`` compiles and then deadlocks.

``gpipe`` and ``circular`` run the forward loop here; their backward is JAX's autodiff of it.
Bubble slots compute on garbage (NaN in the test mode ``PP(nan_bubbles=True)``) and never touch a
result: outputs are written by ``select``, and each tick's parameters are
``where(valid, w, stop_gradient(w))``, so an idle tick's parameter gradient is dropped by a select,
never multiplied (``0 * NaN`` would be NaN).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from titanax.exceptions import PlanError
from titanax.parallel.remat import remat
from titanax.parallel.manual import as_varying

__all__ = ["current_pipeline", "pipeline_context", "pipeline_forward"]


@dataclasses.dataclass(frozen=True)
class ActivePipeline:
    """What a ``LayerStack`` needs to run as a pipeline: the plan's ``PP`` part and the mesh."""

    pp: Any
    mesh: Mesh


class _Active(threading.local):
    def __init__(self) -> None:
        self.stack: list[ActivePipeline | None] = []


_ACTIVE = _Active()


@contextlib.contextmanager
def pipeline_context(pp: Any, mesh: Mesh) -> Iterator[None]:
    """Make ``pp`` (a ``tx.PP`` or ``None``) the pipeline a ``LayerStack`` traced inside runs by."""
    _ACTIVE.stack.append(None if pp is None else ActivePipeline(pp, mesh))
    try:
        yield
    finally:
        _ACTIVE.stack.pop()


def current_pipeline() -> ActivePipeline | None:
    """The innermost active pipeline, or ``None`` (no plan with ``PP``, or not tracing one)."""
    return _ACTIVE.stack[-1] if _ACTIVE.stack else None


def check_pipelined_model(module: Any, pp: Any) -> None:
    """A model under ``PP`` holds exactly one ``tx.nn.LayerStack``, whose layers split into
    ``stages * repeats`` chunks.

    Raises:
      PlanError: naming what is missing or what does not divide.
    """
    from flax import nnx

    from titanax.nn.stack import LayerStack

    stacks = [node for _, node in nnx.iter_graph(module) if isinstance(node, LayerStack)]
    if len(stacks) != 1:
        raise PlanError(
            f"pipeline parallelism needs exactly one tx.nn.LayerStack in the model; found {len(stacks)}",
            suggestion="hold the repeated block in one tx.nn.LayerStack(make_block, num_layers, rngs=rngs), "
            "or drop pipeline_parallel from the plan",
        )
    chunks = pp.stages * pp.repeats
    if stacks[0].num_layers % chunks:
        raise PlanError(
            f"the layer stack has {stacks[0].num_layers} layers, which do not split into {pp.stages} stages x "
            f"{pp.repeats} repeats ({chunks} equal chunks)",
            suggestion=f"use a layer count that is a multiple of {chunks}, or change PP(stages=, repeats=)",
        )


def split_layers(stacked: Any, num_layers: int, stages: int, repeats: int) -> Any:
    """``[L, ...]`` leaves viewed as ``[repeats, stages, L / (repeats * stages), ...]``.

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
    return jax.tree.map(lambda a: a.reshape(repeats, stages, per_chunk, *a.shape[1:]), stacked)


def merge_layers(chunked: Any) -> Any:
    """Inverse of :func:`split_layers`."""
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[3:]), chunked)


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


def pipeline_forward(stage_fn: Callable[[Any, jax.Array], jax.Array], stacked: Any, x: jax.Array,
                     num_layers: int, active: ActivePipeline) -> jax.Array:
    """Run ``x`` through the layer stack as a gpipe or circular pipeline.

    Args:
      stage_fn: ``(chunk, x) -> y`` running one chunk of layers (leaves ``[L / (v p), ...]``).
      stacked: the stack's variables, leaves ``[L, ...]``.
      x: the stack's input ``[B, ...]`` (the global batch).
      num_layers: ``L``.
      active: the plan's ``PP`` part and the mesh.

    Returns:
      The stack's output, ``[B, ...]``, equal to running the layers in order.
    """
    pp, mesh = active.pp, active.mesh
    axis, p, m, v = pp.axis, pp.stages, pp.microbatches, pp.repeats
    schedule = pp.schedule_table()
    ticks = schedule.forward_ticks
    f_mb = jnp.asarray(schedule.forward_mb[:ticks])
    f_rep = jnp.asarray(schedule.forward_repeat[:ticks])
    # The previous tick's row tells stage 0 which microbatch just arrived from the last stage.
    prev_mb = jnp.asarray(np.vstack([np.full((1, p), -1, np.int32), schedule.forward_mb[:ticks - 1]]))
    prev_rep = jnp.asarray(np.vstack([np.zeros((1, p), np.int32), schedule.forward_repeat[:ticks - 1]]))
    chunked = split_layers(stacked, num_layers, p, v)
    x_mb = split_microbatches(x, m)
    body_fn = remat(stage_fn, pp.remat)
    ring = [(j, (j + 1) % p) for j in range(p)]

    def per_stage(chunks: Any, x_mb: jax.Array) -> jax.Array:
        chunks = jax.tree.map(lambda a: a[:, 0], chunks)  # [v, layers per chunk, ...] of this stage
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
            chunk = jax.tree.map(lambda w: jnp.where(valid, w, jax.lax.stop_gradient(w)), chunk)
            y = body_fn(chunk, inp)
            done = valid & last & (r == v - 1)
            outputs = outputs.at[i].set(jnp.where(done, y, outputs[i]))
            return (jax.lax.ppermute(y, axis, ring), parked, outputs), None

        parked = as_varying(jnp.zeros_like(x_mb) if v > 1 else jnp.zeros_like(x_mb[:1]), axis)
        carry = (zeros, parked, as_varying(jnp.zeros_like(x_mb), axis))
        (_, _, outputs), _ = jax.lax.scan(tick, carry, (f_mb, f_rep, prev_mb, prev_rep),
                                          unroll=pp.unroll_ticks)
        return outputs[None]

    leaf_spec = PartitionSpec(None, axis)
    run = jax.shard_map(per_stage, mesh=mesh, in_specs=(jax.tree.map(lambda _: leaf_spec, chunked), PartitionSpec()),
                        out_specs=PartitionSpec(axis), axis_names=frozenset({axis}))
    y_mb = run(chunked, x_mb)[p - 1]
    return merge_microbatches(y_mb)
