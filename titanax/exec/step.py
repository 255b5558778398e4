"""``@tx.step_fn``: a ``(state, batch) -> (state, metrics)`` function, compiled with the plan's
shardings, the state donated, the PRNG threaded, and microbatches accumulated."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from titanax.exceptions import CollectiveError, ShardingError, TitanaxError
from titanax.parallel.manual import as_varying, varying_axes
from titanax.exec.state import TrainState

__all__ = ["StepFunction", "step_fn", "batch_shardings"]

StepBody = Callable[[TrainState, Any], tuple[TrainState, Mapping[str, jax.Array]]]


def batch_shardings(state: TrainState, batch: Any) -> Any:
    """Shardings for a batch: every leaf split on its leading (``batch``) dimension."""
    mesh_shape = dict(state.mesh.shape)

    def one(x: Any) -> NamedSharding:
        shape = np.shape(x)
        names = ("batch",) if shape else ()
        return NamedSharding(state.mesh, state.rules.spec(names, shape, mesh_shape,
                                                          what=f"batch leaf of shape {shape}"))

    return jax.tree.map(one, batch)


def _split_microbatches(batch: Any, k: int) -> Any:
    """``[B, ...] -> [k, B/k, ...]`` so that each device's rows spread over all k microbatches
    (row ``j*k + i`` goes to microbatch ``i``): no data moves between devices."""

    def split(x: jax.Array) -> jax.Array:
        if x.ndim == 0:
            return jnp.broadcast_to(x, (k,))
        if x.shape[0] % k:
            raise ShardingError(
                f"batch of {x.shape[0]} does not split into {k} microbatches",
                suggestion=f"use a global batch divisible by accumulate_steps={k}",
            )
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _batch_axes(state: TrainState) -> tuple[str, ...]:
    (entry,) = state.rules.resolve(("batch",), (state.mesh.size,), dict(state.mesh.shape))
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _check_metrics_reduced(metrics: Mapping[str, jax.Array], axes: tuple[str, ...]) -> None:
    for name, value in metrics.items():
        left = varying_axes(value) & set(axes)
        if left:
            raise CollectiveError(
                f"metric {name!r} still differs per device along {sorted(left)} in a manual step",
                suggestion=f"reduce it: tx.collectives.pmean({name}, {sorted(left)[0]!r})",
            )


class StepFunction:
    """A training (or evaluation) step, compiled on first use for the state's layout.

    Call it in your own loop — ``state, metrics = train_step(state, batch)`` — or hand it to
    :meth:`tx.Engine.fit`. It compiles once per state structure and batch shape: later calls reuse
    the executable.
    """

    def __init__(self, fn: StepBody, *, manual: bool = False, donate: bool = True) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.manual = manual
        self.donate = donate
        self._compiled: dict[Any, Callable[..., Any]] = {}

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        return self.jitted(state, batch)(state, batch)

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The compiled program's lowering, for ``tx.profiling.inspect``."""
        return self.jitted(state, batch).lower(state, batch)

    def jitted(self, state: TrainState, batch: Any) -> Callable[..., Any]:
        """The ``jax.jit``-wrapped step for this state's layout (built once, then cached)."""
        if not isinstance(state, TrainState):
            raise TitanaxError(
                f"a step function takes a tx.TrainState first, got {type(state).__name__}",
                suggestion="create one with engine.init(...) or tx.create_train_state(sharded_model, optimizer)",
            )
        key = jax.tree.structure(state)
        jitted = self._compiled.get(key)
        if jitted is None:
            jitted = self._compiled[key] = self._build(state, batch)
        return jitted

    def _build(self, state: TrainState, batch: Any) -> Callable[..., Any]:
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        in_batch = batch_shardings(state, batch)
        replicated = NamedSharding(state.mesh, PartitionSpec())
        body = self._body
        if self.manual:
            specs = lambda tree: jax.tree.map(lambda s: s.spec, tree)  # noqa: E731
            body = jax.shard_map(self._body, mesh=state.mesh,
                                 in_specs=(specs(state_shardings), specs(in_batch)),
                                 out_specs=(specs(state_shardings), PartitionSpec()))
        return jax.jit(body, in_shardings=(state_shardings, in_batch),
                       out_shardings=(state_shardings, replicated),
                       donate_argnums=(0,) if self.donate else ())

    def _body(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        base_rng = state.rng
        step_rng = jax.random.fold_in(base_rng, state.step)
        k = state.accumulate_steps
        if k == 1 and not self.manual:
            new_state, metrics = self._call_user(state.replace(rng=step_rng), batch)
        else:
            # The user's apply_gradients only sums gradients; one update follows with their mean.
            manual_axes = _batch_axes(state) if self.manual else ()
            params = state.params
            if manual_axes:
                # Per-device gradients (not JAX's implicit sum over the data axes): the user's
                # explicit pmean then gives exactly the global mean, as in pmap-style code.
                params = jax.tree.map(lambda p: as_varying(p, manual_axes), params)
            accumulating = state.replace(accumulating=True, manual_axes=manual_axes, params=params,
                                         grad_accum=jax.tree.map(jnp.zeros_like, state.params))
            if k == 1:
                accumulated, metrics = self._call_user(accumulating.replace(rng=step_rng), batch)
            else:
                def one(carry: TrainState, xs: tuple) -> tuple[TrainState, Any]:
                    index, microbatch = xs
                    return self._call_user(carry.replace(rng=jax.random.fold_in(step_rng, index)),
                                           microbatch)

                microbatches = _split_microbatches(batch, k)
                accumulated, metrics = jax.lax.scan(one, accumulating, (jnp.arange(k), microbatches))
                metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
            grads = jax.tree.map(lambda g: g / k, accumulated.grad_accum)
            new_state = state.replace(model_state=accumulated.model_state).apply_gradients(grads=grads)
        new_state = new_state.replace(rng=base_rng)
        if self.manual:
            _check_metrics_reduced(metrics, _batch_axes(state))
        if new_state.loss_scale is not None:
            metrics = {**metrics, "loss_scale": new_state.loss_scale.scale,
                       "skipped_steps": new_state.loss_scale.skipped}
        return new_state, metrics

    def _call_user(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        result = self.fn(state, batch)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], TrainState)):
            raise TitanaxError(
                f"step function {getattr(self.fn, '__name__', self.fn)!r} must return "
                f"(state, metrics), got {type(result).__name__}",
                suggestion="end it with `return state.apply_gradients(grads=grads), {'loss': loss}`",
            )
        new_state, metrics = result
        if not isinstance(metrics, Mapping):
            raise TitanaxError(
                f"step function metrics must be a dict of scalars, got {type(metrics).__name__}",
                suggestion="return e.g. {'loss': loss, 'accuracy': acc}",
            )
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


