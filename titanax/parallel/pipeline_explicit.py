"""1F1B and interleaved pipelines: forward and backward in one scanned loop, driven by the table.

Autodiff of a forward loop (gpipe, circular) keeps every tick's activations until the backward
starts, so memory grows with the microbatch count. Here each stage instead keeps only the
*inputs* of the microbatches between their forward and their backward (a ring of stash slots
assigned from the schedule table), and its backward recomputes the stage from that input with
``jax.vjp``. The loss therefore has to be computed inside the pipeline: the last stage runs the
rest of the model (the head and the loss) on each microbatch as soon as it leaves the stack.

:func:`value_and_grad` splits the user's loss function at the ``LayerStack`` by running it in two
modes: *capture* (stop at the stack, return its input: the embedding part) and *inject* (the stack
returns a given output: the head and loss part). The three parts' gradients add up to the
gradient of the whole loss, which is the mean of the microbatch losses (as for any loss that is
a mean over examples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from titanax.exceptions import PlanError
from titanax.parallel.remat import remat
from titanax.parallel.manual import as_varying
from titanax.parallel.pipeline import (ActivePipeline, merge_layers, merge_microbatches, split_layers,
                                       split_microbatches)
from titanax.parallel.schedules import Schedule
from titanax.parallel.sharding import path_string

__all__ = ["StackCaptured", "compile_schedule", "current_stack_mode", "needs_explicit", "stack_mode",
           "value_and_grad"]


class StackCaptured(Exception):
    """Raised by a ``LayerStack`` in capture mode: carries its input and how to run it."""

    def __init__(self, x: jax.Array, params: Any, stage_fn: Callable[[Any, jax.Array], jax.Array],
                 num_layers: int, active: ActivePipeline | None) -> None:
        super().__init__("LayerStack reached in capture mode")
        self.x, self.params, self.stage_fn = x, params, stage_fn
        self.num_layers, self.active = num_layers, active


@dataclasses.dataclass(frozen=True)
class StackMode:
    kind: str  # "capture" or "inject"
    output: Any = None


class _Modes(threading.local):
    def __init__(self) -> None:
        self.stack: list[StackMode] = []


_MODES = _Modes()


@contextlib.contextmanager
def stack_mode(mode: StackMode) -> Iterator[None]:
    _MODES.stack.append(mode)
    try:
        yield
    finally:
        _MODES.stack.pop()


def current_stack_mode() -> StackMode | None:
    return _MODES.stack[-1] if _MODES.stack else None


# --------------------------------------------------------------------------- the table, compiled
@dataclasses.dataclass(frozen=True)
class _Program:
    """Per tick and stage, everything the loop body reads (int32 ``[ticks, stages]`` each)."""

    columns: dict[str, np.ndarray]
    stash_slots: int
    cotangent_slots: int


def _assign_slots(intervals: dict[tuple[int, int, int], tuple[int, int]], stages: int) -> tuple[dict, int]:
    """Greedy interval colouring per stage: a slot is reused once its last reader's tick has passed."""
    slots: dict[tuple[int, int, int], int] = {}
    most = 1
    for s in range(stages):
        busy_until: list[int] = []
        for key, (start, end) in sorted(((k, v) for k, v in intervals.items() if k[0] == s), key=lambda kv: kv[1]):
            for slot, until in enumerate(busy_until):
                if until < start:
                    busy_until[slot] = end
                    break
            else:
                slot = len(busy_until)
                busy_until.append(end)
            slots[key] = slot
        most = max(most, len(busy_until))
    return slots, most


