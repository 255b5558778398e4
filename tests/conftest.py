"""Every test sees 8 fake CPU devices; this must run before JAX computes anything."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# In XLA_FLAGS (not only jax's config) so that subprocesses started by tests inherit the 8 devices.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"]).strip()
sys.path.insert(0, os.path.dirname(__file__))  # `import models` from any test directory
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # `import examples.<name>.<module>`

from titanax.runtime.simulate import simulation_environment  # noqa: E402

simulation_environment(8)  # thread pools sized for 8 devices, collective timeouts

import jax  # noqa: E402

assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.devices()}"