@overload
def step_fn(fn: StepBody, /) -> StepFunction: ...


@overload
def step_fn(*, manual: bool = False, donate: bool = True) -> Callable[[StepBody], StepFunction]: ...


def step_fn(fn: StepBody | None = None, /, *, manual: bool = False, donate: bool = True):
    """Make ``fn(state, batch) -> (state, metrics)`` a compiled, sharded training step.

    The step is compiled with the state's shardings in and out (the state is donated: its buffers
    are reused for the new state), the batch split on ``batch`` over the plan's data axes, and
    metrics replicated. ``state.rng`` is a fresh key each step. With ``DP(accumulate_steps=k)`` the
    batch is split into ``k`` microbatches run by ``lax.scan``; ``state.apply_gradients`` sums their
    gradients and one update is applied with the mean.

    Args:
      fn: the step body.
      manual: run the body under ``jax.shard_map`` over the whole mesh: it sees per-device blocks
        and you write the collectives (``tx.collectives.psum`` ...); metrics must be reduced.
      donate: donate the input state's buffers.

    Returns:
      A :class:`StepFunction`.

    Example:
      >>> @tx.step_fn                                                          # doctest: +SKIP
      ... def train_step(state, batch):
      ...     loss, grads = jax.value_and_grad(loss_fn)(state.params, state, batch)
      ...     return state.apply_gradients(grads=grads), {"loss": loss}
    """
    if fn is not None:
        return StepFunction(fn, manual=manual, donate=donate)
    return lambda f: StepFunction(f, manual=manual, donate=donate)