def compile_schedule(schedule: Schedule) -> _Program:
    """Turn a 1F1B-style table into the loop's columns: slots, arrivals and what each slot reads."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.repeats
    last_vs = v * p - 1
    fwd, bwd = schedule.events()
    vs_of = lambda s, r: r * p + s
    where_of = lambda vs: (vs % p, vs // p)  # (stage, repeat)
    stash_iv, cot_iv = {}, {}
    for (s, i, r), tf in fwd.items():
        vs = vs_of(s, r)
        if vs > 0:
            ps, pr = where_of(vs - 1)
            stash_iv[(s, i, r)] = (fwd[(ps, i, pr)] + 1, bwd[(s, i, r)])
        if vs < last_vs:
            ns, nr = where_of(vs + 1)
            cot_iv[(s, i, r)] = (bwd[(ns, i, nr)] + 1, bwd[(s, i, r)])
        else:
            cot_iv[(s, i, r)] = (tf, bwd[(s, i, r)])
    stash, n_stash = _assign_slots(stash_iv, p)
    cots, n_cots = _assign_slots(cot_iv, p)
    T = schedule.ticks
    names = ("f_mb", "f_rep", "f_slot", "f_cot", "b_mb", "b_rep", "b_slot", "b_cot",
             "a_valid", "a_slot", "c_valid", "c_slot")
    col = {n: np.zeros((T, p), np.int32) for n in names}
    col["f_mb"][:] = schedule.forward_mb
    col["f_rep"][:] = np.maximum(schedule.forward_repeat, 0)
    col["b_mb"][:] = schedule.backward_mb
    col["b_rep"][:] = np.maximum(schedule.backward_repeat, 0)
    for (s, i, r), t in fwd.items():
        col["f_slot"][t, s] = stash.get((s, i, r), 0)
        col["f_cot"][t, s] = cots[(s, i, r)]
        vs = vs_of(s, r)
        if vs < last_vs and t + 1 < T:  # the output arrives at the next virtual stage next tick
            ns, nr = where_of(vs + 1)
            col["a_valid"][t + 1, ns], col["a_slot"][t + 1, ns] = 1, stash[(ns, i, nr)]
    for (s, i, r), t in bwd.items():
        col["b_slot"][t, s] = stash.get((s, i, r), 0)
        col["b_cot"][t, s] = cots[(s, i, r)]
        vs = vs_of(s, r)
        if vs > 0 and t + 1 < T:
            ps, pr = where_of(vs - 1)
            col["c_valid"][t + 1, ps], col["c_slot"][t + 1, ps] = 1, cots[(ps, i, pr)]
    return _Program(col, n_stash, n_cots)


# ------------------------------------------------------------------------------------ executor
def _run_explicit(stage_fn: Callable[[Any, jax.Array], jax.Array], stacked: Any, num_layers: int,
                  x: jax.Array, others: list[jax.Array], batch: Any,
                  tail: Callable[[list[jax.Array], jax.Array, Any], jax.Array],
                  active: ActivePipeline) -> tuple[jax.Array, Any, list[jax.Array], jax.Array]:
    """The scanned 1F1B loop. Returns ``(loss, stack grads, other-parameter grads from the tail,
    input cotangent)``; the loss is the mean of the microbatch losses."""
    pp, mesh = active.pp, active.mesh
    axis, p, m, v = pp.axis, pp.stages, pp.microbatches, pp.repeats
    program = compile_schedule(pp.schedule_table())
    chunked = split_layers(stacked, num_layers, p, v)
    x_mb = split_microbatches(x, m)
    batch_mb = jax.tree.map(lambda a: split_microbatches(a, m), batch)
    body = remat(stage_fn, pp.remat)
    fwd_ring = [(j, (j + 1) % p) for j in range(p)]
    bwd_ring = [((j + 1) % p, j) for j in range(p)]
    names = tuple(program.columns)

    def per_stage(chunks, x_mb, others, batch_mb, *columns):
        chunks = jax.tree.map(lambda a: a[:, 0], chunks)
        s = jax.lax.axis_index(axis)
        first, last = s == 0, s == p - 1
        act0 = as_varying(jnp.zeros_like(x_mb[0]), axis)

        def tail_branch(y, i):
            batch_i = jax.tree.map(lambda a: a[i], batch_mb)
            # Differentiate with respect to per-stage (varying) copies: the gradient of a value
            # replicated over the pipeline axis would be a psum over it, inside this branch that
            # only the last stage takes, and a collective only some devices reach never completes.
            varying = [as_varying(o, axis) for o in others]
            loss_i, pullback = jax.vjp(lambda o, h: tail(o, h, batch_i) / m, varying, y)
            d_others, dy = pullback(jnp.ones_like(loss_i))
            return jax.tree.map(lambda a: as_varying(a, axis), (loss_i.astype(jnp.float32), d_others, dy))

        def no_tail(y, i):
            zeros = (jnp.zeros((), jnp.float32), [jnp.zeros_like(o) for o in others], jnp.zeros_like(y))
            return jax.tree.map(lambda a: as_varying(a, axis), zeros)

        def tick(carry, row):
            stash, cbuf, act_in, cot_in, g_chunks, g_others, loss, dx_out = carry
            c = dict(zip(names, (r[0] for r in row)))
            stash = stash.at[c["a_slot"]].set(jnp.where(c["a_valid"] == 1, act_in, stash[c["a_slot"]]))
            cbuf = cbuf.at[c["c_slot"]].set(jnp.where(c["c_valid"] == 1, cot_in, cbuf[c["c_slot"]]))
            # Forward slot.
            f_valid, fi, fr = c["f_mb"] >= 0, jnp.maximum(c["f_mb"], 0), c["f_rep"]
            x_in = jnp.where(first & (fr == 0), x_mb[fi], stash[c["f_slot"]])
            if pp.nan_bubbles:
                x_in = jnp.where(f_valid, x_in, jnp.nan)
            y = body(jax.tree.map(lambda a: a[fr], chunks), x_in)
            ends = f_valid & last & (fr == v - 1)
            # Only the last stage runs the head and loss; the branch holds no pipe-axis collective.
            loss_i, d_others, dy = jax.lax.cond(ends, tail_branch, no_tail, y, fi)
            cbuf = cbuf.at[c["f_cot"]].set(jnp.where(ends, dy.astype(cbuf.dtype), cbuf[c["f_cot"]]))
            loss = loss + loss_i
            g_others = [g + d for g, d in zip(g_others, d_others)]
            # Backward slot: recompute the stage from its stashed input.
            b_valid, bi, br = c["b_mb"] >= 0, jnp.maximum(c["b_mb"], 0), c["b_rep"]
            b_first = first & (br == 0)
            x_b = jnp.where(b_first, x_mb[bi], stash[c["b_slot"]])
            if pp.nan_bubbles:
                x_b = jnp.where(b_valid, x_b, jnp.nan)
            _, pullback = jax.vjp(body, jax.tree.map(lambda a: a[br], chunks), x_b)
            d_chunk, dx = pullback(cbuf[c["b_cot"]])
            g_chunks = jax.tree.map(lambda g, d: g.at[br].add(jnp.where(b_valid, d, jnp.zeros_like(d))),
                                    g_chunks, d_chunk)
            dx_out = dx_out.at[bi].set(jnp.where(b_valid & b_first, dx, dx_out[bi]))
            act_in = jax.lax.ppermute(y, axis, fwd_ring)
            cot_in = jax.lax.ppermute(dx, axis, bwd_ring)
            return (stash, cbuf, act_in, cot_in, g_chunks, g_others, loss, dx_out), None

        carry = (as_varying(jnp.zeros((program.stash_slots, *x_mb.shape[1:]), x_mb.dtype), axis),
                 as_varying(jnp.zeros((program.cotangent_slots, *x_mb.shape[1:]), x_mb.dtype), axis),
                 act0, act0,
                 jax.tree.map(lambda a: as_varying(jnp.zeros_like(a), axis), chunks),
                 [as_varying(jnp.zeros_like(o), axis) for o in others],
                 as_varying(jnp.zeros((), jnp.float32), axis),
                 as_varying(jnp.zeros_like(x_mb), axis))
        (_, _, _, _, g_chunks, g_others, loss, dx_out), _ = jax.lax.scan(tick, carry, columns,
                                                                                  unroll=pp.unroll_ticks)
        # Per-stage partial sums leave the shard_map stacked on the pipeline axis and are summed
        # by GSPMD outside: a psum over the manual axis of an array still split over the auto
        # axes trips XLA's partitioner (jax 0.10).
        return loss[None], jax.tree.map(lambda a: a[:, None], g_chunks), [g[None] for g in g_others], dx_out[None]

    chunk_spec = jax.tree.map(lambda _: PartitionSpec(None, axis), chunked)
    column_spec = PartitionSpec(None, axis)
    run = jax.shard_map(
        per_stage, mesh=mesh,
        in_specs=(chunk_spec, PartitionSpec(), [PartitionSpec()] * len(others),
                  jax.tree.map(lambda _: PartitionSpec(), batch_mb), *(column_spec,) * len(names)),
        out_specs=(PartitionSpec(axis), chunk_spec, [PartitionSpec(axis)] * len(others), PartitionSpec(axis)),
        axis_names=frozenset({axis}))
    columns = [jnp.asarray(program.columns[n]) for n in names]
    loss, g_chunks, g_others, dx_mb = run(chunked, x_mb, list(others), batch_mb, *columns)
    g_others = [g.sum(axis=0) for g in g_others]
    return loss.sum(), merge_layers(g_chunks), g_others, merge_microbatches(dx_mb[0])


# ------------------------------------------------------------------------- the gradient, split
def _stack_leaf_indices(params: Any, captured: Any) -> list[int]:
    """Positions, among the leaves of ``params``, of the stack's parameters (found by path)."""
    full = [path_string(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    rel = [path_string(k) for k, _ in jax.tree_util.tree_flatten_with_path(captured)[0]]
    suffix = "layer/" + rel[0]
    prefixes = {f[: len(f) - len(suffix)] for f in full if f.endswith(suffix)}
    matches = []
    for prefix in prefixes:
        wanted = [prefix + "layer/" + r for r in rel]
        if all(w in full for w in wanted):
            matches.append([full.index(w) for w in wanted])
    if len(matches) != 1:
        raise PlanError(
            "could not find the pipelined LayerStack's parameters among the parameters given to the loss",
            suggestion="differentiate with respect to the whole parameter tree (state.params), with one "
            "LayerStack in the model",
        )
    return matches[0]


def _capture(loss_fn: Callable[..., Any], treedef: Any, leaves: list[jax.Array],
             args: Sequence[Any]) -> StackCaptured | None:
    """Run ``loss_fn`` until its LayerStack; what the stack saw, or ``None`` if it has none."""
    with stack_mode(StackMode("capture")):
        try:
            loss_fn(jax.tree.unflatten(treedef, leaves), *args)
        except StackCaptured as captured:
            return captured
    return None


def _probe(loss_fn: Callable[..., Any], params: Any, args: Sequence[Any]) -> StackCaptured | None:
    """Trace ``loss_fn`` up to its LayerStack (abstractly); the capture if it runs an explicit schedule."""
    found: list[StackCaptured | None] = []
    flat, treedef = jax.tree.flatten(params)
    jax.eval_shape(lambda leaves: found.append(_capture(loss_fn, treedef, leaves, args)) or 0, flat)
    captured = found[0]
    if captured is None or captured.active is None or captured.active.pp.schedule_table().autodiff:
        return None
    return captured


def needs_explicit(loss_fn: Callable[..., Any], params: Any, args: Sequence[Any]) -> bool:
    """Whether ``loss_fn`` runs a LayerStack under a 1f1b/interleaved pipeline."""
    return _probe(loss_fn, params, args) is not None


def value_and_grad(loss_fn: Callable[..., jax.Array], params: Any, args: Sequence[Any],
                   batch_argnum: int) -> tuple[jax.Array, Any] | None:
    """Loss and gradient of ``loss_fn(params, *args)`` with the stack run by an explicit schedule.

    Returns ``None`` when the model's ``LayerStack`` does not run under a 1F1B-style schedule (the
    caller then uses ``jax.value_and_grad``).
    """
    args = list(args)
    batch = args[batch_argnum]
    flat, treedef = jax.tree.flatten(params)

    def pre(leaves: list[jax.Array]) -> tuple[jax.Array, Any]:
        captured = _capture(loss_fn, treedef, leaves, args)
        if captured is None:
            raise PlanError("the loss function never called the model's LayerStack",
                            suggestion="call the model (state.apply) inside the loss function")
        return captured.x, captured.params

    captured = _probe(loss_fn, params, args)
    if captured is None:
        return None
    (x, stack_params), pullback = jax.vjp(pre, flat)
    stack_idx = _stack_leaf_indices(params, stack_params)
    other_idx = [i for i in range(len(flat)) if i not in set(stack_idx)]
    stack_shapes = [jax.ShapeDtypeStruct(flat[i].shape, flat[i].dtype) for i in stack_idx]

    def tail(others: list[jax.Array], y: jax.Array, batch_i: Any) -> jax.Array:
        leaves: list[Any] = [None] * len(flat)
        for i, o in zip(other_idx, others):
            leaves[i] = o
        for i, shape in zip(stack_idx, stack_shapes):  # unread: the stack returns y
            leaves[i] = jnp.zeros(shape.shape, shape.dtype)
        call_args = list(args)
        call_args[batch_argnum] = batch_i
        with stack_mode(StackMode("inject", y)):
            return loss_fn(jax.tree.unflatten(treedef, leaves), *call_args)

    loss, g_stack, g_others, dx = _run_explicit(
        captured.stage_fn, stack_params, captured.num_layers, x, [flat[i] for i in other_idx], batch,
        tail, captured.active)
    (g_pre,) = pullback((dx.astype(x.dtype), jax.tree.map(lambda g, p: g.astype(p.dtype), g_stack, stack_params)))
    grads = list(g_pre)
    for i, g in zip(other_idx, g_others):
        grads[i] = grads[i] + g.astype(grads[i].dtype)
    return loss, jax.tree.unflatten(treedef, grads)
