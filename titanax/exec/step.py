"""``@tx.step_fn``: a ``(state, batch) -> (state, metrics)`` function, compiled with the plan's
shardings, the state donated, the PRNG threaded, and microbatches accumulated."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from titanax.exceptions import CollectiveError, ShardingError, TitanaxError
from titanax.parallel.batch import batch_axes, batch_sharding
from titanax.parallel.manual import as_varying, varying_axes
from titanax.parallel.layout import path_string
from titanax.parallel.tracing import mesh_context
from titanax.exec.compilation import CompileWatch
from titanax.exec.state import TrainState

__all__ = ["StepFunction", "step_fn", "batch_shardings"]

StepBody = Callable[[TrainState, Any], tuple[TrainState, Mapping[str, jax.Array]]]


def batch_shardings(state: TrainState, batch: Any) -> Any:
    """Shardings for a batch: every leaf split on its leading (``batch``) dimension."""
    return jax.tree.map(lambda x: batch_sharding(state.mesh, state.rules, np.shape(x)), batch)


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
    return batch_axes(state.rules, state.mesh.shape)


def _check_metrics_reduced(metrics: Mapping[str, jax.Array], axes: tuple[str, ...]) -> None:
    for name, value in metrics.items():
        left = varying_axes(value) & set(axes)
        if left:
            raise CollectiveError(
                f"metric {name!r} still differs per device along {sorted(left)} in a manual step",
                suggestion=f"reduce it: tx.collectives.pmean({name}, {sorted(left)[0]!r})",
            )


@dataclasses.dataclass
class StepRecord:
    """What a step body did with its state while it was traced (see ``TrainState.step_record``)."""

    mutable_applied: bool = False
    """``state.apply(..., mutable=...)`` returned a new model state."""
    grad_norm: Any = None
    """The global norm of the gradients the optimizer update took (unscaled, before clipping)."""


class StepFunction:
    """A training (or evaluation) step, compiled on first use for the state's layout.

    Call it in your own loop — ``state, metrics = train_step(state, batch)`` — or hand it to
    :meth:`tx.Engine.fit`. It compiles once per layout of the state (structure, shapes, dtypes and
    shardings of its arrays) and per batch shape: later calls reuse the executable. A compile
    after the first warns (:class:`~titanax.exec.compilation.RecompileWarning`) with the argument
    paths whose shape, dtype or sharding changed; :attr:`compile_watch` keeps each compile's time.
    """

    def __init__(self, fn: StepBody, *, manual: bool = False, donate: bool = True) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.manual = manual
        self.donate = donate
        self._compiled: dict[Any, Callable[..., Any]] = {}  # by exact layout (with shardings)
        self._latest: dict[Any, Callable[..., Any]] = {}  # by structure and batch shape: the hot path
        self._batch_shapes: dict[str, tuple[tuple[int, ...], Any]] | None = None
        self.compile_watch = CompileWatch(getattr(fn, "__name__", "step"))
        """Every compile of this step: ``.records`` (seconds, cache hits), ``.recompiles``."""

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        # Reading every array's sharding costs microseconds each, so the hot path keys on the
        # structure alone and lets jax.jit compare shardings; a mismatch (refused before anything
        # runs or is donated) looks the exact layout up.
        _check_live(state, f"step {self.__name__!r}")
        structure = jax.tree.structure(state)
        fn = self._latest.get((structure, _batch_key(batch))) or self.jitted(state, batch)
        named = {"state": state, "batch": batch}
        # A recompile is one for the same mesh and state structure (its static fields, such as the
        # optimizer, included): a new run in the same process is expected to compile.
        scope = (state.mesh, structure)
        with explained(self, state, batch):
            try:
                return self.compile_watch.call(fn, (state, batch), named, scope=scope)
            except ValueError as err:
                if _SHARDING_MISMATCH not in str(err):
                    raise
                exact = self.jitted(state, batch)
                if exact is fn:
                    raise  # the state fits: it is the batch that sits elsewhere
                return self.compile_watch.call(exact, (state, batch), named, scope=scope)

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The compiled program's lowering, for ``tx.profiling.inspect``."""
        jitted = self.jitted(state, batch)
        with explained(self, state, batch):
            return jitted.lower(state, batch)

    def jitted(self, state: TrainState, batch: Any) -> Callable[..., Any]:
        """The ``jax.jit``-wrapped step for this state's layout (structure and shardings; ``jax.jit``
        retraces for new shapes and dtypes) and batch shape: built once per layout."""
        key = (layout_key(state, owner=f"step {self.__name__!r}"), _batch_key(batch))
        jitted = self._compiled.get(key)
        if jitted is None:
            jitted = self._compiled[key] = self._build(state, batch)
        self._latest[(key[0][0], key[1])] = jitted
        return jitted

    def _build(self, state: TrainState, batch: Any) -> Callable[..., Any]:
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        in_batch = batch_shardings(state, batch)
        replicated = NamedSharding(state.mesh, PartitionSpec())

        def body(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
            with mesh_context(state.mesh):  # explicit-style step code names mesh axes in P(...)
                return self._body(state, batch)

        # the program (jit_<name>) and its profile read by the user's function name, not `_body`
        body.__name__ = body.__qualname__ = getattr(self.fn, "__name__", "step")
        if self.manual:
            _check_manual_layout(state)
            specs = lambda tree: jax.tree.map(lambda s: s.spec, tree)  # noqa: E731
            body = jax.shard_map(body, mesh=state.mesh,
                                 in_specs=(specs(state_shardings), specs(in_batch)),
                                 out_specs=(specs(state_shardings), PartitionSpec()))
        return jax.jit(body, in_shardings=(state_shardings, in_batch),
                       out_shardings=(state_shardings, replicated),
                       donate_argnums=(0,) if self.donate else ())

    def _body(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        base_rng = state.rng
        step_rng = jax.random.fold_in(base_rng, state.step)
        k = state.accumulate_steps
        record = StepRecord()
        if k == 1 and not self.manual:
            new_state, metrics = self._call_user(state.replace(rng=step_rng), batch, record)
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
                accumulated, metrics = self._call_user(accumulating.replace(rng=step_rng), batch, StepRecord())
            else:
                def one(carry: TrainState, xs: tuple) -> tuple[TrainState, Any]:
                    index, microbatch = xs
                    return self._call_user(carry.replace(rng=jax.random.fold_in(step_rng, index)),
                                           microbatch, StepRecord())

                microbatches = _split_microbatches(batch, k)
                accumulated, metrics = jax.lax.scan(one, accumulating, (jnp.arange(k), microbatches))
                metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
            grads = jax.tree.map(lambda g: g / k, accumulated.grad_accum)
            new_state = state.replace(model_state=accumulated.model_state,
                                      step_record=record).apply_gradients(grads=grads)
        new_state = new_state.replace(rng=base_rng, step_record=None)
        if self.manual:
            _check_metrics_reduced(metrics, _batch_axes(state))
        if record.grad_norm is not None and "grad_norm" not in metrics and not self.manual:
            # In a manual step the gradients the update sees are per-device shards: no global norm.
            metrics = {**metrics, "grad_norm": record.grad_norm}
        metrics = {**metrics, "skipped_steps": new_state.skipped_steps}
        if new_state.loss_scale is not None:
            metrics["loss_scale"] = new_state.loss_scale.scale
        return new_state, metrics

    def _call_user(self, state: TrainState, batch: Any,
                   record: StepRecord) -> tuple[TrainState, dict[str, jax.Array]]:
        name = getattr(self.fn, "__name__", repr(self.fn))
        try:
            result = self.fn(state.replace(step_record=record), batch)
        except TypeError as err:
            shape = _NON_SCALAR_GRADIENT.search(str(err))
            if shape is None:
                raise
            raise TitanaxError(
                f"step function {name!r}: the function given to jax.grad returns shape "
                f"{shape.group(1)}, not a scalar (one loss per example?)",
                suggestion="reduce the loss to one number, e.g. `return per_example_loss.mean()`, "
                "and log per-example values as metrics if you need them",
            ) from err
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], TrainState)):
            raise TitanaxError(
                f"step function {name!r} must return (state, metrics), got {type(result).__name__}",
                suggestion="end it with `return state.apply_gradients(grads=grads), {'loss': loss}`",
            )
        new_state, metrics = result
        if record.mutable_applied and new_state.model_state is state.model_state:
            raise TitanaxError(
                f"step function {name!r} asked state.apply(..., mutable=...) for the model's new "
                "state (batch statistics, RNG counters) but returned a state without it: the "
                "update would be lost every step",
                suggestion="return it from the loss as aux and keep it: "
                "`state.apply_gradients(grads=grads, model_state=model_state)`",
            )
        return new_state.replace(step_record=None), scalar_metrics(metrics, f"step function {name!r}")


