"""``MeshSpec``: a device mesh described by axis names and sizes, checked before it is built.

A spec is validated twice: its own consistency when it is created (names, sizes, one inferred axis),
and its fit to the devices when it is resolved or built (the sizes must use every device exactly;
``jax.make_mesh`` would otherwise silently drop the extra devices).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from titanax.exceptions import MeshError

__all__ = ["MeshSpec", "describe_mesh"]

# Printing a device grid for thousands of devices buries the summary; past this it is left out.
_MAX_GRID_DEVICES = 64


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _fitting_shape(shape: Sequence[int], n: int) -> tuple[int, ...]:
    """A nearby shape that fits ``n`` devices: fixed sizes shrunk to divisors, the last axis inferred.

    Only used to make a concrete suggestion; the user's own axis order is kept.
    """
    out: list[int] = []
    remaining = n
    inferred = next((i for i, s in enumerate(shape) if s == -1), len(shape) - 1)
    for i, s in enumerate(shape):
        if i == inferred:
            out.append(-1)
            continue
        d = math.gcd(int(s), remaining)
        out.append(d)
        remaining //= d
    return tuple(out)


def _fmt_devices(devices: Sequence[Any]) -> str:
    shown = ", ".join(repr(d) for d in devices[:8])
    return f"[{shown}{', ...' if len(devices) > 8 else ''}]"


def _not_devices(devices: Sequence[Any], culprit: Any) -> MeshError:
    """The error for a ``devices=`` list that holds something other than ``jax.Device`` objects."""
    ids = tuple(int(d) for d in devices if isinstance(d, (int, np.integer)) and not isinstance(d, bool))
    if len(ids) == len(devices):  # device ids: the usual mix-up (JAX's own APIs take the objects)
        first = f"devices=jax.devices()[:{len(ids)}], or " if ids == tuple(range(len(ids))) else ""
        return MeshError(
            f"MeshSpec devices={_fmt_devices(devices)} holds integers (device ids?), not JAX devices",
            suggestion=f"pass the devices themselves, e.g. {first}"
            f"devices=[d for d in jax.devices() if d.id in {ids}]",
            owner="MeshSpec", field="devices",
        )
    return MeshError(
        f"MeshSpec devices={_fmt_devices(devices)} holds {culprit!r} ({type(culprit).__name__}), not a JAX device",
        suggestion="pass jax.Device objects, e.g. devices=jax.devices()[:4] (or devices=jax.local_devices())",
        owner="MeshSpec", field="devices",
    )


_AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A named device mesh: which axes, how large, over which devices.

    Example:
      >>> spec = MeshSpec(axes=("data", "tensor"), shape=(-1, 2))
      >>> spec.resolved_shape(8)
      (4, 2)
      >>> mesh = spec.build()            # jax.sharding.Mesh, every axis AxisType.Auto
      >>> MeshSpec(("data",)).resolved_shape(8)
      (8,)
    """

    axes: tuple[str, ...]
    """Mesh axis names, outermost first, e.g. ``("data", "tensor")``. A single string is one axis.
    With several processes the outermost axes span processes, so put data-like axes first."""

    shape: tuple[int, ...] | None = None
    """Size of each axis, same length as ``axes``. One entry may be ``-1`` or ``None``: it is inferred
    from the device count (stored as ``-1``). ``None`` for the whole shape puts every device on
    ``axes[0]`` and size 1 on the others."""

    devices: tuple[Any, ...] | None = None
    """Devices to lay out (``jax.Device`` objects, not ids), e.g. ``jax.devices()[:4]``; exactly
    these are used. ``None`` means ``jax.devices()`` (all devices of all processes)."""

    axis_types: tuple[str, ...] | str = "auto"
    """``"auto"`` or ``"explicit"`` per axis (one value for all): Auto axes leave activation
    layouts to XLA's partitioner, steered by ``tx.constrain``; Explicit axes carry each array's
    sharding in its type, for models written in JAX's explicit-sharding style (``out_sharding=P(...)``
    on einsums and linears). Parameters, optimizer state and batches are laid out by the plan
    either way. Mixed meshes are allowed where JAX allows them."""

    def __post_init__(self) -> None:
        axes = self.axes
        if isinstance(axes, str):
            axes = (axes,)
        if not isinstance(axes, Sequence):
            raise MeshError(
                f"MeshSpec axes={axes!r} is not a sequence of axis names",
                suggestion='pass names such as axes=("data", "tensor")',
                owner="MeshSpec", field="axes", value=axes,
            )
        axes = tuple(axes)
        if not axes:
            raise MeshError(
                "MeshSpec axes=() names no axes; a mesh needs at least one",
                suggestion='pass at least one axis name, e.g. axes=("data",)',
                owner="MeshSpec", field="axes", value=axes,
            )
        for a in axes:
            if not isinstance(a, str) or not a:
                raise MeshError(
                    f"MeshSpec axis name {a!r} in axes={axes!r} is not a non-empty string",
                    suggestion='name every axis with a string, e.g. axes=("data", "tensor")',
                    owner="MeshSpec", field="axes", value=axes,
                )
        dupes = sorted({a for a in axes if axes.count(a) > 1})
        if dupes:
            raise MeshError(
                f"MeshSpec axes={axes!r} repeats axis {dupes[0]!r}",
                suggestion="give every mesh axis a distinct name",
                owner="MeshSpec", field="axes", value=axes,
            )
        object.__setattr__(self, "axes", axes)

        shape = self.shape
        if shape is not None:
            if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
                shape = (shape,)
            if not isinstance(shape, Sequence) and not isinstance(shape, np.ndarray):
                raise MeshError(
                    f"MeshSpec shape={shape!r} is not a sequence of sizes",
                    suggestion="pass one size per axis, e.g. shape=(-1, 2)",
                    owner="MeshSpec", field="shape", value=shape,
                )
            shape = tuple(shape)
            if len(shape) != len(axes):
                raise MeshError(
                    f"MeshSpec shape {_fmt_shape(shape)} gives {len(shape)} size(s) for the "
                    f"{len(axes)} axes {axes!r}",
                    suggestion="give exactly one size per axis (use -1 for the axis to infer)",
                    owner="MeshSpec", field=("shape", "axes"), value=(shape, axes),
                )
            sizes: list[int] = []
            for name, s in zip(axes, shape):
                if s is None:
                    sizes.append(-1)
                    continue
                try:
                    if isinstance(s, bool):
                        raise TypeError
                    v = operator.index(s)
                except TypeError:
                    raise MeshError(
                        f"MeshSpec shape {_fmt_shape(shape)}: size {s!r} of axis {name!r} is not an integer",
                        suggestion="use positive integers, and -1 (or None) for the one axis to infer",
                        owner="MeshSpec", field="shape", value=shape,
                    ) from None
                if v <= 0 and v != -1:
                    raise MeshError(
                        f"MeshSpec shape {_fmt_shape(shape)}: axis {name!r} has size {v}",
                        suggestion="sizes must be positive; use -1 (or None) for the one axis whose size "
                        "is inferred from the device count",
                        owner="MeshSpec", field="shape", value=shape,
                    )
                sizes.append(v)
            inferred = [name for name, v in zip(axes, sizes) if v == -1]
            if len(inferred) > 1:
                raise MeshError(
                    f"MeshSpec shape {_fmt_shape(shape)} asks to infer axes {inferred!r}; only one "
                    "size can be inferred",
                    suggestion=f"give a size to all but one of {inferred!r}",
                    owner="MeshSpec", field="shape", value=shape,
                )
            object.__setattr__(self, "shape", tuple(sizes))

        devs = self.devices
        if devs is not None:
            if isinstance(devs, np.ndarray):
                devs = tuple(devs.flat)
            else:
                try:
                    devs = tuple(devs)
                except TypeError:
                    raise MeshError(
                        f"MeshSpec devices={devs!r} is not a list of devices",
                        suggestion="pass a list such as devices=jax.devices()[:4], or None for all",
                        owner="MeshSpec", field="devices",
                    ) from None
            if not devs:
                raise MeshError(
                    "MeshSpec devices=[] holds no devices",
                    suggestion="pass devices=None for all devices, or a non-empty list such as "
                    "jax.devices()[:4]",
                    owner="MeshSpec", field="devices",
                )
            seen: set[Any] = set()
            for d in devs:
                if not isinstance(d, jax.Device):  # an id or a name would fail deep inside jax.make_mesh
                    raise _not_devices(devs, d)
                if d in seen:
                    raise MeshError(
                        f"MeshSpec devices lists {d} more than once",
                        suggestion="list each device once",
                        owner="MeshSpec", field="devices",
                    )
                seen.add(d)
            object.__setattr__(self, "devices", devs)

        kinds = self.axis_types
        kinds = (kinds,) * len(axes) if isinstance(kinds, (str, AxisType)) else tuple(kinds)
        names = []
        for kind in kinds:
            name = kind.name.lower() if isinstance(kind, AxisType) else str(kind).lower()
            if name not in _AXIS_TYPES:
                raise MeshError(
                    f"MeshSpec axis_types={self.axis_types!r}: {kind!r} is not 'auto' or 'explicit'",
                    suggestion="use axis_types='explicit' for every axis, or one of 'auto' / 'explicit' per axis",
                    owner="MeshSpec", field="axis_types", value=self.axis_types)
            names.append(name)
        if len(names) != len(axes):
            raise MeshError(
                f"MeshSpec axis_types={self.axis_types!r} gives {len(names)} type(s) for the {len(axes)} axes {axes!r}",
                suggestion="give one type per axis, or a single 'auto' / 'explicit' for all",
                owner="MeshSpec", field=("axis_types", "axes"), value=(self.axis_types, axes))
        object.__setattr__(self, "axis_types", names[0] if len(set(names)) == 1 else tuple(names))

    # ----------------------------------------------------------------------------------------------

    @property
    def jax_axis_types(self) -> tuple[AxisType, ...]:
        """The axis types as ``jax.sharding.AxisType`` values, one per axis."""
        kinds = (self.axis_types,) * len(self.axes) if isinstance(self.axis_types, str) else self.axis_types
        return tuple(_AXIS_TYPES[k] for k in kinds)

    def _device_list(self) -> list[Any]:
        return list(self.devices) if self.devices is not None else list(jax.devices())

    def resolved_shape(self, num_devices: int | None = None) -> tuple[int, ...]:
        """The concrete axis sizes for a device count, with the inferred axis filled in.

        Args:
          num_devices: devices to lay out; ``len(devices)`` or ``jax.device_count()`` if None.

        Returns:
          One positive size per axis, multiplying to ``num_devices``.

        Raises:
          MeshError: the sizes cannot use exactly ``num_devices`` devices.

        Example:
          >>> MeshSpec(axes=("data", "tensor"), shape=(-1, 2)).resolved_shape(8)
          (4, 2)
          >>> MeshSpec(axes=("data", "tensor")).resolved_shape(8)
          (8, 1)
        """
        n = len(self._device_list()) if num_devices is None else int(num_devices)
        if n < 1:
            raise MeshError(
                f"MeshSpec{_fmt_shape(self.axes)} cannot be laid out on {n} devices",
                suggestion="check jax.devices(); at least one device is needed",
                owner="MeshSpec", field="devices",
            )
        if self.shape is None:
            return (n,) + (1,) * (len(self.axes) - 1)
        fixed = math.prod(s for s in self.shape if s != -1)
        if -1 in self.shape:
            if n % fixed:
                example = _fitting_shape(self.shape, n)
                raise MeshError(
                    f"MeshSpec shape {_fmt_shape(self.shape)} for axes {self.axes!r} cannot split {n} "
                    f"device{'s' * (n != 1)}: the fixed sizes multiply to {fixed}, which does not divide {n}",
                    suggestion=f"use fixed sizes whose product divides {n} "
                    f"({', '.join(map(str, _divisors(n)))}), e.g. shape={_fmt_shape(example)}",
                    owner="MeshSpec", field="shape", value=self.shape,
                )
            return tuple(n // fixed if s == -1 else s for s in self.shape)
        if fixed != n:
            example = _fitting_shape(self.shape, n)
            verb = "needs" if fixed > n else "uses only"
            raise MeshError(
                f"MeshSpec shape {_fmt_shape(self.shape)} for axes {self.axes!r} {verb} {fixed} "
                f"devices but {n} {'are' if n != 1 else 'is'} available (every device must be used)",
                suggestion=f"use shape={_fmt_shape(example)} to infer one axis, or pass devices= with "
                f"exactly {fixed} devices (e.g. devices=jax.devices()[:{fixed}])"
                if fixed < n
                else f"use shape={_fmt_shape(example)} to infer one axis from the {n} device{'s' * (n != 1)}",
                owner="MeshSpec", field="shape", value=self.shape,
            )
        return tuple(self.shape)

    def build(self) -> Mesh:
        """Builds the ``jax.sharding.Mesh``, its axes of :attr:`axis_types` (``AxisType.Auto`` by default).

        Auto axes let ``jax.jit`` in/out shardings and ``with_sharding_constraint`` drive the GSPMD
        partitioner; ``jax.make_mesh`` itself now defaults to Explicit axes, which Titanax builds
        when asked (``axis_types="explicit"``). When the devices span several processes (or TPU slices) a hybrid mesh is
        built so the outermost axes cross processes and the inner axes stay within one host.

        Returns:
          The mesh.

        Raises:
          MeshError: the shape does not fit the devices.

        Example:
          >>> mesh = MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()
          >>> dict(mesh.shape)
          {'data': 4, 'tensor': 2}
        """
        devs = self._device_list()
        shape = self.resolved_shape(len(devs))
        axis_types = self.jax_axis_types
        grid = _hybrid_grid(shape, devs)
        if grid is not None:
            return Mesh(grid, self.axes, axis_types=axis_types)
        try:
            return jax.make_mesh(shape, self.axes, axis_types=axis_types, devices=devs)
        except ValueError:
            # make_mesh may refuse a device subset that is not a contiguous physical block (TPU);
            # a plain reshape still gives a valid mesh over exactly those devices.
            return Mesh(
                np.asarray(devs, dtype=object).reshape(shape), self.axes, axis_types=axis_types
            )

    def describe(self, mesh: Mesh | None = None) -> str:
        """A readable summary: axes, sizes, devices per axis, processes, device kind.

        Args:
          mesh: a mesh built from this spec; built now if None.

        Returns:
          Several lines of text.

        Example:
          >>> print(MeshSpec(axes=("data", "tensor"), shape=(-1, 2)).describe())   # doctest: +SKIP
          MeshSpec(data=-1 x tensor=2, devices=all)
          Mesh data=4 x tensor=2: 8 devices (cpu), 1 process
          ...
        """
        return f"{self}\n{describe_mesh(mesh if mesh is not None else self.build())}"

    def __str__(self) -> str:
        sizes = self.shape if self.shape is not None else ("all",) + (1,) * (len(self.axes) - 1)
        axes = " x ".join(f"{a}={s}" for a, s in zip(self.axes, sizes))
        devs = "all" if self.devices is None else f"{len(self.devices)} given"
        return f"MeshSpec({axes}, devices={devs})"


def _split_granules(shape: Sequence[int], granules: int) -> tuple[int, ...] | None:
    """How many granules (processes or slices) each axis spans, outermost axes first.

    Returns None when the granule count cannot be factored over the axes.
    """
    dcn: list[int] = []
    remaining = granules
    for s in shape:
        d = math.gcd(int(s), remaining)
        dcn.append(d)
        remaining //= d
    return tuple(dcn) if remaining == 1 else None


def _hybrid_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray | None:
    """A device grid whose outer axes cross processes/slices, or None for a single-host device set."""
    slices = {getattr(d, "slice_index", None) for d in devices} - {None}
    processes = {getattr(d, "process_index", 0) for d in devices}
    if len(slices) > 1:
        granules, by_process = len(slices), False
    elif len(processes) > 1:
        granules, by_process = len(processes), True
    else:
        return None
    dcn = _split_granules(shape, granules)
    if dcn is not None:
        ici = tuple(s // d for s, d in zip(shape, dcn))
        try:
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, list(devices), process_is_granule=by_process
            )
        except (ValueError, AssertionError, NotImplementedError):
            pass  # uneven granules or a topology mesh_utils cannot tile: fall back below
    # Keeping each process's devices contiguous still makes the outermost axis the one that
    # crosses hosts, which is what matters for data parallelism.
    ordered = sorted(
        devices,
        key=lambda d: (getattr(d, "slice_index", 0) or 0, getattr(d, "process_index", 0), d.id),
    )
    try:
        return mesh_utils.create_device_mesh(shape, ordered)
    except (ValueError, AssertionError, NotImplementedError):
        return np.asarray(ordered, dtype=object).reshape(shape)


def _axis_process_span(mesh: Mesh, axis: int) -> int:
    """The most distinct processes met along one axis (1: the axis stays within a host)."""
    procs = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
    lines = np.moveaxis(procs, axis, -1).reshape(-1, procs.shape[axis])
    return max(len(set(row.tolist())) for row in lines)


def describe_mesh(mesh: Mesh) -> str:
    """A readable summary of a mesh: axes, sizes, axis types, process span, device kind and ids.

    Args:
      mesh: a ``jax.sharding.Mesh``.

    Returns:
      Several lines of text.

    Example:
      >>> print(describe_mesh(MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()))  # doctest: +SKIP
      Mesh data=4 x tensor=2: 8 devices (cpu), 1 process
        axis 'data': size 4, Auto, 2 groups of 4 devices, within 1 process
        axis 'tensor': size 2, Auto, 4 groups of 2 devices, within 1 process
        device ids:
          [[0 1]
           [2 3]
           [4 5]
           [6 7]]
    """
    names = tuple(mesh.axis_names)
    sizes = tuple(mesh.devices.shape)
    flat = list(mesh.devices.flat)
    total = len(flat)
    kinds = sorted({str(getattr(d, "device_kind", "?")) for d in flat})
    nproc = len({getattr(d, "process_index", 0) for d in flat})
    types = tuple(getattr(mesh, "axis_types", ()) or ())
    header = " x ".join(f"{n}={s}" for n, s in zip(names, sizes))
    lines = [
        f"Mesh {header}: {total} device{'s' * (total != 1)} ({', '.join(kinds)}), "
        f"{nproc} process{'es' * (nproc != 1)}"
    ]
    for i, (name, size) in enumerate(zip(names, sizes)):
        kind = f", {getattr(types[i], 'name', types[i])}" if i < len(types) else ""
        span = _axis_process_span(mesh, i)
        where = f"across {span} processes" if span > 1 else "within 1 process"
        lines.append(
            f"  axis {name!r}: size {size}{kind}, {total // size} group{'s' * (total // size != 1)} "
            f"of {size} device{'s' * (size != 1)}, {where}"
        )
    if total <= _MAX_GRID_DEVICES:
        ids = np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices)
        grid = np.array2string(ids, separator=" ")
        lines.append("  device ids:")
        lines.extend("    " + row for row in grid.splitlines())
    else:
        lines.append(f"  device ids: {total} devices (grid omitted)")
    return "\n".join(lines)
