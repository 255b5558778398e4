"""``tx.autoplan`` / ``titanax plan``: choose the plan by compiling the candidates.

1. Read the model's sizes once from its abstract state (parameter and optimizer bytes, the sizes
   of the dimensions it names).
2. Enumerate every split of the devices over pipe, data, fsdp and tensor axes with their options
   (:mod:`titanax.planner.candidates`) and prune by divisibility and arithmetic memory.
3. Compile the survivors abstractly, cheapest by arithmetic first, until the time budget is spent:
   nothing is allocated, so a 70B plan on 256 devices compiles on a laptop.
4. From each compiled step read the peak memory per device (state + XLA's temporaries), FLOPs
   and bytes accessed (every loop counted per trip) and collective bytes per mesh axis, and rank
   the plans that fit by the roofline step time on the chosen device
   (:mod:`titanax.planner.roofline`).

Every candidate that is not chosen says why.
"""

from __future__ import annotations

import dataclasses
import html
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from titanax.planner.candidates import Candidate, ModelFacts, arithmetic_order, enumerate_candidates
from titanax.planner.device_spec import DEVICE_SPECS, DeviceSpec
from titanax.planner.roofline import StepEstimate, estimate_step
from titanax.exceptions import ConfigError, TitanaxError
from titanax.units import human_bytes

__all__ = ["PlanRow", "PlanSearch", "autoplan", "measure_step_time", "model_facts"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class PlanRow:
    """One candidate's outcome."""

    candidate: Candidate
    status: str
    """``chosen``, ``ranked`` (compiled, fits, slower than the chosen), ``too big`` (compiled,
    does not fit), ``failed`` (does not compile), ``not compiled`` (over the time budget) or
    ``pruned`` (ruled out by arithmetic)."""
    reason: str
    estimate: StepEstimate | None = None
    peak_bytes: int | None = None
    """One device's compiled peak: train state plus the step's temporaries."""
    state_bytes: int | None = None
    flops: float | None = None
    """FLOPs per device per step, loop-aware."""
    collective_bytes: float | None = None
    """Collective bytes per device per step, loop-aware."""
    bytes_accessed: float | None = None
    """Bytes one device reads and writes in memory per step, loop-aware."""
    collectives: Mapping[tuple[str, ...], Mapping[str, Any]] | None = None
    """Mesh axes -> collective kind -> :class:`~titanax.profiling.CollectiveStats` (count, bytes)
    per device per step: with ``flops`` and ``bytes_accessed``, what :func:`estimate_step` needs
    to estimate this plan for another device without compiling it again."""
    compile_seconds: float | None = None
    measured_seconds: float | None = None
    """The step time measured on this machine (``measure_steps > 0``)."""


@dataclasses.dataclass(frozen=True)
class PlanSearch:
    """What :func:`autoplan` found: every candidate, ranked or with the reason it was left out."""

    rows: tuple[PlanRow, ...]
    spec: DeviceSpec
    devices: int
    memory_bytes: int
    seconds: float
    values: Mapping[str, Any]
    """The run configuration the candidates vary (a plain mapping)."""

    @property
    def best(self) -> PlanRow | None:
        """The chosen plan: the fastest estimate among those that fit (``None`` if none does)."""
        return next((row for row in self.rows if row.status == "chosen"), None)

    def ranked(self) -> list[PlanRow]:
        """Compiled plans that fit, fastest estimate first."""
        return [row for row in self.rows if row.status in ("chosen", "ranked")]

    def config(self, row: PlanRow | None = None) -> dict[str, Any]:
        """The run configuration with ``row``'s (default: the chosen) mesh, plan and remat."""
        row = row or self.best
        if row is None:
            raise ConfigError("no candidate fits the device's memory",
                              suggestion="allow more devices, a smaller batch or remat, or a larger device",
                              owner="autoplan", field="devices", value=self.devices)
        return row.candidate.apply_to(self.values)

    def write(self, path: str | os.PathLike[str], row: PlanRow | None = None) -> None:
        """Write the run configuration with the chosen plan as YAML, for ``titanax run``."""
        import yaml

        text = yaml.safe_dump(self.config(row), sort_keys=False)
        chosen = (row or self.best).candidate.label
        with open(path, "w") as f:
            f.write(f"# Chosen by titanax plan for {self.devices} x {self.spec.name}: {chosen}\n{text}")

    def table(self, limit: int | None = None) -> str:
        """The candidates as text: rank, plan, estimate, peak memory, status and reason."""
        header = ("#", "plan", "step (est.)", "measured", "peak/device", "compile", "status", "why")
        lines = [header]
        for i, row in enumerate(self.rows[:limit] if limit else self.rows, 1):
            lines.append((str(i), row.candidate.label,
                          f"{row.estimate.total_s * 1e3:.2f} ms" if row.estimate else "-",
                          f"{row.measured_seconds * 1e3:.2f} ms" if row.measured_seconds else "-",
                          human_bytes(row.peak_bytes) if row.peak_bytes is not None else "-",
                          f"{row.compile_seconds:.1f} s" if row.compile_seconds is not None else "-",
                          row.status, row.reason))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines]
        summary = (f"{len(self.rows)} candidates for {self.devices} x {self.spec.name} "
                   f"({human_bytes(self.memory_bytes)} each) in {self.seconds:.0f} s: "
                   f"{sum(r.compile_seconds is not None for r in self.rows)} compiled, "
                   f"{len(self.ranked())} fit")
        return "\n".join([summary, *out])

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        cells = []
        for i, row in enumerate(self.rows, 1):
            style = ' style="font-weight:bold"' if row.status == "chosen" else ""
            values = (i, row.candidate.label,
                      f"{row.estimate.total_s * 1e3:.2f} ms" if row.estimate else "",
                      f"{row.measured_seconds * 1e3:.2f} ms" if row.measured_seconds else "",
                      human_bytes(row.peak_bytes) if row.peak_bytes is not None else "",
                      row.status, row.reason)
            cells.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in ("#", "plan", "step (est.)", "measured", "peak/device",
                                                 "status", "why"))
        return (f"<p>{html.escape(self.table().splitlines()[0])}</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>")


