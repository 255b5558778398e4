"""The plans ``titanax plan`` considers: every way to split N devices over data, fsdp, tensor and
pipe axes, with sequence parallelism, pipeline schedules, microbatch counts and remat policies,
pruned first by divisibility and by arithmetic memory, each rejection with its reason.

A candidate is a value: it prints as a one-line label and turns into the ``mesh:`` and ``plan:``
sections (and ``model.args.remat``) that ``titanax run`` takes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from titanax.exceptions import ConfigError

__all__ = ["AXES", "Candidate", "ModelFacts", "Rejection", "arithmetic_order", "enumerate_candidates",
           "factorizations"]

AXES = ("pipe", "data", "fsdp", "tensor")
"""Mesh axes in mesh order: the pipeline outermost (it communicates least), tensor innermost (it
communicates most, so its devices are neighbours inside a node)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class Candidate:
    """One plan: how many devices each axis gets, and the options that go with them."""

    data: int = 1
    """Data-parallel ways (parameters replicated)."""
    fsdp: int = 1
    """Fully sharded data-parallel ways (parameters, gradients and optimizer state split)."""
    tensor: int = 1
    """Tensor-parallel ways (heads, MLP width and vocabulary split)."""
    pipe: int = 1
    """Pipeline stages."""
    sequence_parallel: bool = False
    """Split the residual stream over the tensor axis along the sequence (``TP(sequence_parallel=)``)."""
    schedule: str | None = None
    """Pipeline schedule (``gpipe``, ``1f1b``, ...) when ``pipe > 1``."""
    microbatches: int | None = None
    """Pipeline microbatches when ``pipe > 1``."""
    remat: str | None = None
    """The model's ``remat`` argument (``None``: as the configuration has it)."""

    def __post_init__(self) -> None:
        for name in ("data", "fsdp", "tensor", "pipe"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Candidate({name}={value!r}) must be a positive integer",
                                  suggestion=f"give {name} as the number of devices on that axis",
                                  owner="Candidate", field=name, value=value)
        if (self.pipe > 1) != (self.schedule is not None and self.microbatches is not None):
            raise ConfigError(f"Candidate(pipe={self.pipe}) needs a schedule and microbatches exactly when pipe > 1",
                              suggestion="set schedule= and microbatches= with pipe > 1, neither otherwise",
                              owner="Candidate", field="schedule", value=self.schedule)
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("Candidate(sequence_parallel=True) needs tensor > 1",
                              suggestion="drop sequence_parallel or give the tensor axis devices",
                              owner="Candidate", field="sequence_parallel", value=True)

    @property
    def devices(self) -> int:
        """Devices the plan uses."""
        return self.data * self.fsdp * self.tensor * self.pipe

    @property
    def batch_ways(self) -> int:
        """Ways the batch is split (data x fsdp)."""
        return self.data * self.fsdp

    @property
    def label(self) -> str:
        """A short name, e.g. ``pp2(1f1b,m8) dp2 fsdp4 tp8+sp remat=full``."""
        parts = []
        if self.pipe > 1:
            parts.append(f"pp{self.pipe}({self.schedule},m{self.microbatches})")
        for name, ways in (("dp", self.data), ("fsdp", self.fsdp), ("tp", self.tensor)):
            if ways > 1:
                parts.append(f"{name}{ways}" + ("+sp" if name == "tp" and self.sequence_parallel else ""))
        if self.remat is not None:
            parts.append(f"remat={self.remat}")
        return " ".join(parts) or "one device"

    def mesh_section(self) -> dict[str, Any]:
        """The ``mesh:`` section: the axes with more than one device, in mesh order."""
        sizes = {"pipe": self.pipe, "data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        used = [axis for axis in AXES if sizes[axis] > 1] or ["data"]
        return {"axes": used, "shape": [sizes[axis] for axis in used]}

    def plan_section(self) -> dict[str, Any]:
        """The ``plan:`` section."""
        plan: dict[str, Any] = {}
        if self.pipe > 1:
            plan["pipeline_parallel"] = {"axis": "pipe", "stages": self.pipe,
                                         "microbatches": self.microbatches, "schedule": self.schedule}
        if self.data > 1 or self.devices == 1:
            plan["data_parallel"] = {"axis": "data"}
        if self.fsdp > 1:
            plan["fsdp"] = {"axis": "fsdp"}
        if self.tensor > 1:
            plan["tensor_parallel"] = {"axis": "tensor", "sequence_parallel": self.sequence_parallel}
        return plan

    def apply_to(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a run configuration (as a mapping) with this candidate's mesh, plan and remat."""
        out = {key: value for key, value in values.items() if key not in ("mesh", "plan")}
        out["mesh"] = self.mesh_section()
        out["plan"] = self.plan_section()
        if self.remat is not None:
            model = dict(out.get("model") or {})
            model["args"] = {**dict(model.get("args") or {}), "remat": self.remat}
            out["model"] = model
        return out


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A candidate left out, and why."""

    candidate: Candidate
    reason: str


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelFacts:
    """What the pruning needs to know of the model and the run, read once from its abstract state."""

    param_bytes: int
    """Bytes of the trainable parameters (master dtype), all devices together."""
    optimizer_bytes: int
    """Bytes of the optimizer state, all devices together."""
    parameter_count: int
    """Number of parameters."""
    dims: Mapping[str, frozenset[int]]
    """Sizes of every dimension the model names, by logical name (``heads``, ``mlp``, ``layers``, ...)."""
    batch_size: int
    """The global batch (``data.batch_size``)."""
    tokens_per_example: int | None = None
    """Tokens per example, when the data says."""

    @property
    def state_bytes(self) -> int:
        """Parameters and optimizer state, all devices together."""
        return self.param_bytes + self.optimizer_bytes

    def state_bytes_per_device(self, candidate: Candidate) -> float:
        """A lower bound of one device's parameters and optimizer state: every array split over
        every model-splitting axis (FSDP and pipeline split nearly all of them, TP only some)."""
        return self.state_bytes / (candidate.fsdp * candidate.tensor * candidate.pipe)


def factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered way to write ``n`` as a product of ``parts`` positive integers.

    Example:
      >>> from titanax.planner.candidates import factorizations
      >>> factorizations(4, 2)
      [(1, 4), (2, 2), (4, 1)]
    """
    if parts == 1:
        return [(n,)]
    out = []
    for first in range(1, n + 1):
        if n % first == 0:
            out.extend((first, *rest) for rest in factorizations(n // first, parts - 1))
    return out


def _divides(ways: int, sizes: Iterable[int]) -> bool:
    return all(size % ways == 0 for size in sizes)


def enumerate_candidates(
    devices: int,
    facts: ModelFacts,
    *,
    memory_bytes: int | None = None,
    devices_per_node: int = 8,
    schedules: Sequence[str] = ("gpipe", "1f1b"),
    microbatch_multiples: Sequence[int] = (1, 2, 4),
    remat: Sequence[str | None] = (None,),
    sequence_parallel: bool = True,
) -> tuple[list[Candidate], list[Rejection]]:
    """Every plan for ``devices`` devices, and those pruned before compiling, with the reason.

    Args:
      devices: devices to plan for.
      facts: the model's sizes (:class:`ModelFacts`).
      memory_bytes: one device's memory; a plan whose parameters and optimizer state alone cannot
        fit (even split over every model-splitting axis) is pruned. ``None``: no memory pruning.
      devices_per_node: devices joined by the fast in-node links; tensor parallelism beyond a node
        is pruned (its per-layer collectives would cross the slow links).
      schedules: pipeline schedules to try when ``pipe > 1``.
      microbatch_multiples: microbatch counts to try, as multiples of the stage count.
      remat: values of the model's ``remat`` argument to try (``None``: as configured).
      sequence_parallel: also try sequence parallelism with each tensor-parallel plan.

    Returns:
      ``(kept, rejected)``.
    """
    heads, mlp = facts.dims.get("heads", frozenset()), facts.dims.get("mlp", frozenset())
    layers = facts.dims.get("layers", frozenset())
    kept: list[Candidate] = []
    rejected: list[Rejection] = []
    for pipe, data, fsdp, tensor in factorizations(devices, 4):
        base = dict(pipe=pipe, data=data, fsdp=fsdp, tensor=tensor)
        sp_options = (False, True) if tensor > 1 and sequence_parallel else (False,)
        if pipe > 1:
            pipe_options = [(s, pipe * k) for s in schedules for k in microbatch_multiples]
        else:
            pipe_options = [(None, None)]
        for (schedule, microbatches), sp, policy in itertools.product(pipe_options, sp_options, remat):
            candidate = Candidate(**base, sequence_parallel=sp, schedule=schedule, microbatches=microbatches,
                                  remat=policy)
            reason = _prune(candidate, facts, heads, mlp, layers, memory_bytes, devices_per_node)
            if reason is None:
                kept.append(candidate)
            else:
                rejected.append(Rejection(candidate, reason))
    return kept, rejected


def _prune(candidate: Candidate, facts: ModelFacts, heads: frozenset[int], mlp: frozenset[int],
           layers: frozenset[int], memory_bytes: int | None, devices_per_node: int) -> str | None:
    """Why ``candidate`` cannot work, from arithmetic alone; ``None`` when nothing says so."""
    c = candidate
    split = c.batch_ways * (c.microbatches or 1)
    if facts.batch_size % split:
        what = f"{c.batch_ways} batch shards" + (f" x {c.microbatches} microbatches" if c.microbatches else "")
        return f"batch {facts.batch_size} does not divide into {what}"
    if c.tensor > 1:
        if c.tensor > devices_per_node:
            return f"tensor parallelism over {c.tensor} devices crosses nodes of {devices_per_node}"
        if not heads and not mlp:
            return "the model names no heads or mlp dimension for tensor parallelism to split"
        if not _divides(c.tensor, heads | mlp):
            return f"TP {c.tensor} does not divide heads {sorted(heads)} and MLP {sorted(mlp)}"
    if c.pipe > 1:
        if not layers:
            return "the model has no tx.nn.LayerStack to pipeline"
        if not _divides(c.pipe, layers):
            return f"{c.pipe} stages do not divide {sorted(layers)} layers"
    if memory_bytes is not None:
        floor = facts.state_bytes_per_device(c)
        if floor > memory_bytes:
            return (f"parameters and optimizer state alone need at least {_gib(floor)} per device "
                    f"(budget {_gib(memory_bytes)})")
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def arithmetic_order(candidates: Sequence[Candidate], facts: ModelFacts, *, flops_per_second: float,
                     bandwidth: float, cross_node_bandwidth: float, devices_per_node: int) -> list[Candidate]:
    """Candidates by an arithmetic step time (no compile), cheapest first: which to compile first.

    Compute is the same model FLOPs for every plan (``6 x parameters x tokens``), stretched by the
    pipeline bubble and by remat's second forward; communication is the gradient all-reduce over
    data, the parameter all-gathers and gradient reduce-scatter over fsdp, each ring-costed over
    the links its axis uses. Tensor-parallel activation traffic is left out (it depends on the
    model's width and sequence, which only the compiled program knows); compiling settles it.
    """
    tokens = facts.batch_size * (facts.tokens_per_example or 1)

    def time(c: Candidate) -> float:
        flops = 6 * facts.parameter_count * tokens / c.devices
        if c.remat == "full":
            flops *= 4 / 3
        if c.pipe > 1:
            flops *= (c.microbatches + c.pipe - 1) / c.microbatches
        shard_bytes = facts.param_bytes / (c.tensor * c.pipe)
        inner = c.tensor
        seconds = flops / flops_per_second
        for ways, volume in ((c.fsdp, 3 * shard_bytes / c.fsdp), (c.data, 2 * shard_bytes / c.fsdp)):
            if ways > 1:
                link = bandwidth if inner * ways <= devices_per_node else cross_node_bandwidth
                seconds += volume * (ways - 1) / link
            inner *= ways
        return seconds

    return sorted(candidates, key=lambda c: (time(c), c.devices, c.label))
