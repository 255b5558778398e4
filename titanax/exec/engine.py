"""``tx.Engine``: the drop-in training loop over a mesh, a plan, an optimizer and loggers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
import collections
import contextlib
import logging
import os
import signal
import time
import threading
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from flax import nnx

from titanax.data import DevicePrefetcher, to_global
from titanax.io.checkpoint import CheckpointStrategy
from titanax.exceptions import ConfigError, PlanError, TitanaxError
from titanax.exec.nonfinite import NonFiniteWatch, default_limit
from titanax.exec.run_report import report_end, report_first_step, report_plan
from titanax.exec.precision import Precision
from titanax.exec.state import TrainState, create_train_state
from titanax.exec.step import StepFunction, layout_key, scalar_metrics, step_fn
from titanax.exec.trace import ProfileWindow
from titanax.logging import Logger, MultiLogger, ThroughputMeter, peak_flops_per_device
from titanax.optim.learning_rate import learning_rate
from titanax.parallel.plan import Plan
from titanax.parallel.resolve import resolve_mesh, resolve_rules
from titanax.parallel.shard import shard
from titanax.parallel.sharded_model import ShardedModel
from titanax.parallel.tracing import mesh_context

_log = logging.getLogger("titanax.engine")

__all__ = ["Engine", "Hook"]


_ADDED = ("grad_norm", "skipped_steps", "loss_scale")
"""Metrics the step adds to the user's (see ``StepFunction``)."""

Hook = Callable[[int, TrainState, Mapping[str, float]], None]
"""Called at every log interval with the step, the state and the fetched metrics."""


