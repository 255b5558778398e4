"""The roofline step-time model (planner/roofline.py), the device constants (device_spec.py) and
their calibration (calibration.py)."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh

from titanax.planner import (
    DEVICE_SPECS,
    DeviceSpec,
    StepEstimate,
    axis_crosses_nodes,
    calibrate,
    device_spec,
    estimate_step,
    ring_bytes,
    ring_steps,
)
from titanax.exceptions import ConfigError, MeshError, TitanaxError
from titanax.profiling import COLLECTIVE_KINDS, CollectiveStats
from titanax.profiling.devices import DEVICE_PRESETS


@dataclasses.dataclass
class Cost:  # any object with .count and .bytes will do, not only CollectiveStats
    count: int
    bytes: float


# Round numbers, so that every figure below can be checked by mental arithmetic.
SPEC = DeviceSpec(name="toy", peak_flops_bf16=1e12, peak_flops_fp32=5e11, memory_bytes=2**30,
                  hbm_bandwidth=1e11, intra_node_bandwidth=1e10, inter_node_bandwidth=1e9,
                  devices_per_node=4, collective_latency=1e-5)


def test_presets_memory_is_the_profiling_table():
    assert {"h100", "h200", "a100", "b200", "tpu-v5p", "tpu-v5e"} <= set(DEVICE_SPECS)
    assert "cpu" not in DEVICE_SPECS
    for name, spec in DEVICE_SPECS.items():
        assert spec.name == name
        assert spec.memory_bytes == DEVICE_PRESETS[name]


def test_presets_datasheet_figures():
    h100 = DEVICE_SPECS["h100"]
    assert (h100.peak_flops_bf16, h100.hbm_bandwidth) == (989e12, 3.35e12)
    assert (h100.intra_node_bandwidth, h100.inter_node_bandwidth, h100.devices_per_node) == (450e9, 50e9, 8)
    assert DEVICE_SPECS["h200"].hbm_bandwidth == 4.8e12
    assert DEVICE_SPECS["h200"].peak_flops_bf16 == h100.peak_flops_bf16
    assert DEVICE_SPECS["a100"].inter_node_bandwidth == 25e9  # 200 Gb/s HDR
    assert DEVICE_SPECS["tpu-v5e"].intra_node_bandwidth == 1600e9 / 8
    assert device_spec(" H100 ") is h100
    with pytest.raises(ConfigError) as info:
        device_spec("cpu")
    assert "calibrate" in info.value.suggestion


def test_axis_crosses_nodes_on_shapes_and_meshes():
    shape = {"data": 4, "tensor": 8}
    abstract = AbstractMesh((4, 8), ("data", "tensor"))
    for mesh in (shape, abstract):
        assert axis_crosses_nodes(mesh, ("tensor",), 8) is False
        assert axis_crosses_nodes(mesh, ("data",), 8) is True
        assert axis_crosses_nodes(mesh, ("data", "tensor"), 8) is True
        assert axis_crosses_nodes(mesh, ("tensor", "data"), 8) is True
        assert axis_crosses_nodes(mesh, (), 8) is False
        assert axis_crosses_nodes(mesh, "data", 32) is False  # everything on one node
    # nodes of 16 hold two `data` rows: data pairs (0,1) and (2,3) stay inside, all four do not
    assert axis_crosses_nodes({"pod": 2, "data": 2, "tensor": 8}, ("data",), 16) is False
    assert axis_crosses_nodes({"pod": 2, "data": 2, "tensor": 8}, ("pod",), 16) is True
    # a node size that does not divide an axis: tensor groups straddle a node boundary
    assert axis_crosses_nodes({"data": 2, "tensor": 6}, ("tensor",), 4) is True
    real = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    assert [axis_crosses_nodes(real, a, 4) for a in [("tensor",), ("data",)]] == [False, True]


def test_axis_crosses_nodes_errors():
    with pytest.raises(MeshError, match="no axis 'pipe'") as info:
        axis_crosses_nodes({"data": 4}, ("pipe",), 8)
    assert info.value.suggestion
    with pytest.raises(ConfigError) as info:
        axis_crosses_nodes({"data": 4}, ("data",), 0)
    assert info.value.field == "devices_per_node"


def test_ring_bytes():
    assert ring_bytes("all-reduce", 800, 4) == 2 * 3 / 4 * 800
    assert ring_bytes("all-gather", 800, 4) == 3 / 4 * 800
    assert ring_bytes("reduce-scatter", 200, 4) == 3 / 4 * 800  # result 200 = operand 800 / 4
    assert ring_bytes("all-to-all", 800, 4) == 600
    assert ring_bytes("collective-permute", 800, 4) == 800
    assert ring_bytes("all-reduce", 800, 1) == 0
    assert all(ring_bytes(kind, 1, 2) >= 0 for kind in COLLECTIVE_KINDS)
    with pytest.raises(ConfigError):
        ring_bytes("send", 1, 2)


def test_ring_steps():
    assert [ring_steps("all-reduce", n) for n in (1, 2, 8)] == [0, 2, 14]
    assert ring_steps("all-gather", 8) == ring_steps("reduce-scatter", 8) == ring_steps("all-to-all", 8) == 7
    assert ring_steps("collective-permute", 8) == ring_steps("collective-broadcast", 8) == 1
    assert all(ring_steps(kind, 4) >= 1 for kind in COLLECTIVE_KINDS)
    with pytest.raises(ConfigError, match="unknown collective kind"):
        ring_steps("send", 2)


def test_the_step_latency_charges_larger_groups_more():
    spec = dataclasses.replace(SPEC, collective_latency=5e-6, collective_step_latency=1e-6, devices_per_node=8)
    mesh = {"data": 2, "tensor": 4}  # one node of 8
    tiny = {"all-reduce": Cost(count=10, bytes=0)}
    est = estimate_step(flops=0, bytes_accessed=0, mesh=mesh, spec=spec,
                        collectives_by_axis={("data",): tiny, ("tensor",): tiny, ("data", "tensor"): tiny})
    # 10 all-reduces each: 5 us + 2(n-1) hops of 1 us
    assert est.collective_s_by_axis == pytest.approx(
        {("data",): 10 * (5e-6 + 2e-6), ("tensor",): 10 * (5e-6 + 6e-6), ("data", "tensor"): 10 * (5e-6 + 14e-6)})
    assert DEVICE_SPECS["h100"].collective_step_latency == 0.0  # presets: one latency per collective
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(SPEC, collective_step_latency=-1e-6)
    assert info.value.field == "collective_step_latency"


def test_calibration_fits_a_latency_and_a_step_latency_to_the_group_sizes():
    from titanax.planner.calibration import _latencies

    # exact: 10 us + 2(g-1) x 2 us, with 1 KiB at 1 GB/s on top
    bandwidth = 1e9
    times = {g: 10e-6 + ring_steps("all-reduce", g) * 2e-6 + ring_bytes("all-reduce", 1024, g) / bandwidth
             for g in (2, 4, 8)}
    assert _latencies(times, 256, bandwidth) == pytest.approx((10e-6, 2e-6))
    # larger groups no slower (noise): all of it is one latency
    assert _latencies({2: 30e-6, 4: 20e-6, 8: 25e-6}, 0, bandwidth) == pytest.approx((25e-6, 0.0))
    # a negative intercept: all of it is the hops'
    latency, step = _latencies({2: 10e-6, 4: 60e-6, 8: 140e-6}, 0, bandwidth)
    assert latency == 0.0 and step == pytest.approx((2 * 10 + 6 * 60 + 14 * 140) / (4 + 36 + 196) * 1e-6)
    # one group size (2 devices): a latency only
    assert _latencies({2: 40e-6}, 0, bandwidth) == pytest.approx((40e-6, 0.0))


def test_estimate_by_hand():
    mesh = {"data": 2, "tensor": 4}  # 4 per node: tensor inside a node, data across
    collectives = {
        ("tensor",): {"all-reduce": CollectiveStats(count=2, bytes=4_000_000),
                      "reduce-scatter": Cost(count=1, bytes=1_000_000)},
        ("data",): {"all-gather": Cost(count=1, bytes=8_000_000)},
        ("data", "tensor"): {"collective-permute": Cost(count=3, bytes=1_000_000)},
        (): {"all-reduce": Cost(count=5, bytes=10**9)},  # groups of one device: free
    }
    est = estimate_step(flops=3e9, bytes_accessed=2e8, collectives_by_axis=collectives, mesh=mesh, spec=SPEC)
    # tensor, n=4 over 1e10 B/s: all-reduce 1.5 x 4e6 B = 0.6 ms, reduce-scatter 3 x 1e6 B = 0.3 ms,
    # plus 3 latencies of 10 us
    tensor = 0.6e-3 + 0.3e-3 + 3 * 10e-6
    data = 4e6 / 1e9 + 10e-6  # n=2 across nodes: half of 8e6 B at 1e9 B/s
    both = 1e6 / 1e9 + 3 * 10e-6  # n=8 crosses nodes; a permute sends its result once
    assert est.flops_s == pytest.approx(3e-3)
    assert est.memory_s == pytest.approx(2e-3)
    assert est.compute_s == pytest.approx(3e-3)
    assert est.collective_s_by_axis == pytest.approx(
        {("tensor",): tensor, ("data",): data, ("data", "tensor"): both, (): 0.0})
    assert est.collective_s == pytest.approx(tensor + data + both) == pytest.approx(5.97e-3)
    assert est.total_s == pytest.approx(3e-3 + 5.97e-3)
    assert est.bound == "communication"
    overlapped = estimate_step(flops=3e9, bytes_accessed=2e8, collectives_by_axis=collectives, mesh=mesh,
                               spec=SPEC, overlap=True)
    assert overlapped.total_s == pytest.approx(5.97e-3)
    fp32 = estimate_step(flops=3e9, bytes_accessed=2e8, collectives_by_axis={}, mesh=mesh, spec=SPEC,
                         compute_dtype="float32")
    assert (fp32.flops_s, fp32.total_s, fp32.bound) == (pytest.approx(6e-3), pytest.approx(6e-3), "compute")
    memory = estimate_step(flops=0, bytes_accessed=1e9, collectives_by_axis={}, mesh=mesh, spec=SPEC)
    assert (memory.total_s, memory.bound) == (pytest.approx(1e-2), "memory")
    text = est.describe()
    assert "communication-bound" in text and "data x tensor" in text and "no overlap" in text


def test_estimate_from_a_real_mesh():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    est = estimate_step(flops=0, bytes_accessed=0, mesh=mesh, spec=SPEC,
                        collectives_by_axis={("data",): {"all-reduce": Cost(count=1, bytes=1e6)}})
    assert est.collective_s == pytest.approx(1e6 / 1e9 + 1e-5)  # 2(n-1)/n = 1 for n=2, across nodes


def test_validation():
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(SPEC, inter_node_bandwidth=-5e9)
    error = info.value
    assert isinstance(error, TitanaxError)
    assert (error.owner, error.field, error.value) == ("DeviceSpec", "inter_node_bandwidth", -5e9)
    assert error.suggestion
    for field, bad in [("hbm_bandwidth", math.inf), ("devices_per_node", 2.5), ("memory_bytes", 0),
                       ("collective_latency", -1e-6), ("peak_flops_bf16", True), ("name", "")]:
        with pytest.raises(ConfigError) as info:
            dataclasses.replace(SPEC, **{field: bad})
        assert info.value.field == field and info.value.suggestion
    assert dataclasses.replace(SPEC, collective_latency=0.0).collective_latency == 0.0
    with pytest.raises(ConfigError, match="compute_dtype"):
        estimate_step(flops=1, bytes_accessed=1, collectives_by_axis={}, mesh={"d": 2}, spec=SPEC,
                      compute_dtype="int8")
    with pytest.raises(ConfigError, match="flops"):
        estimate_step(flops=-1, bytes_accessed=1, collectives_by_axis={}, mesh={"d": 2}, spec=SPEC)
    with pytest.raises(MeshError, match="no axis 'tensor'"):
        estimate_step(flops=1, bytes_accessed=1, mesh={"d": 2}, spec=SPEC,
                      collectives_by_axis={("tensor",): {"all-gather": Cost(count=1, bytes=1)}})
    with pytest.raises(ConfigError, match="unknown collective kind"):
        estimate_step(flops=1, bytes_accessed=1, mesh={"d": 2}, spec=SPEC,
                      collectives_by_axis={("d",): {"all_gather": Cost(count=1, bytes=1)}})
    with pytest.raises(ConfigError, match="bytes"):
        estimate_step(flops=1, bytes_accessed=1, mesh={"d": 2}, spec=SPEC,
                      collectives_by_axis={("d",): {"all-gather": Cost(count=1, bytes=-1)}})


def test_step_estimate_describes_itself():
    est = StepEstimate(flops_s=1e-3, memory_s=4e-3, collective_s_by_axis={}, overlap=True)
    assert (est.bound, est.total_s) == ("memory", 4e-3)
    assert est.describe().splitlines()[0] == "4 ms/step, memory-bound (overlap: max of compute, collectives)"


def test_calibrate_measures_positive_figures():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    spec = calibrate(mesh, repeats=1)
    assert spec.name == "calibrated-cpu"
    assert spec.devices_per_node == jax.local_device_count() == 8
    for value in (spec.peak_flops_bf16, spec.peak_flops_fp32, spec.hbm_bandwidth, spec.intra_node_bandwidth,
                  spec.inter_node_bandwidth, spec.memory_bytes):
        assert math.isfinite(value) and value > 0
    # either latency may be fitted to 0, not both: a small all-reduce over 8 devices takes time
    assert spec.collective_latency >= 0 and spec.collective_step_latency >= 0
    assert spec.collective_latency + ring_steps("all-reduce", 8) * spec.collective_step_latency > 0
    assert spec.intra_node_bandwidth == spec.inter_node_bandwidth
    with pytest.raises(ConfigError):
        calibrate(repeats=0)
