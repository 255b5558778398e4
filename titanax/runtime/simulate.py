"""Fake CPU devices: run a multi-device program on one machine's CPU, as the tests do."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import jax

from titanax.exceptions import MeshError

__all__ = ["simulate_cpu_devices", "simulation_environment", "CPU_COLLECTIVE_FLAGS", "THREADS_PER_DEVICE"]

# XLA runs each simulated device's part of a program on two shared thread pools (dispatch and
# intra-op), both sized max(cores, devices) by default. A device waiting in a collective blocks its
# thread until every participant arrives, and one device can have several collectives in flight at
# once (a 1F1B pipeline step's permutes and its tensor-parallel all-reduces). With 8 devices the
# waiting participants can then hold every thread of the pool, so the last participant never runs
# and XLA aborts at its termination timeout. PJRT_NPROC sizes both pools: our worst case, 8 devices
# running 1F1B x DP x TP, deadlocked with 8 or 9 threads and never with 12 or more
# (benchmarks/simulated_collectives.py); 8 per device leaves a wide margin at no measurable cost.
THREADS_PER_DEVICE = 8

# A collective that still waits after this long is a deadlock, not a slow device: stop the process
# with XLA's report instead of hanging. Both flags exist in every jaxlib Titanax supports (0.10.2 - 0.12).
CPU_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=300",
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60")


def simulation_environment(count: int, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the environment variables simulated devices need, keeping any the user already set.

    Sizes XLA's CPU thread pools for ``count`` devices (``PJRT_NPROC``) and sets the collective
    timeouts (``XLA_FLAGS``). Takes effect only before JAX creates its CPU backend.

    Args:
      count: the number of simulated devices in this process.
      environ: the mapping to update; ``os.environ`` by default (a subprocess's ``env`` otherwise).

    Example:
      >>> env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
      >>> simulation_environment(8, env)
      >>> int(env["PJRT_NPROC"]) >= 64
      True
    """
    environ = os.environ if environ is None else environ
    environ.setdefault("PJRT_NPROC", str(max(os.cpu_count() or 1, THREADS_PER_DEVICE * count)))
    flags = environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_COLLECTIVE_FLAGS if f.split("=")[0] not in flags]
    environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def simulate_cpu_devices(count: int) -> None:
    """Make JAX present ``count`` CPU devices (and use the CPU), before any JAX computation.

    Meshes, shardings and collectives then behave as on ``count`` accelerators, so a plan can be
    checked (and its compiled program inspected) on a laptop.

    Args:
      count: the number of devices to simulate.

    Raises:
      MeshError: JAX already started with a different number of devices.

    Example:
      >>> import titanax as tx
      >>> tx.simulate_cpu_devices(8)         # first thing in the program  # doctest: +SKIP
      >>> len(jax.devices())                                               # doctest: +SKIP
      8
    """
    if not isinstance(count, int) or count < 1:
        raise MeshError(f"simulate_cpu_devices({count!r}) needs a positive device count",
                        suggestion="use e.g. simulate_cpu_devices(8)")
    from jax._src import xla_bridge  # the only way to ask whether backends started

    if xla_bridge.backends_are_initialized():
        have = jax.device_count()
        if have == count and jax.default_backend() == "cpu":
            return
        raise MeshError(
            f"JAX already started with {have} {jax.default_backend()} device(s); cannot simulate {count}",
            suggestion="call tx.simulate_cpu_devices() before any JAX computation, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} JAX_PLATFORMS=cpu "
            f"PJRT_NPROC={THREADS_PER_DEVICE * count}",
        )
    os.environ["JAX_PLATFORMS"] = "cpu"
    simulation_environment(count)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
