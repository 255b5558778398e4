"""1F1B, interleaved and ZB-H1 pipelines: forward and backward in one scanned loop, driven by the table.

Autodiff of a forward loop (gpipe, circular) keeps every tick's activations until the backward
starts, so memory grows with the microbatch count. Here a stage keeps a microbatch only between
its forward and its backward: the forward slot runs each layer under ``jax.vjp`` and stashes the
residuals the backward will read (``PP(remat=)`` decides how many; ``PP(recompute=True)`` keeps
only the stage's input and recomputes the stage instead), in a ring of slots assigned from the
schedule table. The loss therefore runs inside the pipeline: the last stage runs the rest of the
model (head and loss) on each microbatch as soon as it leaves the stack.

Every slot computes only on the ticks its table marks busy: each runs under a ``lax.cond`` whose
branch is the same on every device of a stage (tensor-parallel collectives inside it stay
matched); the two ``ppermute`` of a tick (activations forward, cotangents back) stay outside
every conditional. Idle slots write into a scratch slot of each buffer, so nothing is selected
per element. Split-backward schedules (``zbh1``) run the input gradient (B) and the weight
gradient (W) in separate slots: B stashes each layer's output cotangent, W reads it.

The loss is cut around the stack in one of two ways:

* :func:`pipeline_value_and_grad` takes the cut explicitly: ``before(params, batch) -> x`` (the
  part before the stack), the pipelined stack, and ``after(params, y, batch_i) -> loss_i`` (head
  and loss of one microbatch).
* :func:`value_and_grad` (behind ``tx.value_and_grad``) finds it for the user: the loss is traced
  with the stack *recording* its input and returning a given output (``context.stack_split``), so
  one traced function is both parts. Nothing is raised through user code.

The three parts' gradients add up to the gradient of the whole loss, which is the mean of the
microbatch losses (as for any loss that is a mean over examples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from titanax.exceptions import PlanError
from titanax.nn.remat import remat
from titanax.parallel.context import stack_split
from titanax.parallel.busy import busy_scope
from titanax.parallel.manual import as_varying
from titanax.parallel.pipeline import (chunk_fn, from_chunks, merge_microbatches, pipeline_forward,
                                       split_microbatches, to_chunks)
from titanax.parallel.pipeline_stack import PipelinedStack, find_pipelined_stack
from titanax.parallel.pipeline_program import compile_schedule
from titanax.parallel.layout import path_string

__all__ = ["pipeline_value_and_grad", "value_and_grad"]


# ----------------------------------------------------------------------- stashed residuals
class _Residuals:
    """One layer's ``jax.vjp`` residuals, split into what must be stashed per microbatch and what
    is the layer's own parameters (read again from the chunk, never copied).

    Stashed residuals of the same shape and dtype travel stacked, one array per group: every
    stash buffer costs a write and a read (a kernel each) on every tick, and a transformer layer
    has dozens of residuals but a handful of distinct shapes.
    """

    def __init__(self, layer: Callable[[jax.Array, Any], jax.Array], axis: str) -> None:
        self.layer, self.axis = layer, axis
        self.treedef: Any = None
        self.kinds: tuple[int | None, ...] = ()
        self.groups: tuple[tuple[int, ...], ...] = ()

    def forward(self, h: jax.Array, layer_params: Any) -> tuple[jax.Array, list[jax.Array]]:
        """``(y, stashed residuals, grouped)`` of one layer."""
        y, pullback = jax.vjp(self.layer, h, layer_params)
        leaves, treedef = jax.tree.flatten(pullback)
        # jax.vjp keeps a parameter it needs as the very input array: found by identity.
        param_index = {id(leaf): j for j, leaf in enumerate(jax.tree.leaves(layer_params))}
        kinds = tuple(param_index.get(id(leaf)) for leaf in leaves)
        stashed = [leaf for leaf, kind in zip(leaves, kinds) if kind is None]
        if self.treedef is None:
            by_type: dict[tuple[Any, ...], list[int]] = {}
            for i, leaf in enumerate(stashed):
                by_type.setdefault((jnp.shape(leaf), jnp.result_type(leaf)), []).append(i)
            self.treedef, self.kinds, self.groups = treedef, kinds, tuple(map(tuple, by_type.values()))
        elif kinds != self.kinds:
            raise PlanError("a pipelined layer's residuals changed between traces",
                            suggestion="use PP(recompute=True) for this model")
        return y, [as_varying(jnp.stack([stashed[i] for i in group]), self.axis) for group in self.groups]

    def pullback(self, layer_params: Any, stashed: Sequence[jax.Array]) -> Callable[[jax.Array], Any]:
        params = jax.tree.leaves(layer_params)
        flat: dict[int, jax.Array] = {}
        for group, stacked in zip(self.groups, stashed):
            flat.update((i, stacked[j]) for j, i in enumerate(group))
        rest = iter(flat[i] for i in range(len(flat)))
        leaves = [params[kind] if kind is not None else next(rest) for kind in self.kinds]
        return jax.tree.unflatten(self.treedef, leaves)


# ------------------------------------------------------------------------------------ executor
def _run_explicit(stack: PipelinedStack, layer: Callable[[jax.Array, Any], jax.Array], stacked: Any,
                  x: jax.Array, others: list[jax.Array], batch: Any,
                  tail: Callable[[list[jax.Array], jax.Array, Any], jax.Array],
                  ) -> tuple[jax.Array, Any, list[jax.Array], jax.Array]:
    """The scanned loop. Returns ``(loss, stack grads, other-parameter grads from the tail,
    input cotangent)``; the loss is the mean of the microbatch losses."""
    pp, mesh = stack.pp, stack.mesh
    axis, p, m, v = pp.axis, pp.stages, pp.microbatches, pp.repeats
    schedule = pp.schedule_table()
    split = schedule.split_backward
    recompute = pp.recompute
    program = compile_schedule(schedule, recompute=recompute)
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    chunked = to_chunks(stacked, num_layers, p, v)
    x_mb = split_microbatches(x, m)
    batch_mb = jax.tree.map(lambda a: split_microbatches(a, m), batch)
    staged_layer = remat(layer, pp.remat)  # the pipeline's policy, per layer, over the stack's own
    body = remat(chunk_fn(layer, stack.unroll), pp.remat)  # PP(recompute=True): the whole chunk
    fwd_ring = [(j, (j + 1) % p) for j in range(p)]
    bwd_ring = [((j + 1) % p, j) for j in range(p)]
    names = tuple(program.columns)
    busy = _busy_cells(program.columns, p, v)
    scan = lambda f, init, xs, **kw: jax.lax.scan(f, init, xs, unroll=stack.unroll, **kw)  # noqa: E731

    def per_stage(chunks, x_mb, others, batch_mb, *columns):
        chunks = jax.tree.map(lambda a: a[0], chunks)  # [v, layers per chunk, ...] of this stage
        x_mb = as_varying(x_mb, axis)
        s = jax.lax.axis_index(axis)
        first, last = s == 0, s == p - 1
        act = jnp.zeros_like(x_mb[0])
        varying = lambda tree: jax.tree.map(lambda a: as_varying(a, axis), tree)  # noqa: E731
        zeros_like = lambda tree: varying(jax.tree.map(jnp.zeros_like, tree))  # noqa: E731
        residuals = _Residuals(staged_layer, axis)
        one_layer = jax.tree.map(lambda a: a[0, 0], chunks)
        res_shapes = jax.eval_shape(residuals.forward, act, one_layer)[1]
        layers_per_chunk = jax.tree.leaves(chunks)[0].shape[1]

        def buffer(slots: int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
            return as_varying(jnp.zeros((slots, *shape), dtype), axis)

        # --- the slots' computations (each under lax.cond; every output cast to per-stage)
        def forward_stash(chunk, h):
            y, stash = scan(lambda c, lp: residuals.forward(c, lp), h, chunk)
            return varying((y, stash))

        def forward_skip(chunk, h):
            return varying((jnp.zeros_like(h), [jnp.zeros((layers_per_chunk, *r.shape), r.dtype)
                                                for r in res_shapes]))

        def backward_stash(chunk, stash, dy):
            def step(dh, xs):
                lp, st = xs
                dh_in, dlp = residuals.pullback(lp, st)(dh)
                return dh_in, (dh if split else dlp)
            dx, out = scan(step, dy, (chunk, stash), reverse=True)
            return varying((dx, out))  # out: per-layer output cotangents (split) or the chunk's grads

        def backward_skip(chunk, stash, dy):
            out = jnp.zeros((layers_per_chunk, *dy.shape), dy.dtype) if split else jax.tree.map(jnp.zeros_like, chunk)
            return varying((jnp.zeros_like(dy), out))

        def weight_grad(chunk, stash, dhs):
            return varying(scan(lambda _, xs: (None, residuals.pullback(xs[0], xs[1])(xs[2])[1]),
                                None, (chunk, stash, dhs))[1])

        def backward_recompute(chunk, h, dy):
            _, pullback = jax.vjp(body, chunk, h)
            d_chunk, dx = pullback(dy)
            return varying((dx, d_chunk))

        def tail_branch(y, i):
            batch_i = jax.tree.map(lambda a: a[i], batch_mb)
            # Differentiate with respect to per-stage (varying) copies: the gradient of a value
            # replicated over the pipeline axis would be a psum over it, inside this branch that
            # only the last stage takes, and a collective only some devices reach never completes.
            loss_i, pullback = jax.vjp(lambda o, h: tail(o, h, batch_i) / m, varying(others), y)
            d_others, dy = pullback(jnp.ones_like(loss_i))
            return varying((loss_i.astype(jnp.float32), d_others, dy))

        def no_tail(y, i):
            return varying((jnp.zeros((), jnp.float32), [jnp.zeros_like(o) for o in others], jnp.zeros_like(y)))

        def tick(carry, row):
            inputs, stash, cots, dhs, act_in, cot_in, g_chunks, g_others, loss, dx_out = carry
            c = dict(zip(names, (r[0] for r in row)))
            inputs = inputs.at[c["a_slot"]].set(act_in)  # idle arrivals land in the scratch slot
            cots = cots.at[c["c_slot"]].set(cot_in)
            # Forward slot.
            f_valid, fi, fr = c["f_mb"] >= 0, jnp.maximum(c["f_mb"], 0), c["f_rep"]
            x_in = jnp.where(first & (fr == 0), x_mb[fi], inputs[c["f_in"]])
            if pp.nan_bubbles:
                x_in = jnp.where(f_valid, x_in, jnp.nan)
            chunk_f = jax.tree.map(lambda a: a[fr], chunks)
            if recompute:
                with busy_scope("forward", *busy["forward"]):
                    y = jax.lax.cond(f_valid, lambda ch, h: varying(body(ch, h)),
                                     lambda _, h: varying(jnp.zeros_like(h)), chunk_f, x_in)
            else:
                with busy_scope("forward", *busy["forward"]):
                    y, new = jax.lax.cond(f_valid, forward_stash, forward_skip, chunk_f, x_in)
                stash = [b.at[c["f_res"]].set(n) for b, n in zip(stash, new)]
            # The head and loss, on the last stage only, when a microbatch leaves the stack.
            ends = f_valid & last & (fr == v - 1)
            with busy_scope("loss", *busy["loss"]):
                loss_i, d_others, dy = jax.lax.cond(ends, tail_branch, no_tail, y, fi)
            cots = cots.at[c["f_cot"]].set(dy.astype(cots.dtype))
            loss = loss + loss_i
            g_others = [g + d for g, d in zip(g_others, d_others)]
            # Backward slot (input gradient; with the weight gradient unless the schedule splits it).
            b_valid, bi, br = c["b_mb"] >= 0, jnp.maximum(c["b_mb"], 0), c["b_rep"]
            b_first = first & (br == 0)
            chunk_b = jax.tree.map(lambda a: a[br], chunks)
            cot = cots[c["b_cot"]]
            if pp.nan_bubbles:
                cot = jnp.where(b_valid, cot, jnp.nan)
            if recompute:
                x_b = jnp.where(b_first, x_mb[bi], inputs[c["b_in"]])
                with busy_scope("backward", *busy["backward"]):
                    dx, d_chunk = jax.lax.cond(
                        b_valid, backward_recompute,
                        lambda ch, h, d: varying((jnp.zeros_like(d), jax.tree.map(jnp.zeros_like, ch))),
                        chunk_b, x_b, cot)
            else:
                stash_b = [b[c["b_res"]] for b in stash]
                with busy_scope("backward", *busy["backward"]):
                    dx, out = jax.lax.cond(b_valid, backward_stash, backward_skip, chunk_b, stash_b, cot)
                if split:
                    dhs = dhs.at[c["b_dh"]].set(out)
                else:
                    d_chunk = out
            if not split:
                g_chunks = jax.tree.map(lambda g, d: g.at[br].add(d), g_chunks, d_chunk)
            else:
                # Weight-gradient slot.
                w_valid, wr = c["w_mb"] >= 0, c["w_rep"]
                chunk_w = jax.tree.map(lambda a: a[wr], chunks)
                dh_w = dhs[c["w_dh"]]
                if pp.nan_bubbles:
                    dh_w = jnp.where(w_valid, dh_w, jnp.nan)
                with busy_scope("weight", *busy["weight"]):
                    d_chunk = jax.lax.cond(w_valid, weight_grad, lambda ch, st, d: zeros_like(ch), chunk_w,
                                           [b[c["w_res"]] for b in stash], dh_w)
                g_chunks = jax.tree.map(lambda g, d: g.at[wr].add(d), g_chunks, d_chunk)
            dx_out = dx_out.at[jnp.where(b_valid & b_first, bi, m)].set(dx)
            act_in = jax.lax.ppermute(y, axis, fwd_ring)
            cot_in = jax.lax.ppermute(dx, axis, bwd_ring)
            return (inputs, stash, cots, dhs, act_in, cot_in, g_chunks, g_others, loss, dx_out), None

        stash0 = [] if recompute else [buffer(program.residual_slots, (layers_per_chunk, *r.shape), r.dtype)
                                       for r in res_shapes]
        dhs0 = buffer(program.layer_cotangent_slots, (layers_per_chunk, *act.shape), act.dtype) if split else \
            buffer(1, (), act.dtype)
        carry = (buffer(program.input_slots, act.shape, act.dtype), stash0,
                 buffer(program.cotangent_slots, act.shape, act.dtype), dhs0,
                 varying(act), varying(act), zeros_like(chunks), [zeros_like(o) for o in others],
                 as_varying(jnp.zeros((), jnp.float32), axis),
                 buffer(m + 1, act.shape, act.dtype))  # row m: the scratch row of idle ticks
        (*_, g_chunks, g_others, loss, dx_out), _ = jax.lax.scan(tick, carry, columns, unroll=pp.unroll_ticks)
        # Per-stage partial sums leave the shard_map stacked on the pipeline axis and are summed
        # by GSPMD outside: a psum over the manual axis of an array still split over the auto
        # axes trips XLA's partitioner (jax 0.10).
        return loss[None], jax.tree.map(lambda a: a[None], g_chunks), [g[None] for g in g_others], dx_out[None, :m]

    chunk_spec = jax.tree.map(lambda _: PartitionSpec(axis), chunked)
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
    return loss.sum(), from_chunks(g_chunks), g_others, merge_microbatches(dx_mb[0])


def _busy_cells(columns: dict[str, np.ndarray], p: int, v: int) -> dict[str, tuple[int, int]]:
    """Each slot's ``(busy, total)`` (tick, stage) cells, for :func:`busy_scope`."""
    f_mb = columns["f_mb"]
    total = int(f_mb.size)
    ends = (f_mb[:, p - 1] >= 0) & (columns["f_rep"][:, p - 1] == v - 1)
    return {"forward": (int((f_mb >= 0).sum()), total), "loss": (int(ends.sum()), total),
            "backward": (int((columns["b_mb"] >= 0).sum()), total),
            "weight": (int((columns["w_mb"] >= 0).sum()), total) if "w_mb" in columns else (0, total)}


