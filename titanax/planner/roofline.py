"""A roofline step-time estimate: what one training step costs on a device, from the compiled
program's FLOPs, bytes and collectives, and the device's datasheet (or calibrated) constants.

The model, per device and per step::

    compute_s    = max(flops / peak_flops, bytes_accessed / hbm_bandwidth)
    collective_s = sum over (axes, kind): count * (collective_latency + steps * collective_step_latency)
                                          + moved_bytes / bandwidth
    total_s      = compute_s + collective_s          (or max(...) with overlap=True)

``moved_bytes`` is what a ring algorithm sends from each device (:func:`ring_bytes`) and ``steps``
the ring's sequential steps (:func:`ring_steps`: ``2(n-1)`` for an all-reduce over ``n`` devices),
each paying a hop's latency (the alpha-beta model of collectives), and the bandwidth is the
inter-node one when the collective's group spans nodes (:func:`axis_crosses_nodes`), the intra-node
one otherwise. The device's constants are a :class:`~titanax.planner.device_spec.DeviceSpec`.

Example:
  >>> from titanax.profiling import CollectiveStats
  >>> est = estimate_step(flops=1e12, bytes_accessed=1e9,
  ...                     collectives_by_axis={("data",): {"all-reduce": CollectiveStats(count=1, bytes=2**30)}},
  ...                     mesh={"data": 8}, spec=DEVICE_SPECS["h100"])
  >>> est.bound, round(est.total_s * 1e3, 2)
  ('communication', 5.2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Protocol, TypeAlias

import numpy as np
from jax.sharding import AbstractMesh, Mesh

from titanax.exceptions import ConfigError, MeshError
from titanax.planner.device_spec import DEVICE_SPECS, DeviceSpec, _positive  # noqa: F401  (DEVICE_SPECS: the examples)

__all__ = ["StepEstimate", "axis_crosses_nodes", "estimate_step", "ring_bytes", "ring_steps"]

MeshLike: TypeAlias = Mesh | AbstractMesh | Mapping[str, int]
"""A ``jax.sharding.Mesh`` or ``AbstractMesh`` (read through its ``.shape``, axis name -> size),
or such a mapping itself: ``{"data": 4, "tensor": 8}``."""


class CollectiveCost(Protocol):
    """What :func:`estimate_step` reads of one kind of collective (e.g.
    :class:`titanax.profiling.CollectiveStats`)."""

    count: int
    bytes: int


def _axis_sizes(mesh: MeshLike) -> dict[str, int]:
    sizes = mesh if isinstance(mesh, Mapping) else getattr(mesh, "shape", None)
    if not isinstance(sizes, Mapping):
        raise MeshError(f"{type(mesh).__name__} is not a mesh",
                        suggestion="pass a jax.sharding.Mesh, an AbstractMesh or a dict of axis sizes "
                        "such as {'data': 4, 'tensor': 8}", owner="mesh", field="mesh")
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise MeshError(f"mesh axis {axis!r} has size {size!r}", suggestion="give each axis a positive "
                            "integer size", owner="mesh", field="shape", value=dict(sizes))
    return {str(axis): int(size) for axis, size in sizes.items()}


def _check_axes(sizes: Mapping[str, int], axes: str | Sequence[str]) -> tuple[str, ...]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in axes if a not in sizes]
    if unknown:
        shape = ", ".join(f"{a}={s}" for a, s in sizes.items())
        raise MeshError(f"the mesh ({shape}) has no axis {unknown[0]!r} (collective over {axes!r})",
                        suggestion=f"use the mesh's axis names: {tuple(sizes)}",
                        owner="mesh", field="axes", value=axes)
    if len(set(axes)) != len(axes):
        raise MeshError(f"the axes {axes!r} of one collective name an axis twice",
                        suggestion="name each axis once, e.g. ('data', 'tensor')",
                        owner="mesh", field="axes", value=axes)
    return axes


def axis_crosses_nodes(mesh: MeshLike, axes: str | Sequence[str], devices_per_node: int) -> bool:
    """Whether a collective over the mesh axes ``axes`` joins devices of different nodes.

    A device's node is its position in the mesh's device order (``mesh.devices.flat``, row-major
    over the axis sizes for a mapping) divided by ``devices_per_node``: the order of a real
    cluster's ``jax.devices()`` is host-major, so a mesh reshaped from it keeps each host's devices
    together. A collective over ``axes`` runs in groups of the devices that differ only in those
    axes; it crosses nodes when any group holds devices of two nodes.

    Args:
      mesh: a ``jax.sharding.Mesh`` / ``AbstractMesh``, or a mapping axis name -> size.
      axes: the axis names of the collective (a tuple; a single name is accepted).
      devices_per_node: devices per node (:attr:`DeviceSpec.devices_per_node`).

    Returns:
      True when some group of the collective spans two nodes.

    Raises:
      MeshError: an axis the mesh lacks, or a mesh that is not one.
      ConfigError: ``devices_per_node`` not a positive integer.

    Example:
      >>> mesh = {"data": 4, "tensor": 8}
      >>> [axis_crosses_nodes(mesh, axes, 8) for axes in [("tensor",), ("data",), ("data", "tensor")]]
      [False, True, True]
    """
    _positive("axis_crosses_nodes", "devices_per_node", devices_per_node, integer=True, example="8")
    sizes = _axis_sizes(mesh)
    axes = _check_axes(sizes, axes)
    total = math.prod(sizes.values())
    if total <= devices_per_node or not axes:
        return False
    nodes = np.arange(total).reshape(tuple(sizes.values())) // devices_per_node
    positions = [list(sizes).index(a) for a in axes]
    rest = [i for i in range(len(sizes)) if i not in positions]
    groups = nodes.transpose(rest + positions).reshape(-1, math.prod(sizes[a] for a in axes))
    return bool(np.any(groups.min(axis=1) != groups.max(axis=1)))


# Bytes each device sends, as a multiple of the collective's per-device *result* size (what
# CollectiveStats.bytes counts), for ring algorithms over n devices. A reduce-scatter's result is
# 1/n of its operand, so its (n-1)/n x operand is (n-1) x result.
_RING_FACTOR = {
    "all-reduce": lambda n: 2 * (n - 1) / n,  # reduce-scatter then all-gather
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: n - 1,
    "all-to-all": lambda n: (n - 1) / n,
    "ragged-all-to-all": lambda n: (n - 1) / n,  # result buffer as the upper bound of what is sent
    "collective-permute": lambda n: 1.0,
    "collective-broadcast": lambda n: 1.0,  # pipelined: each device receives and forwards once
}


def ring_bytes(kind: str, result_bytes: float, n: int) -> float:
    """Bytes one device sends for a collective of ``kind`` over ``n`` devices (ring algorithm).

    Args:
      kind: an HLO collective opcode (:data:`titanax.profiling.COLLECTIVE_KINDS`).
      result_bytes: the collective's result size on one device (what
        :class:`~titanax.profiling.CollectiveStats` counts): the reduced array for all-reduce, the
        gathered array for all-gather, the scattered shard for reduce-scatter.
      n: devices in each group; a group of one moves nothing.

    Returns:
      all-reduce ``2(n-1)/n`` x size, all-gather and all-to-all ``(n-1)/n`` x result,
      reduce-scatter ``(n-1)/n`` x operand (= ``(n-1)`` x result), permute and broadcast 1 x.

    Raises:
      ConfigError: an unknown kind.

    Example:
      >>> ring_bytes("all-reduce", 1000, 4), ring_bytes("reduce-scatter", 250, 4)
      (1500.0, 750.0)
    """
    if kind not in _RING_FACTOR:
        raise ConfigError(f"unknown collective kind {kind!r}", suggestion=f"use one of {', '.join(_RING_FACTOR)}",
                          owner="estimate_step", field="collectives_by_axis", value=kind)
    return 0.0 if n <= 1 else float(_RING_FACTOR[kind](n) * result_bytes)


# Sequential steps of the ring algorithm over n devices, each waiting for the previous hop.
_RING_STEPS = {
    "all-reduce": lambda n: 2 * (n - 1),  # reduce-scatter then all-gather
    "all-gather": lambda n: n - 1,
    "reduce-scatter": lambda n: n - 1,
    "all-to-all": lambda n: n - 1,
    "ragged-all-to-all": lambda n: n - 1,
    "collective-permute": lambda n: 1,
    "collective-broadcast": lambda n: 1,  # pipelined, as ring_bytes counts it
}


def ring_steps(kind: str, n: int) -> int:
    """Sequential steps of a collective of ``kind`` over ``n`` devices (ring algorithm): what the
    per-hop latency :attr:`DeviceSpec.collective_step_latency` multiplies.

    Args:
      kind: an HLO collective opcode (:data:`titanax.profiling.COLLECTIVE_KINDS`).
      n: devices in each group; a group of one takes no step.

    Returns:
      all-reduce ``2(n-1)``, all-gather, reduce-scatter and all-to-all ``n-1``, permute and
      broadcast 1.

    Raises:
      ConfigError: an unknown kind.

    Example:
      >>> ring_steps("all-reduce", 8), ring_steps("all-gather", 8), ring_steps("collective-permute", 8)
      (14, 7, 1)
    """
    if kind not in _RING_STEPS:
        raise ConfigError(f"unknown collective kind {kind!r}", suggestion=f"use one of {', '.join(_RING_STEPS)}",
                          owner="estimate_step", field="collectives_by_axis", value=kind)
    return 0 if n <= 1 else int(_RING_STEPS[kind](n))


def _fmt_s(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return "0 s" if seconds == 0 else f"{seconds / 1e-9:.3g} ns"


@dataclasses.dataclass(kw_only=True, frozen=True)
class StepEstimate:
    """The roofline time of one step on one device, and what bounds it.

    Example:
      >>> est = StepEstimate(flops_s=0.010, memory_s=0.002,
      ...                    collective_s_by_axis={("data",): 0.004, ("tensor",): 0.001})
      >>> round(est.total_s, 6), est.bound
      (0.015, 'compute')
      >>> print(est.describe())
      15 ms/step, compute-bound (no overlap: compute + collectives)
        compute 10 ms = max(FLOPs 10 ms, memory 2 ms)
        collectives 5 ms: data 4 ms, tensor 1 ms
    """

    flops_s: float
    """FLOPs over the device's peak FLOP/s at the compute dtype: the time if compute-bound."""

    memory_s: float
    """Bytes accessed over the HBM bandwidth: the time if memory-bound."""

    collective_s_by_axis: dict[tuple[str, ...], float]
    """Collective seconds by the mesh axes they run over."""

    overlap: bool = False
    """Whether collectives are assumed hidden behind compute (``total_s`` the max of the two)
    rather than serial with it (the sum: the default, because XLA overlaps only what its
    scheduler can, and a sum ranks plans by all the work they do)."""

    @property
    def compute_s(self) -> float:
        """``max(flops_s, memory_s)``: compute and memory traffic are assumed to overlap."""
        return max(self.flops_s, self.memory_s)

    @property
    def collective_s(self) -> float:
        """All collectives' seconds."""
        return sum(self.collective_s_by_axis.values())

    @property
    def total_s(self) -> float:
        """The step time: ``compute_s + collective_s``, or their max with ``overlap``."""
        combine = max if self.overlap else (lambda a, b: a + b)
        return combine(self.compute_s, self.collective_s)

    @property
    def bound(self) -> str:
        """``"compute"``, ``"memory"`` or ``"communication"``: the largest of ``flops_s``,
        ``memory_s`` and ``collective_s`` (the first of those on a tie)."""
        parts = {"compute": self.flops_s, "memory": self.memory_s, "communication": self.collective_s}
        return max(parts, key=parts.__getitem__)

    def describe(self) -> str:
        """Three lines for people: the step time and its bound, compute, collectives by axis.

        Returns:
          The text (see the class example).
        """
        how = "overlap: max of compute, collectives" if self.overlap else "no overlap: compute + collectives"
        by_axis = ", ".join(f"{' x '.join(axes) or '(no axis)'} {_fmt_s(s)}"
                            for axes, s in sorted(self.collective_s_by_axis.items(), key=lambda kv: -kv[1]))
        return (f"{_fmt_s(self.total_s)}/step, {self.bound}-bound ({how})\n"
                f"  compute {_fmt_s(self.compute_s)} = max(FLOPs {_fmt_s(self.flops_s)}, "
                f"memory {_fmt_s(self.memory_s)})\n"
                f"  collectives {_fmt_s(self.collective_s)}{': ' + by_axis if by_axis else ''}")


