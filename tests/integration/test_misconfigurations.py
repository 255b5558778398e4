"""Every misconfiguration Titanax can see raises a TitanaxError subclass before XLA runs: the
message names the culprit and ``.suggestion`` says what to change."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import models as m
import titanax as tx


def mesh_8(*axes_shape):
    axes = tuple(a for a, _ in axes_shape)
    return tx.MeshSpec(axes=axes, shape=tuple(s for _, s in axes_shape)).build()


class AnnotatedDense(nn.Module):
    """One Dense layer whose kernel carries whatever annotation a case gives it."""

    features: int = 8
    names: tuple = ("embed", "mlp")
    mesh_axes: bool = False

    @nn.compact
    def __call__(self, x):
        wrap = nn.with_partitioning if self.mesh_axes else nn.with_logical_partitioning
        return nn.Dense(self.features, kernel_init=wrap(nn.initializers.lecun_normal(), self.names))(x)


X = jnp.ones((8, 16))
DP8 = tx.Plan(data_parallel=tx.DP(axis="data"), strict=True)
TP_RULES = tx.Rules([("batch", "data"), ("mlp", "tensor")], replicated=["embed"], strict=True)


def shard_dense(rules=TP_RULES, mesh=None, **module_kwargs):
    mesh = mesh or mesh_8(("data", 4), ("tensor", 2))
    return tx.shard(AnnotatedDense(**module_kwargs), rules, mesh, example=X)


CASES = {
    "mesh needs more devices than exist": (
        lambda: tx.MeshSpec(axes=("data", "tensor"), shape=(4, 4)).build(), tx.MeshError, "16"),
    "two inferred mesh axes": (
        lambda: tx.MeshSpec(axes=("data", "tensor"), shape=(-1, -1)), tx.MeshError, "-1"),
    "mesh axes and shape of different lengths": (
        lambda: tx.MeshSpec(axes=("data", "tensor"), shape=(8,)), tx.MeshError, "axes"),
    "duplicate mesh axis name": (
        lambda: tx.MeshSpec(axes=("data", "data")), tx.MeshError, "data"),
    "inferred axis does not divide the devices": (
        lambda: tx.MeshSpec(axes=("data", "tensor"), shape=(3, -1)).build(), tx.MeshError, "3"),
    "plan axis the mesh lacks": (
        lambda: tx.Plan(data_parallel=tx.DP(axis="batch")).validate(mesh_8(("data", 8))),
        tx.PlanError, "'batch'"),
    "two plan parts on one axis": (
        lambda: tx.Plan(data_parallel=tx.DP(axis="x"), tensor_parallel=tx.TP(axis="x")),
        tx.PlanError, "'x'"),
    "mesh axis no plan part uses": (
        lambda: tx.Plan(data_parallel=tx.DP(axis="data")).validate(mesh_8(("data", 4), ("tensor", 2))),
        tx.PlanError, "'tensor'"),
    "empty plan": (lambda: tx.Plan(), tx.PlanError, "no parallelism"),
    "non-positive accumulation": (
        lambda: tx.DP(axis="data", accumulate_steps=0), tx.PlanError, "accumulate_steps"),
    "rule names an unknown mesh axis": (
        lambda: shard_dense(tx.Rules([("batch", "dta")])), tx.PlanError, "'dta'"),
    "same mesh axis twice in one annotation": (
        lambda: shard_dense(names=("data", "data"), mesh_axes=True), tx.ShardingError, "Dense_0/kernel"),
    "annotation names a mesh axis the mesh lacks": (
        lambda: shard_dense(names=("model", None), mesh_axes=True), tx.ShardingError, "'model'"),
    "indivisible dimension (strict)": (
        lambda: shard_dense(features=5), tx.ShardingError, "Dense_0/kernel"),
    "path rule that matches nothing (strict)": (
        lambda: shard_dense(TP_RULES + tx.Rules(params=[(r"Dense_9/kernel$", ("embed", "mlp"))])),
        tx.ShardingError, "Dense_9"),
    "logical name no rule maps (strict)": (
        lambda: shard_dense(names=("embed", "mpl")), tx.ShardingError, "'mpl'"),
    "annotation with more names than dimensions": (
        lambda: shard_dense(names=("embed", "mlp", "kv")), tx.ShardingError, "Dense_0/kernel"),
    "large parameter left replicated by a missing rule (strict)": (
        lambda: tx.shard(nn.Dense(64), tx.Plan(tensor_parallel=tx.TP(axis="tensor"), strict=True,
                                               max_replicated_bytes=1024),
                         mesh_8(("tensor", 8)), example=X),
        tx.ShardingError, "'kernel'"),
    "Linen module with neither example nor params": (
        lambda: tx.shard(m.LinenMLP(), DP8, mesh_8(("data", 8))), tx.ShardingError, "LinenMLP"),
    "params that do not fit the module": (
        lambda: tx.shard(m.LinenMLP(), DP8, mesh_8(("data", 8)), example=m.float_batch(),
                         params={"Dense_0": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}),
        tx.ShardingError, "Dense_0"),
    "batch that does not divide over the data axis (strict)": (
        lambda: tx.shard(m.LinenMLP(), DP8, mesh_8(("data", 8)), example=m.float_batch())(
            m.float_batch(batch=12)),
        tx.ShardingError, "12"),
    "no mesh given and none set": (
        lambda: tx.shard(m.LinenMLP(), DP8, example=m.float_batch()), tx.ShardingError, "no mesh"),
    "not a Flax model": (lambda: tx.shard(42, DP8, mesh_8(("data", 8))), tx.ShardingError, "int"),
    "abstract NNX module": (
        lambda: tx.shard(nnx.eval_shape(lambda: m.NNXMLP(nnx.Rngs(0), annotate=False)), DP8,
                         mesh_8(("data", 8))),
        tx.ShardingError, "abstract"),
    "unknown axis in ProcessGroups": (
        lambda: tx.ProcessGroups(mesh_8(("data", 8))).size("tensor"), tx.MeshError, "'tensor'"),
    "multi-process settings without a coordinator": (
        lambda: tx.runtime.resolve_cluster({}, num_processes=2, process_id=0), tx.DistributedError,
        "coordinator"),
    "plan given bare tuples instead of tx.Rules": (
        lambda: tx.Plan(data_parallel=tx.DP(), rules=[("batch", "data")]), tx.PlanError, "list"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_misconfiguration_raises_a_titanax_error_with_a_suggestion(case):
    call, error, culprit = CASES[case]
    with pytest.raises(error) as err:
        call()
    assert isinstance(err.value, tx.TitanaxError)
    assert culprit in err.value.message, err.value.message
    assert err.value.suggestion and len(err.value.suggestion) > 10
    assert "Suggestion:" in str(err.value)


def test_at_least_twelve_distinct_misconfigurations_are_covered():
    assert len(CASES) >= 12


def test_replicated_on_purpose_is_not_flagged():
    """Names that every rule replicates (here: embed under TP) are a choice, not an accident."""
    plan = tx.Plan(tensor_parallel=tx.TP(axis="tensor"), strict=True, max_replicated_bytes=64)
    sm = shard_dense(tx.Rules([("batch", None)]) + plan.resolved_rules(),
                     mesh=mesh_8(("tensor", 8)), names=("embed", None))
    assert sm.layout["Dense_0/kernel"].replicated


def test_non_strict_mode_warns_and_still_shards():
    rules = tx.Rules([("batch", "data"), ("mlp", "tensor")])  # "embed" is unmapped
    with pytest.warns(tx.TitanaxWarning, match="'embed'"):
        sm = shard_dense(rules)
    assert sm.layout["Dense_0/kernel"].spec == jax.sharding.PartitionSpec(None, "tensor")


def test_mesh_set_by_jax_set_mesh_is_used():
    mesh = mesh_8(("data", 8))
    with jax.set_mesh(mesh):
        sm = tx.shard(m.LinenMLP(), DP8, example=m.float_batch())
    assert sm.mesh is mesh


def test_messy_annotation_with_fewer_names_than_dimensions_names_the_leading_ones():
    sm = shard_dense(names=("mlp",))  # kernel is 16 x 8: only the first dimension is named
    assert sm.layout["Dense_0/kernel"].spec == jax.sharding.PartitionSpec("tensor", None)


def test_messy_annotation_with_an_indivisible_dimension_is_dropped_with_a_warning():
    rules = TP_RULES.replace(strict=False)
    with pytest.warns(tx.TitanaxWarning, match="Dense_0/kernel.*does not divide"):
        sm = shard_dense(rules, features=5)
    assert sm.layout["Dense_0/kernel"].replicated
    # Nothing is left to split over 'tensor': both of its devices would compute the same thing.
    with pytest.warns(tx.TitanaxWarning, match="mesh axis 'tensor' .* splits no parameter"):
        assert sm(X).shape == (8, 5)


# ------------------------------------------------------------- axes and constraints nothing uses
class EmbedOnly(nnx.Module):
    """Names only ``embed``: a TP plan's rules (mlp, heads, vocab) find nothing to split."""

    def __init__(self, rngs: nnx.Rngs):
        kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", None))
        self.dense = nnx.Linear(16, 8, kernel_init=kernel, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


DP4_TP2 = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))