# ------------------------------------------------------------------------- the gradient, split
def _stack_leaf_indices(params: Any, stack: PipelinedStack) -> list[int]:
    """Positions, among the leaves of ``params``, of the stack's parameters: those under the
    stack's own path in the model (``stack.path``), which ``tx.shard`` recorded."""
    prefix = stack.param_prefix
    found = [j for j, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])
             if path_string(path).startswith(prefix)]
    expected = len(jax.tree.leaves(stack.layer_fn()[1]))
    if len(found) != expected:
        raise PlanError(
            f"the parameters given to the loss hold {len(found)} arrays under {prefix!r}, where the "
            f"pipelined stack has {expected}",
            suggestion="differentiate with respect to the model's whole parameter tree (state.params or sm.params)",
        )
    return found


class _Recorder:
    """What a pipelined stack does inside :func:`~titanax.parallel.context.stack_split`: note its
    input and parameters, and return ``output`` (or the input itself, to trace the loss whole)."""

    def __init__(self, output: jax.Array | None = None) -> None:
        self.output = output
        self.calls: list[tuple[PipelinedStack, jax.Array, Any]] = []

    def record(self, stack: PipelinedStack, x: jax.Array, params: Any) -> jax.Array:
        self.calls.append((stack, x, params))
        if len(self.calls) > 1:
            raise PlanError("the loss calls the pipelined layer stack more than once",
                            suggestion="call the model once per loss, or train with schedule='gpipe'/'circular'")
        return x if self.output is None else self.output


