"""``titanax.exceptions``: each error class is also the builtin it refines, and the structured
fields (``owner``, ``field``, ``value``) survive pickling and :meth:`TitanaxError.replace`."""

from __future__ import annotations

import pickle

import pytest

from titanax import exceptions as E

BUILTINS = {
    E.MeshError: ValueError, E.PlanError: ValueError, E.ShardingError: ValueError,
    E.CollectiveError: ValueError, E.ConfigError: ValueError, E.CheckpointError: ValueError,
    E.DistributedError: RuntimeError, E.NonFiniteError: FloatingPointError,
}


def test_every_subclass_is_listed():
    assert set(BUILTINS) == {getattr(E, name) for name in E.__all__
                             if name != "TitanaxError" and issubclass(getattr(E, name), E.TitanaxError)}


@pytest.mark.parametrize("cls", list(BUILTINS), ids=lambda c: c.__name__)
def test_each_error_is_its_builtin(cls):
    error = cls("bad", suggestion="fix it")
    assert isinstance(error, E.TitanaxError) and isinstance(error, BUILTINS[cls])
    with pytest.raises(BUILTINS[cls]):  # `except ValueError` written before Titanax keeps working
        raise error
    assert str(error) == "bad\n  Suggestion: fix it"


@pytest.mark.parametrize("cls", [E.TitanaxError, *BUILTINS], ids=lambda c: c.__name__)
def test_structured_fields_survive_pickling(cls):
    error = cls("DP(axis='batch') is not in the mesh", suggestion="use 'data'", owner="DP", field="axis",
                value="batch")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert (again.message, again.suggestion, again.owner, again.field, again.value) == (
        error.message, "use 'data'", "DP", "axis", "batch")


def test_nonfinite_step_survives_pickling_and_replace():
    error = E.NonFiniteError("loss is nan", step=7, owner="Engine", field="on_nonfinite", value=1)
    assert pickle.loads(pickle.dumps(error)).step == 7
    renamed = error.replace(message="train.on_nonfinite=1: loss is nan")
    assert (renamed.step, renamed.owner, renamed.field, renamed.value) == (7, "Engine", "on_nonfinite", 1)


def test_replace_keeps_the_class_and_every_other_field():
    error = E.ConfigError("warmup_steps=20 is longer than total_steps=10", suggestion="s", owner="schedule",
                          field=("warmup_steps", "total_steps"), value=(20, 10))
    new = error.replace(message="m", suggestion=None)
    assert type(new) is E.ConfigError and new.message == "m" and new.suggestion is None
    assert new.fields == (("warmup_steps", 20), ("total_steps", 10))
    assert error.message.startswith("warmup_steps")  # the original is unchanged


def test_fields_without_a_field_or_a_value():
    assert E.PlanError("the plan has no parallelism", owner="Plan").fields == ()
    assert E.PlanError("x", owner="TP", field=("sequence_parallel", "rules")).fields == (
        ("sequence_parallel", None), ("rules", None))