def test_a_parallel_axis_nothing_uses_is_reported_at_the_first_call():
    mesh = mesh_8(("data", 4), ("tensor", 2))
    strict = tx.shard(EmbedOnly, dataclasses.replace(DP4_TP2, strict=True), mesh)
    with pytest.raises(tx.ShardingError, match=r"mesh axis 'tensor' \(2 devices\) splits no parameter, "
                       r"no activation and not the batch.*rules map \['mlp', 'heads', 'vocab'\] to it, but "
                       r"the model's arrays are named only \['embed'\]"):
        strict(X)
    lenient = tx.shard(EmbedOnly, DP4_TP2, mesh)
    with pytest.warns(tx.TitanaxWarning, match="mesh axis 'tensor'"):
        lenient(X)


def test_an_axis_only_activations_use_counts_as_used():
    class ConstrainedOnly(nn.Module):  # parameters unnamed, the hidden activation named 'mlp'
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(tx.constrain(nn.Dense(32)(x), ("batch", "mlp")))

    mesh = mesh_8(("data", 4), ("tensor", 2))
    sm = tx.shard(ConstrainedOnly(), tx.Rules([("batch", "data"), ("mlp", "tensor")], strict=True), mesh, example=X)
    assert sm(X).shape == (8, 8)  # no warning (warnings are errors in this suite)


def test_flax_logical_constraints_are_reported_once_with_the_titanax_call():
    class FlaxConstrained(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
            return nn.with_logical_constraint(h, ("batch", "mlp"))

    sm = tx.shard(FlaxConstrained(), DP4_TP2, mesh_8(("data", 4), ("tensor", 2)), example=X)
    with pytest.warns(tx.TitanaxWarning, match=r"nn.with_logical_constraint .*constraints reach XLA as nothing") as seen:
        sm(X)
    assert "tx.constrain(x, names)" in str(seen[0].message)
    sm(X[:4])  # reported once per model, not at every trace


def test_an_nnx_class_with_keyword_only_rngs_is_a_factory():
    class KeywordRngs(nnx.Module):
        def __init__(self, width: int = 4, *, rngs: nnx.Rngs):
            self.linear = nnx.Linear(width, 2, rngs=rngs)

        def __call__(self, x):
            return self.linear(x)

    sm = tx.shard(KeywordRngs, tx.Plan(data_parallel=tx.DP(axis="data")), mesh_8(("data", 8)))
    assert sm.params["linear"]["kernel"][...].shape == (4, 2)
