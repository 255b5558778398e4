"""Accelerator memory: named presets and ``80GiB``-style sizes, for "will my run fit?" verdicts."""

from __future__ import annotations

import dataclasses
import re

from titanax.exceptions import TitanaxError

__all__ = ["DEVICE_PRESETS", "DeviceMemory", "device_memory"]

_GIB = 1 << 30
_MIB = 1 << 20

DEVICE_PRESETS: dict[str, int] = {
    "a100-40gb": 40_960 * _MIB,
    "a100": 81_920 * _MIB,
    "h100": 81_559 * _MIB,
    "h200": 143_771 * _MIB,
    "b200": 183_359 * _MIB,
    "mi300x": 196_592 * _MIB,
    "tpu-v4": 32 * _GIB,
    "tpu-v5e": 16 * _GIB,
    "tpu-v5p": 95 * _GIB,
    "tpu-v6e": 32 * _GIB,
}
"""Memory of one device as the device reports it (``nvidia-smi`` / ``rocm-smi`` total, TPU HBM
per chip), in bytes."""

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": _MIB, "gib": _GIB, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """The memory of the device a plan is checked against."""

    name: str
    """The preset's name, or the size as given."""
    bytes: int
    """Capacity in bytes."""
    gpu: bool
    """A GPU, where JAX by default preallocates only 75% (``XLA_PYTHON_CLIENT_MEM_FRACTION``)."""


def device_memory(device: str | None = None, size: str | None = None) -> DeviceMemory:
    """The device memory named by a preset or given as a size.

    Args:
      device: a key of :data:`DEVICE_PRESETS` (``h100``, ``tpu-v5p``, ...).
      size: a size such as ``80GiB``, ``141GB`` or ``96e9`` bytes (binary units: KiB, MiB, GiB,
        TiB; decimal: KB, MB, GB, TB); used when ``device`` is not given.

    Returns:
      A :class:`DeviceMemory`.

    Raises:
      TitanaxError: an unknown preset, an unreadable size, or neither given.

    Example:
      >>> device_memory("h100").bytes / 2**30
      79.6474609375
      >>> device_memory(size="80GiB").bytes
      85899345920
    """
    if device is not None:
        key = device.strip().lower()
        if key not in DEVICE_PRESETS:
            raise TitanaxError(f"unknown device {device!r}",
                               suggestion=f"use one of {', '.join(DEVICE_PRESETS)}, or give the size: "
                               "--device-memory 80GiB")
        return DeviceMemory(name=key, bytes=DEVICE_PRESETS[key], gpu=not key.startswith("tpu"))
    if size is None:
        raise TitanaxError("no device memory given", suggestion="pass --device h100 or --device-memory 80GiB")
    try:
        value = float(size)
        unit = ""
    except ValueError:
        match = _SIZE.match(size.lower())
        if match is None or match.group(2) not in _UNITS:
            raise TitanaxError(f"device memory {size!r} is not a size",
                               suggestion="write it as a number and a unit, e.g. 80GiB, 141GB or 16384MiB") from None
        value, unit = float(match.group(1)), match.group(2)
    total = int(value * _UNITS[unit])
    if total <= 0:
        raise TitanaxError(f"device memory {size!r} must be positive", suggestion="e.g. --device-memory 80GiB")
    return DeviceMemory(name=size.strip(), bytes=total, gpu=False)
