"""The most memory a run's devices have held."""

from __future__ import annotations

from typing import Any

__all__ = ["memory_watermark"]


def memory_watermark(devices: Any, compiled: Any = None) -> tuple[int | None, str]:
    """The most memory one device has held, and where the figure comes from.

    Args:
      devices: the devices of the run (``mesh.devices.flat``).
      compiled: the step's ``jax.stages.Compiled``, for backends without memory statistics.

    Returns:
      ``(bytes, source)``: the largest ``peak_bytes_in_use`` of ``device.memory_stats()`` over the
      devices (GPU, TPU), else the compiled step's arguments + outputs + temporaries − aliased
      (what XLA planned, e.g. on CPU); ``(None, "unknown")`` when neither is available.
    """
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise rather than return None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "device memory statistics"
    if compiled is not None:
        try:
            m = compiled.memory_analysis()
        except Exception:
            m = None
        if m is not None:
            total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                     - m.alias_size_in_bytes)
            return int(total), "compiled memory analysis"
    return None, "unknown"
