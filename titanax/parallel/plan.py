"""Plan: which kinds of parallelism run over which mesh axes.

A :class:`Plan` is the single source of truth for layout: together with a mesh it determines the
sharding of every parameter, optimizer slot, batch and activation, through the :class:`Rules` it
composes (:meth:`Plan.resolved_rules`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jax.sharding import Mesh

from titanax.nn.remat import check_policy
from titanax.exceptions import PlanError
from titanax.html import Report
from titanax.parallel import presets
from titanax.parallel.report import plan_html
from titanax.parallel.rules import Rules
from titanax.parallel.schedules import SCHEDULES, Schedule, build_schedule

__all__ = ["DP", "FSDP", "PP", "TP", "Plan"]


def _check_axis(part: str, axis: object) -> None:
    if not isinstance(axis, str) or not axis:
        raise PlanError(
            f"{part}(axis={axis!r}): the axis must be a mesh axis name",
            suggestion=f"write {part}(axis='data') with a name from your MeshSpec axes",
            owner=part, field="axis", value=axis,
        )


@dataclasses.dataclass(kw_only=True, frozen=True)
class DP:
    """Data parallelism: replicas of the model, each on a slice of the batch."""

    axis: str = "data"
    """Mesh axis the batch is split over."""

    accumulate_steps: int = 1
    """Microbatches whose gradients are summed before one optimizer update (used by the engine)."""

    def __post_init__(self) -> None:
        _check_axis("DP", self.axis)
        if not isinstance(self.accumulate_steps, int) or self.accumulate_steps < 1:
            raise PlanError(
                f"DP(accumulate_steps={self.accumulate_steps!r}) must be a positive integer",
                suggestion="use accumulate_steps=1 for no accumulation",
                owner="DP", field="accumulate_steps", value=self.accumulate_steps,
            )


@dataclasses.dataclass(kw_only=True, frozen=True)
class FSDP:
    """Fully sharded data parallelism (ZeRO-3): batch, parameters and optimizer state split."""

    axis: str = "fsdp"
    """Mesh axis the batch and each parameter are split over."""

    shard_unnamed: bool = True
    """Shard parameters that carry no logical names on their largest dimension the axis divides."""

    def __post_init__(self) -> None:
        _check_axis("FSDP", self.axis)


@dataclasses.dataclass(kw_only=True, frozen=True)
class TP:
    """Tensor parallelism: single matmuls split across devices (Megatron-style by default)."""

    axis: str = "tensor"
    """Mesh axis the tensor-parallel dimensions are split over."""

    rules: Rules | None = None
    """Rules mapping logical names to ``axis``; ``None`` uses :func:`titanax.presets.tensor_parallel`."""

    sequence_parallel: bool = False
    """Also split activations named ``seq`` over ``axis`` (Megatron sequence parallelism): the
    residual stream's layer norms and adds run on a slice of the sequence, and each block's
    all-reduce becomes a reduce-scatter plus an all-gather."""

    def __post_init__(self) -> None:
        _check_axis("TP", self.axis)
        if self.sequence_parallel and self.rules is not None:
            raise PlanError(
                "TP(sequence_parallel=True) builds its own rules; it cannot be combined with TP(rules=...)",
                suggestion="add ('seq', axis) to your own rules instead, or drop rules= to use the preset",
                owner="TP", field=("sequence_parallel", "rules"),
            )
        if self.rules is not None and not isinstance(self.rules, Rules):
            raise PlanError(
                f"TP(rules=...) got {type(self.rules).__name__}, not tx.Rules",
                suggestion="wrap the pairs: TP(axis='tensor', rules=tx.Rules([('mlp', 'tensor')]))",
                owner="TP", field="rules",
            )

    def resolved_rules(self) -> Rules:
        """The rules this part contributes to the plan."""
        if self.rules is not None:
            return self.rules
        return presets.tensor_parallel(self.axis, sequence_parallel=self.sequence_parallel)


@dataclasses.dataclass(kw_only=True, frozen=True)
class PP:
    """Pipeline parallelism: the model's ``tx.nn.LayerStack`` split into stages over ``axis``.

    The stack's ``L`` layers form ``stages * repeats`` equal chunks; stage ``s`` runs chunks
    ``s, s + stages, ...`` (one per repeat). The batch is cut into ``microbatches`` that flow
    through the stages; the embedding and head run outside the stages.
    """

    axis: str = "pipe"
    """Mesh axis the stages are split over (its size must equal ``stages``)."""

    stages: int
    """Pipeline stages ``p``."""

    microbatches: int
    """Microbatches ``m`` per step (at least ``stages``; the global batch must divide by it)."""

    repeats: int = 1
    """Virtual stages per device ``v`` (``circular`` and ``interleaved``): smaller bubbles, more
    stage-to-stage transfers."""

    schedule: str = "gpipe"
    """``gpipe``, ``circular``, ``1f1b``, ``interleaved`` or ``zbh1`` (see ``titanax.parallel.schedules``)."""

    remat: str = "none"
    """Recompute inside each stage in the backward pass: ``none``, ``full``, ``save_dots``,
    ``save_dots_no_batch``."""

    recompute: bool = False
    """Explicit schedules (``1f1b``, ``interleaved``): the backward slot recomputes the stage from
    its stashed input instead of reading the residuals its forward slot stashed (less memory:
    one activation per stashed microbatch instead of every layer's residuals; a forward pass
    more compute). ``remat`` chooses what the stash keeps in between (``full``: each layer's
    input only). gpipe and circular keep what autodiff keeps: use ``remat`` there."""

    nan_bubbles: bool = False
    """Debug check: feed NaN into every idle (bubble) slot; results must not change."""

    unroll_ticks: bool = False
    """Unroll the loop over ticks (compile time grows with the tick count). ``tx.profiling.inspect``
    counts a rolled loop per trip, but each tick's conditional slots at their heaviest branch (an
    upper bound); unrolled, XLA may fold the conditionals and count the ticks as they run."""

    def __post_init__(self) -> None:
        _check_axis("PP", self.axis)
        if self.schedule not in SCHEDULES:
            raise PlanError(f"PP(schedule={self.schedule!r}) is not a schedule",
                            suggestion=f"use one of {', '.join(SCHEDULES)}",
                            owner="PP", field="schedule", value=self.schedule)
        try:
            check_policy(self.remat, "PP(remat=...)")
        except PlanError as error:  # the policy check is shared with LayerStack: say whose it is
            raise error.replace(owner="PP", field="remat", value=self.remat) from None
        if self.recompute and self.schedule in ("gpipe", "circular"):
            raise PlanError(f"PP(recompute=True) applies to the explicit schedules, not {self.schedule!r}",
                            suggestion="use PP(remat='full') to recompute each stage in gpipe/circular's backward",
                            owner="PP", field=("recompute", "schedule"), value=(True, self.schedule))
        if self.recompute and self.schedule == "zbh1":
            raise PlanError("PP(recompute=True) cannot split the backward of zbh1: its input-gradient and "
                            "weight-gradient slots both read the stashed residuals",
                            suggestion="use PP(recompute=False) with remat='full' to stash only each layer's input",
                            owner="PP", field=("recompute", "schedule"), value=(True, self.schedule))
        self.schedule_table()  # validates stages, microbatches and repeats

    def schedule_table(self) -> Schedule:
        """The schedule as a validated table (tick x stage)."""
        return _schedule(self.schedule, self.stages, self.microbatches, self.repeats)

    def forward_table(self) -> Schedule:
        """The forward loop a pipelined stack runs when called plainly (evaluation, ``jax.grad``):
        this schedule for gpipe and circular; for the explicit schedules, whose backward needs the
        loss inside the loop (``tx.value_and_grad``), gpipe's or circular's over the same chunks."""
        name = self.schedule if self.schedule in ("gpipe", "circular") else ("gpipe" if self.repeats == 1 else "circular")
        return _schedule(name, self.stages, self.microbatches, self.repeats)

    def resolved_rules(self) -> Rules:
        """The stacked ``layers`` axis over the pipeline axis."""
        return presets.pipeline_parallel(self.axis)

    def describe(self, activation_bytes: int | None = None) -> list[str]:
        """Lines for :meth:`Plan.describe`: schedule, bubble, stash and transfers per step."""
        table = self.schedule_table()
        p, m, v = self.stages, self.microbatches, self.repeats
        if table.autodiff:
            bubble = f" = (p-1)/(v*m+p-1) = {(p - 1) / (v * m + p - 1):.1%}"
            held = " (autodiff keeps every tick's activations)"
        elif table.split_backward:
            # Explicit schedules run in lockstep: a tick lasts as long as its busiest stage's slots.
            bubble = (" (lockstep idle share of slot time, F=B=W=1: backward slots compute input "
                      "gradients, weight slots the weight gradients)")
            held = " (forward to weight gradient)"
        else:
            bubble = " (lockstep idle share of slot time, F=1, B=2: input + weight gradient)"
            held = " (forward to backward)"
        lines = [(f"  schedule {self.schedule}: {p} stages x {m} microbatches x {v} repeat(s), "
                  f"{table.ticks} ticks, remat {self.remat}"),
                 f"  bubble fraction {table.bubble_fraction:.1%}{bubble}",
                 f"  peak stashed microbatches per stage {table.peak_stash}{held}"]
        sends = table.forward_ticks if table.autodiff else table.ticks
        per_step = 2 * sends  # activations forward, cotangents backward
        moved = f"{per_step} microbatch activations per device per step"
        if activation_bytes is not None:
            from titanax.units import human_bytes

            moved += f" ({human_bytes(per_step * activation_bytes)})"
        lines.append(f"  between stages: {moved}")
        return lines


_SCHEDULE_CACHE: dict[tuple[str, int, int, int], Schedule] = {}


def _schedule(name: str, stages: int, microbatches: int, repeats: int) -> Schedule:
    key = (name, stages, microbatches, repeats)
    if key not in _SCHEDULE_CACHE:
        _SCHEDULE_CACHE[key] = build_schedule(name, stages, microbatches, repeats)
    return _SCHEDULE_CACHE[key]


@dataclasses.dataclass(kw_only=True, frozen=True)
class Plan:
    """A combination of parallelism strategies, each over its own mesh axis.

    Example:
      >>> plan = Plan(data_parallel=DP(axis="data"), tensor_parallel=TP(axis="tensor"))
      >>> plan.axes
      ('data', 'tensor')
    """

    data_parallel: DP | None = None
    """Replicated parameters, batch split over ``DP.axis``."""

    fsdp: FSDP | None = None
    """Parameters, optimizer state and batch split over ``FSDP.axis``."""

    tensor_parallel: TP | None = None
    """Matmuls split over ``TP.axis``."""

    pipeline_parallel: PP | None = None
    """The layer stack split into stages over ``PP.axis``."""

    rules: Rules | None = None
    """Extra rules that take precedence over the parts' own: path rules for an unannotated model,
    or overrides (``tx.Rules([("vocab", None)])`` keeps the vocabulary replicated)."""

    max_replicated_bytes: int | None = 4 << 20
    """Under FSDP or TP, a parameter larger than this left fully replicated by accident (no names,
    or names no free mesh axis took) is flagged; ``None`` disables the check."""

    strict: bool = False
    """Raise instead of warning on unmapped names, indivisible dimensions, unused path rules and
    accidentally replicated large parameters."""

    def __post_init__(self) -> None:
        if self.rules is not None and not isinstance(self.rules, Rules):
            raise PlanError(
                f"Plan(rules=...) got {type(self.rules).__name__}, not tx.Rules",
                suggestion="write Plan(..., rules=tx.Rules(params=[(r'Dense_0/kernel$', ('embed', 'mlp'))]))",
                owner="Plan", field="rules",
            )
        limit = self.max_replicated_bytes
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise PlanError(
                f"Plan(max_replicated_bytes={limit!r}) must be a byte count >= 0 or None",
                suggestion="e.g. max_replicated_bytes=4 << 20 (4 MiB), or None to disable the check",
                owner="Plan", field="max_replicated_bytes", value=limit,
            )
        parts = self._parts()
        if not parts:
            raise PlanError(
                "the plan has no parallelism",
                suggestion="give at least one of data_parallel=tx.DP(), fsdp=tx.FSDP(), "
                "tensor_parallel=tx.TP(), pipeline_parallel=tx.PP(...)",
                owner="Plan",
            )
        for field, kind in (("data_parallel", DP), ("fsdp", FSDP), ("tensor_parallel", TP),
                            ("pipeline_parallel", PP)):
            value = getattr(self, field)
            if value is not None and not isinstance(value, kind):
                raise PlanError(
                    f"Plan({field}=...) got {type(value).__name__}, expected tx.{kind.__name__}",
                    suggestion=f"write Plan({field}=tx.{kind.__name__}(axis=...))",
                    owner="Plan", field=field,
                )
        seen: dict[str, str] = {}
        for name, part in parts.items():
            if part.axis in seen:
                raise PlanError(
                    f"{seen[part.axis]} and {name} both use mesh axis {part.axis!r}",
                    suggestion="give each kind of parallelism its own mesh axis, e.g. "
                    "MeshSpec(axes=('data', 'tensor'))",
                    owner=name, field="axis", value=part.axis,
                )
            seen[part.axis] = name

    def _parts(self) -> dict[str, DP | FSDP | TP | PP]:
        named = {"DP": self.data_parallel, "FSDP": self.fsdp, "TP": self.tensor_parallel,
                 "PP": self.pipeline_parallel}
        return {name: part for name, part in named.items() if part is not None}

    @property
    def axes(self) -> tuple[str, ...]:
        """The mesh axes the plan uses, in the order DP, FSDP, TP, PP."""
        return tuple(part.axis for part in self._parts().values())

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes the batch is split over (data-parallel and FSDP axes)."""
        return tuple(p.axis for p in (self.data_parallel, self.fsdp) if p is not None)

    def resolved_rules(self) -> Rules:
        """The composed rules: batch over the data axes, the plan's own ``rules``, then TP, FSDP."""
        composed = Rules([("batch", self.batch_axes)]) if self.batch_axes else Rules()
        if self.pipeline_parallel is not None:
            composed = composed + self.pipeline_parallel.resolved_rules()
        if self.rules is not None:
            composed = composed + self.rules
        if self.tensor_parallel is not None:
            composed = composed + self.tensor_parallel.resolved_rules()
        if self.fsdp is not None:
            composed = composed + presets.fsdp(self.fsdp.axis, shard_unnamed=self.fsdp.shard_unnamed)
        if self.data_parallel is not None:
            composed = composed + presets.data_parallel(self.data_parallel.axis)
        if self.fsdp is not None or self.tensor_parallel is not None or self.pipeline_parallel is not None:
            composed = composed.replace(max_replicated_bytes=self.max_replicated_bytes)
        return composed.replace(strict=self.strict) if self.strict else composed

    def validate(self, mesh: Mesh | Mapping[str, int]) -> None:
        """Check the plan against a mesh before anything is compiled.

        Args:
          mesh: a ``jax.sharding.Mesh`` (or a mapping of axis name to size).

        Raises:
          PlanError: a part names an axis the mesh lacks, or a mesh axis with more than one device
            is used by no part (those devices would all compute the same thing).
        """
        shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
        for name, part in self._parts().items():
            if part.axis not in shape:
                raise PlanError(
                    f"{name}(axis={part.axis!r}) names an axis the mesh {shape} does not have",
                    suggestion=f"use one of {list(shape)} or build the mesh with an axis "
                    f"{part.axis!r}",
                    owner=name, field="axis", value=part.axis,
                )
        pp = self.pipeline_parallel
        if pp is not None and shape[pp.axis] != pp.stages:
            raise PlanError(
                f"PP(stages={pp.stages}) but mesh axis {pp.axis!r} has {shape[pp.axis]} devices",
                suggestion=f"make the {pp.axis!r} axis {pp.stages} devices in the MeshSpec, or set "
                f"PP(stages={shape[pp.axis]})",
                owner="PP", field="stages", value=pp.stages,
            )
        for axis, size in shape.items():
            if size > 1 and axis not in self.axes:
                raise PlanError(
                    f"mesh axis {axis!r} has {size} devices but no part of the plan uses it: "
                    "they would all compute the same thing",
                    suggestion=f"add e.g. data_parallel=tx.DP(axis={axis!r}) to the plan, or give "
                    f"{axis!r} size 1 in the MeshSpec",
                    owner="MeshSpec", field="axes", value=tuple(shape),
                )
        self.resolved_rules().validate(shape)

    def describe(self, mesh: Mesh | Mapping[str, int] | None = None, *,
                 activation_bytes: int | None = None) -> Report:
        """A readable summary of the plan.

        Args:
          mesh: adds the axis sizes.
          activation_bytes: with a pipeline, the bytes of one microbatch's activation on one device
            (the stack's input), to report the bytes moved between stages per step.

        Returns:
          The text (a ``str``); as HTML (``.html()``, ``.save(path)``, a notebook's display) the
          same, with the pipeline's schedule drawn as a Gantt chart.

        Example:
          >>> plan = Plan(pipeline_parallel=PP(stages=2, microbatches=4), data_parallel=DP())
          >>> report = plan.describe({"pipe": 2, "data": 4})
          >>> report.splitlines()[1], report.html().count('class="tx-tick')
          ("  DP    over 'data' (4 devices)", 20)
        """
        shape = {} if mesh is None else (dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh))
        lines = ["Plan"]
        for name, part in self._parts().items():
            size = f" ({shape[part.axis]} devices)" if part.axis in shape else ""
            extra = ""
            if isinstance(part, DP) and part.accumulate_steps > 1:
                extra = f", accumulate_steps={part.accumulate_steps}"
            if isinstance(part, TP) and part.sequence_parallel:
                extra = ", sequence parallel"
            lines.append(f"  {name:<5} over {part.axis!r}{size}{extra}")
        lines.append(f"  batch split over {self.batch_axes or 'nothing (replicated)'}")
        if self.pipeline_parallel is not None:
            lines.extend(self.pipeline_parallel.describe(activation_bytes))
        rules = self.resolved_rules()
        lines.append("  rules: " + ", ".join(f"{n}->{t}" for n, t in rules.rules))
        if rules.unnamed is not None:
            lines.append(f"  unnamed parameters: largest divisible dimension over {rules.unnamed!r}")
        text = "\n".join(lines)
        pp = self.pipeline_parallel
        return Report(text, plan_html(text, None if pp is None else pp.schedule_table()), title="Plan")
