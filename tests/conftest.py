"""Every test sees 8 fake CPU devices; this must run before JAX is imported."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
                                    # simulated devices on 2 busy cores can be slow to meet in a collective
                                    "--xla_cpu_collective_call_terminate_timeout_seconds=900"]).strip()
sys.path.insert(0, os.path.dirname(__file__))  # `import models` from any test directory
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # `import examples.<name>.<module>`

import jax  # noqa: E402

assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.devices()}"