def _explicit_stack(loss_fn: Callable[..., Any], params: Any, args: Sequence[Any]) -> PipelinedStack | None:
    """The pipelined stack ``loss_fn`` runs under an explicit schedule, or ``None`` (traced
    abstractly, the stack passing its input through)."""
    recorder = _Recorder()
    with stack_split(recorder):
        jax.eval_shape(lambda p: loss_fn(p, *args), params)
    if not recorder.calls:
        return None
    stack = recorder.calls[0][0]
    return None if stack.pp.schedule_table().autodiff else stack


def needs_explicit(loss_fn: Callable[..., Any], params: Any, args: Sequence[Any]) -> bool:
    """Whether ``loss_fn`` runs a pipelined stack under an explicit (1f1b-style) schedule."""
    return _explicit_stack(loss_fn, params, args) is not None


def _split_value_and_grad(stack: PipelinedStack, params: Any,
                          pre: Callable[[list[jax.Array]], tuple[jax.Array, Any]],
                          tail: Callable[[list[jax.Array], jax.Array, Any], jax.Array],
                          batch: Any) -> tuple[jax.Array, Any]:
    """Loss and gradients from the cut: ``pre(leaves) -> (x, stack params as the stack uses them)``
    and ``tail(all leaves, y, batch_i) -> loss_i``; the stack runs the pipeline between them."""
    flat, treedef = jax.tree.flatten(params)
    stack_idx = _stack_leaf_indices(params, stack)
    taken = set(stack_idx)
    other_idx = [i for i in range(len(flat)) if i not in taken]
    stack_shapes = [jax.ShapeDtypeStruct(flat[i].shape, flat[i].dtype) for i in stack_idx]

    def tail_of_others(others: list[jax.Array], y: jax.Array, batch_i: Any) -> jax.Array:
        leaves: list[Any] = [None] * len(flat)
        for i, o in zip(other_idx, others):
            leaves[i] = o
        for i, shape in zip(stack_idx, stack_shapes):  # never read: the stack returns y
            leaves[i] = jnp.zeros(shape.shape, shape.dtype)
        return tail(leaves, y, batch_i)

    (x, stack_params), pullback = jax.vjp(pre, flat)
    layer, _ = stack.layer_fn()
    loss, g_stack, g_others, dx = _run_explicit(stack, layer, stack_params, x, [flat[i] for i in other_idx],
                                                batch, tail_of_others)
    (g_pre,) = pullback((dx.astype(x.dtype), jax.tree.map(lambda g, p: g.astype(p.dtype), g_stack, stack_params)))
    grads = list(g_pre)
    for i, g in zip(other_idx, g_others):
        grads[i] = grads[i] + g.astype(grads[i].dtype)
    return loss, jax.tree.unflatten(treedef, grads)


