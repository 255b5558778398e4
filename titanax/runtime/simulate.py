"""Fake CPU devices: run a multi-device program on one machine's CPU, as the tests do."""

from __future__ import annotations

import os

import jax

from titanax.exceptions import MeshError

__all__ = ["simulate_cpu_devices"]


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
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