def model_facts(values: Mapping[str, Any], source: Any = None) -> ModelFacts:
    """The model's sizes, read from its abstract state on one device (nothing allocated); ``source``:
    the run's ``DataSource`` if built already."""
    import numpy as np

    from titanax.config import from_dict
    from titanax.config.describe import bytes_per_device
    from titanax.config.run import build_model, build_source
    from titanax.exec.state import create_train_state
    from titanax.parallel.plan import DP, Plan
    from titanax.parallel.shard import shard
    from titanax.runtime.mesh import MeshSpec

    cfg = from_dict(Candidate().apply_to(values))
    mesh = MeshSpec(axes=("data",), shape=(1,), devices=jax.devices()[:1]).build()
    plan = Plan(data_parallel=DP(axis="data"))
    source = source if source is not None else build_source(cfg)
    model, example = build_model(cfg, source.example, plan.resolved_rules(), mesh)
    sharded = shard(model, plan, mesh, example=example, rng=cfg.train.seed, abstract=True)
    state = create_train_state(sharded, cfg.optimizer.build(cfg.train.steps), precision=cfg.precision.build())
    dims: dict[str, set[int]] = {}
    for entry in sharded.layout:
        for name, size in zip(entry.names or (), entry.shape):
            if isinstance(name, str):
                dims.setdefault(name, set()).add(int(size))
    return ModelFacts(param_bytes=bytes_per_device(state.params), optimizer_bytes=bytes_per_device(state.opt_state),
                      parameter_count=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
                      dims={name: frozenset(sizes) for name, sizes in dims.items()},
                      batch_size=cfg.data.batch_size, tokens_per_example=source.tokens_per_example)


