"""tx.collectives under jax.shard_map: same numbers as jax.lax / NumPy, errors as CollectiveError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from titanax.exceptions import CollectiveError, TitanaxWarning
from titanax.exec import collectives as C

ROWS, COLS = 8, 6            # x is (8, 6): blocks of (2, 3) on a data=4 x model=2 mesh
X = np.arange(ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)
XS = P("data", "model")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def run(mesh, body, out_specs, *args, in_specs=XS, check_vma=True):
    if not args:
        args = (jnp.asarray(X),)
    f = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)
    return jax.jit(f)(*args)


def blocks(x=X):
    """x as [data, model, 2, 3] blocks: blocks()[i, j] is what device (i, j) holds."""
    return x.reshape(4, 2, 2, 3).transpose(0, 2, 1, 3)


vma = pytest.mark.parametrize("check_vma", [True, False], ids=["vma", "novma"])


# ------------------------------------------------------------------------------ same numbers

@vma
def test_psum_and_pmean_match_lax_and_numpy(mesh, check_vma):
    def body(b):
        return (C.psum(b, "data"), jax.lax.psum(b, "data"),
                C.pmean(b, ("data", "model")), jax.lax.pmean(b, ("data", "model")))
    ours, ref, mean, ref_mean = run(mesh, body, (P(None, "model"), P(None, "model"), P(), P()),
                                    check_vma=check_vma)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(ours, X.reshape(4, 2, COLS).sum(0))
    np.testing.assert_array_equal(mean, ref_mean)
    np.testing.assert_allclose(mean, blocks().mean((0, 1)), rtol=1e-6)


def test_psum_works_on_pytrees_and_python_numbers(mesh):
    def body(b):
        tree = {"w": b, "pair": (b.sum(keepdims=True).reshape(1), b[0])}
        return C.psum(tree, "data"), C.psum(1, ("data", "model")), C.psum(1, "model")
    tree, n, m = run(mesh, body, ({"w": P(None, "model"), "pair": (P("model"), P("model"))}, P(), P()))
    assert int(n) == 8 and int(m) == 2
    np.testing.assert_allclose(tree["w"], X.reshape(4, 2, COLS).sum(0))
    np.testing.assert_allclose(tree["pair"][0], blocks().sum((0, 2, 3)))
    np.testing.assert_allclose(tree["pair"][1], X[0::2].sum(0))


@vma
@pytest.mark.parametrize("dim, tiled", [(0, False), (1, False), (2, False), (-1, False),
                                        (0, True), (1, True), (-1, True)])
def test_all_gather_matches_lax(mesh, dim, tiled, check_vma):
    # all_gather's result is still typed as varying over the gathered axis, so every device's
    # copy comes back: out[i, j] is what device (data i, model j) holds.
    def body(b):
        tree = {"a": b, "b": b * 2}
        ours = C.all_gather(tree, "data", gather_dimension=dim, tiled=tiled)
        ref = jax.tree.map(lambda v: jax.lax.all_gather(v, "data", axis=dim, tiled=tiled), tree)
        return jax.tree.map(lambda v: v[None, None], (ours, ref))
    ours, ref = run(mesh, body, XS, check_vma=check_vma)
    for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, r)
    for j in range(2):
        col = list(blocks()[:, j])                           # the four data blocks of column j
        expected = np.concatenate(col, axis=dim) if tiled else np.stack(col, axis=dim)
        for i in range(4):
            np.testing.assert_array_equal(ours["a"][i, j], expected)
            np.testing.assert_array_equal(ours["b"][i, j], 2 * expected)


@vma
def test_all_gather_over_a_tuple_of_axes(mesh, check_vma):
    def body(b):
        ours, ref = C.all_gather(b, ("data", "model")), jax.lax.all_gather(b, ("data", "model"))
        return ours[None, None], ref[None, None]
    ours, ref = run(mesh, body, (XS, XS), check_vma=check_vma)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[3, 1], blocks().reshape(8, 2, 3))


@vma
@pytest.mark.parametrize("dim, tiled", [(0, True), (1, False), (-2, True)])
def test_reduce_scatter_matches_lax_and_numpy(mesh, dim, tiled, check_vma):
    # per-device input of shape (4, 4): device (i, j) holds 10 * i + j + arange
    def body(b):
        i, j = jax.lax.axis_index("data"), jax.lax.axis_index("model")
        local = (10.0 * i + j + jnp.arange(16.0).reshape(4, 4)).astype(jnp.float32)
        ours = C.reduce_scatter(local, "data", scatter_dimension=dim, tiled=tiled)
        # (jax.lax.psum_scatter fails to lower a negative dimension; tx normalizes it)
        ref = jax.lax.psum_scatter(local, "data", scatter_dimension=dim % 2, tiled=tiled)
        return ours[None, None], ref[None, None]
    ours, ref = run(mesh, body, (P("data", "model"), P("data", "model")), check_vma=check_vma)
    np.testing.assert_array_equal(ours, ref)
    total_col0 = sum(10.0 * i + np.arange(16.0).reshape(4, 4) for i in range(4))
    d = dim % 2
    for i in range(4):
        want = np.take(total_col0, i, axis=d) if not tiled else \
            np.take(total_col0, [i], axis=d)
        np.testing.assert_allclose(ours[i, 0], want)


@vma
def test_ppermute_ring_matches_lax(mesh, check_vma):
    ring = [(i, (i + 1) % 4) for i in range(4)]
    ring8 = [(i, (i + 3) % 8) for i in range(8)]

    def body(b):
        return (C.ppermute({"x": b}, "data", ring)["x"], jax.lax.ppermute(b, "data", ring),
                C.ppermute(b, ("data", "model"), ring8), jax.lax.ppermute(b, ("data", "model"), ring8))
    ours, ref, ours8, ref8 = run(mesh, body, (XS,) * 4, check_vma=check_vma)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours8, ref8)
    np.testing.assert_array_equal(ours, np.roll(X, 2, axis=0))   # data block i -> i + 1 (2 rows)


def test_ppermute_partial_permutation_zero_fills(mesh):
    out = run(mesh, lambda b: C.ppermute(b, "data", [(0, 3)]), XS)
    np.testing.assert_array_equal(out[6:8], X[0:2])
    np.testing.assert_array_equal(out[:6], 0)


@vma
@pytest.mark.parametrize("source", [0, 2, 3])
def test_broadcast_sends_the_source_value(mesh, source, check_vma):
    def body(b):
        tree = {"f": b, "i": b.astype(jnp.int32), "flag": b > 20, "h": b.astype(jnp.bfloat16)}
        return C.broadcast(tree, "data", source=source)
    out = run(mesh, body, P(None, "model"), check_vma=check_vma)
    want = X[2 * source:2 * source + 2]
    np.testing.assert_array_equal(out["f"], want)
    np.testing.assert_array_equal(out["i"], want.astype(np.int32))
    np.testing.assert_array_equal(out["flag"], want > 20)
    assert out["i"].dtype == jnp.int32 and out["flag"].dtype == jnp.bool_
    assert out["h"].dtype == jnp.bfloat16


def test_broadcast_over_a_tuple_and_of_a_replicated_value(mesh):
    def body(b, r):
        return C.broadcast(b, ("data", "model"), source=5), C.broadcast(r, "data", source=1)
    out, rep = run(mesh, body, (P(), P()), jnp.asarray(X), jnp.arange(3.0), in_specs=(XS, P()))
    np.testing.assert_array_equal(out, blocks()[2, 1])     # linear index 5 = (data 2, model 1)
    np.testing.assert_array_equal(rep, np.arange(3.0))


def test_axis_index_and_axis_size(mesh):
    sizes = {}

    def body(b):
        sizes["data"] = C.axis_size("data")
        sizes["both"] = C.axis_size(("data", "model"))
        return (C.axis_index("data")[None, None], C.axis_index(("data", "model"))[None, None],
                jax.lax.axis_index(("data", "model"))[None, None])
    d, both, ref = run(mesh, body, (XS, XS, XS))
    assert sizes == {"data": 4, "both": 8}
    assert isinstance(sizes["data"], int)
    np.testing.assert_array_equal(d, np.repeat(np.arange(4)[:, None], 2, axis=1))
    np.testing.assert_array_equal(both, ref)
    np.testing.assert_array_equal(both.ravel(), np.arange(8))


def test_collectives_inside_scan_and_grad(mesh):
    def body(b):
        def tick(carry, _):
            return C.ppermute(carry, "data", [(i, (i + 1) % 4) for i in range(4)]), None
        rolled, _ = jax.lax.scan(tick, b, None, length=4)          # back where it started
        g = jax.grad(lambda v: C.psum((v ** 2).sum(), ("data", "model")))(b)
        return rolled, g
    rolled, g = run(mesh, body, (XS, XS))
    np.testing.assert_array_equal(rolled, X)
    np.testing.assert_allclose(g, 2 * X)


def test_vmap_axis_names_are_accepted():
    out = jax.vmap(lambda v: C.psum(v, "batch") + C.axis_index("batch"), axis_name="batch")(
        jnp.arange(4.0))
    np.testing.assert_array_equal(out, 6.0 + np.arange(4))


# ------------------------------------------------------------------------------ errors

def _check(info, *needles):
    err = info.value
    assert err.suggestion, f"no suggestion on {err!r}"
    for n in needles:
        assert n in str(err), (n, str(err))


def test_unknown_axis_names_the_axis_and_the_available_ones(mesh):
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.psum(b, "dat"), XS)
    _check(info, "'dat'", "data, model", "did you mean 'data'")
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.all_gather(b, ("data", "pipe")), XS)
    _check(info, "'pipe'", "available axes: data, model")


@pytest.mark.parametrize("op", ["psum", "pmean", "all_gather", "reduce_scatter", "ppermute",
                                "broadcast", "axis_index", "axis_size"])
def test_every_collective_validates_the_axis(mesh, op):
    calls = {
        "psum": lambda b: C.psum(b, "tensor"),
        "pmean": lambda b: C.pmean(b, "tensor"),
        "all_gather": lambda b: C.all_gather(b, "tensor"),
        "reduce_scatter": lambda b: C.reduce_scatter(b, "tensor"),
        "ppermute": lambda b: C.ppermute(b, "tensor", [(0, 1)]),
        "broadcast": lambda b: C.broadcast(b, "tensor"),
        "axis_index": lambda b: b + C.axis_index("tensor"),
        "axis_size": lambda b: b + C.axis_size("tensor"),
    }
    with pytest.raises(CollectiveError) as info:
        run(mesh, calls[op], XS)
    _check(info, f"tx.collectives.{op}", "'tensor'", "data, model")


def test_outside_shard_map_suggests_manual_mode(mesh):
    for call in (lambda: C.psum(jnp.ones(3), "data"),                       # eager
                 lambda: jax.jit(lambda v: C.pmean(v, "data"))(jnp.ones(3)),  # plain jit
                 lambda: C.axis_index("data")):
        with pytest.raises(CollectiveError) as info:
            call()
        _check(info, "outside any shard_map")
        assert "step_fn(manual=True)" in info.value.suggestion
        assert "jax.shard_map" in info.value.suggestion
    with jax.set_mesh(mesh):                                     # a mesh, but no manual axes
        with pytest.raises(CollectiveError) as info:
            jax.jit(lambda v: C.psum(v, "data"))(jnp.ones(3))
    _check(info, "outside any shard_map", "has no manual axis")


def test_automatic_axis_of_a_partial_shard_map(mesh):
    def body(b):
        return C.psum(b, "model")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                              axis_names={"data"}))
    with pytest.raises(CollectiveError) as info:
        f(jnp.ones((8, 4)))
    _check(info, "'model' is automatic", "manual axes here: data")
    assert "axis_names" in info.value.suggestion


@pytest.mark.parametrize("axis_name", [3, (), ("data", "data"), ["data", 1], None])
def test_malformed_axis_names(mesh, axis_name):
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.psum(b, axis_name), XS)
    _check(info, "tx.collectives.psum")


@pytest.mark.parametrize("perm, needle", [
    ([(0, 4)], "out of range for axis 'data' of size 4"),
    ([(-1, 0)], "out of range"),
    ([(0, 1), (0, 2)], "device 0 is a source more than once"),
    ([(0, 1), (2, 1)], "device 1 is a destination more than once"),
    ([(0, 1, 2)], "is not a (source, destination) pair"),
    ([(0.5, 1)], "is not a (source, destination) pair"),
    (5, "perm must be a list"),
])
def test_ppermute_validates_the_permutation(mesh, perm, needle):
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.ppermute(b, "data", perm), XS)
    _check(info, needle)


def test_ppermute_tuple_axis_range_uses_the_product(mesh):
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.ppermute(b, ("data", "model"), [(7, 8)]), XS)
    _check(info, "size 8")


@pytest.mark.parametrize("source", [4, -1, 1.0])
def test_broadcast_validates_the_source(mesh, source):
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.broadcast(b, "data", source=source), XS)
    _check(info, "source")


@pytest.mark.parametrize("kwargs, needle", [
    ({"gather_dimension": 3}, "gather_dimension=3 is out of range"),
    ({"gather_dimension": 2, "tiled": True}, "gather_dimension=2 is out of range"),
    ({"gather_dimension": -4}, "out of range"),
])
def test_all_gather_validates_the_dimension(mesh, kwargs, needle):
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.all_gather({"w": b}, "data", **kwargs), XS)
    _check(info, needle, "['w']")


def test_all_gather_tiled_scalar(mesh):
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.all_gather(b.sum(), "data", tiled=True), XS)
    _check(info, "rank 0")


@pytest.mark.parametrize("body, needle", [
    (lambda b: C.reduce_scatter(b[:, :3], "model", scatter_dimension=1), "not divisible by the size 2"),
    (lambda b: C.reduce_scatter(b, "data", scatter_dimension=0, tiled=False), "must equal the axis size 4"),
    (lambda b: C.reduce_scatter(b, "data", scatter_dimension=2), "scatter_dimension=2 is out of range"),
])
def test_reduce_scatter_validates_shapes(mesh, body, needle):
    with pytest.raises(CollectiveError) as info:
        run(mesh, body, XS)
    _check(info, needle)


def test_psum_over_a_replicated_axis_mixed_with_a_varying_one(mesh):
    # The value varies over data but is replicated over model: psum over both would count it
    # twice. JAX rejects this under check_vma; Titanax says so in words.
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.psum(b.sum(keepdims=True), ("data", "model")), P(),
            jnp.ones((8, 4)), in_specs=P("data", None))
    _check(info, "replicated", "('data', 'model')")
    assert "pcast" in info.value.suggestion


def test_psum_of_a_value_already_reduced_over_the_axis_is_refused(mesh):
    # psum(pmean(g)) would silently multiply the mean by the number of devices.
    with pytest.raises(CollectiveError) as info:
        run(mesh, lambda b: C.psum(C.pmean({"g": b}, "data"), "data"), P(None, "model"))
    _check(info, "['g'] is already the same on every device along 'data'", "multiply it by 4")
    assert "axis_size('data')" in info.value.suggestion


def test_pmean_of_a_sum_warns_that_it_stays_a_sum(mesh):
    with pytest.warns(TitanaxWarning, match="already the same on every device along 'data'.*a sum, not a mean"):
        run(mesh, lambda b: C.pmean(C.psum(b, "data"), "data"), P(None, "model"))


def test_double_reduction_is_not_guessed_where_replication_is_untracked(mesh):
    # Without check_vma every value looks replicated: nothing is refused, JAX's numbers stand.
    out = run(mesh, lambda b: C.psum(C.pmean(b, "data"), "data"), P(None, "model"), check_vma=False)
    np.testing.assert_allclose(out, X.reshape(4, 2, COLS).sum(0), rtol=1e-6)
