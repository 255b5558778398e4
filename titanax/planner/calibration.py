"""Measure a :class:`~titanax.planner.device_spec.DeviceSpec` on the devices at hand.

Every figure is measured with **all devices busy at once**, as in a training step: simulated CPU
devices share the host's cores (and an accelerator's host shares its PCIe and NICs), so one device
alone would overstate what each gets. Each measurement runs a loop of ``k`` identical operations
inside one compiled program and subtracts the time of a one-trip loop, which cancels dispatch
overhead; ``k`` is chosen so a run lasts about ``_TARGET_S``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from titanax.planner.device_spec import DeviceSpec
from titanax.planner.roofline import ring_bytes, ring_steps
from titanax.exceptions import ConfigError, MeshError

__all__ = ["calibrate"]

_AXIS = "devices"
# Seconds one timed run should last: long enough to dwarf the timer, dispatch and a scheduler's
# hiccup, short enough that the whole calibration stays within seconds on 8 simulated devices.
_TARGET_S = 0.25
# Loop trips of the long run at least: the per-trip time is the difference of two runs divided by
# ``trips - 1``; with 2 trips of a 50 ms operation (a streamed array on simulated devices) that
# difference was one noisy trip, and the memory bandwidth came out anywhere from 3 to 25 GB/s in
# four calibrations in a row.
_MIN_TRIPS = 6
# Per-device problem sizes. The matmul edge saturates a GPU/TPU's matrix units and fits a CPU's
# caches poorly enough to be honest; the streamed array is well beyond any cache; the small
# all-reduce is latency, the large one bandwidth.
_SIZES = {
    "cpu": {"matmul": 256, "stream": 8 << 20, "reduce_small": 256, "reduce_large": 1 << 20},
    "accelerator": {"matmul": 4096, "stream": 256 << 20, "reduce_small": 256, "reduce_large": 64 << 20},
}


def _best_time(run: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _per_trip(run: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> float:
    """Seconds one loop trip of ``run(trips, *args)`` takes, dispatch overhead removed."""
    jax.block_until_ready(run(1, *args))  # compiles, and warms caches and allocators
    one = _best_time(run, (1, *args), repeats)
    trips = int(min(max(_TARGET_S / max(one, 1e-6), _MIN_TRIPS), 10_000))
    many = _best_time(run, (trips, *args), repeats)
    per = (many - one) / (trips - 1)
    # timer noise can make the difference vanish when dispatch dominates; the plain mean is then
    # the honest (pessimistic) figure
    return per if per > 0 else many / trips


def _looped(body: Callable[[Any, Any], Any], mesh: Mesh, spec: P) -> Callable[..., Any]:
    """``run(trips, x, *consts)``: ``trips`` applications of ``body(x, consts)``, one program
    for any trip count (the count is a traced argument, so the loop is not unrolled)."""
    sharding = NamedSharding(mesh, spec)

    def run(trips: Any, x: Any, *consts: Any) -> Any:
        return jax.lax.fori_loop(0, trips, lambda _, y: body(y, consts), x)

    return jax.jit(run, out_shardings=sharding)


def _filled(mesh: Mesh, shape: tuple[int, ...], dtype: Any, spec: P) -> jax.Array:
    # made on the devices, already sharded: a large host array would only add transfer time
    return jax.jit(lambda: jnp.ones(shape, dtype), out_shardings=NamedSharding(mesh, spec))()


def _matmul_flops(mesh: Mesh, n: int, edge: int, dtype: Any, repeats: int) -> float:
    """Dense matmul FLOP/s per device, every device multiplying its own matrices."""
    x = _filled(mesh, (n, edge, edge), dtype, P(_AXIS))
    # A signed permutation keeps the values exactly +-1 trip after trip (no overflow, no
    # denormals), yet the hardware does the full dense product: its values are runtime data.
    rng = np.random.default_rng(0)
    w_host = np.zeros((edge, edge), np.float32)
    w_host[np.arange(edge), rng.permutation(edge)] = rng.choice([-1.0, 1.0], edge)
    w = jax.device_put(jnp.asarray(w_host, dtype), NamedSharding(mesh, P()))
    run = _looped(lambda y, c: jnp.einsum("bij,jk->bik", y, c[0]), mesh, P(_AXIS))
    return 2 * edge**3 / _per_trip(run, (x, w), repeats)


def _memory_bandwidth(mesh: Mesh, n: int, length: int, repeats: int) -> float:
    """Bytes read plus written per second per device by an elementwise op on a large array."""
    x = _filled(mesh, (n, length), jnp.float32, P(_AXIS))
    scale = jax.device_put(jnp.float32(1.0), NamedSharding(mesh, P()))
    # a runtime scale, so XLA cannot fold the multiply away
    run = _looped(lambda y, c: y * c[0], mesh, P(_AXIS))
    return 2 * 4 * length / _per_trip(run, (x, scale), repeats)


def _all_reduce_seconds(devices: np.ndarray, group: int, length: int, repeats: int) -> float:
    """Seconds of one all-reduce of ``length`` float32 per device within groups of ``group``
    devices, every group at once (a mesh axis of size ``group``)."""
    n = devices.size
    mesh = Mesh(devices.reshape(n // group, group), ("groups", _AXIS), axis_types=(AxisType.Auto,) * 2)
    spec = P(("groups", _AXIS))
    x = _filled(mesh, (n * length,), jnp.float32, spec)
    reduce = jax.shard_map(lambda y: jax.lax.psum(y, _AXIS) * (1.0 / group), mesh=mesh,
                           in_specs=spec, out_specs=spec, check_vma=False)
    return _per_trip(_looped(lambda y, c: reduce(y), mesh, spec), (x,), repeats)


def _latencies(small_seconds: dict[int, float], small_elements: int, bandwidth: float) -> tuple[float, float]:
    """``(collective_latency, collective_step_latency)`` fitted by least squares to the small
    all-reduce's time per group size: ``t(g) - moved(g) / bandwidth = latency + ring_steps(g) * step``."""
    xs = np.array([ring_steps("all-reduce", g) for g in small_seconds], float)
    ys = np.array([t - ring_bytes("all-reduce", 4 * small_elements, g) / bandwidth
                   for g, t in small_seconds.items()])
    if len(xs) > 1:
        step = float(np.polyfit(xs, ys, 1)[0])
        if step <= 0:  # noise: the groups cost alike, so it is all a fixed latency
            return max(float(ys.mean()), 0.0), 0.0
        latency = float(ys.mean() - step * xs.mean())
        if latency >= 0:
            return latency, step
        # a negative intercept is noise: every bit of the time is the hops'
        return 0.0, float((xs * ys).sum() / (xs * xs).sum())
    return max(float(ys[0]), 0.0), 0.0