def _evaluate(values: Mapping[str, Any], candidate: Candidate, spec: DeviceSpec, source: Any = None) -> dict[str, Any]:
    """Compile ``candidate`` abstractly; its memory, loop-aware figures and roofline estimate."""
    from titanax.config import from_dict
    from titanax.config.describe import compile_run

    return estimate_compiled(compile_run(from_dict(candidate.apply_to(values)), source=source), spec)


def estimate_compiled(built: Any, spec: DeviceSpec) -> dict[str, Any]:
    """A compiled run's (:func:`~titanax.config.describe.compile_run`) memory, loop-aware FLOPs
    and collective bytes per device, and the roofline estimate made of them.

    A pipeline's idle ticks count as what they run (its slots' conditionals are weighted by the
    schedule's busy share, :mod:`titanax.parallel.busy`), so the figures are what the average
    device executes in one step.
    """
    from titanax.config.describe import bytes_per_device
    from titanax.profiling import collectives_by_axis, inspect

    stats = inspect(built.compiled)
    mesh = built.prepared.engine.mesh
    state = built.state
    state_bytes = (bytes_per_device(state.params) + bytes_per_device(state.opt_state)
                   + bytes_per_device(state.model_state))
    collectives = collectives_by_axis(built.compiled, mesh)
    estimate = estimate_step(flops=stats.flops or 0.0, bytes_accessed=stats.bytes_accessed or 0.0,
                             collectives_by_axis=collectives, mesh=mesh,
                             spec=spec, compute_dtype=built.prepared.config.precision.compute)
    return dict(estimate=estimate, state_bytes=state_bytes, peak_bytes=state_bytes + (stats.temp_bytes or 0),
                flops=stats.flops, collective_bytes=stats.total_collective_bytes,
                bytes_accessed=stats.bytes_accessed, collectives=collectives, compile_seconds=built.seconds)


class _StepTimer:
    """One plan's run, prepared once and then timed step by step: a search times its plans in
    rounds, one plan after another, so that a slow spell of a shared machine lands on every plan
    rather than on whichever ran during it."""

    def __init__(self, values: Mapping[str, Any], candidate: Candidate, *, warmup: int = 2,
                 source: Any = None) -> None:
        from titanax.config import from_dict, prepare
        from titanax.data import to_global

        run = prepare(from_dict(candidate.apply_to(values)), loggers=False, checkpoint=False, source=source)
        batches = iter(run.source.train_batches())
        self._placed = [to_global(next(batches), run.engine.mesh, run.engine.plan) for _ in range(4)]
        self._step, self._state = run.step, run.init()
        self.times: list[float] = []
        self._run(max(warmup, 1), record=False)

    def _run(self, steps: int, *, record: bool = True) -> None:
        for i in range(steps):  # one step at a time: each is timed alone
            started = time.perf_counter()
            self._state, metrics = self._step(self._state, self._placed[len(self.times) % len(self._placed)])
            jax.block_until_ready((self._state, metrics))
            if record:
                self.times.append(time.perf_counter() - started)

    def time(self, steps: int) -> None:
        """Time ``steps`` more steps."""
        self._run(steps)

    @property
    def median(self) -> float:
        """The median of every timed step: a stray slow step does not count."""
        return statistics.median(self.times)


def measure_step_time(values: Mapping[str, Any], candidate: Candidate, *, steps: int = 5, warmup: int = 2) -> float:
    """The median seconds of one training step of ``candidate`` over ``steps`` steps (after
    ``warmup``), run for real on this machine's devices (a small model only: its state is
    allocated)."""
    timer = _StepTimer(values, candidate, warmup=warmup)
    timer.time(steps)
    return timer.median


def _spec_for(device: str | DeviceSpec | None) -> DeviceSpec:
    if isinstance(device, DeviceSpec):
        return device
    if device is None or device == "calibrate":
        from titanax.planner.calibration import calibrate

        return calibrate()
    if device not in DEVICE_SPECS:
        raise ConfigError(f"--device {device!r} is not a device preset",
                          suggestion=f"use one of {sorted(DEVICE_SPECS)}, or 'calibrate' to measure this machine",
                          owner="autoplan", field="device", value=device)
    return DEVICE_SPECS[device]


