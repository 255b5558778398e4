"""``titanax describe``: a run's layout, memory and communication, read from its compiled step.

Nothing is allocated, trained or read: the model, its train state and one batch of the configured
shapes are abstract (``jax.ShapeDtypeStruct``s carrying their shardings), and the training step is
compiled ahead of time from them.
Parameter and optimizer bytes come from the arrays' shardings; activations and temporaries,
FLOPs and collectives from what XLA compiled (``tx.profiling.inspect``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from typing import Any

import jax
import numpy as np

from titanax.config.run import prepare
from titanax.config.schema import RunConfig
from titanax.html import Report
from titanax.parallel.layout import bytes_per_device

__all__ = ["CompiledRun", "RunDescription", "bytes_per_device", "compile_run", "describe_run"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunDescription:
    """What ``titanax describe`` reports (figures per device unless named otherwise)."""

    mesh: str
    """The mesh: axes, sizes, devices."""
    plan: str
    """``Plan.describe`` (rules, pipeline bubble)."""
    layout: str
    """The per-parameter table: path, shape, logical axes, spec, bytes per device."""
    parameter_count: int
    """Parameters in the model (all devices together)."""
    param_bytes: int
    """Parameter bytes on one device."""
    optimizer_bytes: int
    """Optimizer-state bytes on one device."""
    model_state_bytes: int
    """Other model-state bytes on one device (batch statistics, RNG keys)."""
    batch_shapes: dict[str, tuple[int, ...]]
    """The global batch the step is compiled for."""
    stats: Any
    """``tx.profiling.CompiledStats`` of the compiled training step."""
    activations: Any
    """``tx.profiling.ActivationEstimate`` of the model's forward (``None`` under pipeline
    parallelism, or if the step never called ``state.apply``)."""
    backend: str
    """The backend that compiled the step (``cpu`` on a laptop)."""
    compute_dtype: str = "float32"
    """The precision policy's compute dtype."""
    device: Any
    """The ``DeviceMemory`` to judge the plan against, or ``None``."""
    compile_seconds: float
    """Time to lower and compile the step."""
    layout_table: Any = None
    """The model's :class:`~titanax.parallel.layout.Layout` (the HTML table's rows), or ``None``."""
    schedule: Any = None
    """The pipeline's :class:`~titanax.parallel.schedules.Schedule` (its Gantt chart), or ``None``."""
    collectives_by_axis: Any = None
    """``tx.profiling.collectives_by_axis`` of the compiled step, or ``None``."""

    @property
    def state_bytes(self) -> int:
        """Parameters, optimizer state and model state on one device."""
        return self.param_bytes + self.optimizer_bytes + self.model_state_bytes

    @property
    def peak_bytes(self) -> int:
        """One device's peak: the train state plus the step's temporaries, as compiled."""
        return self.state_bytes + (self.stats.temp_bytes or 0)

    @property
    def analytic_peak_bytes(self) -> int | None:
        """The train state plus the analytic activations (``None`` without an estimate)."""
        if self.activations is None:
            return None
        return self.state_bytes + self.activations.per_device_bytes

    def __str__(self) -> str:
        return str(self.render())

    def html(self) -> str:
        """The report as one self-contained HTML page (``titanax describe --html``)."""
        return self.render().html()

    def _repr_html_(self) -> str:
        return self.render()._repr_html_()

    def save(self, path: str | os.PathLike[str]) -> pathlib.Path:
        """Write :meth:`html` to ``path`` (parent directories created); returns the path.

        Raises:
          TitanaxError: ``path`` is a directory or cannot be written.
        """
        return self.render().save(path)

    def render(self) -> Report:
        """What ``titanax describe`` prints (a ``str``); its HTML form (``.html()``) draws the
        plan's schedule, the memory per device, the layout table and the collectives."""
        from titanax.config.describe_html import run_html
        from titanax.units import human_bytes, human_count

        s = self.stats
        lines = [self.mesh, "", self.plan, "", "Parameters", self.layout, ""]
        lines.append(f"Memory per device (compiled for batch {self.batch_shapes})")
        lines.append(f"  parameters        {human_bytes(self.param_bytes):>12}   "
                     f"({human_count(self.parameter_count)} parameters in all)")
        lines.append(f"  optimizer state   {human_bytes(self.optimizer_bytes):>12}")
        if self.model_state_bytes:
            lines.append(f"  model state       {human_bytes(self.model_state_bytes):>12}")
        lines.append(f"  params + optimizer{human_bytes(self.param_bytes + self.optimizer_bytes):>12}")
        if s.temp_bytes is not None:
            note = (f"XLA temporaries of one step, compiled by the {self.backend} backend"
                    + (f", which keeps {self.compute_dtype} activations in float32"
                       if self.backend == "cpu" and self.compute_dtype != "float32" else ""))
            lines.append(f"  activations/temp  {human_bytes(s.temp_bytes):>12}   ({note})")
        if self.activations is not None:
            a = self.activations
            recomputed = (f" + {human_bytes(a.recomputed_bytes)} one layer recomputes at a time"
                          if a.recomputed_bytes else "")
            lines.append(f"  activations       {human_bytes(a.per_device_bytes):>12}   "
                         f"(analytic, in their own dtypes: {a.count} arrays the forward saves for the backward"
                         f"{recomputed}; {human_bytes(a.total_bytes)} saved on all devices)")
        lines.append(f"  peak              {human_bytes(self.peak_bytes):>12}   (state + compiled temporaries"
                     + (f"; {human_bytes(self.analytic_peak_bytes)} with the analytic activations)"
                        if self.analytic_peak_bytes is not None else ")"))
        if s.argument_bytes is not None:
            lines.append(f"  XLA buffers       arguments {human_bytes(s.argument_bytes)}, outputs "
                         f"{human_bytes(s.output_bytes or 0)} ({human_bytes(s.alias_bytes or 0)} reusing the "
                         f"arguments), temporaries {human_bytes(s.temp_bytes or 0)}: at most "
                         f"{human_bytes(s.allocated_bytes or 0)} held at once")
        if self.device is not None:
            lines.append(self.verdict())
        lines.append("")
        at_least = "at least " if s.unknown_trip_loops else ""
        lines.append(f"Collectives per step ({at_least}{s.total_collective_count}, {at_least}"
                     f"{human_bytes(s.total_collective_bytes)} per device; a loop body counts once per trip)")
        for kind, c in s.collectives.items():
            if c.count:
                lines.append(f"  {kind:<20} {c.count:>5} op{'s' if c.count > 1 else ' '}  "
                             f"{human_bytes(c.bytes):>12} in all  ({c.static_count} in the program text)")
        if not s.total_collective_count:
            lines.append("  none")
        if s.flops is not None:
            lines.append(f"FLOPs per step per device {human_count(s.flops)} (XLA cost model, a loop body counted once per trip)")
        lines.append(f"compiled in {self.compile_seconds:.1f} s by the {self.backend} backend; nothing was "
                     "allocated or trained")
        return Report("\n".join(lines), run_html(self), title="titanax describe")

    def verdict(self) -> str:
        """Whether one device's peak fits the device's memory, and by how much."""
        from titanax.units import human_bytes

        capacity = self.device.bytes
        name = f"{self.device.name} ({human_bytes(capacity)})"
        compiled, analytic = self.peak_bytes, self.analytic_peak_bytes
        if compiled <= capacity:
            text = (f"Verdict: fits one {name} with {human_bytes(capacity - compiled)} to spare "
                    f"({100 * compiled / capacity:.0f}% used)")
        elif analytic is not None and analytic <= capacity and self.backend == "cpu":
            text = (f"Verdict: fits one {name} by the analytic activations ({human_bytes(capacity - analytic)} to "
                    f"spare, {100 * analytic / capacity:.0f}% used), not by the CPU compile "
                    f"({human_bytes(compiled)}, float32 activations): confirm on the device")
        else:
            text = (f"Verdict: does NOT fit one {name}: the peak is {human_bytes(compiled)}, "
                    f"{compiled / capacity:.2f}x the memory; remat (model args: remat=full), more "
                    "devices for FSDP/TP/PP or a smaller batch per device lower it")
        if self.device.gpu:
            text += ("; JAX preallocates 75% of a GPU by default "
                     "(XLA_PYTHON_CLIENT_MEM_FRACTION=.95 raises it)")
        return text