_NON_SCALAR_GRADIENT = re.compile(r"Gradient only defined for scalar-output functions\. Output had shape: (\([^)]*\))")


def scalar_metrics(metrics: Any, owner: str) -> dict[str, jax.Array]:
    """``metrics`` as float32 scalars, or a TitanaxError naming the one that is not a scalar."""
    if not isinstance(metrics, Mapping):
        raise TitanaxError(
            f"{owner}: metrics must be a dict of scalars, got {type(metrics).__name__}",
            suggestion="return e.g. {'loss': loss, 'accuracy': acc}",
        )
    out = {}
    for key, value in metrics.items():
        shape = np.shape(value)
        if shape:
            raise TitanaxError(
                f"{owner}: metric {key!r} has shape {shape}; metrics are scalars (one number per step)",
                suggestion=f"reduce it, e.g. {{{key!r}: value.mean()}}",
            )
        out[key] = jnp.asarray(value, jnp.float32)
    return out


_SHARDING_MISMATCH = "does not match the sharding"  # jax.jit: a committed argument laid out otherwise


def _check_live(state: Any, owner: str) -> None:
    """Refuse a state whose buffers were donated to an earlier call (JAX would crash on them)."""
    if not isinstance(state, TrainState):
        raise TitanaxError(
            f"a step function takes a tx.TrainState first, got {type(state).__name__}",
            suggestion="create one with engine.init(...) or tx.create_train_state(sharded_model, optimizer)",
        )
    for index, leaf in enumerate(jax.tree.leaves(state)):
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            path = path_string(jax.tree_util.tree_flatten_with_path(state)[0][index][0])
            raise TitanaxError(
                f"{owner} got a state whose array {path!r} was deleted: the state was donated to an "
                "earlier call (its buffers now hold the state that call returned)",
                suggestion="use the state each call returns (`state, metrics = train_step(state, "
                "batch)`), or build the step with @tx.step_fn(donate=False) to keep old states "
                "usable at the cost of memory",
            )


