"""Every field of the classes a run configuration builds is reachable from YAML.

The fields are enumerated from the classes themselves (``dataclasses.fields`` of ``tx.DP``,
``tx.FSDP``, ``tx.TP``, ``tx.PP``, ``tx.Plan``, ``tx.Precision``; ``inspect.signature`` of the
``tx.optim`` factories and learning-rate schedules), set one at a time in a configuration, and
looked for in the object the configuration builds. A field added to one of those classes fails
here until YAML can set it (and a sample value says how).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import pytest

import titanax as tx
from titanax.config import from_dict
from titanax.config.keys import OWNERS, RENAMED, sections, yaml_keys
from titanax.config.schema import SCHEDULE_KEYS, key_hint
from titanax.exceptions import ConfigError, MeshError, PlanError
from titanax.optim import LR_SCHEDULES, OPTIMIZERS

MINIMAL = {"model": {"factory": "pkg.mod:Model"}, "data": {"factory": "pkg.mod:data"},
           "train": {"step": "pkg.mod:step"}}

PARTS = {tx.DP: "data_parallel", tx.FSDP: "fsdp", tx.TP: "tensor_parallel", tx.PP: "pipeline_parallel"}

# class -> field -> (a YAML value unlike the default, the other keys of the section it needs)
SAMPLES: dict[type, dict[str, tuple[Any, dict[str, Any]]]] = {
    tx.DP: {"axis": ("batch", {}), "accumulate_steps": (4, {})},
    tx.FSDP: {"axis": ("shards", {}), "shard_unnamed": (False, {})},
    tx.TP: {"axis": ("model", {}), "rules": ([["mlp", "model"], ["heads", ["model"]]], {}),
            "sequence_parallel": (True, {})},
    tx.PP: {"axis": ("stage", {}), "stages": (4, {"microbatches": 4}), "microbatches": (8, {}),
            "repeats": (2, {"schedule": "circular"}), "schedule": ("1f1b", {}), "remat": ("full", {}),
            "recompute": (True, {"schedule": "1f1b"}), "nan_bubbles": (True, {}), "unroll_ticks": (True, {})},
    tx.Plan: {"data_parallel": ({"axis": "batch"}, {}), "fsdp": ({"axis": "fsdp"}, {}),
              "tensor_parallel": ({"axis": "tensor"}, {}),
              "pipeline_parallel": ({"stages": 2, "microbatches": 2}, {}),
              "rules": ([["vocab", None]], {"data_parallel": {}}),
              "max_replicated_bytes": (1024, {"data_parallel": {}}), "strict": (True, {"data_parallel": {}})},
    tx.Precision: {"params": ("bfloat16", {"compute": "bfloat16"}), "compute": ("bfloat16", {}),
                   "loss_scale": ("dynamic", {}), "initial_scale": (1024.0, {}), "growth_interval": (10, {})},
}
REQUIRED = {tx.PP: {"stages": 2, "microbatches": 2}}
"""Fields a section needs whatever is being set (as ``tx.PP`` needs them)."""


def _section(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The configuration whose section for ``cls`` holds ``values``."""
    if cls in PARTS:
        return {**MINIMAL, "plan": {PARTS[cls]: values}}
    if cls is tx.Plan:
        return {**MINIMAL, "plan": values}
    return {**MINIMAL, "precision": values}


def _built(cls: type, cfg: Any) -> Any:
    if cls is tx.Precision:
        return cfg.precision.build()
    plan = cfg.plan.build()
    return plan if cls is tx.Plan else getattr(plan, PARTS[cls])


