"""Device memory presets and sizes, the analytic activation figure, and describe's verdict."""

import jax
import jax.numpy as jnp
import pytest

import titanax as tx
from titanax.config.describe import RunDescription
from titanax.profiling import CompiledStats
from titanax.profiling.activations import ActivationEstimate, saved_activations
from titanax.profiling.devices import DEVICE_PRESETS, device_memory


def test_presets_and_sizes():
    assert device_memory("H100").bytes == 81_559 * 2**20
    assert device_memory("tpu-v5p").gpu is False and device_memory("h200").gpu is True
    assert device_memory(size="80GiB").bytes == 80 * 2**30
    assert device_memory(size="96 GB").bytes == 96 * 10**9
    assert device_memory(size="1.5TiB").bytes == int(1.5 * 2**40)
    assert device_memory(size="123456").bytes == 123456
    assert set(DEVICE_PRESETS) >= {"h100", "h200", "a100", "tpu-v5p"}


@pytest.mark.parametrize("device, size, match", [
    ("h1000", None, "unknown device 'h1000'"),
    (None, "80 gigs", "is not a size"),
    (None, "0GiB", "must be positive"),
    (None, None, "no device memory given"),
])
def test_bad_device_memory_is_named(device, size, match):
    with pytest.raises(tx.TitanaxError, match=match):
        device_memory(device, size)


def test_saved_activations_count_what_the_backward_keeps_in_its_dtype():
    w = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((32, 64), jnp.bfloat16)

    def forward(w, x):
        return jnp.tanh(x @ w).sum()

    plain = saved_activations(forward, w, x)
    # tanh's output (and, before jax 0.12, a second [32, 64] array for its derivative), bfloat16
    assert plain.total_bytes == plain.count * 32 * 64 * 2 and plain.count in (1, 2)
    split = saved_activations(forward, w, x, batch_size=32, batch_ways=8)
    assert split.per_device_bytes == plain.total_bytes // 8
    recomputed = saved_activations(jax.checkpoint(forward), w, x)
    assert recomputed.total_bytes == 0  # only the inputs, which are not counted


def description(temp: int, analytic: int | None, device: str, backend: str = "cpu") -> RunDescription:
    activations = None if analytic is None else ActivationEstimate(total_bytes=analytic,
                                                                   per_device_bytes=analytic, count=1)
    return RunDescription(mesh="", plan="", layout="", parameter_count=0, param_bytes=2**30,
                          optimizer_bytes=2**31, model_state_bytes=0, batch_shapes={},
                          stats=CompiledStats(temp_bytes=temp), activations=activations, backend=backend,
                          compute_dtype="bfloat16", device=device_memory(device), compile_seconds=0.0)


def test_verdicts():
    fits = description(10 * 2**30, None, "h100").verdict()
    assert fits.startswith("Verdict: fits one h100 (79.65 GiB) with 66.65 GiB to spare")
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in fits
    only_analytic = description(100 * 2**30, 40 * 2**30, "tpu-v5p").verdict()
    assert "fits one tpu-v5p (95.00 GiB) by the analytic activations" in only_analytic
    assert "confirm on the device" in only_analytic and "XLA_PYTHON" not in only_analytic
    no = description(200 * 2**30, 100 * 2**30, "h100").verdict()
    assert "does NOT fit one h100" in no and "2.55x the memory" in no and "remat" in no