def value_and_grad(loss_fn: Callable[..., jax.Array], params: Any, args: Sequence[Any],
                   batch_argnum: int) -> tuple[jax.Array, Any] | None:
    """Loss and gradient of ``loss_fn(params, *args)`` with its pipelined stack run by an
    explicit schedule, the cut found by tracing (see the module docstring).

    Returns ``None`` when the loss runs no pipelined stack under an explicit schedule (the
    caller then uses ``jax.value_and_grad``).
    """
    stack = _explicit_stack(loss_fn, params, args)
    if stack is None:
        return None
    args = list(args)
    if not -len(args) <= batch_argnum < len(args):
        # The schedule splits the batch into microbatches, so it must see it as an argument;
        # a batch the loss closes over would be run whole by every microbatch's slot.
        raise PlanError(
            f"under a {stack.pp.schedule} pipeline tx.value_and_grad needs the batch as an argument of "
            f"the loss (batch_argnum={batch_argnum}), but the loss was called with {len(args)} "
            "argument(s) after the parameters",
            suggestion="write loss_fn(params, batch) and call tx.value_and_grad(loss_fn)(state.params, batch), "
            "or pass batch_argnum= for the argument that is the batch")
    batch = args[batch_argnum]
    treedef = jax.tree.structure(params)

    def pre(leaves: list[jax.Array]) -> tuple[jax.Array, Any]:
        recorder = _Recorder()
        with stack_split(recorder):
            loss_fn(jax.tree.unflatten(treedef, leaves), *args)  # only the part before the stack is kept
        _, x, stack_params = recorder.calls[0]
        return x, stack_params

    def tail(leaves: list[Any], y: jax.Array, batch_i: Any) -> jax.Array:
        call_args = list(args)
        call_args[batch_argnum] = batch_i
        with stack_split(_Recorder(output=y)):
            return loss_fn(jax.tree.unflatten(treedef, leaves), *call_args)

    return _split_value_and_grad(stack, params, pre, tail, batch)


