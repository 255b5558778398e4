"""Data: global batches on 8 fake devices, ArrayLoader slicing and resume, prefetch, MNIST/IDX."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.data import (
    ArrayLoader,
    DataShard,
    batch_sharding,
    global_batch_size,
    prefetch_to_device,
    process_data_shard,
    to_global,
)
from titanax.data.global_batch import _data_shard
from titanax.exceptions import ShardingError, TitanaxError

ROOT = pathlib.Path(__file__).parent.parent.parent
DP = tx.Plan(data_parallel=tx.DP(axis="data"))


def _load_example_data():
    # examples/ is not a package on sys.path; load the module from its file.
    spec = importlib.util.spec_from_file_location("mnist_dp_data", ROOT / "examples" / "mnist_dp" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mesh8():
    return tx.MeshSpec(axes=("data",)).build()


@pytest.fixture(scope="module")
def mesh4x2():
    return tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()


def _rows_of(mesh: Mesh, device) -> tuple[int, ...]:
    (position,) = [idx for idx, d in np.ndenumerate(mesh.devices) if d == device]
    return position


# ------------------------------------------------------------------------------ to_global
def test_to_global_splits_every_leaf_on_data_and_each_device_holds_its_rows(mesh8):
    x = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    y = np.arange(64, dtype=np.int32)
    batch = to_global({"x": x, "y": y, "lr": 0.5}, mesh8, DP)
    assert isinstance(batch["x"], jax.Array) and batch["x"].shape == (64, 3)
    assert batch["x"].sharding.spec == P("data", None)
    assert batch["y"].sharding.spec == P("data")
    assert batch["lr"].sharding.spec == P() and float(batch["lr"]) == 0.5  # 0-d: replicated
    for name, host in (("x", x), ("y", y)):
        shards = batch[name].addressable_shards
        assert len(shards) == 8
        for shard in shards:
            (i,) = _rows_of(mesh8, shard.device)
            assert shard.index[0] == slice(8 * i, 8 * (i + 1))
            np.testing.assert_array_equal(np.asarray(shard.data), host[8 * i:8 * (i + 1)])
    total = jax.jit(lambda b: b["x"].sum() * b["lr"])(batch)
    assert float(total) == pytest.approx(x.sum() * 0.5)


def test_dp_x_tp_splits_the_batch_over_data_and_replicates_it_over_tensor(mesh4x2):
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    x = np.arange(16 * 5, dtype=np.float32).reshape(16, 5)
    out = to_global((x,), mesh4x2, plan)[0]
    assert out.sharding.spec == P("data", None)
    for shard in out.addressable_shards:
        i, _ = _rows_of(mesh4x2, shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), x[4 * i:4 * (i + 1)])


def test_dp_and_fsdp_split_the_batch_over_both_axes_major_to_minor():
    mesh = tx.MeshSpec(axes=("data", "fsdp"), shape=(2, 4)).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), fsdp=tx.FSDP(axis="fsdp"))
    x = np.arange(32, dtype=np.int32)
    out = to_global(x, mesh, plan)
    assert out.sharding.spec == P(("data", "fsdp"))
    for shard in out.addressable_shards:
        i, j = _rows_of(mesh, shard.device)
        block = 4 * i + j
        np.testing.assert_array_equal(np.asarray(shard.data), x[4 * block:4 * (block + 1)])


def test_bare_rules_work_like_a_plan_and_batch_sharding_matches(mesh4x2):
    rules = tx.Rules([("batch", "data")])
    assert batch_sharding(mesh4x2, rules, (8, 2)).spec == P("data", None)
    assert batch_sharding(mesh4x2, rules, ()).spec == P()
    assert to_global(np.zeros((8, 2)), mesh4x2, rules).sharding.spec == P("data", None)


def test_a_tensor_parallel_only_plan_replicates_the_batch():
    mesh = tx.MeshSpec(axes=("tensor",)).build()
    out = to_global(np.ones((3, 4)), mesh, tx.Plan(tensor_parallel=tx.TP(axis="tensor")))
    assert out.sharding.spec == P(None, None)  # 3 examples are fine: nothing splits the batch


def test_single_process_owns_the_whole_batch(mesh8):
    assert process_data_shard(mesh8, DP) == DataShard(0, 1)
    assert global_batch_size(32, mesh8, DP) == 32


@pytest.mark.parametrize("strict", [False, True])
def test_an_indivisible_batch_is_a_sharding_error_naming_size_and_axes(mesh8, strict):
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), strict=strict)
    with pytest.raises(ShardingError) as info:
        to_global({"x": np.zeros((12, 2))}, mesh8, plan)
    assert "12" in info.value.message and "('data',)" in info.value.message
    assert "8 or 16" in info.value.suggestion
    with pytest.raises(ShardingError):
        batch_sharding(mesh8, plan, (4, 2))


def test_leaves_with_different_batch_sizes_or_non_numbers_are_refused(mesh8):
    with pytest.raises(ShardingError, match="disagree") as info:
        to_global({"x": np.zeros((16, 2)), "y": np.zeros((8,))}, mesh8, DP)
    assert info.value.suggestion
    with pytest.raises(TitanaxError, match="dtype") as info:
        to_global({"x": np.zeros((16, 2)), "name": np.array(["a"] * 16)}, mesh8, DP)
    assert info.value.suggestion


def test_a_plan_that_does_not_fit_the_mesh_is_refused(mesh8):
    with pytest.raises(tx.PlanError):
        to_global(np.zeros((8,)), mesh8, tx.Plan(data_parallel=tx.DP(axis="batch_axis")))


# ------------------------------------------------- which part of the batch a process loads
def _fake_processes(mesh: Mesh, process_of, axes=("data",)):
    processes = sorted({process_of(d) for d in mesh.devices.flat})
    return [_data_shard(mesh, axes, process_of, me) for me in processes]


def test_data_shards_of_simulated_processes(mesh4x2):
    # Two processes owning data rows {0, 1} and {2, 3}: each loads half the batch, in order.
    assert _fake_processes(mesh4x2, lambda d: d.id // 4) == [DataShard(0, 2), DataShard(1, 2)]
    # Tensor parallelism across processes: both hold every data row, so they load the same data.
    assert _fake_processes(mesh4x2, lambda d: d.id % 2) == [DataShard(0, 1), DataShard(0, 1)]
    # Four processes, one data row each.
    assert _fake_processes(mesh4x2, lambda d: d.id // 2) == [DataShard(i, 4) for i in range(4)]


def test_interleaved_processes_still_get_disjoint_shards(mesh8):
    assert _fake_processes(mesh8, lambda d: d.id % 2) == [DataShard(0, 2), DataShard(1, 2)]


def test_unequal_process_blocks_are_refused(mesh8):
    with pytest.raises(ShardingError, match="unequal") as info:
        _fake_processes(mesh8, lambda d: 0 if d.id < 6 else 1)
    assert info.value.suggestion
    with pytest.raises(ShardingError, match="owns no device"):
        _data_shard(mesh8, ("data",), lambda d: 0, me=3)


# ----------------------------------------------------------------------------- ArrayLoader
def _data(n: int = 40):
    return {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2), "y": np.arange(n, dtype=np.int32)}


def _take(it, k):
    return list(itertools.islice(it, k))


def test_loader_is_deterministic_and_each_epoch_is_a_fresh_permutation():
    a = ArrayLoader(_data(), batch_size=8, seed=3, process_index=0, process_count=1)
    b = ArrayLoader(_data(), batch_size=8, seed=3, process_index=0, process_count=1)
    c = ArrayLoader(_data(), batch_size=8, seed=4, process_index=0, process_count=1)
    assert a.steps_per_epoch == 5
    ea, eb, ec = _take(a, 10), _take(b, 10), _take(c, 10)
    for u, v in zip(ea, eb):
        np.testing.assert_array_equal(u["y"], v["y"])
        np.testing.assert_array_equal(u["x"], _data()["x"][u["y"]])  # rows stay together
    first = np.concatenate([bt["y"] for bt in ea[:5]])
    second = np.concatenate([bt["y"] for bt in ea[5:]])
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))  # each once
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.concatenate([bt["y"] for bt in ec[:5]]))


def test_no_shuffle_walks_in_order_and_keeps_the_remainder():
    loader = ArrayLoader(_data(10), batch_size=4, shuffle=False, drop_remainder=False,
                         process_index=0, process_count=1, epochs=1)
    assert loader.steps_per_epoch == 3
    assert [b["y"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_simulated_processes_together_cover_the_single_process_global_batch(drop_remainder):
    n, batch, procs = 44, 8, 4  # 44 % 8 = 4 examples left over: one per process when kept
    single = ArrayLoader(_data(n), batch_size=batch, seed=7, drop_remainder=drop_remainder,
                         process_index=0, process_count=1)
    parts = [ArrayLoader(_data(n), batch_size=batch, seed=7, drop_remainder=drop_remainder,
                         process_index=p, process_count=procs) for p in range(procs)]
    assert parts[0].local_batch_size == 2
    steps = 2 * single.steps_per_epoch + 1  # across two epoch boundaries
    for _ in range(steps):
        whole = next(single)
        pieces = [next(part) for part in parts]
        for key in ("x", "y"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in pieces]), whole[key])


def test_finite_epochs_stop():
    loader = ArrayLoader(_data(), batch_size=8, epochs=2, process_index=0, process_count=1)
    assert len(list(loader)) == 10
    assert list(loader) == []


def test_default_process_is_jax_process():
    loader = ArrayLoader(_data(), batch_size=8)
    assert (loader.process_index, loader.process_count) == (jax.process_index(), jax.process_count())


@pytest.mark.parametrize("k", [0, 3, 5, 12])
def test_resume_continues_with_exactly_the_following_batches(k):
    loader = ArrayLoader(_data(), batch_size=8, seed=11, process_index=0, process_count=1)
    _take(loader, k)
    saved = json.loads(json.dumps(loader.state()))  # it survives JSON
    expected = _take(loader, 7)
    resumed = ArrayLoader.from_state(_data(), saved, process_index=0, process_count=1)
    again = ArrayLoader(_data(), batch_size=8, seed=11, process_index=0, process_count=1).restore(saved)
    for other in (resumed, again):
        for u, v in zip(expected, _take(other, 7), strict=True):
            np.testing.assert_array_equal(u["x"], v["x"])
            np.testing.assert_array_equal(u["y"], v["y"])


def test_state_is_process_independent_so_a_run_can_resume_on_more_processes():
    one = ArrayLoader(_data(), batch_size=8, seed=2, process_index=0, process_count=1)
    _take(one, 3)
    saved = one.state()
    two = [ArrayLoader.from_state(_data(), saved, process_index=p, process_count=2) for p in range(2)]
    assert two[0].state() == saved
    whole = next(one)
    np.testing.assert_array_equal(np.concatenate([next(t)["y"] for t in two]), whole["y"])


def test_state_after_an_epoch_points_at_the_next_epoch():
    loader = ArrayLoader(_data(), batch_size=8, process_index=0, process_count=1)
    _take(loader, 5)
    assert (loader.state()["epoch"], loader.state()["position"]) == (1, 0)


@pytest.mark.parametrize(
    "arrays, kwargs, match",
    [
        ({"x": np.zeros((10, 2)), "y": np.zeros(9)}, {"batch_size": 2}, "different numbers"),
        ({}, {"batch_size": 2}, "non-empty"),
        ({"x": np.float32(1.0)}, {"batch_size": 1}, "scalar"),
        ({"x": np.zeros(10)}, {"batch_size": 11}, "larger than the data"),
        ({"x": np.zeros(10)}, {"batch_size": 6, "process_count": 4, "process_index": 0}, "divide over 4"),
        ({"x": np.zeros(10)}, {"batch_size": 4, "process_count": 2, "process_index": 2}, "not below"),
        ({"x": np.zeros(10)}, {"batch_size": True}, "batch_size"),
        ({"x": np.zeros(10)}, {"batch_size": 2, "seed": -1}, "seed"),
        ({"x": np.zeros(10)}, {"batch_size": 8, "drop_remainder": False, "process_count": 4,
                               "process_index": 0}, "last batch"),
    ],
)
def test_loader_validation_errors(arrays, kwargs, match):
    with pytest.raises(TitanaxError, match=match) as info:
        ArrayLoader(arrays, **kwargs)
    assert info.value.suggestion


def test_restoring_a_state_of_another_stream_is_refused():
    saved = ArrayLoader(_data(40), batch_size=8, seed=1, process_index=0, process_count=1).state()
    for other in (ArrayLoader(_data(48), batch_size=8, seed=1, process_index=0, process_count=1),
                  ArrayLoader(_data(40), batch_size=8, seed=2, process_index=0, process_count=1),
                  ArrayLoader({"x": _data()["x"]}, batch_size=8, seed=1, process_index=0, process_count=1)):
        with pytest.raises(TitanaxError, match="different data stream") as info:
            other.restore(saved)
        assert info.value.suggestion
    loader = ArrayLoader(_data(40), batch_size=8, seed=1, process_index=0, process_count=1)
    for bad in ({"epoch": 0}, "state", {**saved, "position": 99}, {**saved, "epoch": -1},
                {**saved, "version": 2}):
        with pytest.raises(TitanaxError):
            loader.restore(bad)
    with pytest.raises(TitanaxError):
        ArrayLoader.from_state(_data(40), {"kind": "nope"})


# -------------------------------------------------------------------------------- prefetch
class _Counting:
    """An iterator of numbered batches that records how many were pulled."""

    def __init__(self, n: int, rows: int = 8):
        self.pulled, self.n, self.rows = 0, n, rows

    def __iter__(self):
        return self

    def __next__(self):
        if self.pulled == self.n:
            raise StopIteration
        self.pulled += 1
        return {"i": np.full((self.rows,), self.pulled - 1, np.int32)}


@pytest.mark.parametrize("size", [1, 2, 3])
def test_prefetch_keeps_order_and_never_pulls_more_than_size_ahead(mesh8, size):
    source = _Counting(6)
    data = prefetch_to_device(source, mesh=mesh8, rules_or_plan=DP, size=size)
    assert source.pulled == 0  # nothing before the first next()
    seen = []
    for k, batch in enumerate(data, start=1):
        assert source.pulled == min(k + size - 1, 6)
        assert data.in_flight == source.pulled - k
        assert batch["i"].sharding.spec == P("data")
        seen.append(int(batch["i"][0]))
    assert seen == list(range(6))


def test_prefetch_state_is_the_loader_state_after_the_last_batch_handed_out(mesh8):
    loader = ArrayLoader(_data(), batch_size=8, seed=5, process_index=0, process_count=1)
    data = prefetch_to_device(loader, mesh=mesh8, rules_or_plan=DP, size=3)
    assert data.state() == loader.state()  # nothing consumed yet
    _take(data, 4)
    saved = data.state()
    assert (saved["epoch"], saved["position"]) == (0, 4)
    assert loader.state() != saved  # the loader itself has run ahead
    expected = [np.asarray(b["y"]) for b in _take(data, 6)]
    resumed = ArrayLoader.from_state(_data(), saved, process_index=0, process_count=1)
    for want, got in zip(expected, _take(resumed, 6), strict=True):
        np.testing.assert_array_equal(want, got["y"])
    # Restoring through the prefetcher drops what was in flight.
    data.restore(saved)
    assert data.in_flight == 0
    np.testing.assert_array_equal(np.asarray(next(data)["y"]), expected[0])


def test_prefetch_of_a_stateless_source_cannot_save_or_restore(mesh8):
    data = prefetch_to_device(iter([{"x": np.zeros(8)}]), mesh=mesh8, rules_or_plan=DP)
    with pytest.raises(TitanaxError, match="no state"):
        data.state()
    with pytest.raises(TitanaxError, match="no restore"):
        data.restore({})


def test_prefetch_refuses_a_loader_cut_for_another_process_layout(mesh8):
    loader = ArrayLoader(_data(), batch_size=8, process_index=1, process_count=2)
    with pytest.raises(ShardingError, match="part 1 of 2") as info:
        prefetch_to_device(loader, mesh=mesh8, rules_or_plan=DP)
    assert "process_data_shard" in info.value.suggestion


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_prefetch_size_must_be_a_positive_integer(mesh8, size):
    with pytest.raises(TitanaxError, match="size") as info:
        prefetch_to_device(iter([]), mesh=mesh8, rules_or_plan=DP, size=size)
    assert info.value.suggestion


def test_prefetched_batches_feed_a_jitted_step(mesh8):
    def loader():
        return ArrayLoader(_data(), batch_size=16, epochs=1, process_index=0, process_count=1)

    step = jax.jit(lambda b: jnp.sum(b["y"]))
    sums = [int(step(b)) for b in prefetch_to_device(loader(), mesh=mesh8, rules_or_plan=DP)]
    assert sums == [int(b["y"].sum()) for b in loader()]  # 2 full batches; the last 8 dropped
    assert len(sums) == 2


# ----------------------------------------------------------------------------- MNIST / IDX
def _write_idx(path: pathlib.Path, array: np.ndarray, magic: int, gz: bool = False) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(">u1").tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _write_mnist(tmp_path: pathlib.Path, gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 4, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, (6,), dtype=np.uint8),
        "x_test": rng.integers(0, 256, (2, 4, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, (2,), dtype=np.uint8),
    }
    mod = _load_example_data()
    for split, (name, magic) in mod.MNIST_FILES.items():
        _write_idx(tmp_path / name, arrays[split], magic, gz=gz and split.startswith("x"))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_load_as_float_images_and_int_labels(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz)
    x_train, y_train, x_test, y_test = _load_example_data().load_dataset(str(tmp_path))
    assert x_train.shape == (6, 4, 3, 1) and x_train.dtype == np.float32
    assert x_test.shape == (2, 4, 3, 1) and y_test.dtype == np.int32
    np.testing.assert_allclose(x_train[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0


def test_idx_parser_rejects_bad_files(tmp_path):
    mod = _load_example_data()
    _write_idx(tmp_path / "labels", np.zeros(5, np.uint8), 2049)
    with pytest.raises(TitanaxError, match="magic number 2049, expected 2051") as info:
        mod.read_idx(str(tmp_path / "labels"), 2051)
    assert "swapped" in info.value.suggestion
    (tmp_path / "short").write_bytes((tmp_path / "labels").read_bytes()[:-1])
    with pytest.raises(TitanaxError, match="truncated|announces"):
        mod.read_idx(str(tmp_path / "short"))
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(TitanaxError, match="not an IDX file"):
        mod.read_idx(str(tmp_path / "junk"))
    assert mod.read_idx(str(tmp_path / "labels")).shape == (5,)


def test_missing_mnist_files_are_named(tmp_path):
    mod = _load_example_data()
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(TitanaxError, match="t10k-labels-idx1-ubyte") as info:
        mod.load_dataset(str(tmp_path))
    assert "never downloads" in info.value.suggestion
    with pytest.raises(TitanaxError, match="not a directory"):
        mod.load_dataset(str(tmp_path / "nowhere"))


def test_bundled_digits_split_is_deterministic_and_stratified():
    mod = _load_example_data()
    x_train, y_train, x_test, y_test = mod.load_dataset()
    assert x_train.shape[1:] == (8, 8, 1) and x_train.dtype == np.float32 and y_train.dtype == np.int32
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 360
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert set(np.unique(y_test)) == set(range(10))
    np.testing.assert_array_equal(mod.load_dataset()[3], y_test)
