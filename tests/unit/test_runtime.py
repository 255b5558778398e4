"""Runtime: MeshSpec, ProcessGroups, cluster resolution, single-process initialize (8 CPU devices)."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from titanax.exceptions import DistributedError, MeshError, TitanaxError
from titanax.runtime import (
    ClusterSpec,
    DistributedInfo,
    MeshSpec,
    ProcessGroups,
    describe_mesh,
    initialize,
    resolve_cluster,
)
from titanax.runtime import distributed as dist
from titanax.runtime import mesh as mesh_mod
from titanax.runtime.slurm import parse_slurm_nodelist
from titanax.runtime.sources import DEFAULT_COORDINATOR_PORT


def _raises(exc: type[TitanaxError], *culprits: str, fn, **kwargs) -> TitanaxError:
    """Calls fn, asserts it raises `exc` naming every culprit and carrying a suggestion."""
    with pytest.raises(exc) as info:
        fn(**kwargs)
    err = info.value
    assert err.suggestion, f"no suggestion on {err!r}"
    for c in culprits:
        assert c in err.message, f"{c!r} not named in {err.message!r}"
    return err


# --------------------------------------------------------------------------------------------------
# MeshSpec: construction and shape inference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "axes, shape, expected",
    [
        (("data", "tensor"), (-1, 2), (4, 2)),
        (("data", "tensor"), (None, 2), (4, 2)),
        (("data", "tensor"), (2, -1), (2, 4)),
        (("data", "fsdp", "tensor"), (2, -1, 2), (2, 2, 2)),
        (("data", "tensor"), None, (8, 1)),
        (("data", "fsdp", "tensor"), None, (8, 1, 1)),
        (("data",), None, (8,)),
        (("data", "tensor"), (4, 2), (4, 2)),
        (("data",), (-1,), (8,)),
    ],
)
def test_shape_inference(axes, shape, expected):
    spec = MeshSpec(axes=axes, shape=shape)
    assert spec.resolved_shape() == expected
    mesh = spec.build()
    assert tuple(mesh.axis_names) == axes
    assert mesh.devices.shape == expected
    assert dict(mesh.shape) == dict(zip(axes, expected))


def test_resolved_shape_for_other_device_counts():
    spec = MeshSpec(axes=("data", "tensor"), shape=(-1, 2))
    assert spec.resolved_shape(16) == (8, 2)
    assert spec.resolved_shape(2) == (1, 2)
    assert MeshSpec(("data", "tensor")).resolved_shape(4) == (4, 1)


def test_positional_axes_and_normalisation():
    spec = MeshSpec(("data",))
    assert spec.axes == ("data",) and spec.shape is None
    assert MeshSpec("data").axes == ("data",)  # a lone string is one axis, not its letters
    assert MeshSpec(["a", "b"], [None, 2]).shape == (-1, 2)  # None is stored as -1
    assert MeshSpec(axes=("a",), shape=8).shape == (8,)
    assert MeshSpec(axes=("a", "b"), shape=(np.int64(4), 2)).resolved_shape() == (4, 2)
    # Normalised specs compare equal, so they can key caches.
    assert MeshSpec(("a", "b"), (None, 2)) == MeshSpec(axes=("a", "b"), shape=(-1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.axes = ("x",)  # type: ignore[misc]


def test_axis_types_are_auto():
    for spec in (
        MeshSpec(axes=("data", "tensor"), shape=(-1, 2)),
        MeshSpec(axes=("data",), devices=jax.devices()[:2]),
        MeshSpec(axes=("data", "fsdp", "tensor"), shape=(2, 2, 2)),
    ):
        mesh = spec.build()
        assert isinstance(mesh, Mesh)
        assert tuple(mesh.axis_types) == (AxisType.Auto,) * len(spec.axes)


def test_all_devices_used_by_default():
    mesh = MeshSpec(axes=("data", "tensor"), shape=(-1, 2)).build()
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_device_subset_uses_exactly_those():
    subset = jax.devices()[:2]
    mesh = MeshSpec(axes=("data",), devices=subset).build()
    assert mesh.devices.shape == (2,)
    assert set(mesh.devices.flat) == set(subset)

    subset4 = jax.devices()[4:]
    spec = MeshSpec(axes=("data", "tensor"), shape=(-1, 2), devices=subset4)
    assert spec.resolved_shape() == (2, 2)
    assert set(spec.build().devices.flat) == set(subset4)

    # A numpy array of devices (e.g. an existing mesh's grid) is flattened.
    assert len(MeshSpec(("data",), devices=mesh.devices).devices) == 2


def test_str_and_describe():
    spec = MeshSpec(axes=("data", "tensor"), shape=(-1, 2))
    assert str(spec) == "MeshSpec(data=-1 x tensor=2, devices=all)"
    text = spec.describe()
    assert "data=4 x tensor=2" in text
    assert "8 devices" in text and "1 process" in text
    assert "axis 'data': size 4, Auto" in text and "axis 'tensor': size 2, Auto" in text
    assert "cpu" in text.lower()
    mesh = spec.build()
    assert describe_mesh(mesh) in spec.describe(mesh)
    assert "devices=2 given" in str(MeshSpec(("data",), devices=jax.devices()[:2]))


# --------------------------------------------------------------------------------------------------
# MeshSpec: every error names its culprit and suggests a fix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, culprits",
    [
        (dict(axes=()), ["axes=()"]),
        (dict(axes=("data", "data")), ["'data'", "repeats"]),
        (dict(axes=("data", 3)), ["3"]),
        (dict(axes=("data", "")), ["''"]),
        (dict(axes=5), ["5"]),
        (dict(axes=("data", "tensor"), shape=(8,)), ["(8,)", "'data'", "'tensor'"]),
        (dict(axes=("data",), shape=(2, 4)), ["(2, 4)"]),
        (dict(axes=("data", "tensor"), shape=(-1, None)), ["'data'", "'tensor'", "only one"]),
        (dict(axes=("data", "tensor"), shape=(-1, -1)), ["'data'", "'tensor'"]),
        (dict(axes=("data", "tensor"), shape=(0, 8)), ["'data'", "size 0"]),
        (dict(axes=("data", "tensor"), shape=(4, -2)), ["'tensor'", "size -2"]),
        (dict(axes=("data",), shape=(2.5,)), ["'data'", "2.5"]),
        (dict(axes=("data",), shape=(True,)), ["'data'", "True"]),
        (dict(axes=("data",), shape="ab"), ["'data'"]),
        (dict(axes=("data",), devices=[]), ["devices=[]"]),
        (dict(axes=("data",), devices=7), ["devices=7"]),
    ],
)
def test_spec_validation_errors(kwargs, culprits):
    _raises(MeshError, *culprits, fn=MeshSpec, **kwargs)


@pytest.mark.parametrize("devices, culprits, fix", [
    ([0, 1, 2, 3], ["devices=[0, 1, 2, 3]", "integers (device ids?)"], "devices=jax.devices()[:4]"),
    ([1, 3], ["devices=[1, 3]", "integers"], "d.id in (1, 3)"),
    (["cpu:0"], ["'cpu:0'", "str"], "jax.devices()[:4]"),
])
def test_devices_must_be_device_objects(devices, culprits, fix):
    # ids or names would pass until jax.make_mesh failed on a missing attribute
    err = _raises(MeshError, *culprits, fn=MeshSpec, axes=("data",), devices=devices)
    assert fix in err.suggestion


def test_duplicate_devices_rejected():
    d = jax.devices()[0]
    _raises(MeshError, str(d), fn=MeshSpec, axes=("data",), devices=[d, d])


def test_inferred_axis_not_integral():
    spec = MeshSpec(axes=("data", "tensor"), shape=(3, -1))
    err = _raises(MeshError, "(3, -1)", "8 devices", fn=spec.build)
    # The suggestion lists the sizes that would work and a concrete shape.
    assert "1, 2, 4, 8" in err.suggestion and "shape=(" in err.suggestion
    _raises(MeshError, "(3, -1)", fn=spec.resolved_shape)


def test_too_many_devices_requested():
    spec = MeshSpec(axes=("data", "tensor"), shape=(4, 4))
    err = _raises(MeshError, "(4, 4)", "16", "8", fn=spec.build)
    assert "(4, -1)" in err.suggestion


def test_too_few_devices_requested_is_not_silently_truncated():
    # jax.make_mesh would quietly drop 4 devices here; Titanax refuses.
    spec = MeshSpec(axes=("data", "tensor"), shape=(2, 2))
    err = _raises(MeshError, "(2, 2)", "4", "8", fn=spec.build)
    assert "devices=jax.devices()[:4]" in err.suggestion


def test_subset_shape_mismatch():
    spec = MeshSpec(axes=("data", "tensor"), shape=(-1, 4), devices=jax.devices()[:2])
    _raises(MeshError, "(-1, 4)", "2 devices", fn=spec.build)


def test_errors_are_titanax_errors_and_print_suggestion():
    with pytest.raises(TitanaxError) as info:
        MeshSpec(axes=("a", "a"))
    assert "Suggestion:" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Hybrid (multi-process) device grids, with stand-in devices
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def _fake_devices(processes: int, per_process: int) -> list[_FakeDevice]:
    # Interleave the global list so a naive reshape would mix processes along the inner axis.
    devs = [
        _FakeDevice(p * per_process + i, p) for p in range(processes) for i in range(per_process)
    ]
    return devs[::2] + devs[1::2]


@pytest.mark.parametrize(
    "shape, processes, outer",
    [((4, 2), 2, 0), ((2, 4), 2, 0), ((8, 1), 4, 0), ((2, 2, 2), 2, 0), ((1, 8), 2, 1)],
)
def test_hybrid_grid_outer_axis_spans_processes(shape, processes, outer):
    devs = _fake_devices(processes, 8 // processes)
    grid = mesh_mod._hybrid_grid(shape, devs)
    assert grid is not None and grid.shape == shape
    assert sorted(d.id for d in grid.flat) == list(range(8))
    procs = np.vectorize(lambda d: d.process_index)(grid)
    # Every axis after `outer` stays within one process: slicing the outer axis isolates hosts.
    inner = np.moveaxis(procs, outer, 0).reshape(shape[outer], -1)
    for row in inner:
        assert len(set(row.tolist())) == 1
    assert len(set(procs.flat)) == processes


def test_hybrid_grid_falls_back_when_processes_do_not_factor():
    # 3 processes cannot be spread over axes of sizes (2, 4): processes kept contiguous instead.
    devs = [_FakeDevice(i, i // 3) for i in range(8)]
    grid = mesh_mod._hybrid_grid((2, 4), devs)
    assert grid.shape == (2, 4)
    assert [d.id for d in grid.flat] == list(range(8))


def test_hybrid_grid_is_none_for_one_process():
    assert mesh_mod._hybrid_grid((4, 2), jax.devices()) is None


def test_split_granules():
    assert mesh_mod._split_granules((4, 2), 2) == (2, 1)
    assert mesh_mod._split_granules((3, 4), 2) == (1, 2)
    assert mesh_mod._split_granules((2, 4), 16) is None


# --------------------------------------------------------------------------------------------------
# ProcessGroups
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_4x2() -> Mesh:
    return MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()


def test_process_groups_size(mesh_4x2):
    g = ProcessGroups(mesh_4x2)
    assert g.axes == ("data", "tensor")
    assert g.size("data") == 4 and g.size("tensor") == 2
    assert g.size(("data", "tensor")) == 8 and g.size(("tensor", "data")) == 8
    assert g.size(()) == 1
    assert repr(g) == "ProcessGroups(data=4, tensor=2)"


def test_process_groups_rank_matches_mesh_coordinates(mesh_4x2):
    g = ProcessGroups(mesh_4x2)
    for (i, j), device in np.ndenumerate(mesh_4x2.devices):
        assert g.rank("data", device) == i
        assert g.rank("tensor", device=device) == j
        assert g.rank(("data", "tensor"), device) == i * 2 + j
        assert g.rank(("tensor", "data"), device) == j * 4 + i
        assert g.coords(device) == {"data": i, "tensor": j}


def test_process_groups_rank_defaults_to_this_process(mesh_4x2):
    g = ProcessGroups(mesh_4x2)
    first = next(d for d in mesh_4x2.devices.flat if d.process_index == jax.process_index())
    assert g.rank("data") == g.rank("data", first) == 0
    assert g.coords() == {"data": 0, "tensor": 0}


def test_process_groups_on_a_subset_mesh():
    devs = jax.devices()[4:]
    mesh = MeshSpec(axes=("data", "tensor"), shape=(2, 2), devices=devs).build()
    g = ProcessGroups(mesh)
    assert g.size("data") == 2
    assert {g.rank(("data", "tensor"), d) for d in devs} == {0, 1, 2, 3}
    _raises(MeshError, str(jax.devices()[0]), fn=g.rank, axis="data", device=jax.devices()[0])


@pytest.mark.parametrize("axis", ["pipe", ("data", "pipe")])
def test_process_groups_unknown_axis(mesh_4x2, axis):
    g = ProcessGroups(mesh_4x2)
    err = _raises(MeshError, "'pipe'", "'data'", "'tensor'", fn=g.size, axis=axis)
    assert "'data'" in err.suggestion
    _raises(MeshError, "'pipe'", fn=g.rank, axis=axis)


def test_process_groups_bad_axis_argument(mesh_4x2):
    g = ProcessGroups(mesh_4x2)
    _raises(MeshError, "['data']", fn=g.size, axis=["data"])  # a list is not an axis tuple
    _raises(MeshError, "'data'", fn=g.size, axis=("data", "data"))
    _raises(MeshError, "int", fn=ProcessGroups, mesh=3)


def test_process_groups_abstract_mesh_has_sizes_but_no_ranks(mesh_4x2):
    g = ProcessGroups(mesh_4x2.abstract_mesh)
    assert g.size(("data", "tensor")) == 8
    _raises(MeshError, "AbstractMesh", fn=g.rank, axis="data")


# --------------------------------------------------------------------------------------------------
# resolve_cluster: each environment source
# --------------------------------------------------------------------------------------------------


def test_resolve_nothing_found():
    assert resolve_cluster({}) is None
    assert resolve_cluster({"HOME": "/root", "JAX_PROCESS_ID": ""}) is None  # empty means unset


def test_resolve_explicit():
    spec = resolve_cluster({}, coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert spec == ClusterSpec("10.0.0.1:1234", 4, 3, None, "explicit")
    assert spec.is_multiprocess


def test_resolve_explicit_single_process():
    spec = resolve_cluster({}, num_processes=1)
    assert spec is not None and spec.num_processes == 1 and spec.process_id == 0
    assert not spec.is_multiprocess


def test_resolve_titanax_env():
    env = {
        "TITANAX_COORDINATOR_ADDRESS": "head:999",
        "TITANAX_NUM_PROCESSES": "2",
        "TITANAX_PROCESS_ID": "1",
        "TITANAX_LOCAL_DEVICE_IDS": "0, 1,2",
    }
    assert resolve_cluster(env) == ClusterSpec("head:999", 2, 1, (0, 1, 2), "env:TITANAX")


def test_resolve_jax_env():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "7"}
    assert resolve_cluster(env) == ClusterSpec("h:1", 8, 7, None, "env:JAX")


def test_resolve_priority_explicit_over_titanax_over_jax():
    env = {
        "TITANAX_NUM_PROCESSES": "4",
        "TITANAX_COORDINATOR_ADDRESS": "t:1",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
        "JAX_COORDINATOR_ADDRESS": "j:1",
    }
    spec = resolve_cluster(env)
    assert (spec.num_processes, spec.process_id, spec.coordinator_address) == (4, 1, "t:1")
    assert spec.source == "env:TITANAX+env:JAX"
    spec = resolve_cluster(env, process_id=3, coordinator_address="e:2")
    assert (spec.num_processes, spec.process_id, spec.coordinator_address) == (4, 3, "e:2")
    assert spec.source == "env:TITANAX+explicit"


def test_resolve_adds_missing_port():
    assert resolve_cluster(
        {}, coordinator_address="head", num_processes=2, process_id=0
    ).coordinator_address == (f"head:{DEFAULT_COORDINATOR_PORT}")
    env = {"TITANAX_COORDINATOR_PORT": "4000"}
    spec = resolve_cluster(env, coordinator_address="head", num_processes=2, process_id=0)
    assert spec.coordinator_address == "head:4000"
    spec = resolve_cluster({}, coordinator_address="[::1]", num_processes=2, process_id=0)
    assert spec.coordinator_address == f"[::1]:{DEFAULT_COORDINATOR_PORT}"
    spec = resolve_cluster({}, coordinator_address="[::1]:77", num_processes=2, process_id=0)
    assert spec.coordinator_address == "[::1]:77"


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NODELIST": "node[07-08,11],login",
    "SLURM_JOB_NODELIST": "other[1-9]",
}


def test_resolve_slurm():
    spec = resolve_cluster(SLURM)
    port = 65535 - 2**12 + 1 + 4242 % 2**12  # same derivation as JAX's own SLURM detection
    assert spec == ClusterSpec(f"node07:{port}", 4, 2, None, "slurm")


def test_resolve_slurm_job_nodelist_and_port_override():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    env["TITANAX_COORDINATOR_PORT"] = "23456"
    assert resolve_cluster(env).coordinator_address == "other1:23456"
    env.pop("SLURM_JOB_ID")
    env.pop("TITANAX_COORDINATOR_PORT")
    assert resolve_cluster(env).coordinator_address == f"other1:{DEFAULT_COORDINATOR_PORT}"


def test_resolve_slurm_with_titanax_coordinator():
    spec = resolve_cluster({**SLURM, "TITANAX_COORDINATOR_ADDRESS": "10.1.1.1:5000"})
    assert spec.coordinator_address == "10.1.1.1:5000"
    assert spec.source == "slurm+env:TITANAX"


def test_resolve_slurm_single_task_is_single_process():
    # One task: no nodelist needed, and a malformed one is never parsed.
    spec = resolve_cluster(
        {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "bad["}
    )
    assert spec.num_processes == 1 and spec.coordinator_address is None


def test_resolve_slurm_errors():
    env = {k: v for k, v in SLURM.items() if not k.endswith("NODELIST")}
    _raises(DistributedError, "SLURM_STEP_NODELIST", fn=resolve_cluster, env=env)
    _raises(
        DistributedError,
        "SLURM_STEP_NODELIST",
        "node[1-",
        fn=resolve_cluster,
        env={**SLURM, "SLURM_STEP_NODELIST": "node[1-"},
    )
    _raises(
        DistributedError,
        "SLURM_NTASKS",
        "'four'",
        fn=resolve_cluster,
        env={**SLURM, "SLURM_NTASKS": "four"},
    )
    _raises(
        DistributedError,
        "SLURM_NTASKS",
        fn=resolve_cluster,
        env={k: v for k, v in SLURM.items() if k != "SLURM_PROCID"},
    )
    _raises(
        DistributedError,
        "SLURM_PROCID",
        "SLURM_NTASKS",
        fn=resolve_cluster,
        env={**SLURM, "SLURM_PROCID": "4"},
    )


def test_resolve_openmpi():
    env = {
        "OMPI_COMM_WORLD_SIZE": "3",
        "OMPI_COMM_WORLD_RANK": "1",
        "TITANAX_COORDINATOR_ADDRESS": "rank0host:7000",
    }
    assert resolve_cluster(env) == ClusterSpec("rank0host:7000", 3, 1, None, "openmpi+env:TITANAX")


def test_resolve_openmpi_needs_coordinator():
    env = {"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "1"}
    err = _raises(
        DistributedError, "OMPI_COMM_WORLD_SIZE", "coordinator", fn=resolve_cluster, env=env
    )
    assert "TITANAX_COORDINATOR_ADDRESS" in err.suggestion


def test_resolve_slurm_before_openmpi():
    env = {**SLURM, "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "9"}
    spec = resolve_cluster(env)
    assert (spec.num_processes, spec.process_id, spec.source) == (4, 2, "slurm")


def test_unused_lower_priority_garbage_is_ignored():
    env = {"TITANAX_NUM_PROCESSES": "1", "JAX_NUM_PROCESSES": "not-a-number"}
    assert resolve_cluster(env).num_processes == 1


@pytest.mark.parametrize(
    "env, explicit, culprits",
    [
        ({"TITANAX_NUM_PROCESSES": "two"}, {}, ["TITANAX_NUM_PROCESSES", "'two'"]),
        (
            {"JAX_PROCESS_ID": "1.5", "JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"},
            {},
            ["JAX_PROCESS_ID"],
        ),
        (
            {"TITANAX_LOCAL_DEVICE_IDS": "0,x", "TITANAX_NUM_PROCESSES": "1"},
            {},
            ["TITANAX_LOCAL_DEVICE_IDS"],
        ),
        (
            {"TITANAX_NUM_PROCESSES": "2", "TITANAX_PROCESS_ID": "0"},
            {},
            ["TITANAX_NUM_PROCESSES", "coordinator"],
        ),
        ({}, {"num_processes": 2, "process_id": 0}, ["num_processes=", "coordinator"]),
        (
            {},
            {"num_processes": 2, "coordinator_address": "h:1"},
            ["num_processes", "which process"],
        ),
        (
            {},
            {"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"},
            ["process_id=2", "num_processes=2"],
        ),
        (
            {},
            {"num_processes": 2, "process_id": -1, "coordinator_address": "h:1"},
            ["process_id=-1"],
        ),
        ({"TITANAX_NUM_PROCESSES": "0"}, {}, ["TITANAX_NUM_PROCESSES", "0"]),
        ({}, {"process_id": 1}, ["process_id", "number of processes"]),
        (
            {"TITANAX_COORDINATOR_ADDRESS": "h:1"},
            {},
            ["TITANAX_COORDINATOR_ADDRESS", "number of processes"],
        ),
        ({}, {"local_device_ids": [0]}, ["local_device_ids"]),
        (
            {"TITANAX_COORDINATOR_PORT": "http"},
            {"coordinator_address": "h", "num_processes": 2, "process_id": 0},
            ["TITANAX_COORDINATOR_PORT", "'http'"],
        ),
        (
            {"TITANAX_COORDINATOR_PORT": "70000"},
            {"coordinator_address": "h", "num_processes": 2, "process_id": 0},
            ["TITANAX_COORDINATOR_PORT", "70000"],
        ),
        (
            {},
            {"num_processes": "2", "process_id": 0, "coordinator_address": "h:1"},
            ["num_processes", "'2'"],
        ),
        ({}, {"num_processes": 2, "process_id": 0, "coordinator_address": "  "}, ["coordinator"]),
    ],
)
def test_resolve_errors(env, explicit, culprits):
    _raises(DistributedError, *culprits, fn=resolve_cluster, env=env, **explicit)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("a,b", ["a", "b"]),
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[08-10],gpu3", ["node08", "node09", "node10", "gpu3"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("  host-a.example.com ", ["host-a.example.com"]),
    ],
)
def test_parse_slurm_nodelist(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-", "node]1[", "node[a-b]", "node[5-2]", "node[]"])
def test_parse_slurm_nodelist_errors(bad):
    _raises(DistributedError, "MY_VAR", fn=parse_slurm_nodelist, nodelist=bad, variable="MY_VAR")


# --------------------------------------------------------------------------------------------------
# initialize(): single process is a no-op; idempotency; the multi-process path with JAX stubbed
# --------------------------------------------------------------------------------------------------

_CLUSTER_VARS = [
    k
    for prefix in (
        "TITANAX_",
        "JAX_COORDINATOR",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "JAX_LOCAL_DEVICE_IDS",
        "SLURM_",
        "OMPI_",
    )
    for k in list(os.environ)
    if k.startswith(prefix)
]


@pytest.fixture
def clean_init(monkeypatch):
    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    # These tests stub jax.distributed; the rendezvous before it would wait for processes that do
    # not exist (tests/integration/test_missing_peer.py tests it with real sockets).
    monkeypatch.setattr(dist, "_rendezvous", lambda spec, timeout_s, origin: None)
    dist._reset_for_tests()
    yield monkeypatch
    dist._reset_for_tests()


def _forbid_jax_distributed(monkeypatch):
    def boom(**kwargs):
        raise AssertionError(f"jax.distributed.initialize must not be called: {kwargs}")

    monkeypatch.setattr(jax.distributed, "initialize", boom)


def test_initialize_single_process_is_noop(clean_init):
    _forbid_jax_distributed(clean_init)
    info = initialize()
    assert isinstance(info, DistributedInfo)
    assert (info.process_id, info.num_processes, info.source) == (0, 1, "default")
    assert info.coordinator_address is None
    assert (
        info.local_device_count == jax.local_device_count()
        and info.global_device_count == jax.device_count()
    )
    assert info.is_coordinator and not info.is_multiprocess
    assert initialize() is info  # idempotent
    assert initialize(num_processes=1) is info


def test_initialize_single_process_from_env(clean_init):
    _forbid_jax_distributed(clean_init)
    clean_init.setenv("SLURM_NTASKS", "1")
    clean_init.setenv("SLURM_PROCID", "0")
    info = initialize()
    assert (info.num_processes, info.source) == (1, "slurm")


def test_initialize_refuses_a_different_setup_after_noop(clean_init):
    _forbid_jax_distributed(clean_init)
    initialize()
    _raises(
        DistributedError,
        "num_processes 1 -> 2",
        fn=initialize,
        coordinator_address="h:1",
        num_processes=2,
        process_id=0,
    )


def test_initialize_validation_error_propagates(clean_init):
    _forbid_jax_distributed(clean_init)
    clean_init.setenv("TITANAX_NUM_PROCESSES", "x")
    _raises(DistributedError, "TITANAX_NUM_PROCESSES", fn=initialize)


def test_initialize_multiprocess_calls_jax_once(clean_init):
    calls = []
    clean_init.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    clean_init.setattr(jax, "process_index", lambda: 1)
    clean_init.setattr(jax, "process_count", lambda: 2)
    clean_init.setenv("TITANAX_COORDINATOR_ADDRESS", "head")
    clean_init.setenv("TITANAX_COORDINATOR_PORT", "4321")
    info = initialize(
        num_processes=2, process_id=1, local_device_ids=[0, 1], initialization_timeout=30
    )
    assert calls == [
        dict(
            coordinator_address="head:4321",
            num_processes=2,
            process_id=1,
            local_device_ids=[0, 1],
            initialization_timeout=30,
        )
    ]
    assert (info.process_id, info.num_processes, info.coordinator_address) == (1, 2, "head:4321")
    assert info.source == "explicit+env:TITANAX"
    # Same request, or no request: same info, JAX not called again.
    assert initialize(num_processes=2, process_id=1) is info
    assert initialize() is info
    assert len(calls) == 1
    _raises(DistributedError, "process_id 1 -> 0", fn=initialize, num_processes=2, process_id=0)
    _raises(
        DistributedError,
        "coordinator_address",
        fn=initialize,
        coordinator_address="other:1",
        num_processes=2,
        process_id=1,
    )


def test_initialize_wraps_jax_failures(clean_init):
    def fail(**kwargs):
        raise RuntimeError(
            "jax.distributed.initialize() must be called before any JAX computations"
        )

    clean_init.setattr(jax.distributed, "initialize", fail)
    err = _raises(
        DistributedError,
        "h:1",
        "must be called before",
        fn=initialize,
        coordinator_address="h:1",
        num_processes=2,
        process_id=0,
    )
    assert isinstance(err.__cause__, RuntimeError)
    assert dist._INITIALIZED is None  # a failed start is not recorded


def test_initialize_adopts_existing_jax_distributed(clean_init):
    _forbid_jax_distributed(clean_init)
    clean_init.setattr(jax.distributed, "is_initialized", lambda: True, raising=False)
    info = initialize()
    assert info.source == "jax.distributed" and info.num_processes == jax.process_count()
    dist._reset_for_tests()
    _raises(
        DistributedError,
        "already initialized",
        fn=initialize,
        coordinator_address="h:1",
        num_processes=2,
        process_id=0,
    )


# --------------------------------------------------------------------------------------------------
# resolve_cluster: torchrun / Kubeflow PyTorchJob and Kubernetes Indexed Job
# --------------------------------------------------------------------------------------------------

TORCHRUN = {"WORLD_SIZE": "4", "RANK": "2", "MASTER_ADDR": "master-0", "MASTER_PORT": "29500"}


def test_resolve_torchrun():
    assert resolve_cluster(TORCHRUN) == ClusterSpec("master-0:29500", 4, 2, None, "torchrun")
    env = {k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}
    assert resolve_cluster(env).coordinator_address == f"master-0:{DEFAULT_COORDINATOR_PORT}"
    # Titanax's own port variable beats the launcher's (as it beats SLURM's derived port).
    assert resolve_cluster({**TORCHRUN, "TITANAX_COORDINATOR_PORT": "7000"}).coordinator_address == (
        "master-0:7000"
    )
    assert resolve_cluster({**TORCHRUN, "MASTER_ADDR": "10.0.0.9:555"}).coordinator_address == (
        "10.0.0.9:555"
    )


def test_resolve_torchrun_local_rank_picks_one_device_only_when_sharing_a_node():
    shared = {**TORCHRUN, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert resolve_cluster(shared).local_device_ids == (1,)
    # One process per node (a PyTorchJob pod per node) drives all of the node's devices.
    alone = {**TORCHRUN, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert resolve_cluster(alone).local_device_ids is None
    assert resolve_cluster({**TORCHRUN, "LOCAL_RANK": "0"}).local_device_ids is None
    spec = resolve_cluster({**shared, "TITANAX_LOCAL_DEVICE_IDS": "0,1"})
    assert spec.local_device_ids == (0, 1) and spec.source == "torchrun+env:TITANAX"


def test_resolve_torchrun_needs_world_size_and_rank():
    assert resolve_cluster({"WORLD_SIZE": "4", "MASTER_ADDR": "m"}) is None  # too generic alone
    assert resolve_cluster({"RANK": "1", "MASTER_ADDR": "m"}) is None


def test_resolve_torchrun_priority():
    spec = resolve_cluster({**TORCHRUN, **SLURM})
    assert (spec.num_processes, spec.process_id, spec.source) == (4, 2, "slurm")
    env = {**TORCHRUN, "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"}
    spec = resolve_cluster(env)
    assert (spec.num_processes, spec.process_id, spec.coordinator_address) == (8, 5, "master-0:29500")
    assert spec.source == "openmpi+torchrun"
    spec = resolve_cluster({**TORCHRUN, "TITANAX_COORDINATOR_ADDRESS": "head:1", "TITANAX_PROCESS_ID": "3"})
    assert (spec.process_id, spec.coordinator_address, spec.source) == (3, "head:1", "torchrun+env:TITANAX")
    spec = resolve_cluster({**TORCHRUN, "JOB_COMPLETION_INDEX": "0"})
    assert (spec.process_id, spec.source) == (2, "torchrun")


def test_resolve_torchrun_single_process_needs_no_master():
    spec = resolve_cluster({"WORLD_SIZE": "1", "RANK": "0"})
    assert spec == ClusterSpec(None, 1, 0, None, "torchrun")


@pytest.mark.parametrize(
    "env, culprits",
    [
        ({**TORCHRUN, "MASTER_ADDR": ""}, ["MASTER_ADDR"]),
        ({"WORLD_SIZE": "2", "RANK": "0"}, ["MASTER_ADDR"]),
        ({**TORCHRUN, "WORLD_SIZE": "four"}, ["WORLD_SIZE", "'four'"]),
        ({**TORCHRUN, "RANK": "x"}, ["RANK", "'x'"]),
        ({**TORCHRUN, "RANK": "4"}, ["process_id=4", "RANK", "WORLD_SIZE"]),
        ({**TORCHRUN, "MASTER_PORT": "p"}, ["MASTER_PORT", "'p'"]),
        ({**TORCHRUN, "LOCAL_RANK": "a", "LOCAL_WORLD_SIZE": "2"}, ["LOCAL_RANK", "'a'"]),
        ({**TORCHRUN, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "many"}, ["LOCAL_WORLD_SIZE"]),
    ],
)
def test_resolve_torchrun_errors(env, culprits):
    _raises(DistributedError, *culprits, fn=resolve_cluster, env=env)


K8S = {"TITANAX_NUM_PROCESSES": "4", "TITANAX_COORDINATOR_ADDRESS": "job-0.svc:1234"}


def test_resolve_kubernetes_indexed_job():
    spec = resolve_cluster({**K8S, "JOB_COMPLETION_INDEX": "3"})
    assert spec == ClusterSpec("job-0.svc:1234", 4, 3, None, "env:TITANAX+kubernetes")
    # An explicit id (or TITANAX_PROCESS_ID) still wins.
    assert resolve_cluster({**K8S, "JOB_COMPLETION_INDEX": "3"}, process_id=1).process_id == 1
    assert resolve_cluster({**K8S, "JOB_COMPLETION_INDEX": "3", "TITANAX_PROCESS_ID": "0"}).process_id == 0
    spec = resolve_cluster({"JOB_COMPLETION_INDEX": "2"}, num_processes=3, coordinator_address="h:1")
    assert (spec.process_id, spec.source) == (2, "explicit+kubernetes")


def test_resolve_kubernetes_index_alone_is_not_a_cluster():
    # An indexed job of independent single-process runs: every pod has an index, nothing else.
    assert resolve_cluster({"JOB_COMPLETION_INDEX": "5"}) is None
    assert resolve_cluster({"JOB_COMPLETION_INDEX": "garbage"}) is None


@pytest.mark.parametrize(
    "index, culprits",
    [("x", ["JOB_COMPLETION_INDEX", "'x'"]), ("4", ["process_id=4", "JOB_COMPLETION_INDEX"])],
)
def test_resolve_kubernetes_errors(index, culprits):
    _raises(DistributedError, *culprits, fn=resolve_cluster, env={**K8S, "JOB_COMPLETION_INDEX": index})


# --------------------------------------------------------------------------------------------------
# initialize(): TITANAX_CPU_DEVICES (set by `titanax launch --cpu-devices-per-proc`)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_launch(clean_init):
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
              "JOB_COMPLETION_INDEX", "TITANAX_CPU_DEVICES"):
        clean_init.delenv(k, raising=False)
    return clean_init


def test_initialize_cpu_devices_before_jax_distributed(clean_launch):
    events = []
    clean_launch.setattr(dist._simulate, "simulate_cpu_devices", lambda n: events.append(("simulate", n)))
    clean_launch.setattr(dist, "_use_gloo_cpu_collectives", lambda: events.append(("gloo",)))
    clean_launch.setattr(jax.distributed, "initialize", lambda **kw: events.append(("init", kw["process_id"])))
    clean_launch.setattr(jax, "process_index", lambda: 1)
    clean_launch.setattr(jax, "process_count", lambda: 2)
    clean_launch.setenv("TITANAX_CPU_DEVICES", "4")
    clean_launch.setenv("TITANAX_NUM_PROCESSES", "2")
    clean_launch.setenv("TITANAX_PROCESS_ID", "1")
    clean_launch.setenv("TITANAX_COORDINATOR_ADDRESS", "localhost:1234")
    info = initialize()
    assert events == [("simulate", 4), ("gloo",), ("init", 1)]
    assert (info.process_id, info.num_processes, info.source) == (1, 2, "env:TITANAX")
    assert initialize() is info and len(events) == 3  # a repeat call changes nothing


def test_initialize_cpu_devices_single_process_uses_the_real_simulator(clean_launch):
    _forbid_jax_distributed(clean_launch)
    gloo = []
    clean_launch.setattr(dist, "_use_gloo_cpu_collectives", lambda: gloo.append(1))
    clean_launch.setenv("TITANAX_CPU_DEVICES", str(jax.device_count()))  # what the tests already have
    info = initialize()
    assert info.global_device_count == jax.device_count() and gloo == []
    dist._reset_for_tests()
    clean_launch.setenv("TITANAX_CPU_DEVICES", "3")  # JAX already runs with 8: too late to change
    err = _raises(DistributedError, "TITANAX_CPU_DEVICES=3", fn=initialize)
    assert isinstance(err.__cause__, MeshError)
    assert dist._INITIALIZED is None


@pytest.mark.parametrize("value, culprit", [("four", "'four'"), ("0", "=0"), ("-2", "=-2")])
def test_initialize_cpu_devices_malformed(clean_launch, value, culprit):
    _forbid_jax_distributed(clean_launch)
    clean_launch.setattr(dist._simulate, "simulate_cpu_devices", lambda n: pytest.fail("applied"))
    clean_launch.setenv("TITANAX_CPU_DEVICES", value)
    err = _raises(DistributedError, "TITANAX_CPU_DEVICES", culprit, fn=initialize)
    assert "=0 " not in err.suggestion and "=0)" not in err.suggestion  # never suggest what is refused
    if value == "four":
        assert "TITANAX_CPU_DEVICES=8" in err.suggestion


def test_initialize_gloo_for_multiprocess_cpu_without_simulation(clean_launch):
    events = []
    clean_launch.setattr(dist, "_use_gloo_cpu_collectives", lambda: events.append("gloo"))
    clean_launch.setattr(jax.distributed, "initialize", lambda **kw: events.append("init"))
    clean_launch.setattr(jax, "process_index", lambda: 0)
    clean_launch.setattr(jax, "process_count", lambda: 2)
    initialize(coordinator_address="h:1", num_processes=2, process_id=0)  # the tests run on CPU
    assert events == ["gloo", "init"]


def test_use_gloo_cpu_collectives(monkeypatch):
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    dist._use_gloo_cpu_collectives()
    assert updates == [("jax_cpu_collectives_implementation", "gloo")]

    def missing(name, value):
        raise AttributeError(f"Unrecognized config option: {name}")

    monkeypatch.setattr(jax.config, "update", missing)
    dist._use_gloo_cpu_collectives()  # a jax without the option: silently nothing to do


# --- simulated devices ----------------------------------------------------------------------------


def test_simulation_environment_sizes_the_thread_pools_and_sets_the_collective_timeouts():
    from titanax.runtime.simulate import CPU_COLLECTIVE_FLAGS, THREADS_PER_DEVICE, simulation_environment

    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    simulation_environment(8, env)
    assert env["PJRT_NPROC"] == str(max(os.cpu_count() or 1, THREADS_PER_DEVICE * 8))
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *CPU_COLLECTIVE_FLAGS]


def test_simulation_environment_keeps_what_the_user_set():
    from titanax.runtime.simulate import simulation_environment

    mine = "--xla_cpu_collective_call_terminate_timeout_seconds=30"
    env = {"PJRT_NPROC": "12", "XLA_FLAGS": mine}
    simulation_environment(8, env)
    assert env["PJRT_NPROC"] == "12"
    assert env["XLA_FLAGS"].count("terminate_timeout") == 1 and mine in env["XLA_FLAGS"]
    assert "--xla_cpu_collective_call_warn_stuck_timeout_seconds" in env["XLA_FLAGS"]


def test_simulated_devices_get_enough_xla_threads_in_a_fresh_process():
    # Whether the installed jaxlib honours PJRT_NPROC: with 8 devices its pools have 8 threads by
    # default, which let a 1F1B x DP x TP step deadlock (titanax/runtime/simulate.py).
    import subprocess
    import sys

    script = ("import collections, os\n"
              "import titanax as tx\n"
              "tx.simulate_cpu_devices(8)\n"
              "import jax, jax.numpy as jnp\n"
              "jax.jit(lambda x: x * 2)(jnp.ones(8)).block_until_ready()\n"
              "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
              "print(names.count('tf_XLAEigen'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PJRT_NPROC")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 64, result.stdout


# --- the public surface ---------------------------------------------------------------------------


def test_follow_launcher_applies_only_under_the_launcher():
    from titanax.runtime.env_vars import LAUNCHER_PID_VAR
    from titanax.runtime.launcher import follow_launcher

    assert follow_launcher({}) is False
    assert follow_launcher({LAUNCHER_PID_VAR: "not-a-pid"}) is False
    assert follow_launcher({LAUNCHER_PID_VAR: str(os.getpid())}) is False  # we are not our own parent