def _memory_bytes(device: Any) -> int:
    stats = None
    with contextlib.suppress(Exception):  # backends without memory stats fail in various ways
        stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:  # CPU: the host's memory, shared by its simulated devices
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 1 << 34
    return max(1, int(total) // max(1, jax.local_device_count()))


def calibrate(mesh: Mesh | None = None, *, repeats: int = 3) -> DeviceSpec:
    """Measures the roofline constants of the present backend, every device busy at once.

    * ``peak_flops_bf16`` / ``peak_flops_fp32``: a batched matmul sharded over the devices, one
      ``edge x edge`` product per device per trip (``edge`` 256 on CPU, 4096 elsewhere), at JAX's
      default precision.
    * ``hbm_bandwidth``: an elementwise multiply of a float32 array (32 MiB per device on CPU,
      1 GiB elsewhere), counting bytes read plus written.
    * ``intra_node_bandwidth`` = ``inter_node_bandwidth``: the time of an all-reduce over all
      devices of 1 KiB and of a large array (4 MiB per device on CPU, 256 MiB elsewhere): the
      bytes :func:`~titanax.planner.ring_bytes` counts for the difference over the difference of
      the times. On one host both bandwidths are the same figure; over several hosts the
      all-reduce crosses nodes, so both are the inter-node one (intra-node links are then at
      least this fast). With one device there is no collective to time: the bandwidths are the
      memory bandwidth and the latencies 0.
    * ``collective_latency`` and ``collective_step_latency``: the 1 KiB all-reduce within groups
      of every power-of-two size up to all devices (all groups at once; the median of three
      measurements each), its bandwidth time taken off, fitted by least squares to ``latency +
      ring_steps("all-reduce", g) * step_latency``, the model :func:`~titanax.planner.estimate_step`
      uses. On 8 simulated CPU devices a group of 2 took ~50 us and one of 8 ~270 us: a single
      latency measured over all devices overcharged the steps' many collectives over 2 or 4 of
      them (GPT tiny's plans: ``benchmarks/autoplan.py``). The latency is the collective's own: a
      collective inside a compute stream also waits for the slowest device, but that wait scales
      with the compute between two collectives, not with their number.
    * ``memory_bytes``: the device's allocation limit, or for CPU the host memory divided among
      its devices; ``devices_per_node``: ``jax.local_device_count()``.

    Each figure is the best of ``repeats`` timed runs, after a warm-up run. With several
    processes every process must call it (the programs span all devices).

    Args:
      mesh: measure its devices (``mesh.devices``) instead of all of ``jax.devices()``.
      repeats: timed runs per figure (the fastest counts).

    Returns:
      A :class:`~titanax.planner.DeviceSpec` named ``"calibrated-<platform>"``.

    Raises:
      ConfigError: ``repeats`` not a positive integer.
      MeshError: a mesh with no devices.

    Example:
      >>> spec = calibrate(repeats=1)  # a few seconds on 8 simulated CPU devices    # doctest: +SKIP
      >>> spec.name, spec.devices_per_node                                          # doctest: +SKIP
      ('calibrated-cpu', 8)
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"calibrate(repeats={repeats!r}) must be a positive integer",
                          suggestion="use repeats=3 (the default), or 1 for a quick figure",
                          owner="calibrate", field="repeats", value=repeats)
    devices = list(jax.devices()) if mesh is None else list(np.asarray(mesh.devices).flat)
    if not devices:
        raise MeshError("calibrate got a mesh without devices", suggestion="pass a built jax.sharding.Mesh, "
                        "or no mesh to use every device", owner="calibrate", field="mesh")
    n = len(devices)
    grid = np.empty(n, dtype=object)
    grid[:] = devices
    flat = Mesh(grid, (_AXIS,), axis_types=(AxisType.Auto,))
    platform = devices[0].platform
    sizes = _SIZES["cpu" if platform == "cpu" else "accelerator"]
    fp32 = _matmul_flops(flat, n, sizes["matmul"], jnp.float32, repeats)
    bf16 = _matmul_flops(flat, n, sizes["matmul"], jnp.bfloat16, repeats)
    # twice: the first pass pays the page faults of fresh buffers, which a training step's
    # reused buffers do not
    hbm = max(_memory_bandwidth(flat, n, sizes["stream"], repeats) for _ in range(2))
    step_latency = 0.0
    if n > 1:
        small, large = sizes["reduce_small"], sizes["reduce_large"]
        # every power-of-two group size up to all devices: the latency grows with the group
        groups = sorted({g for g in (2 ** k for k in range(1, n.bit_length())) if n % g == 0} | {n})
        # the median of three: a rendezvous of simulated devices on shared cores now and then
        # takes twice as long for a whole run, which the best of ``repeats`` does not remove
        t_small = {g: statistics.median(_all_reduce_seconds(grid, g, small, repeats) for _ in range(3))
                   for g in groups}
        t_large = _all_reduce_seconds(grid, n, large, repeats)
        moved_small, moved_large = (ring_bytes("all-reduce", 4 * s, n) for s in (small, large))
        bandwidth = ((moved_large - moved_small) / (t_large - t_small[n]) if t_large > t_small[n]
                     else moved_large / t_large)
        latency, step_latency = _latencies(t_small, small, bandwidth)
    else:
        bandwidth, latency = hbm, 0.0
    return DeviceSpec(name=f"calibrated-{platform}", peak_flops_bf16=bf16, peak_flops_fp32=fp32,
                      memory_bytes=_memory_bytes(devices[0]), hbm_bandwidth=hbm,
                      intra_node_bandwidth=bandwidth, inter_node_bandwidth=bandwidth,
                      devices_per_node=jax.local_device_count(), collective_latency=latency,
                      collective_step_latency=step_latency)