def autoplan(
    config: str | os.PathLike[str] | Mapping[str, Any],
    *,
    devices: int | None = None,
    device: str | DeviceSpec | None = "h100",
    memory_bytes: int | None = None,
    overrides: Sequence[str] = (),
    time_budget: float = 240.0,
    max_compiles: int | None = None,
    schedules: Sequence[str] = ("gpipe", "1f1b"),
    microbatch_multiples: Sequence[int] = (1, 2),
    remat: Sequence[str | None] = (None,),
    sequence_parallel: bool = True,
    measure_steps: int = 0,
    measure_rounds: int = 3,
    progress: Callable[[str], None] | bool = False,
) -> PlanSearch:
    """Choose a parallelism plan for a run by compiling candidate plans abstractly.

    Args:
      config: a run configuration: a YAML path (as ``titanax run`` takes) or a mapping.
      devices: devices to plan for; default every device present (simulate them on a CPU with
        ``tx.simulate_cpu_devices(n)`` before JAX starts, as ``titanax plan --devices n`` does).
      device: a preset of :data:`~titanax.planner.device_spec.DEVICE_SPECS` (``h100``, ...), a
        :class:`~titanax.planner.device_spec.DeviceSpec`, or ``"calibrate"`` / ``None`` to measure
        this machine's devices (:func:`~titanax.planner.calibration.calibrate`).
      memory_bytes: one device's memory budget; default the device's memory.
      overrides: ``section.key=value`` assignments applied to ``config``.
      time_budget: seconds to spend compiling; candidates left are listed as not compiled.
      max_compiles: compile at most this many candidates (``None``: as the time budget allows).
      schedules: pipeline schedules to try.
      microbatch_multiples: pipeline microbatch counts to try, as multiples of the stage count.
      remat: values of the model factory's ``remat`` argument to try (``None``: as configured).
      sequence_parallel: also try sequence parallelism with tensor parallelism.
      measure_steps: when positive, also run each compiled plan that fits on this machine and
        record its step time, the median of ``measure_steps`` steps in each of ``measure_rounds``
        rounds that take the plans in turn (small models only: every measured plan's state is
        allocated at once).
      measure_rounds: rounds of ``measure_steps`` steps per plan.
      progress: print a line per compiled candidate (to stderr), or a function taking the line.

    Returns:
      A :class:`PlanSearch` (``print`` it; ``.best``, ``.config()``, ``.write(path)``; in a
      notebook it shows as an HTML table).

    Raises:
      ConfigError: the configuration, the device preset or the device count is unusable.

    Example:
      >>> search = tx.autoplan("examples/configs/gpt_tiny_dp8.yaml", devices=8,   # doctest: +SKIP
      ...                      device="h100", time_budget=60)
      >>> print(search.table(limit=10))                                         # doctest: +SKIP
      >>> search.write("best.yaml")                  # titanax run best.yaml     # doctest: +SKIP
    """
    from titanax.config.loader import load_values

    started = time.perf_counter()
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress is True else (progress or None)
    values = load_values(config, overrides) if not isinstance(config, Mapping) else dict(config)
    available = jax.device_count()
    devices = available if devices is None else devices
    if not isinstance(devices, int) or devices < 1 or devices > available:
        raise ConfigError(f"devices={devices!r}: this process has {available} device(s)",
                          suggestion=f"simulate them first: tx.simulate_cpu_devices({devices}) before JAX starts, "
                          f"or titanax plan --devices {devices}", owner="autoplan", field="devices", value=devices)
    for field, value in (("measure_steps", measure_steps), ("measure_rounds", measure_rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "measure_steps" else 1):
            raise ConfigError(f"autoplan({field}={value!r}) must be a {'non-negative' if field == 'measure_steps' else 'positive'} integer",
                              suggestion="e.g. measure_steps=5, measure_rounds=3", owner="autoplan", field=field, value=value)
    spec = _spec_for(device)
    budget = memory_bytes if memory_bytes is not None else spec.memory_bytes
    from titanax.config import from_dict
    from titanax.config.run import build_source

    source = build_source(from_dict(Candidate().apply_to(values)))  # once: candidates differ in mesh and plan only
    facts = model_facts(values, source)
    kept, pruned = enumerate_candidates(devices, facts, memory_bytes=budget, devices_per_node=spec.devices_per_node,
                                        schedules=schedules, microbatch_multiples=microbatch_multiples,
                                        remat=remat, sequence_parallel=sequence_parallel)
    order = arithmetic_order(kept, facts, flops_per_second=spec.flops_for("bfloat16"),
                             bandwidth=spec.intra_node_bandwidth, cross_node_bandwidth=spec.inter_node_bandwidth,
                             devices_per_node=spec.devices_per_node)
    evaluated: list[PlanRow] = []
    timers: dict[int, _StepTimer] = {}  # position in `evaluated` -> the plan's prepared run
    for rank, candidate in enumerate(order, 1):
        spent = time.perf_counter() - started
        if spent > time_budget or (max_compiles is not None and rank > max_compiles):
            why = ("over the compile budget" if max_compiles is not None and rank > max_compiles
                   else f"over the {time_budget:.0f} s time budget")
            evaluated.append(PlanRow(candidate=candidate, status="not compiled",
                                     reason=f"{why} (arithmetic rank {rank} of {len(order)})"))
            continue
        try:
            figures = _evaluate(values, candidate, spec, source)
        except TitanaxError as error:
            evaluated.append(PlanRow(candidate=candidate, status="failed", reason=error.message.splitlines()[0]))
            if say:
                say(f"[{rank}/{len(order)}] {candidate.label}: {error.message.splitlines()[0]}")
            continue
        fits = figures["peak_bytes"] <= budget
        status, reason = ("ranked", "") if fits else (
            "too big", f"compiled peak {human_bytes(figures['peak_bytes'])} > {human_bytes(budget)}")
        if measure_steps and fits:
            timers[len(evaluated)] = _StepTimer(values, candidate, source=source)
        evaluated.append(PlanRow(candidate=candidate, status=status, reason=reason, **figures))
        if say:
            est = figures["estimate"]
            say(f"[{'#' * (20 * rank // len(order)):<20}] {rank}/{len(order)} {candidate.label}: "
                f"{est.total_s * 1e3:.2f} ms/step ({est.bound}), peak {human_bytes(figures['peak_bytes'])}, "
                f"compiled in {figures['compile_seconds']:.1f} s")
    for round_ in range(measure_rounds if timers else 0):
        for timer in timers.values():
            timer.time(measure_steps)
        if say:
            say(f"measured round {round_ + 1}/{measure_rounds} of {len(timers)} plans")
    for i, timer in timers.items():
        evaluated[i] = dataclasses.replace(evaluated[i], measured_seconds=timer.median)
    rows = _rank(evaluated) + [PlanRow(candidate=r.candidate, status="pruned", reason=r.reason) for r in pruned]
    return PlanSearch(rows=tuple(rows), spec=spec, devices=devices, memory_bytes=budget,
                      seconds=time.perf_counter() - started, values=values)


def _rank(rows: list[PlanRow]) -> list[PlanRow]:
    """Fitting plans by estimate (the first is chosen), then the rest in order of how far they got."""
    fitting = sorted((r for r in rows if r.status == "ranked"), key=lambda r: r.estimate.total_s)
    out = []
    for i, row in enumerate(fitting):
        if i == 0:
            out.append(dataclasses.replace(row, status="chosen", reason=f"fastest estimate ({row.estimate.bound} bound)"))
        else:
            slower = row.estimate.total_s / fitting[0].estimate.total_s
            out.append(dataclasses.replace(row, reason=f"{slower:.2f}x the chosen plan's estimate "
                                           f"({row.estimate.bound} bound)"))
    order = {"too big": 0, "failed": 1, "not compiled": 2}
    out.extend(sorted((r for r in rows if r.status in order), key=lambda r: order[r.status]))
    return out

