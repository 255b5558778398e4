"""Fake CPU devices: run a multi-device program on one machine's CPU, as the tests do."""

from __future__ import annotations

import os

import jax

from titanax.exceptions import MeshError

__all__ = ["simulate_cpu_devices", "CPU_COLLECTIVE_FLAGS"]

# Simulated devices are threads sharing the host's cores: on a busy 2-core machine one of them can
# reach a collective more than XLA's default 40 s after the others, and XLA then aborts the process.
# Both flags exist in every jaxlib Titanax supports (0.10.2 - 0.12).
CPU_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=900",
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")


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
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} JAX_PLATFORMS=cpu",
        )
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_COLLECTIVE_FLAGS if f.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