def _abstract_batch(example: Any, engine: Any) -> Any:
    from titanax.parallel.batch import batch_sharding

    def one(x: Any) -> jax.ShapeDtypeStruct:
        shape = tuple(x.shape)
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=batch_sharding(engine.mesh, engine.rules, shape))

    return jax.tree.map(one, example)


class _ApplyRecorder:
    """Wraps a state's ``apply_fn`` to keep the shapes of the first call the step makes."""

    def __init__(self, apply_fn: Any) -> None:
        self.apply_fn = apply_fn
        self.call: tuple | None = None

    def __call__(self, params: Any, model_state: Any, *args: Any, **kwargs: Any) -> Any:
        if self.call is None:
            leaves, treedef = jax.tree.flatten((args, kwargs))
            arrays = [i for i, leaf in enumerate(leaves) if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]
            shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731
            self.call = (shapes(params), shapes(model_state), leaves, treedef, arrays,
                         [shapes(leaves[i]) for i in arrays])
        return self.apply_fn(params, model_state, *args, **kwargs)

    def estimate(self, *, batch_ways: int, width_ways: dict[int, int]) -> Any:
        from titanax.profiling.activations import saved_activations

        if self.call is None:
            return None
        params, model_state, leaves, treedef, arrays, array_shapes = self.call

        def forward(params: Any, model_state: Any, array_values: list) -> Any:
            filled = list(leaves)
            for i, value in zip(arrays, array_values):
                filled[i] = value
            args, kwargs = jax.tree.unflatten(treedef, filled)
            return self.apply_fn(params, model_state, *args, **kwargs)

        batch_size = array_shapes[0].shape[0] if array_shapes and array_shapes[0].shape else None
        return saved_activations(forward, params, model_state, array_shapes, batch_size=batch_size,
                                 batch_ways=batch_ways, width_ways=width_ways)


