"""``ProcessGroups``: sizes of mesh axes and where a device (or this process) sits along them.

These are the numbers a data loader or a logger needs outside ``jit`` ("how many data shards are
there, and which one is mine?"); inside a step the same facts come from ``jax.lax.axis_index``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from titanax.exceptions import MeshError

__all__ = ["ProcessGroups", "AxisNames"]

AxisNames = str | tuple[str, ...]
"""One mesh axis name, or several treated as one combined axis (row-major)."""


class ProcessGroups:
    """Axis sizes and ranks of a mesh, for code that runs outside ``jit``.

    Args:
      mesh: the ``jax.sharding.Mesh`` (for example from ``MeshSpec.build()``). An abstract mesh
        works for :meth:`size` but has no devices to rank.

    Example:
      >>> mesh = MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()   # doctest: +SKIP
      >>> groups = ProcessGroups(mesh)                                      # doctest: +SKIP
      >>> groups.size("data"), groups.size(("data", "tensor"))              # doctest: +SKIP
      (4, 8)
      >>> groups.rank("data", device=mesh.devices[3, 1])                    # doctest: +SKIP
      3
    """

    def __init__(self, mesh: Mesh) -> None:
        names = getattr(mesh, "axis_names", None)
        shape = getattr(mesh, "shape", None)
        if names is None or shape is None:
            raise MeshError(
                f"ProcessGroups needs a jax.sharding.Mesh, got {type(mesh).__name__}",
                suggestion="build one with MeshSpec(...).build() or jax.make_mesh",
            )
        self._mesh = mesh
        self._axes: tuple[str, ...] = tuple(names)
        self._sizes: dict[str, int] = {a: int(shape[a]) for a in self._axes}
        self._coords: dict[Any, tuple[int, ...]] | None = (
            None  # built on first rank(): meshes can be large
        )

    @property
    def mesh(self) -> Mesh:
        """The mesh these groups describe."""
        return self._mesh

    @property
    def axes(self) -> tuple[str, ...]:
        """The mesh axis names, outermost first."""
        return self._axes

    def _names(self, axis: AxisNames) -> tuple[str, ...]:
        names = (axis,) if isinstance(axis, str) else axis
        if not isinstance(names, tuple) or not all(isinstance(a, str) for a in names):
            raise MeshError(
                f"axis {axis!r} is not a mesh axis name or a tuple of names",
                suggestion=f"use one of {self._axes!r} or a tuple of them",
            )
        for a in names:
            if a not in self._sizes:
                raise MeshError(
                    f"axis {a!r} is not in the mesh; its axes are {self._axes!r}",
                    suggestion=f"use one of {', '.join(repr(x) for x in self._axes)}",
                )
        if len(set(names)) != len(names):
            raise MeshError(
                f"axes {names!r} name the same mesh axis twice",
                suggestion="list each axis once",
            )
        return names

    def size(self, axis: AxisNames) -> int:
        """Number of devices along an axis; the product for a tuple of axes.

        Args:
          axis: an axis name, or a tuple of names (``()`` has size 1).

        Returns:
          The size.

        Raises:
          MeshError: an axis is not in the mesh.

        Example:
          >>> ProcessGroups(mesh).size(("data", "tensor"))   # doctest: +SKIP
          8
        """
        return math.prod(self._sizes[a] for a in self._names(axis))

    def _device_coords(self, device: Any) -> tuple[int, ...]:
        # An AbstractMesh raises on `.devices`, so test the type rather than the attribute.
        devices = self._mesh.devices if isinstance(self._mesh, Mesh) else None
        if devices is None:
            raise MeshError(
                f"{type(self._mesh).__name__} has no devices, so no device has a rank in it",
                suggestion="pass a concrete jax.sharding.Mesh (MeshSpec(...).build())",
            )
        if self._coords is None:
            self._coords = {d: tuple(int(i) for i in idx) for idx, d in np.ndenumerate(devices)}
        if device is None:
            me = jax.process_index()
            for d in devices.flat:  # row-major: the process's lowest-coordinate device
                if getattr(d, "process_index", 0) == me:
                    return self._coords[d]
            raise MeshError(
                f"process {me} owns no device of the mesh ({self._mesh.devices.size} devices)",
                suggestion="pass device= explicitly, or build the mesh over devices that include this "
                "process's jax.local_devices()",
            )
        coords = self._coords.get(device)
        if coords is None:
            raise MeshError(
                f"device {device} is not in the mesh",
                suggestion="pass one of mesh.devices.flat",
            )
        return coords

    def coords(self, device: Any | None = None) -> dict[str, int]:
        """A device's coordinate along every axis.

        Args:
          device: a device of the mesh; by default this process's first device (row-major order).

        Returns:
          ``{axis: index}`` for every mesh axis.

        Raises:
          MeshError: the device is not in the mesh, or the mesh has no devices.

        Example:
          >>> ProcessGroups(mesh).coords(mesh.devices[3, 1])   # doctest: +SKIP
          {'data': 3, 'tensor': 1}
        """
        return dict(zip(self._axes, self._device_coords(device)))

    def rank(self, axis: AxisNames, device: Any | None = None) -> int:
        """A device's index along an axis; for a tuple of axes, the row-major combined index.

        Args:
          axis: an axis name, or a tuple of names (the first varies slowest).
          device: a device of the mesh; by default this process's first device (row-major order),
            so in data-parallel loading ``rank("data")`` is the shard this process should read.

        Returns:
          An index in ``range(size(axis))``.

        Raises:
          MeshError: an axis is not in the mesh, or the device is not.

        Example:
          >>> ProcessGroups(mesh).rank(("data", "tensor"), device=mesh.devices[3, 1])   # doctest: +SKIP
          7
        """
        names = self._names(axis)
        coords = dict(zip(self._axes, self._device_coords(device)))
        index = 0
        for a in names:
            index = index * self._sizes[a] + coords[a]
        return index

    def __repr__(self) -> str:
        return "ProcessGroups(" + ", ".join(f"{a}={s}" for a, s in self._sizes.items()) + ")"