def _expected(cls: type, field: str, value: Any) -> Any:
    if field == "rules":
        return tx.Rules([(name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in value])
    if cls is tx.Plan and field in PARTS.values():
        part = next(kind for kind, name in PARTS.items() if name == field)
        return part(**value)
    return value


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_samples_cover_every_field(cls):
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    assert set(SAMPLES[cls]) == fields, f"give SAMPLES[{cls.__name__}] a YAML value for {fields - set(SAMPLES[cls])}"


@pytest.mark.parametrize("cls, field", [(c, f) for c in SAMPLES for f in SAMPLES[c]],
                         ids=lambda x: getattr(x, "__name__", x))
def test_every_field_is_reachable_from_yaml(cls, field):
    value, companions = SAMPLES[cls][field]
    cfg = from_dict(_section(cls, {**REQUIRED.get(cls, {}), **companions, field: value}))
    built = _built(cls, cfg)
    assert isinstance(built, cls)
    got = getattr(built, field)
    assert got == _expected(cls, field, value)
    default = next(f.default for f in dataclasses.fields(cls) if f.name == field)
    assert got != default  # the value arrived: it is not just the default


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_yaml_defaults_are_the_python_defaults(cls):
    """A key left out of the YAML means what the argument left out means in Python."""
    required = REQUIRED.get(cls, {})
    companions = {"data_parallel": {}} if cls is tx.Plan else {}
    built = _built(cls, from_dict(_section(cls, {**required, **companions})))
    assert built == cls(**required, **{k: _expected(cls, k, v) for k, v in companions.items()})


def test_pipeline_stages_and_microbatches_are_required_as_in_python():
    with pytest.raises(ConfigError, match="plan.pipeline_parallel.stages is required"):
        from_dict(_section(tx.PP, {"microbatches": 4}))
    with pytest.raises(ConfigError, match="plan.pipeline_parallel.microbatches is required"):
        from_dict(_section(tx.PP, {"stages": 4}))


# ------------------------------------------------------------------------------- the optimizer
FACTORY_SAMPLES: dict[str, tuple[Any, dict[str, Any]]] = {
    "b1": (0.8, {}), "b2": (0.9, {}), "eps": (1e-6, {}), "weight_decay": (0.05, {}), "decay_mask": (None, {}),
    "clip_norm": (2.0, {}), "moment_dtype": ("bfloat16", {}), "momentum": (0.5, {}),
    "nesterov": (True, {"momentum": 0.9}), "decay_rate": (0.7, {}), "clipping_threshold": (0.5, {}),
    "factored": (False, {}), "min_dim_size_to_factor": (64, {}),
}
"""Every argument of every ``tx.optim`` factory but ``learning_rate``: a value unlike its default."""


def _recording(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[Any, dict[str, Any]]]:
    """Record the calls ``OptimizerConfig.build`` makes to the factory ``name``."""
    calls: list[tuple[Any, dict[str, Any]]] = []
    original = OPTIMIZERS[name]

    @functools.wraps(original)  # the same signature, so optimizer.args are checked against it
    def factory(learning_rate: Any, **kwargs: Any) -> Any:
        calls.append((learning_rate, kwargs))
        return original(learning_rate, **kwargs)

    monkeypatch.setitem(OPTIMIZERS, name, factory)
    return calls


FACTORY_ARGUMENTS = [(name, arg) for name, factory in OPTIMIZERS.items()
                     for arg in inspect.signature(factory).parameters if arg != "learning_rate"]


def test_factory_samples_cover_every_argument():
    missing = {arg for _, arg in FACTORY_ARGUMENTS} - set(FACTORY_SAMPLES)
    assert not missing, f"give FACTORY_SAMPLES a value for {missing}"


@pytest.mark.parametrize("name, arg", FACTORY_ARGUMENTS)
def test_every_factory_argument_is_reachable_from_yaml(monkeypatch, name, arg):
    value, companions = FACTORY_SAMPLES[arg]
    default = inspect.signature(OPTIMIZERS[name]).parameters[arg].default
    assert value != default
    calls = _recording(monkeypatch, name)
    cfg = from_dict({**MINIMAL, "optimizer": {"name": name, "args": {**companions, arg: value}}})
    cfg.optimizer.build(total_steps=10)
    assert calls[-1][1][arg] == value


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_learning_rate_is_optimizer_lr(monkeypatch, name):
    calls = _recording(monkeypatch, name)
    from_dict({**MINIMAL, "optimizer": {"name": name, "lr": 0.375}}).optimizer.build(total_steps=10)
    assert float(calls[-1][0](7)) == pytest.approx(0.375)


# schedule argument -> what the built schedule shows when it arrived (lr 1.0, warm-up 4 steps from
# 0.25, decay to 0.125 at train.steps = 10)
SCHEDULE_CHECKS = {
    "value": lambda lr: lr(123) == pytest.approx(1.0),
    "peak_value": lambda lr: lr(4) == pytest.approx(1.0),
    "init_value": lambda lr: lr(0) == pytest.approx(0.25),
    "warmup_steps": lambda lr: lr(3) < 1.0 and lr(4) == pytest.approx(1.0),
    "total_steps": lambda lr: lr(9) > 0.125 and lr(10) == pytest.approx(0.125),
    "end_value": lambda lr: lr(20) == pytest.approx(0.125),
}
SCHEDULE_ARGUMENTS = [(name, arg) for name, schedule in LR_SCHEDULES.items()
                      for arg in inspect.signature(schedule).parameters]


def test_every_schedule_argument_has_a_yaml_key():
    for _, arg in SCHEDULE_ARGUMENTS:
        assert arg in SCHEDULE_KEYS, f"SCHEDULE_KEYS has no YAML key for the schedules' {arg}"
        assert key_hint(SCHEDULE_KEYS[arg]) is not None, SCHEDULE_KEYS[arg]
        assert arg in SCHEDULE_CHECKS


@pytest.mark.parametrize("name, arg", SCHEDULE_ARGUMENTS)
def test_every_schedule_argument_is_reachable_from_yaml(monkeypatch, name, arg):
    calls = _recording(monkeypatch, "sgd")
    values = {"optimizer.lr": 1.0, "optimizer.warmup_steps": 4, "optimizer.init_lr": 0.25,
              "optimizer.end_lr": 0.125, "train.steps": 10}
    read = {SCHEDULE_KEYS[p] for p in inspect.signature(LR_SCHEDULES[name]).parameters}
    optimizer = {"name": "sgd", "schedule": name,
                 **{key.split(".")[1]: v for key, v in values.items() if key in read and key.startswith("optimizer.")}}
    cfg = from_dict({**MINIMAL, "optimizer": optimizer, "train": {**MINIMAL["train"], "steps": 10}})
    cfg.optimizer.build(total_steps=cfg.train.steps)
    schedule = calls[-1][0]
    assert SCHEDULE_CHECKS[arg](lambda step: float(schedule(step)))


def test_a_key_the_schedule_does_not_read_is_refused():
    with pytest.raises(ConfigError, match="optimizer.init_lr is set but optimizer.schedule is constant") as error:
        from_dict({**MINIMAL, "optimizer": {"init_lr": 0.1}})
    assert "warmup_cosine or warmup_linear" in error.value.suggestion


# ------------------------------------------------------------------- (owner, field) -> YAML key
def test_every_named_key_is_a_key_of_the_schema():
    for (owner, field), key in RENAMED.items():
        assert key_hint(key) is not None, (owner, field, key)
    for owner, section in OWNERS.items():
        assert key_hint(section) is not None, (owner, section)
    for cls in (*SAMPLES, tx.MeshSpec, tx.io.OrbaxCheckpoint):
        assert cls.__name__ in sections()


@pytest.mark.parametrize("owner, field, key", [
    ("DP", "axis", "plan.data_parallel.axis"),
    ("PP", "stages", "plan.pipeline_parallel.stages"),
    ("TP", "rules", "plan.tensor_parallel.rules"),
    ("Plan", "max_replicated_bytes", "plan.max_replicated_bytes"),
    ("Precision", "growth_interval", "precision.growth_interval"),
    ("MeshSpec", "shape", "mesh.shape"),
    ("MeshSpec", "devices", "mesh"),                       # no key of its own: its section
    ("optimizer", "learning_rate", "optimizer.lr"),
    ("optimizer", "b2", "optimizer.args.b2"),
    ("schedule", "peak_value", "optimizer.lr"),
    ("schedule", "total_steps", "train.steps"),
    ("OrbaxCheckpoint", "directory", "checkpoint.dir"),
    ("CSV", "path", "logging.csv"),
    ("Engine", "log_every", "logging.every"),
])
def test_owner_and_field_name_the_yaml_key(owner, field, key):
    assert yaml_keys(PlanError("...", owner=owner, field=field))[0][0] == key


def test_errors_of_built_parts_carry_their_fields():
    with pytest.raises(PlanError) as error:
        tx.PP(stages=4, microbatches=2)
    assert (error.value.owner, error.value.field, error.value.value) == ("PP", "microbatches", 2)
    with pytest.raises(MeshError) as error:
        tx.MeshSpec(axes=("data", "data"))
    assert (error.value.owner, error.value.field) == ("MeshSpec", "axes")
    with pytest.raises(ConfigError) as error:
        tx.optim.warmup_cosine(1.0, warmup_steps=20, total_steps=10)
    assert yaml_keys(error.value) == (("optimizer.warmup_steps", 20), ("train.steps", 10))
