"""Every test, and every docstring example under ``titanax/`` (run with ``--doctest-modules``),
sees 8 fake CPU devices; this must run before JAX computes anything."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
# In XLA_FLAGS (not only jax's config) so that subprocesses started by tests inherit the 8 devices.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_force_host_platform_device_count=8"]).strip()
# XLA programs compiled in this run are kept on disk for the rest of it: the fresh processes the
# tests start (checkpoint workers, launched jobs, docs pages) and tests that build the same model
# load a program compiled once instead of compiling it again. Each run starts with an empty cache.
_XLA_CACHE = tempfile.mkdtemp(prefix="titanax-tests-xla-cache-")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
# `titanax run` writes a run directory per run (runs/<name>-<time>/ by default): tests write theirs here.
_RUNS = tempfile.mkdtemp(prefix="titanax-tests-runs-")
atexit.register(shutil.rmtree, _RUNS, ignore_errors=True)
os.environ.setdefault("TITANAX_RUNS", _RUNS)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tests"))  # `import models` from any test
sys.path.insert(0, os.path.dirname(__file__))  # `import examples.<name>.<module>`

from titanax.runtime.simulate import simulation_environment  # noqa: E402

simulation_environment(8)  # thread pools sized for 8 devices, collective timeouts

import jax  # noqa: E402

assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.devices()}"


import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import titanax as tx  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    """The names every docstring example may use without importing them."""
    doctest_namespace.update(tx=tx, jax=jax, jnp=jnp, np=np, nn=nn, nnx=nnx, P=P)


@pytest.fixture(autouse=True)
def _titanax_logger_restored():
    """``titanax run`` called in-process (``CliRunner``) gives the ``titanax`` logger a handler on
    that call's stderr and stops propagation: put the logger back so that the next test's ``caplog``
    sees its records whatever order the tests run in."""
    import logging

    logger = logging.getLogger("titanax")
    before = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = before[0]
    logger.propagate = before[2]
    logger.setLevel(before[1])  # setLevel, not `level =`: it clears the children's enabled-for cache