def _activations(recorder: _ApplyRecorder, sharded: Any, **split: Any) -> Any:
    """The saved activations, plus under remat the intermediates one layer recomputes in the
    backward pass (they live beside the saved ones while that layer's gradient is computed)."""
    from flax import nnx

    from titanax.nn.remat import without_remat
    from titanax.nn.stack import LayerStack

    saved = recorder.estimate(**split)
    stacks = ([node for _, node in nnx.iter_graph(sharded.module) if isinstance(node, LayerStack)]
              if isinstance(sharded.module, nnx.Module) else [])
    if saved is None or not any(stack.remat != "none" for stack in stacks):
        return saved
    with without_remat():
        kept = recorder.estimate(**split)
    layers = max(stack.num_layers for stack in stacks if stack.remat != "none")
    extra = max(0, kept.per_device_bytes - saved.per_device_bytes) // layers
    return dataclasses.replace(saved, per_device_bytes=saved.per_device_bytes + extra, recomputed_bytes=extra)


def _width_ways(layout: Any, mesh: Any, batch_axes: tuple[str, ...]) -> dict[int, int]:
    """Dimension size -> devices it is split over, for the parameters' dimensions split over
    non-batch axes (tensor, pipeline): activations of those widths are split the same way."""
    ways: dict[int, int] = {}
    for entry in layout:
        for size, axes in zip(entry.shape, tuple(entry.spec)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            split = math.prod(mesh.shape[a] for a in axes if a not in batch_axes)
            if split > 1:
                ways.setdefault(size, split)
    return ways


@dataclasses.dataclass(frozen=True)
class CompiledRun:
    """A run's training step compiled from abstract state: what ``describe`` and ``plan`` read."""

    prepared: Any
    """The ``Prepared`` parts (engine, model, data, step)."""
    sharded: Any
    """The abstract ``ShardedModel``."""
    state: Any
    """The abstract ``TrainState`` (shapes and shardings)."""
    batch: Any
    """The abstract global batch the step is compiled for."""
    compiled: Any
    """The compiled step (``jax.stages.Compiled``)."""
    seconds: float
    """Time to lower and compile the step."""
    recorder: Any
    """What the model was called with (for the analytic activations)."""


def compile_run(cfg: RunConfig, *, source: Any = None) -> CompiledRun:
    """Lay out and compile a run's training step from abstract state, allocating nothing.

    Args:
      cfg: the run configuration (its mesh must fit the devices present, e.g. simulated ones).
      source: the ``DataSource`` already built for ``cfg.data`` (see :func:`~titanax.config.run.prepare`).

    Returns:
      The :class:`CompiledRun`.

    Raises:
      TitanaxError: the configuration cannot be built on the current devices.
    """
    from titanax.parallel.shard import shard

    run = prepare(cfg, loggers=False, checkpoint=False, source=source)
    engine = run.engine
    # Abstract end to end: shapes and shardings only, so a 405B plan fits on a laptop.
    sharded = shard(run.model, engine.plan, engine.mesh, example=run.model_example, rng=cfg.train.seed,
                    abstract=True)
    state = engine.init(sharded)
    recorder = _ApplyRecorder(state.apply_fn)
    state = state.replace(apply_fn=recorder)
    batch = _abstract_batch(run.source.example, engine)
    started = time.perf_counter()
    compiled = run.step.lower(state, batch).compile()
    return CompiledRun(prepared=run, sharded=sharded, state=state, batch=batch, compiled=compiled,
                       seconds=time.perf_counter() - started, recorder=recorder)


def describe_run(cfg: RunConfig, *, device: Any = None) -> RunDescription:
    """Lay out and compile a run's training step without allocating or training anything.

    Args:
      cfg: the run configuration.
      device: a ``tx.profiling.DeviceMemory`` to judge the plan against (``titanax describe
        --device h100``), or ``None``.

    Returns:
      A :class:`RunDescription` (``.render()`` is what ``titanax describe`` prints).

    Raises:
      TitanaxError: the configuration cannot be built on the current devices.
    """
    from titanax.parallel.batch import batch_axes
    from titanax.profiling import collectives_by_axis, inspect
    from titanax.runtime import describe_mesh

    built = compile_run(cfg)
    engine, sharded, state, batch = built.prepared.engine, built.sharded, built.state, built.batch
    compiled, seconds, recorder = built.compiled, built.seconds, built.recorder
    axes = batch_axes(engine.rules, engine.mesh.shape)
    # Under PP the step runs the stack as a pipeline of microbatches, which the residual count
    # below cannot divide per device; the compiled figure stands alone there.
    activations = None if engine.plan.pipeline_parallel is not None else _activations(recorder, sharded, batch_ways=math.prod(engine.mesh.shape[a] for a in axes),
                               width_ways=_width_ways(sharded.layout, engine.mesh, axes))
    return RunDescription(
        mesh=describe_mesh(engine.mesh),
        plan=engine.plan.describe(engine.mesh),
        layout=sharded.layout.describe(),
        parameter_count=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        param_bytes=bytes_per_device(state.params),
        optimizer_bytes=bytes_per_device(state.opt_state),
        model_state_bytes=bytes_per_device(state.model_state),
        batch_shapes={"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
                      for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]},
        stats=inspect(compiled),
        activations=activations,
        backend=jax.devices()[0].platform,
        compute_dtype=engine.precision.compute,
        device=device,
        compile_seconds=seconds,
        layout_table=sharded.layout,
        schedule=None if engine.plan.pipeline_parallel is None else engine.plan.pipeline_parallel.schedule_table(),
        collectives_by_axis=collectives_by_axis(compiled, engine.mesh),
    )
