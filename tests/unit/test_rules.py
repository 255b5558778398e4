"""Rule semantics exactly as DESIGN.md states them, on mesh shapes alone (nothing compiled)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.parallel import presets

MESH = {"data": 4, "tensor": 2, "one": 1}


def test_first_match_wins():
    assert tx.Rules([("mlp", "tensor"), ("mlp", "data")], replicated=["embed"]).spec(
        ("embed", "mlp"), (8, 8), MESH) == P(None, "tensor")


def test_used_mesh_axis_is_skipped_with_fallback_to_next_rule():
    rules = tx.Rules([("embed", "data"), ("mlp", "data"), ("mlp", "tensor")])
    assert rules.spec(("embed", "mlp"), (8, 8), MESH) == P("data", "tensor")
    # The same name on two dimensions: the second falls through to the next rule.
    assert rules.spec(("mlp", "mlp"), (8, 8), MESH) == P("data", "tensor")


def test_used_axis_with_no_further_rule_replicates():
    rules = tx.Rules([("embed", "data"), ("mlp", "data")])
    assert rules.spec(("embed", "mlp"), (8, 8), MESH) == P("data", None)


def test_size_one_axes_are_dropped_and_an_emptied_rule_falls_through():
    rules = tx.Rules([("mlp", "one"), ("mlp", "tensor"), ("embed", ("one", "data"))])
    assert rules.spec(("embed", "mlp"), (8, 8), MESH) == P("data", "tensor")


def test_tuple_of_mesh_axes_shards_one_dimension_over_both():
    rules = tx.Rules([("batch", ("data", "tensor"))])
    assert rules.spec(("batch",), (16, 3), MESH) == P(("data", "tensor"), None)


def test_none_declares_replicated_and_stops_the_search():
    rules = tx.Rules([("vocab", None), ("vocab", "tensor")], strict=True)
    assert rules.spec(("vocab", None), (8, 8), MESH) == P(None, None)


def test_fewer_names_than_dimensions_name_the_leading_ones():
    rules = tx.Rules([("batch", "data")], strict=True)
    assert rules.spec(("batch",), (8, 3, 5), MESH) == P("data", None, None)


def test_more_names_than_dimensions_is_an_error_naming_the_array():
    with pytest.raises(tx.ShardingError, match="kernel.*2 dimension") as err:
        tx.Rules([("batch", "data")]).spec(("a", "b", "c"), (4, 4), MESH, what="parameter 'kernel'")
    assert err.value.suggestion


def test_indivisible_dimension_warns_and_drops_the_axis():
    rules = tx.Rules([("mlp", ("data", "tensor"))])
    with pytest.warns(tx.TitanaxWarning, match="does not divide"):
        spec = rules.spec(("mlp",), (6,), MESH)
    assert spec == P("tensor")  # 6 % 4 != 0 drops data; 6 % 2 == 0 keeps tensor


def test_indivisible_dimension_in_strict_mode_names_parameter_dimension_and_sizes():
    rules = tx.Rules([("mlp", "data")], strict=True)
    with pytest.raises(tx.ShardingError) as err:
        rules.spec((None, "mlp"), (8, 6), {"data": 4}, what="parameter 'Dense_0/kernel'")
    message = str(err.value)
    assert "Dense_0/kernel" in message and "dimension 1" in message and "'data': 4" in message
    assert "multiple of 4" in err.value.suggestion


def test_unmapped_name_warns_then_strict_raises():
    with pytest.warns(tx.TitanaxWarning, match="'mpl'"):
        assert tx.Rules([("mlp", "tensor")]).spec(("mpl",), (8,), MESH) == P(None)
    with pytest.raises(tx.ShardingError, match="'mpl'") as err:
        tx.Rules([("mlp", "tensor")], strict=True).spec(("mpl",), (8,), MESH)
    assert "replicated" in err.value.suggestion


def test_declared_replicated_names_are_not_flagged_in_strict_mode():
    assert tx.Rules([], replicated=["embed"], strict=True).spec(("embed",), (8,), MESH) == P(None)


def test_rules_are_values_that_compose_print_and_compare():
    a = tx.Rules([("batch", "data")])
    b = tx.Rules([("batch", "tensor"), ("mlp", "tensor")], params=[(r"k$", ("mlp",))], strict=True)
    c = a + b
    assert c.rules == (("batch", "data"), ("batch", "tensor"), ("mlp", "tensor"))
    assert c.strict and c.params == ((r"k$", ("mlp",)),)
    assert c == a + b and c != b + a
    assert "Rules([('batch', 'data')" in repr(c)
    assert c.replace(strict=False).strict is False
    assert hash(a) == hash(tx.Rules([("batch", "data")]))


def test_path_rules_first_match():
    rules = tx.Rules(params=[(r"Dense_0/kernel$", ("embed", "mlp")), (r"kernel$", ("mlp", "embed"))])
    assert rules.names_for_path("Block_0/Dense_0/kernel") == ("embed", "mlp")
    assert rules.names_for_path("Block_0/Dense_1/kernel") == ("mlp", "embed")
    assert rules.names_for_path("Block_0/Dense_1/bias") is None


@pytest.mark.parametrize(
    "bad",
    [
        [("batch",)],
        ["batch"],
        [(1, "data")],
        [("batch", ("data", "data"))],
        [("batch", 3)],
    ],
)
def test_malformed_rules_raise_plan_error(bad):
    with pytest.raises(tx.PlanError) as err:
        tx.Rules(bad)
    assert err.value.suggestion


def test_bad_path_regex_raises_plan_error():
    with pytest.raises(tx.PlanError, match="does not compile"):
        tx.Rules(params=[("Dense_0/kernel[", ("embed",))])


def test_presets_map_the_standard_names():
    mesh = {"data": 8, "fsdp": 8, "tensor": 4}
    assert presets.data_parallel("data").spec(("batch", "embed"), (16, 32), mesh) == P("data", None)
    assert presets.fsdp("fsdp").spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", None)
    assert presets.fsdp("fsdp").spec(("vocab", "embed"), (64, 32), mesh) == P("fsdp", None)
    tp = presets.tensor_parallel("tensor")
    assert tp.spec(("embed", "mlp"), (32, 64), mesh) == P(None, "tensor")
    assert tp.spec(("mlp", "embed"), (64, 32), mesh) == P("tensor", None)
    assert tp.spec(("embed", "heads", "kv"), (32, 8, 8), mesh) == P(None, "tensor", None)
    for preset in (presets.data_parallel("data"), presets.fsdp("fsdp"), tp):
        strict = preset.replace(strict=True)
        for name in presets.LOGICAL_NAMES:  # every standard name is mapped or declared replicated
            strict.spec((name,), (64,), mesh)


def test_constrain_is_a_no_op_outside_a_titanax_context():
    x = jnp.ones((8, 4))
    assert tx.constrain(x, ("batch", "embed")) is x


def test_constrain_with_rules_but_no_mesh_raises():
    with tx.Rules([("batch", "data")]):
        with pytest.raises(tx.ShardingError, match="no mesh") as err:
            tx.constrain(jnp.ones((8, 4)), ("batch",))
    assert "set_mesh" in err.value.suggestion


def test_constrain_resolves_against_the_active_rules_and_mesh():
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()
    rules = tx.Rules([("batch", "data"), ("mlp", "tensor")])

    def f(x):
        return tx.constrain(x * 2, ("batch", "mlp"))

    with tx.sharding_context(rules, mesh):
        y = jax.jit(f)(jnp.ones((8, 4)))
    assert y.sharding.spec == P("data", "tensor")
    with rules, jax.set_mesh(mesh):  # `with rules:` plus the mesh from jax.set_mesh
        z = jax.jit(f)(jnp.ones((8, 4)))
    assert z.sharding.spec == P("data", "tensor")


def test_an_indivisible_dimension_warns_with_the_layout_the_array_ends_up_with():
    # FSDP over 8: 'heads' (6) does not divide, so the axis moves on to 'kv': the warning must
    # say where the array is split, not that it "stays replicated".
    with pytest.warns(tx.TitanaxWarning, match=r"dimension 0 \('heads', size 6\) does not divide over "
                      r"mesh axes \['fsdp'\].*laid out as P\(None, 'fsdp', None\): dimension 1 over 'fsdp'"):
        spec = tx.presets.fsdp("fsdp").spec(("heads", "kv", "embed"), (6, 64, 512), {"fsdp": 8},
                                          what="parameter 'out/kernel'")
    assert spec == P(None, "fsdp", None)
    with pytest.warns(tx.TitanaxWarning, match=r"size 6\) does not divide.*the array stays replicated"):
        assert tx.presets.fsdp("fsdp").spec(("heads",), (6,), {"fsdp": 8}) == P(None)