class Engine:
    """Trains a sharded model: compiled steps, microbatching, logging, evaluation, checkpoints.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> engine = tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP()), optimizer=tx.optim.sgd(0.1))
      >>> state = engine.init(nn.Dense(1), example=jnp.ones((16, 3)))
      >>> @tx.step_fn
      ... def train_step(state, batch):
      ...     loss_fn = lambda params: jnp.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)
      ...     loss, grads = jax.value_and_grad(loss_fn)(state.params)
      ...     return state.apply_gradients(grads=grads), {"loss": loss}
      >>> data = tx.data.ArrayLoader({"x": np.ones((64, 3), np.float32),
      ...                             "y": np.zeros((64, 1), np.float32)}, batch_size=16)
      >>> state = engine.fit(train_step, data=data, steps=4)
      >>> int(state.step)
      4
    """

    def __init__(
        self,
        *,
        mesh: Mesh | None = None,
        plan: Plan,
        optimizer: optax.GradientTransformation,
        precision: Precision | None = None,
        checkpoint: CheckpointStrategy | None = None,
        loggers: Sequence[Logger] = (),
        log_every: int = 10,
        flops_per_example: float | None = None,
        tokens_per_example: int | None = None,
        peak_flops: float | None = None,
        prefetch: int = 2,
        max_steps_in_flight: int = 4,
        on_nonfinite: int | None = None,
        profile_steps: str | tuple[int, int] | None = None,
        profile_dir: str | os.PathLike[str] = "profile",
    ) -> None:
        """
        Args:
          mesh: the device mesh; ``None`` takes the one set by ``jax.set_mesh``.
          plan: the parallelism plan (validated against ``mesh`` here).
          optimizer: any optax ``GradientTransformation`` (``tx.optim.adamw(...)``).
          precision: the precision policy (float32 by default).
          checkpoint: a checkpointer (``tx.io.OrbaxCheckpoint``) or ``None``.
          loggers: where metrics go; only process 0 writes.
          log_every: steps between metric fetches (the only host-device sync of the loop).
          flops_per_example: model FLOPs per example for MFU; ``None`` reads the compiled step's
            cost analysis (per device, every loop counted per trip; an upper bound under pipeline
            parallelism, whose idle slots count as busy).
          tokens_per_example: tokens in one example (a sequence model's length), to log tokens/s.
          peak_flops: peak FLOP/s of one device for MFU; ``None`` looks the device kind up.
          prefetch: batches kept in flight to the devices.
          max_steps_in_flight: steps dispatched ahead of the oldest unfinished one. JAX dispatches
            asynchronously; the bound keeps the host from running far ahead, holding the batches
            and metrics of every queued step, and keeps the logged step times close to the work.
          on_nonfinite: stop with :class:`~titanax.NonFiniteError` after this many steps in a row
            whose loss or gradients are not finite. Each such step's update is skipped in the
            compiled step (parameters, optimizer and model state stay as they were, so no
            checkpoint holds NaN); the engine sees it as the step completes, at most
            ``max_steps_in_flight`` steps later, and always before a checkpoint is written.
            ``None``: the first one stops the run — under dynamic loss scaling, where overflow
            steps are expected, ``log2(initial_scale) + 2`` in a row do.
          profile_steps: trace these steps with ``jax.profiler``: ``"5:8"`` or ``(5, 8)`` traces
            steps 5, 6 and 7 (a range; step 1 compiles), for TensorBoard's profile plugin, XProf
            or Perfetto (:class:`~titanax.exec.trace.ProfileWindow`).
          profile_dir: where the trace goes.
        """
        self.mesh = resolve_mesh(mesh)
        self.plan, self.rules = resolve_rules(plan, self.mesh)
        self.optimizer = optimizer
        self.precision = precision or Precision()
        self.checkpoint = checkpoint
        self.logger = MultiLogger(list(loggers))
        if not isinstance(log_every, int) or log_every < 1:
            raise ConfigError(f"Engine(log_every={log_every!r}) must be a positive integer",
                              suggestion="use log_every=10", owner="Engine", field="log_every", value=log_every)
        self.log_every = log_every
        self.flops_per_example = flops_per_example
        self.tokens_per_example = tokens_per_example
        self.peak_flops = peak_flops
        self.prefetch = prefetch
        if not isinstance(max_steps_in_flight, int) or max_steps_in_flight < 1:
            raise ConfigError(f"Engine(max_steps_in_flight={max_steps_in_flight!r}) must be a positive integer",
                              suggestion="use max_steps_in_flight=4", owner="Engine", field="max_steps_in_flight",
                              value=max_steps_in_flight)
        self.max_steps_in_flight = max_steps_in_flight
        if on_nonfinite is None:
            on_nonfinite = default_limit(self.precision)
        if not isinstance(on_nonfinite, int) or isinstance(on_nonfinite, bool) or on_nonfinite < 1:
            raise ConfigError(f"Engine(on_nonfinite={on_nonfinite!r}) must be a positive integer",
                              suggestion="stop at the first non-finite step with on_nonfinite=1, or allow "
                              "a few bad batches in a row with e.g. on_nonfinite=3",
                              owner="Engine", field="on_nonfinite", value=on_nonfinite)
        self.on_nonfinite = on_nonfinite
        self.profile = None if profile_steps is None else ProfileWindow.parse(profile_steps, profile_dir)
        self.state: TrainState | None = None
        # The signal that ended the last fit early (its step saved), or None: the caller decides
        # whether to exit; the CLI returns success so the scheduler can requeue the same command.
        self.stopped_by: str | None = None

    # ------------------------------------------------------------------------------------ init
    def init(self, model: Any, example: Any = None, *, rng: int | jax.Array = 0, params: Any = None,
             example_kwargs: Mapping[str, Any] | None = None, abstract: bool = False) -> TrainState:
        """Create the training state, directly sharded.

        Args:
          model: a ``tx.shard`` result on this engine's mesh, or a Flax model (Linen module, NNX
            module or factory) to shard with the engine's plan; the engine then hands the
            parameters it created to the state without a copy.
          example: Linen: an input batch (or tuple of inputs) to initialize from; an NNX model needs
            none (one given is not used).
          rng: seed or key for initialization and the per-step PRNG.
          params: existing parameters instead of initializing.
          example_kwargs: Linen only: keyword arguments for ``init``.
          abstract: allocate nothing: the state's arrays are ``jax.ShapeDtypeStruct``s with their
            shardings, for lowering a step (an abstract sharded model gives one too).

        Returns:
          The :class:`TrainState` (also kept as ``engine.state``).
        """
        if isinstance(model, ShardedModel):
            if model.mesh != self.mesh:
                raise PlanError(
                    "the sharded model lives on a different mesh than the engine",
                    suggestion="shard it with the engine's mesh: tx.shard(model, plan, engine.mesh)",
                )
            sharded, ours = model, False
        else:
            sharded = shard(model, self.plan, self.mesh, example=example, rng=rng, params=params,
                            example_kwargs=example_kwargs, abstract=abstract)
            # Parameters the engine created are handed to the state; a built NNX module (its
            # arrays are resharded in place) and params= stay the user's.
            ours = params is None and not isinstance(model, nnx.Module)
        self.state = create_train_state(sharded, self.optimizer, precision=self.precision, rng=rng,
                                        donate_params=ours)
        return self.state

    # ------------------------------------------------------------------------------------- fit
    def fit(
        self,
        step: StepFunction | Callable[..., Any],
        data: Iterable[Any],
        steps: int,
        *,
        state: TrainState | None = None,
        eval_step: Callable[[TrainState, Any], Mapping[str, Any]] | None = None,
        eval_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
        eval_every: int | None = None,
        eval_summary: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
        hooks: Sequence[Hook] = (),
    ) -> TrainState:
        """Train until ``state.step == steps``.

        Args:
          step: a ``@tx.step_fn`` (a plain function is wrapped with ``tx.step_fn``).
          data: host batches (dicts of NumPy arrays, each process its own slice; a
            ``tx.data.ArrayLoader`` resumes exactly) or global ``jax.Array`` batches.
          steps: the step number to stop at (a restored run continues to the same end).
          state: the state to start from; default ``engine.state`` from :meth:`init`.
          eval_step: ``(state, batch) -> metrics`` for held-out data.
          eval_data: batches for evaluation (re-iterable, or a function returning an iterable).
          eval_every: steps between evaluations (and always at the end) when ``eval_step`` is set.
          eval_summary: adds metrics computed from the averaged evaluation metrics, e.g.
            ``lambda m: {"perplexity": math.exp(m["loss"])}`` (a mean of per-batch perplexities
            would be wrong); see :meth:`evaluate`.
          hooks: called at each log interval with ``(step, state, metrics)``.

        Returns:
          The final state (also kept as ``engine.state``). With a checkpoint, SIGTERM or SIGINT
          stops training after the current step, which is saved: ``fit`` then returns early with
          :attr:`stopped_by` set to the signal's name (``None`` otherwise) and logs a warning on
          the ``titanax`` logger; whether to exit is the caller's decision (``titanax run`` exits
          with status 0, so a scheduler can requeue the same command). Messages such as the step
          resumed from are logged at INFO on ``titanax.engine``.
        """
        state = state if state is not None else self.state
        if state is None:
            raise TitanaxError("Engine.fit has no state to train",
                               suggestion="call engine.init(model, example=...) first, or pass state=")
        step = step if isinstance(step, StepFunction) else step_fn(step)
        check_run = getattr(self.checkpoint, "check_run", None)
        if check_run is not None:  # a keep_best metric no save could carry is refused up front
            check_run(evaluates=eval_step is not None and eval_data is not None)
        batches = self._device_batches(data)
        if self.checkpoint is not None:
            restored = self.checkpoint.restore_latest(state)
            if restored is not None:
                state, data_state = restored
                if data_state is not None and hasattr(batches, "restore"):
                    batches.restore(data_state)
                if jax.process_index() == 0:
                    at = int(jax.device_get(state.step))
                    where = getattr(self.checkpoint, "directory", None)
                    _log.info("resumed from the checkpoint of step %d%s%s", at, f" in {where}" if where else "",
                              f"; it already reached steps={steps}, nothing to train" if at >= steps else "")
        start = int(jax.device_get(state.step))
        if start >= steps:
            self.state = state
            if jax.process_index() == 0:  # no silent no-op: steps is where to stop, not how many
                _log.warning("fit(steps=%d) has nothing to train: the state is already at step %d. `steps` "
                             "is the step number to stop at (a resumed run stops at the same end); to train "
                             "%d more steps, pass steps=int(state.step) + %d", steps, start, steps, steps)
            return state
        self.logger.start(total_steps=steps, start_step=start)
        if jax.process_index() == 0:
            report_plan(step, state, self.mesh, start, steps)
        started = time.perf_counter()
        preempted: list[str] = []
        self.stopped_by = None
        with contextlib.ExitStack() as stack:
            if self.checkpoint is not None:
                stack.enter_context(_catch_preemption(preempted))
            state, meter = self._loop(step, state, batches, start, steps, eval_step, eval_data, eval_every,
                                      eval_summary, hooks, preempted)
        self.state = state
        if jax.process_index() == 0 and meter is not None:
            report_end(start, int(jax.device_get(state.step)), time.perf_counter() - started, meter)
        if preempted:
            self.stopped_by = preempted[0]
            where = getattr(self.checkpoint, "directory", "the checkpoint directory")
            _log.warning("stopped by %s at step %d; the checkpoint is in %s. Run the same command "
                         "again to resume.", preempted[0], int(jax.device_get(state.step)), where)
        return state

    def _loop(self, step: StepFunction, state: TrainState, batches: Iterator[Any], start: int,
              steps: int, eval_step: Any, eval_data: Any, eval_every: int | None,
              eval_summary: Any, hooks: Sequence[Hook],
              preempted: list[str]) -> tuple[TrainState, ThroughputMeter | None]:
        meter: ThroughputMeter | None = None
        pending: list[dict[str, jax.Array]] = []
        # (step, metrics) dispatched but not yet seen complete; checked for non-finite values as
        # they leave, which also bounds how far the host runs ahead.
        in_flight: collections.deque[tuple[int, dict[str, jax.Array]]] = collections.deque()
        watch = NonFiniteWatch(self.on_nonfinite, int(jax.device_get(state.skipped_steps)))
        check_metrics = getattr(self.checkpoint, "check_metrics", None)  # until a log settles it

        def settle(keep: int) -> None:
            while len(in_flight) > keep:
                done, metrics = in_flight.popleft()
                values = jax.device_get({k: metrics[k] for k in ("skipped_steps", "loss") if k in metrics})
                loss = values.get("loss")
                watch.observe(done, float(values["skipped_steps"]), None if loss is None else float(loss))

        current = start
        compiles_before = step.compile_watch.compiles
        try:
            for batch in batches:
                if meter is None:
                    meter = self._meter(step, state, batch)
                if self.profile is not None:
                    self.profile.before(current + 1)
                dispatched = time.perf_counter()
                state, metrics = step(state, batch)
                current += 1
                if self.profile is not None:
                    self.profile.after(current, (state, metrics))
                pending.append(metrics)
                in_flight.append((current, metrics))
                settle(self.max_steps_in_flight)
                if current == start + 1:  # start the clock after compilation
                    jax.block_until_ready(metrics)
                    meter.update(current)
                    if jax.process_index() == 0:
                        report_first_step(step, state, self.mesh, compiles_before,
                                          time.perf_counter() - dispatched)
                last = current >= steps or bool(preempted)
                logged = None
                if current % self.log_every == 0 or last:
                    settle(0)
                    logged = self._fetch(pending)
                    lr = learning_rate(state.optimizer, state.opt_state)
                    if lr is not None:
                        logged["lr"] = lr
                    logged.update(meter.update(current))
                    if step.compile_watch.recompiles:
                        logged["recompiles"] = float(step.compile_watch.recompiles)
                    pending = []
                    if eval_step is not None and eval_data is not None and (
                        last or (eval_every and current % eval_every == 0)):
                        logged.update(self.evaluate(eval_step, state, eval_data, summary=eval_summary))
                        meter.reset()  # evaluation time is not training throughput
                        meter.update(current)
                    self.logger.log(current, logged)
                    if check_metrics is not None and check_metrics(logged.keys()):
                        check_metrics = None
                    for hook in hooks:
                        hook(current, state, logged)
                if self.checkpoint is not None and _save_due(self.checkpoint, current, last):
                    settle(0)  # never write a checkpoint while a bad step may be unseen
                    saved = self.checkpoint.maybe_save(current, state, data_state=_data_state(batches),
                                                       force=last, metrics=logged,
                                                       meta={"plan": repr(self.plan or self.rules)})
                    if saved and jax.process_index() == 0:
                        _log.info("checkpoint of step %d %s %s", current,
                                  "being written to" if getattr(self.checkpoint, "async_save", False)
                                  else "written to", getattr(self.checkpoint, "directory", "the checkpoint"))
                if last:
                    break
            else:
                if current < steps:
                    raise TitanaxError(
                        f"the data ran out after step {current} of {steps}",
                        suggestion="use an endless loader (tx.data.ArrayLoader(..., epochs=None)) or "
                        "fewer steps",
                    )
        finally:
            if self.profile is not None:
                self.profile.close()
            if self.checkpoint is not None:
                self.checkpoint.wait()
            self.logger.close()
        return state, meter

    def evaluate(self, eval_step: Callable[[TrainState, Any], Mapping[str, Any]], state: TrainState,
                 data: Iterable[Any] | Callable[[], Iterable[Any]], *,
                 summary: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None
                 ) -> dict[str, float]:
        """Evaluate ``state`` on held-out data.

        Args:
          eval_step: ``(state, batch) -> metrics`` (jitted here, once per step function).
          state: the state to evaluate.
          data: batches (re-iterable, or a function returning an iterable).
          summary: maps the averaged metrics to extra ones (``perplexity = exp(loss)``).

        Returns:
          The mean of each metric over ``data`` weighted by batch size, plus ``summary``'s, each
          prefixed ``eval/``.
        """
        jitted = self._eval_jit(eval_step, state)
        totals: dict[str, float] = {}
        count = 0
        source = data() if callable(data) else data
        for batch in self._device_batches(source, prefetch=False):
            size = int(jax.tree.leaves(batch)[0].shape[0])
            metrics = jax.device_get(jitted(state, batch))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) * size
            count += size
        if count == 0:
            raise TitanaxError("evaluation data yielded no batch",
                               suggestion="pass a re-iterable (a list, or a function returning a loader)")
        means = {k: v / count for k, v in totals.items()}
        if summary is not None:
            means.update(summary(dict(means)))
        return {f"eval/{k}": float(v) for k, v in means.items()}

    # --------------------------------------------------------------------------------- helpers
    def _eval_jit(self, eval_step: Callable[..., Any], state: TrainState) -> Callable[..., Any]:
        cache = self.__dict__.setdefault("_eval_cache", {})
        name = getattr(eval_step, "__name__", repr(eval_step))
        key = (eval_step, layout_key(state, owner=f"eval step {name!r}"))
        if key not in cache:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            state_shardings = jax.tree.map(lambda x: x.sharding, state)

            def run(state: TrainState, batch: Any) -> dict[str, jax.Array]:
                with mesh_context(self.mesh):
                    return scalar_metrics(eval_step(state, batch), f"eval step {name!r}")

            cache[key] = jax.jit(run, in_shardings=(state_shardings, None), out_shardings=replicated)
        return cache[key]

    def _device_batches(self, data: Iterable[Any], prefetch: bool = True) -> Iterator[Any]:
        """Global batches from ``data``. A resumable source (``state()``, e.g. an ArrayLoader) is
        prefetched, and its state is reported for the batches actually consumed; other sources are
        converted batch by batch (already-global ``jax.Array`` batches pass through)."""
        if isinstance(data, DevicePrefetcher):
            return data
        if prefetch and self.prefetch > 0 and callable(getattr(data, "state", None)):
            return DevicePrefetcher(data, mesh=self.mesh, rules_or_plan=self.rules, size=self.prefetch)
        return (b if _is_global(b) else to_global(b, self.mesh, self.rules) for b in data)

    def _fetch(self, pending: list[dict[str, jax.Array]]) -> dict[str, float]:
        fetched = jax.device_get(pending)  # one sync for the whole interval
        # The loss first, the step's own metrics, then what Titanax adds (jit returns dicts sorted).
        keys = sorted(fetched[-1], key=lambda k: (k != "loss", k in _ADDED, k))
        out = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
        for cumulative in ("loss_scale", "skipped_steps"):  # states, not per-step values
            if cumulative in fetched[-1]:
                out[cumulative] = float(fetched[-1][cumulative])
        if out.get("skipped_steps") == 0 and "loss_scale" not in out:
            del out["skipped_steps"]  # shown once a step has been skipped (always under loss scaling)
        return out

    def _meter(self, step: StepFunction, state: TrainState, batch: Any) -> ThroughputMeter:
        examples = int(jax.tree.leaves(batch)[0].shape[0])
        peak = self.peak_flops if self.peak_flops is not None else peak_flops_per_device(
            self.mesh.devices.flat[0].device_kind, self.precision.compute)
        flops = None
        if self.flops_per_example is not None:
            flops = self.flops_per_example * examples
        elif peak is not None:  # only worth a look at the compiled program when MFU can be shown
            from titanax.profiling import inspect

            # Per-device FLOPs, the microbatch loop counted per trip (inspect walks the loops).
            stats = inspect(step.lower(state, batch).compile())
            flops = None if stats.flops is None else stats.flops * self.mesh.size
        tokens = None if self.tokens_per_example is None else self.tokens_per_example * examples
        return ThroughputMeter(examples_per_step=examples, tokens_per_step=tokens, flops_per_step=flops,
                               num_devices=self.mesh.size, peak_flops_per_device=peak)


@contextlib.contextmanager
def _catch_preemption(flag: list[str]):
    """Turn SIGTERM/SIGINT into a request to stop after the current step (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        flag.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _save_due(checkpoint: CheckpointStrategy, step: int, force: bool) -> bool:
    """Whether ``checkpoint`` would save at ``step`` (a strategy without ``due`` may, any step)."""
    due = getattr(checkpoint, "due", None)
    return True if due is None else bool(due(step, force=force))


def _is_global(batch: Any) -> bool:
    leaves = jax.tree.leaves(batch)
    return bool(leaves) and all(isinstance(x, jax.Array) for x in leaves)


def _data_state(batches: Any) -> Any:
    state = getattr(batches, "state", None)
    if not callable(state):
        return None
    try:
        return state()
    except TitanaxError:
        return None