def pipeline_value_and_grad(before: Callable[[Any, Any], jax.Array], after: Callable[[Any, jax.Array, Any], jax.Array],
                            stack: Any) -> Callable[[Any, Any], tuple[jax.Array, Any]]:
    """Loss and gradient of a model cut explicitly around its pipelined layer stack.

    The stack runs the plan's schedule (any of them; the explicit ones run forward and backward
    together, one microbatch at a time) between ``before`` and ``after``; ``after`` runs per
    microbatch on the last stage, and the loss is the mean of its values.

    Args:
      before: ``(params, batch) -> x``, the model up to the stack (e.g. the embedding).
      after: ``(params, y, microbatch) -> loss``, the rest of the model and the loss of one
        microbatch (a mean over its examples), from the stack's output ``y``.
      stack: the ``tx.shard``-ed model (``ShardedModel``) or its ``PipelinedStack``.

    Returns:
      ``(params, batch) -> (loss, grads)``, as ``jax.value_and_grad`` of the whole loss; ``params``
      is the model's whole parameter tree, ``batch`` splits into ``PP(microbatches=)`` along its
      first dimension.

    Example:
      A sketch (a whole pipelined GPT is in ``tests/integration/test_pipeline.py``):

      >>> step = tx.parallel.pipeline_value_and_grad(                        # doctest: +SKIP
      ...     lambda p, t: embed(p, t[:, :-1]),
      ...     lambda p, y, t: next_token_loss(head(p, y), t[:, 1:]),
      ...     sm)
      >>> loss, grads = jax.jit(step)(sm.params, tokens)                    # doctest: +SKIP
    """
    pipelined = find_pipelined_stack(stack)

    def run(params: Any, batch: Any) -> tuple[jax.Array, Any]:
        treedef = jax.tree.structure(params)
        stack_idx = _stack_leaf_indices(params, pipelined)
        layer_params_def = jax.tree.structure(pipelined.layer_fn()[1])

        def pre(leaves: list[jax.Array]) -> tuple[jax.Array, Any]:
            x = before(jax.tree.unflatten(treedef, leaves), batch)
            return x, jax.tree.unflatten(layer_params_def, [leaves[i] for i in stack_idx])

        def tail(leaves: list[Any], y: jax.Array, batch_i: Any) -> jax.Array:
            return after(jax.tree.unflatten(treedef, leaves), y, batch_i)

        if pipelined.pp.schedule_table().autodiff:
            def whole(p: Any) -> jax.Array:
                flat = jax.tree.leaves(p)
                x, stack_params = pre(flat)
                layer, _ = pipelined.layer_fn()
                y = pipeline_forward(layer, stack_params, x, pipelined.pp, pipelined.mesh, unroll=pipelined.unroll)
                return after(p, y, batch)
            return jax.value_and_grad(whole)(params)
        return _split_value_and_grad(pipelined, params, pre, tail, batch)

    return run
