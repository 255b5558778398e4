"""Plan composition, validation and description."""

from __future__ import annotations

import pytest
from jax.sharding import PartitionSpec as P

import titanax as tx


def test_composed_rules_put_the_batch_over_every_data_axis_first():
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), fsdp=tx.FSDP(axis="fsdp"),
                   tensor_parallel=tx.TP(axis="tensor"))
    rules = plan.resolved_rules()
    assert rules.rules[0] == ("batch", ("data", "fsdp"))
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    assert rules.spec(("batch", "seq", "embed"), (8, 4, 16), mesh) == P(("data", "fsdp"), None, None)
    assert rules.spec(("embed", "mlp"), (16, 32), mesh) == P("fsdp", "tensor")
    assert rules.spec(("mlp", "embed"), (32, 16), mesh) == P("tensor", "fsdp")
    assert plan.axes == ("data", "fsdp", "tensor")
    assert plan.batch_axes == ("data", "fsdp")


def test_plan_rules_override_the_parts():
    plan = tx.Plan(tensor_parallel=tx.TP(axis="tensor"), rules=tx.Rules([("vocab", None)]))
    assert plan.resolved_rules().spec(("vocab", "embed"), (64, 16), {"tensor": 4}) == P(None, None)


def test_tp_takes_custom_rules():
    custom = tx.Rules([("embed", "tensor")], replicated=["mlp"])
    plan = tx.Plan(tensor_parallel=tx.TP(axis="tensor", rules=custom), strict=True)
    assert plan.resolved_rules().spec(("embed", "mlp"), (16, 32), {"tensor": 4}) == P("tensor", None)
    assert plan.resolved_rules().strict


def test_validate_accepts_size_one_axes_the_plan_does_not_use():
    tx.Plan(data_parallel=tx.DP(axis="data")).validate({"data": 8, "tensor": 1})


def test_validate_checks_custom_rule_axes_against_the_mesh():
    plan = tx.Plan(tensor_parallel=tx.TP(axis="tensor", rules=tx.Rules([("mlp", "model")])))
    with pytest.raises(tx.PlanError, match="'model'"):
        plan.validate({"tensor": 4})


def test_describe_names_every_part_with_its_size():
    plan = tx.Plan(data_parallel=tx.DP(axis="data", accumulate_steps=4), fsdp=tx.FSDP(axis="fsdp"))
    text = plan.describe({"data": 2, "fsdp": 4})
    assert "DP    over 'data' (2 devices), accumulate_steps=4" in text
    assert "FSDP  over 'fsdp' (4 devices)" in text
    assert "batch split over ('data', 'fsdp')" in text
    assert "largest divisible dimension over 'fsdp'" in text


def test_parts_are_frozen_keyword_only_values():
    with pytest.raises(TypeError):
        tx.DP("data")  # keyword-only
    dp = tx.DP(axis="data")
    with pytest.raises(AttributeError):
        dp.axis = "x"
    assert dp == tx.DP(axis="data")