def estimate_step(*, flops: float, bytes_accessed: float,
                  collectives_by_axis: Mapping[tuple[str, ...], Mapping[str, CollectiveCost]],
                  mesh: MeshLike, spec: DeviceSpec, compute_dtype: str = "bfloat16",
                  overlap: bool = False) -> StepEstimate:
    """The roofline time of one step of a compiled SPMD program on one device.

    Each group of collectives costs ``count * (spec.collective_latency + steps *
    spec.collective_step_latency) + moved / bandwidth``, with ``moved`` from :func:`ring_bytes` and
    ``steps`` from :func:`ring_steps` over ``n`` = the product of the axes' sizes, and the
    bandwidth ``spec.inter_node_bandwidth`` if the axes cross nodes
    (:func:`axis_crosses_nodes` with ``spec.devices_per_node``), else ``intra_node_bandwidth``.
    A collective over axes of total size 1 costs nothing (XLA removes it).

    Args:
      flops: FLOPs one device executes per step (the compiled program's, counted per run).
      bytes_accessed: bytes one device reads and writes in memory per step.
      collectives_by_axis: mesh axes -> collective kind -> an object with ``.count`` and
        ``.bytes`` per device per step (:class:`titanax.profiling.CollectiveStats`: ``bytes`` the
        result sizes), e.g. ``{("data",): {"all-reduce": CollectiveStats(count=2, bytes=...)}}``.
      mesh: the mesh the program runs on (``Mesh``, ``AbstractMesh`` or axis sizes).
      spec: the device's constants (:data:`DEVICE_SPECS` or :func:`~titanax.planner.calibrate`).
      compute_dtype: the matmul input dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
      overlap: assume collectives hide behind compute (total = max) instead of adding up.

    Returns:
      A :class:`StepEstimate`.

    Raises:
      ConfigError: a negative or non-finite figure, an unknown kind or dtype.
      MeshError: an axis the mesh lacks.

    Example:
      >>> from titanax.profiling import CollectiveStats
      >>> est = estimate_step(flops=2e12, bytes_accessed=0,
      ...                     collectives_by_axis={("tensor",): {"all-gather": CollectiveStats(count=4, bytes=8e9)}},
      ...                     mesh={"data": 2, "tensor": 8}, spec=DEVICE_SPECS["h100"])
      >>> round(est.flops_s * 1e3, 3), round(est.collective_s * 1e3, 3), est.bound
      (2.022, 15.596, 'communication')
    """
    _positive("estimate_step", "flops", flops, zero=True)
    _positive("estimate_step", "bytes_accessed", bytes_accessed, zero=True)
    if not isinstance(spec, DeviceSpec):
        raise ConfigError(f"spec={spec!r} is not a DeviceSpec",
                          suggestion="pass DEVICE_SPECS['h100'] or tx.planner.calibrate()",
                          owner="estimate_step", field="spec", value=spec)
    peak = spec.flops_for(compute_dtype)
    sizes = _axis_sizes(mesh)
    by_axis: dict[tuple[str, ...], float] = {}
    for axes, kinds in collectives_by_axis.items():
        axes = _check_axes(sizes, axes)
        n = math.prod(sizes[a] for a in axes)
        bandwidth = (spec.inter_node_bandwidth if axis_crosses_nodes(sizes, axes, spec.devices_per_node)
                     else spec.intra_node_bandwidth)
        seconds = 0.0
        for kind, stats in kinds.items():
            _positive("estimate_step", f"collectives_by_axis[{axes!r}][{kind!r}].count", stats.count, zero=True)
            _positive("estimate_step", f"collectives_by_axis[{axes!r}][{kind!r}].bytes", stats.bytes, zero=True)
            moved = ring_bytes(kind, stats.bytes, n)
            if n > 1:
                latency = spec.collective_latency + ring_steps(kind, n) * spec.collective_step_latency
                seconds += stats.count * latency + moved / bandwidth
        by_axis[axes] = by_axis.get(axes, 0.0) + seconds
    return StepEstimate(flops_s=flops / peak, memory_s=bytes_accessed / spec.hbm_bandwidth,
                        collective_s_by_axis=by_axis, overlap=overlap)