def layout_key(state: TrainState, *, owner: str) -> tuple:
    """What a compiled step is specialised to: the state's structure and each array's sharding
    (``jax.jit`` itself retraces for new shapes and dtypes). Refuses a donated state."""
    _check_live(state, owner)
    leaves, treedef = jax.tree.flatten(state)
    return treedef, tuple(leaf.sharding if isinstance(leaf, jax.Array) else None for leaf in leaves)


def _batch_key(batch: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(batch)
    return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)


def _check_manual_layout(state: TrainState) -> None:
    """Manual mode runs the body on per-device blocks: only replicated parameters are whole."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        spec = leaf.sharding.spec
        if any(entry is not None for entry in spec):
            full = tuple(leaf.shape)
            block = tuple(leaf.sharding.shard_shape(full))
            raise ShardingError(
                f"@tx.step_fn(manual=True) runs the step once per device on that device's blocks, "
                f"but parameter {path_string(path)!r} is split by the plan ({spec}): the body would "
                f"see a {block} block of the {full} array and compute with it as if it were whole",
                suggestion="use the default mode (drop manual=True; XLA inserts the collectives for "
                "TP and FSDP), or a plan whose parameters are replicated (data parallel only) for "
                "hand-written collectives",
            )


@contextlib.contextmanager
def explained(step: StepFunction, state: TrainState, batch: Any) -> Iterator[None]:
    """Turn the raw JAX/Flax errors a step raises on common mistakes into TitanaxErrors naming the
    culprit: the batch leaf that changed shape since the step compiled, a float leaf an
    embedding got, a batch already placed on other devices."""
    try:
        yield
    except (TypeError, ValueError) as err:
        better = None if isinstance(err, TitanaxError) else _explain(step, state, batch, err)
        if better is None:
            raise
        raise better from err
    if step._batch_shapes is None:
        step._batch_shapes = _leaf_shapes(batch)


def _explain(step: StepFunction, state: TrainState, batch: Any, err: BaseException) -> TitanaxError | None:
    text = str(err)
    name = getattr(step.fn, "__name__", "step")
    shapes = _leaf_shapes(batch)
    if _SHARDING_MISMATCH in text:
        expected = batch_shardings(state, batch)
        for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(batch)[0], jax.tree.leaves(expected)):
            have = getattr(leaf, "sharding", None)
            if isinstance(leaf, jax.Array) and not have.is_equivalent_to(want, leaf.ndim):
                devices = sorted(d.id for d in have.device_set)
                layout = f" {have.spec}" if hasattr(have, "spec") else ""
                return ShardingError(
                    f"batch leaf {path_string(path) or 'batch'!r} is already placed on devices {devices} "
                    f"({type(have).__name__}{layout}); step {name!r} takes it split over the mesh as "
                    f"{want.spec}",
                    suggestion="pass host (NumPy) batches and let Titanax place them, or place them on "
                    "the step's mesh first: tx.data.to_global(batch, mesh, plan) / "
                    "sharded_model.shard_batch(batch)",
                )
        return None
    if "Input type must be an integer" in text:
        floats = [p for p, (_, dtype) in shapes.items() if np.issubdtype(np.dtype(dtype), np.floating)]
        if floats:
            return TitanaxError(
                f"step {name!r}: an embedding lookup got non-integer ids; batch leaves {floats} are "
                f"{[str(shapes[p][1]) for p in floats]}",
                suggestion="feed token ids as integers (np.int32) from the data pipeline; a float id "
                "would otherwise have to be rounded, which silently changes tokens",
            )
    previous = step._batch_shapes
    if previous is not None:
        changed = [(p, previous[p], shapes[p]) for p in shapes
                   if p in previous and previous[p][0][1:] != shapes[p][0][1:]]
        if changed:
            path, old, new = changed[0]
            return ShardingError(
                f"step {name!r} was compiled for batch leaf {path!r} of shape {old[0]} ({old[1]}) and "
                f"now gets shape {new[0]}: the model fails on it ({type(err).__name__}: "
                f"{text.splitlines()[0][:200]})",
                suggestion="keep every example's shape fixed for a run (pad or crop in the data "
                "pipeline); only the batch (leading) dimension may change",
            )
    return None


def _leaf_shapes(batch: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {path_string(path) or "batch": (tuple(np.shape(leaf)), getattr(leaf, "dtype", type(leaf)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]}


@overload
def step_fn(fn: StepBody, /) -> StepFunction: ...


@overload
def step_fn(*, manual: bool = False, donate: bool = True) -> Callable[[StepBody], StepFunction]: ...


def step_fn(fn: StepBody | None = None, /, *, manual: bool = False,
            donate: bool = True) -> StepFunction | Callable[[StepBody], StepFunction]:
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
      A ``StepFunction``; called without ``fn`` (``@tx.step_fn(manual=True)``), a decorator that
      makes one.

    Example:
      >>> @tx.step_fn                                                          # doctest: +SKIP
      ... def train_step(state, batch):
      ...     loss, grads = jax.value_and_grad(loss_fn)(state.params, state, batch)
      ...     return state.apply_gradients(grads=grads), {"loss": loss}
    """
    if fn is not None:
        return StepFunction(fn, manual=manual, donate=donate)
    return lambda f: StepFunction(f, manual=manual, donate=donate)
