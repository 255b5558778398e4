"""The constants of an accelerator that the roofline estimate needs (:class:`DeviceSpec`), the
datasheet presets of common ones (:data:`DEVICE_SPECS`, sources beside them) and their lookup.

A machine at hand is measured instead: :func:`titanax.planner.calibrate`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from titanax.exceptions import ConfigError
from titanax.profiling.devices import DEVICE_PRESETS

__all__ = ["DEVICE_SPECS", "DeviceSpec", "device_spec"]


def _positive(owner: str, field: str, value: Any, *, zero: bool = False, integer: bool = False,
              example: str = "") -> None:
    """Raises ConfigError unless ``value`` is a finite number > 0 (>= 0 with ``zero``)."""
    ok_type = (isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number)))
    ok = ok_type and not isinstance(value, bool) and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        what = ("a non-negative" if zero else "a positive") + (" integer" if integer else " finite number")
        raise ConfigError(f"{owner}({field}={value!r}) must be {what}",
                          suggestion=f"set {field} to {what}{', e.g. ' + example if example else ''}",
                          owner=owner, field=field, value=value)


@dataclasses.dataclass(kw_only=True, frozen=True)
class DeviceSpec:
    """The constants of one accelerator that the roofline needs, all per device.

    Example:
      >>> spec = DEVICE_SPECS["h100"]
      >>> spec.flops_for("bfloat16") / 1e12, spec.intra_node_bandwidth / 1e9
      (989.0, 450.0)
      >>> DeviceSpec(name="x", peak_flops_bf16=1e12, peak_flops_fp32=1e12, memory_bytes=2**30,
      ...            hbm_bandwidth=1e11, intra_node_bandwidth=-1.0, inter_node_bandwidth=1e9,
      ...            devices_per_node=8, collective_latency=1e-5)
      Traceback (most recent call last):
      ...
      titanax.exceptions.ConfigError: DeviceSpec(intra_node_bandwidth=-1.0) must be a positive finite number
        Suggestion: set intra_node_bandwidth to a positive finite number, e.g. 450e9 (bytes/s)
    """

    name: str
    """What the spec describes: a preset's key (``"h100"``) or ``"calibrated-<platform>"``."""

    peak_flops_bf16: float
    """Dense (no structured sparsity) matmul FLOP/s with bfloat16 (or float16) inputs."""

    peak_flops_fp32: float
    """Dense matmul FLOP/s with float32 inputs at JAX's default precision, which on GPUs since
    Ampere runs on TF32 tensor cores and on TPUs as one bfloat16 pass (``jax_default_matmul_precision``
    changes that; ``"highest"`` is several times slower)."""

    memory_bytes: int
    """Device memory capacity in bytes (as :data:`titanax.profiling.devices.DEVICE_PRESETS`)."""

    hbm_bandwidth: float
    """Device memory bandwidth in bytes/s (reads plus writes)."""

    intra_node_bandwidth: float
    """Bytes/s one device can send to the others of its node at once, one direction (NVLink
    through NVSwitch, TPU ICI): half of a datasheet's bidirectional figure."""

    inter_node_bandwidth: float
    """Bytes/s one device can send to other nodes, one direction: its share of the node's
    network (one 400 Gb/s NIC per GPU is 50e9), TPU data-center network per chip."""

    devices_per_node: int
    """Devices joined by the intra-node fabric: GPUs per server, chips per TPU slice (ICI spans a
    whole slice, many hosts)."""

    collective_latency: float
    """Fixed seconds each collective costs whatever its size and group (launch, synchronisation)."""

    collective_step_latency: float = 0.0
    """Seconds each sequential step of a collective's ring costs on top (a hop: :func:`ring_steps`
    per collective, ``2(n-1)`` for an all-reduce over ``n`` devices), so that a collective over
    many devices costs more than one over two. The presets leave it 0 (NCCL and ICI switch to tree
    and multi-dimensional algorithms whose latency grows far slower than a ring's; their
    ``collective_latency`` is the figure for a node's group); :func:`~titanax.planner.calibrate`
    measures it."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"DeviceSpec(name={self.name!r}) must be a non-empty string",
                              suggestion="name the device, e.g. name='h100'",
                              owner="DeviceSpec", field="name", value=self.name)
        _positive("DeviceSpec", "peak_flops_bf16", self.peak_flops_bf16, example="989e12 (FLOP/s)")
        _positive("DeviceSpec", "peak_flops_fp32", self.peak_flops_fp32, example="494e12 (FLOP/s)")
        _positive("DeviceSpec", "memory_bytes", self.memory_bytes, integer=True, example="80 * 2**30")
        for field in ("hbm_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth"):
            _positive("DeviceSpec", field, getattr(self, field), example="450e9 (bytes/s)")
        _positive("DeviceSpec", "devices_per_node", self.devices_per_node, integer=True, example="8")
        _positive("DeviceSpec", "collective_latency", self.collective_latency, zero=True,
                  example="10e-6 (seconds)")
        _positive("DeviceSpec", "collective_step_latency", self.collective_step_latency, zero=True,
                  example="1e-6 (seconds)")

    def flops_for(self, compute_dtype: str = "bfloat16") -> float:
        """Dense matmul FLOP/s for inputs of ``compute_dtype``.

        Args:
          compute_dtype: ``"bfloat16"``, ``"float16"`` (the same tensor-core rate) or ``"float32"``.

        Returns:
          FLOP/s per device.

        Raises:
          ConfigError: another dtype.

        Example:
          >>> DEVICE_SPECS["a100"].flops_for("float32") / 1e12
          156.0
        """
        if compute_dtype in ("bfloat16", "float16"):
            return self.peak_flops_bf16
        if compute_dtype == "float32":
            return self.peak_flops_fp32
        raise ConfigError(f"compute_dtype={compute_dtype!r} has no peak FLOP/s in a DeviceSpec",
                          suggestion="use 'bfloat16', 'float16' or 'float32'",
                          owner="estimate_step", field="compute_dtype", value=compute_dtype)


def _preset(name: str, **figures: Any) -> DeviceSpec:
    return DeviceSpec(name=name, memory_bytes=DEVICE_PRESETS[name], **figures)


# Sources (vendor datasheets unless noted; "dense" = without 2:4 structured sparsity, i.e. half the
# headline "with sparsity" figure). (?) marks figures that are derived or estimated, not printed.
#
# device   bf16 TF   fp32* TF  HBM TB/s  intra GB/s          inter GB/s           per node
# h100     989       494.7     3.35      450 (NVLink4 900    50 (400 Gb/s NDR     8 (HGX/DGX H100)
#                                         bidirectional)      IB per GPU)
# h200     989       494.7     4.8       450 (NVLink4)       50 (400 Gb/s NDR)    8
# a100     312       156       2.039     300 (NVLink3 600    25 (200 Gb/s HDR)    8
#                                         bidirectional)
# b200     2250 (?)  1125 (?)  8.0       900 (NVLink5 1.8    50 (400 Gb/s CX-7)   8
#                                         TB/s bidirect.)
# tpu-v5p  459       459 (?)   2.765     600 (ICI 4800 Gb/s  6.25 (DCN 50 Gb/s    6144 (largest
#                                         per direction)      per chip)            single slice)
# tpu-v5e  197       197 (?)   0.819     200 (ICI 1600 Gb/s  3.125 (?) (DCN 6.4   256 (pod)
#                                         per direction)      Tb/s per 256 chips)
#
# * fp32 = float32 inputs at JAX's default matmul precision: TF32 tensor cores on NVIDIA (datasheet
#   "TF32 Tensor Core" / 2), one bf16 MXU pass on TPU (so the bf16 figure; (?) as it depends on
#   jax_default_matmul_precision).
# - H100 SXM5 / H200 SXM: NVIDIA H100 and H200 datasheets (BF16 1,979 TF with sparsity; TF32 989 TF
#   with sparsity; 3.35 / 4.8 TB/s; NVLink 900 GB/s). 400 Gb/s per GPU: DGX H100 has 8 ConnectX-7
#   NDR ports for 8 GPUs.
# - A100 80GB SXM: A100 datasheet (BF16 312 TF dense, TF32 156 TF dense, HBM2e 2,039 GB/s, NVLink
#   600 GB/s); 200 Gb/s HDR per GPU as in DGX A100 (8 ConnectX-6 for 8 GPUs).
# - B200 (?): HGX B200 datasheet, 8 GPUs: FP16/BF16 36 PF and TF32 18 PF with sparsity -> per GPU
#   2.25 PF and 1.125 PF dense; 8 TB/s HBM3e; NVLink5 1.8 TB/s. Air-cooled B200 at 1000 W; the
#   GB200 part is rated higher (2.5 PF dense bf16), some B200 systems lower. 400 Gb/s per GPU:
#   DGX B200's 8 ConnectX-7 (a ConnectX-8 system has 800 Gb/s).
# - TPU v5p / v5e: Google Cloud TPU "v5p" and "v5e" pages (459 / 197 TF bf16; 2,765 / 819 GB/s;
#   ICI 4,800 / 1,600 Gbps per chip, which those pages also give as 1,200 / 400 GBps
#   bidirectional; v5p DCN 50 Gbps per chip; v5e DCN 6.4 Tbps per 256-chip pod). The ICI figure is
#   the chip's total over all its torus links (6 on v5p, 4 on v5e); a ring along one torus
#   dimension uses only 2 of them, so for single-axis collectives it is optimistic (?).
# - collective_latency (?): an estimate, not a datasheet figure: ~10 us per NCCL collective
#   (launch plus a few NVLink/IB hops), ~5 us per ICI collective.
_H100 = _preset("h100", peak_flops_bf16=989e12, peak_flops_fp32=494.7e12, hbm_bandwidth=3.35e12,
                intra_node_bandwidth=450e9, inter_node_bandwidth=50e9, devices_per_node=8,
                collective_latency=10e-6)
DEVICE_SPECS: dict[str, DeviceSpec] = {
    "h100": _H100,
    # an H100 with more, faster HBM (HBM3e): the same compute, NVLink and network
    "h200": dataclasses.replace(_H100, name="h200", memory_bytes=DEVICE_PRESETS["h200"], hbm_bandwidth=4.8e12),
    "a100": _preset("a100", peak_flops_bf16=312e12, peak_flops_fp32=156e12, hbm_bandwidth=2.039e12,
                    intra_node_bandwidth=300e9, inter_node_bandwidth=25e9, devices_per_node=8,
                    collective_latency=10e-6),
    "b200": _preset("b200", peak_flops_bf16=2250e12, peak_flops_fp32=1125e12, hbm_bandwidth=8e12,
                    intra_node_bandwidth=900e9, inter_node_bandwidth=50e9, devices_per_node=8,
                    collective_latency=10e-6),
    "tpu-v5p": _preset("tpu-v5p", peak_flops_bf16=459e12, peak_flops_fp32=459e12,
                       hbm_bandwidth=2.765e12, intra_node_bandwidth=600e9, inter_node_bandwidth=6.25e9,
                       devices_per_node=6144, collective_latency=5e-6),
    "tpu-v5e": _preset("tpu-v5e", peak_flops_bf16=197e12, peak_flops_fp32=197e12,
                       hbm_bandwidth=819e9, intra_node_bandwidth=200e9, inter_node_bandwidth=3.125e9,
                       devices_per_node=256, collective_latency=5e-6),
}
"""Datasheet constants of common accelerators, by the names :data:`DEVICE_PRESETS` uses (the
table of sources is beside the definition). There is no ``cpu`` preset: measure it with
:func:`titanax.planner.calibrate`."""


def device_spec(name: str) -> DeviceSpec:
    """The preset named ``name`` (case and surrounding spaces ignored).

    Args:
      name: a key of :data:`DEVICE_SPECS`.

    Returns:
      The :class:`DeviceSpec`.

    Raises:
      ConfigError: an unknown name.

    Example:
      >>> device_spec("H200").hbm_bandwidth / 1e12
      4.8
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DEVICE_SPECS:
        raise ConfigError(f"no device spec named {name!r}",
                          suggestion=f"use one of {', '.join(DEVICE_SPECS)}, or measure this machine "
                          "with tx.planner.calibrate()", owner="device_spec", field="name", value=name)
    return DEVICE_SPECS[key]
