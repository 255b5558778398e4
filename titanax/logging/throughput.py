"""Throughput and model-FLOPs utilisation (MFU), with a table of accelerator peak FLOP/s.

MFU is the fraction of the hardware's peak that the model's own FLOPs would need at the measured
speed: ``flops_per_step * steps_per_second / (num_devices * peak_flops_per_device)``.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from typing import Any

import numpy as np

from titanax.exceptions import TitanaxError

__all__ = ["ThroughputMeter", "mfu", "peak_flops_per_device"]

# Dense peak FLOP/s per JAX device (one GPU, or one TPU chip: v4/v5p megacore chips and v5e/v6e
# single-core chips each appear to JAX as one device), for matrix-unit math in that dtype.
# "Dense" means without 2:4 structured sparsity: NVIDIA datasheets headline the sparse figure, so the
# GPU numbers below are half of it. Patterns match `jax.Device.device_kind`, lower-cased, first match
# wins (so the more specific variants come first).
# Sources:
#   NVIDIA H100 datasheet (SXM 1,979 / PCIe 1,513 / NVL 1,671 TFLOPS BF16 & FP16 with sparsity);
#   NVIDIA H200 datasheet (SXM 1,979 / NVL 1,671 with sparsity); NVIDIA A100 datasheet (312 dense);
#   NVIDIA V100 datasheet (tensor FP16 125 SXM2 / 112 PCIe; no bf16 tensor cores);
#   NVIDIA L4 datasheet (242 with sparsity);
#   Google Cloud TPU system architecture pages, BF16 peak per chip: v4 275, v5e 197, v5p 459,
#   v6e (Trillium) 918 TFLOPS. JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
_T = 1e12
_PEAK_TABLE: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bh200 nvl\b", {"bfloat16": 835.5 * _T, "float16": 835.5 * _T}),
    (r"\bh200\b", {"bfloat16": 989.5 * _T, "float16": 989.5 * _T}),
    (r"\bh100\b.*\bpcie\b", {"bfloat16": 756.5 * _T, "float16": 756.5 * _T}),
    (r"\bh100 nvl\b", {"bfloat16": 835.5 * _T, "float16": 835.5 * _T}),
    (r"\bh100\b", {"bfloat16": 989.5 * _T, "float16": 989.5 * _T}),  # SXM ("H100 80GB HBM3")
    (r"\ba100\b", {"bfloat16": 312.0 * _T, "float16": 312.0 * _T}),
    (r"\bv100\b.*\bpcie\b", {"float16": 112.0 * _T}),
    (r"\bv100\b", {"float16": 125.0 * _T}),
    (r"\bl4\b", {"bfloat16": 121.0 * _T, "float16": 121.0 * _T}),  # \b: not the L40 / L40S
    (r"^tpu v4$", {"bfloat16": 275.0 * _T}),  # not "TPU v4 lite" (v4i)
    (r"^tpu v5(?: lite|e)$", {"bfloat16": 197.0 * _T}),
    (r"^tpu v5p?$", {"bfloat16": 459.0 * _T}),
    (r"^tpu v6(?: lite|e)$", {"bfloat16": 918.0 * _T}),
)

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "tf32": "float32"}


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[dtype.lower()]
    try:
        return np.dtype(dtype).name  # "bfloat16" also for jnp.bfloat16 (ml_dtypes)
    except TypeError:
        raise TitanaxError(
            f"peak_flops_per_device: unknown dtype {dtype!r}",
            suggestion='use "bfloat16", "float16" or a jnp dtype',
        ) from None


def peak_flops_per_device(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The dense peak FLOP/s of one device of this kind, from a small built-in table.

    Covers NVIDIA H100 (SXM, PCIe, NVL), H200 (SXM, NVL), A100, V100 (float16 only), L4, and TPU v4,
    v5e, v5p, v6e. Figures are for matrix units without sparsity; see the source comment above the
    table in ``titanax/logging/throughput.py``.

    Args:
      device_kind: ``jax.devices()[0].device_kind`` (e.g. ``"NVIDIA H100 80GB HBM3"``,
        ``"TPU v5 lite"``), or a ``jax.Device``.
      dtype: the matmul dtype: ``"bfloat16"`` (default) or ``"float16"``, or a numpy/jnp dtype.

    Returns:
      FLOP/s, or ``None`` for CPUs, unlisted devices, and dtypes without a listed peak (e.g.
      float32, whose GPU rate depends on whether TF32 is used).

    Raises:
      TitanaxError: if ``device_kind`` is not a string or ``dtype`` is not a dtype.

    Example:
      >>> peak_flops_per_device("TPU v5 lite")
      197000000000000.0
      >>> peak_flops_per_device("cpu") is None
      True
    """
    kind = getattr(device_kind, "device_kind", device_kind)
    if not isinstance(kind, str):
        raise TitanaxError(
            f"peak_flops_per_device expects a device kind string, got {type(device_kind).__name__}",
            suggestion="pass jax.devices()[0].device_kind",
        )
    name = _dtype_name(dtype)
    key = " ".join(kind.lower().split())
    for pattern, peaks in _PEAK_TABLE:
        if re.search(pattern, key):
            return peaks.get(name)
    return None


def _positive(value: Any, what: str, *, integer: bool = False, allow_zero: bool = False) -> float:
    kind = numbers.Integral if integer else numbers.Real
    ok = not isinstance(value, bool) and isinstance(value, kind)
    if ok:
        ok = math.isfinite(float(value)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = "an int" if integer else "a finite number"
        bound = ">= 0" if allow_zero else "> 0"
        raise TitanaxError(f"{what} must be {need} {bound}, got {value!r}",
                           suggestion=f"pass {need} {bound}")
    return int(value) if integer else float(value)


def mfu(flops_per_second: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model-FLOPs utilisation: achieved FLOP/s over the devices' combined peak.

    Args:
      flops_per_second: the model's FLOPs per step (summed over all devices) times steps per second.
      num_devices: devices the step runs on.
      peak_flops_per_device: one device's peak, e.g. from :func:`peak_flops_per_device`.

    Returns:
      A fraction (0.45 means 45% of peak).

    Raises:
      TitanaxError: on a negative or non-finite rate, or a non-positive device count or peak.

    Example:
      >>> mfu(400e12, num_devices=2, peak_flops_per_device=1000e12)
      0.2
    """
    rate = _positive(flops_per_second, "mfu: flops_per_second", allow_zero=True)
    n = _positive(num_devices, "mfu: num_devices", integer=True)
    peak = _positive(peak_flops_per_device, "mfu: peak_flops_per_device")
    return rate / (n * peak)


class ThroughputMeter:
    """Measures steps/s, examples/s, tokens/s and MFU between successive steps, all over the same interval.

    Call :meth:`update` after a step has finished (after its metrics were fetched from the device,
    so the time is real, not dispatch time). Each call reports the rates over the interval since the
    previous call; the first call only starts the clock.

    Args:
      examples_per_step: examples in one (global) batch.
      tokens_per_step: tokens in one (global) batch, for sequence models.
      flops_per_step: the model's FLOPs for one step summed over all devices (e.g. ``6 * params *
        tokens`` for a transformer's training step, or per-device compiled FLOPs times
        ``num_devices``).
      num_devices: devices the step runs on.
      peak_flops_per_device: one device's peak FLOP/s (see :func:`peak_flops_per_device`); MFU is
        reported only when this and ``flops_per_step`` are given.

    Raises:
      TitanaxError: if a count is not positive.

    Example:
      >>> m = ThroughputMeter(examples_per_step=32, tokens_per_step=32 * 128, flops_per_step=1e12,
      ...                     num_devices=8, peak_flops_per_device=1e12)
      >>> m.update(10, now=100.0)
      {}
      >>> m.update(20, now=105.0)
      {'steps_per_s': 2.0, 'examples_per_s': 64.0, 'tokens_per_s': 8192.0, 'mfu': 0.25}
    """

    def __init__(
        self,
        *,
        examples_per_step: int,
        tokens_per_step: int | None = None,
        flops_per_step: float | None = None,
        num_devices: int,
        peak_flops_per_device: float | None = None,
    ) -> None:
        self.examples_per_step = _positive(examples_per_step, "ThroughputMeter: examples_per_step",
                                           integer=True)
        self.tokens_per_step = (None if tokens_per_step is None else
                                _positive(tokens_per_step, "ThroughputMeter: tokens_per_step",
                                          integer=True))
        self.flops_per_step = (None if flops_per_step is None else
                               _positive(flops_per_step, "ThroughputMeter: flops_per_step"))
        self.num_devices = _positive(num_devices, "ThroughputMeter: num_devices", integer=True)
        self.peak_flops_per_device = (
            None if peak_flops_per_device is None else
            _positive(peak_flops_per_device, "ThroughputMeter: peak_flops_per_device"))
        self._last: tuple[int, float] | None = None

    def reset(self) -> None:
        """Forgets the previous update, so the next one only restarts the clock (e.g. after eval)."""
        self._last = None

    def update(self, step: int, now: float | None = None) -> dict[str, float]:
        """Records that ``step`` has finished and returns the rates since the previous update.

        Args:
          step: the step just finished.
          now: the time in seconds (default ``time.perf_counter()``); pass it in tests.

        Returns:
          ``{"steps_per_s": ..., "examples_per_s": ..., "tokens_per_s": ..., "mfu": ...}`` (the last two only when
          known), or ``{}`` on the first call, or when the step did not advance or the clock did not
          move (a restart or resume: the clock starts again from here).

        Example:
          >>> m = ThroughputMeter(examples_per_step=8, num_devices=1)
          >>> m.update(0, now=0.0), m.update(4, now=2.0)
          ({}, {'steps_per_s': 2.0, 'examples_per_s': 16.0})
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TitanaxError(f"ThroughputMeter.update: step must be an int, got {step!r}",
                               suggestion="pass the integer step number")
        now = time.perf_counter() if now is None else float(now)
        last, self._last = self._last, (int(step), now)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        steps_per_s = (step - last[0]) / (now - last[1])
        out = {"steps_per_s": steps_per_s, "examples_per_s": self.examples_per_step * steps_per_s}
        if self.tokens_per_step is not None:
            out["tokens_per_s"] = self.tokens_per_step * steps_per_s
        if self.flops_per_step is not None and self.peak_flops_per_device is not None:
            out["mfu"] = mfu(self.flops_per_step * steps_per_s, self.num_devices,
                             self.peak_flops_per_device)
        return out
