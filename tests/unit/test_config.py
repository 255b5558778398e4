"""``titanax.config``: the YAML loader, the schema's own checks, import paths and the parts each
section builds. Nothing here compiles or touches a mesh."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import typing

import pytest

from titanax.config import (
    CheckpointConfig,
    DataParallelConfig,
    FSDPConfig,
    MeshConfig,
    OptimizerConfig,
    PlanConfig,
    RunConfig,
    TensorParallelConfig,
    from_dict,
    import_object,
    load,
)
from titanax.config.imports import check_arguments
from titanax.exceptions import ConfigError, TitanaxError
from titanax.optim import LR_SCHEDULES, OPTIMIZERS

REPO = pathlib.Path(__file__).resolve().parents[2]
MINIMAL = {"model": {"factory": "pkg.mod:Model"}, "data": {"factory": "pkg.mod:data"},
           "train": {"step": "pkg.mod:step"}}


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_text(excinfo: pytest.ExceptionInfo) -> str:
    err = excinfo.value
    return f"{err.message}\n{err.suggestion}"


# --------------------------------------------------------------------------------------- defaults
def test_defaults():
    cfg = from_dict(MINIMAL)
    assert cfg.mesh == MeshConfig(axes=("data",), shape=None)
    assert cfg.plan == PlanConfig(data_parallel=DataParallelConfig(axis="data"))
    assert cfg.optimizer == OptimizerConfig(name="adamw", lr=1e-3, schedule="constant")
    assert cfg.data.batch_size == 32 and cfg.data.args == {}
    assert cfg.train.steps == 100 and cfg.train.seed == 0 and cfg.train.eval_step is None
    assert cfg.checkpoint.dir is None and cfg.checkpoint.build() is None
    assert cfg.logging.every == 10 and cfg.precision.compute == "float32"
    assert isinstance(cfg.mesh.axes, tuple)


def test_example_config_loads():
    cfg = load(REPO / "examples" / "configs" / "mnist_dp.yaml", ["train.steps=20"])
    assert cfg.train.steps == 20 and cfg.model.input == "image" and cfg.optimizer.schedule == "warmup_cosine"


def test_a_written_plan_replaces_the_default_plan():
    cfg = from_dict({**MINIMAL, "plan": {"fsdp": {"axis": "data"}}})
    assert cfg.plan.data_parallel is None and cfg.plan.fsdp == FSDPConfig(axis="data")
    # without a plan section the overrides add to the default plan
    cfg = from_dict(MINIMAL, ["plan.data_parallel.accumulate_steps=4"])
    assert cfg.plan.data_parallel == DataParallelConfig(axis="data", accumulate_steps=4)
    cfg = from_dict(MINIMAL, ["plan.tensor_parallel.axis=tensor"])
    assert cfg.plan.data_parallel == DataParallelConfig() and cfg.plan.tensor_parallel == TensorParallelConfig()


# ------------------------------------------------------------------------------ env substitution
def test_env_substitution_with_default(tmp_path, monkeypatch):
    path = write(tmp_path, "model: {factory: 'a:b'}\ndata: {factory: 'a:b'}\ntrain: {step: 'a:b'}\n"
                 "checkpoint: {dir: '${oc.env:TX_TEST_CKPT,runs/default}'}\n"
                 "logging: {csv: '${oc.env:TX_TEST_CSV,null}'}\n")
    monkeypatch.delenv("TX_TEST_CKPT", raising=False)
    monkeypatch.delenv("TX_TEST_CSV", raising=False)
    cfg = load(path)
    assert cfg.checkpoint.dir == "runs/default" and cfg.logging.csv is None
    monkeypatch.setenv("TX_TEST_CKPT", "/scratch/ckpt")
    assert load(path).checkpoint.dir == "/scratch/ckpt"


def test_env_substitution_into_typed_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("TX_TEST_STEPS", "7")
    path = write(tmp_path, "model: {factory: 'a:b'}\ndata: {factory: 'a:b'}\n"
                 "train: {step: 'a:b', steps: '${oc.env:TX_TEST_STEPS}'}\n")
    assert load(path).train.steps == 7


def test_missing_env_variable_without_default(tmp_path, monkeypatch):
    monkeypatch.delenv("TX_TEST_NOT_SET", raising=False)
    path = write(tmp_path, "model: {factory: 'a:b'}\ndata: {factory: 'a:b'}\ntrain: {step: 'a:b'}\n"
                 "checkpoint: {dir: '${oc.env:TX_TEST_NOT_SET}'}\n")
    with pytest.raises(ConfigError) as excinfo:
        load(path)
    text = error_text(excinfo)
    assert "checkpoint.dir" in text and "TX_TEST_NOT_SET" in text and "${oc.env:TX_TEST_NOT_SET,<default>}" in text


def test_interpolation_of_another_key():
    cfg = from_dict({**MINIMAL, "train": {"step": "a:b", "steps": 40, "eval_every": "${train.steps}"},
                     "logging": {"every": 20}})
    assert cfg.train.eval_every == 40


# -------------------------------------------------------------------------------------- overrides
def test_dotted_overrides_including_lists():
    cfg = from_dict(MINIMAL, ["mesh.axes=[data,tensor]", "mesh.shape=[2,4]", "data.args.paths=[a.txt, b.txt]",
                              "plan.rules=[[vocab,null]]", "optimizer.lr=3e-4", "checkpoint.dir=null",
                              "model.args={width: 8}"])
    assert cfg.mesh == MeshConfig(axes=("data", "tensor"), shape=(2, 4))
    assert cfg.data.args == {"paths": ["a.txt", "b.txt"]}
    assert cfg.plan.rules == [["vocab", None]]
    assert cfg.optimizer.lr == 3e-4 and cfg.checkpoint.dir is None and cfg.model.args == {"width": 8}


def test_override_ordering(tmp_path):
    path = write(tmp_path, "model: {factory: 'a:b'}\ndata: {factory: 'a:b', batch_size: 16}\n"
                 "train: {step: 'a:b', steps: 5}\nmesh: {axes: [data, tensor], shape: [2, 4]}\n")
    cfg = load(path, ["train.steps=6", "data.batch_size=64", "train.steps=7", "mesh.shape=[4,2]"])
    assert cfg.train.steps == 7                   # the last override wins
    assert cfg.data.batch_size == 64              # overrides win over the file
    assert cfg.mesh.shape == (4, 2)               # a list is replaced, not merged
    assert cfg.mesh.axes == ("data", "tensor")    # what no override touches stays


def test_overrides_alone():
    cfg = load(None, ["model.factory=a:b", "data.factory=a:b", "train.step=a:b"])
    assert cfg.model.factory == "a:b"
    with pytest.raises(ConfigError, match="the command line: model is required"):
        load(None, [])


@pytest.mark.parametrize("assignment", ["train.steps", "=3", "train..steps=3", ".steps=1"])
def test_malformed_override(assignment):
    with pytest.raises(ConfigError, match="is not key=value") as excinfo:
        from_dict(MINIMAL, [assignment])
    assert "--set" in excinfo.value.message and "optimizer.lr=1e-3" in excinfo.value.suggestion


def test_override_that_is_not_yaml():
    with pytest.raises(ConfigError, match=re.escape("--set 'mesh.shape=[2,' cannot be parsed")):
        from_dict(MINIMAL, ["train.steps=3", "mesh.shape=[2,"])


def test_override_error_names_the_override(tmp_path):
    path = write(tmp_path, "model: {factory: 'a:b'}\ndata: {factory: 'a:b'}\ntrain: {step: 'a:b'}\n")
    with pytest.raises(ConfigError) as excinfo:
        load(path, ["train.stepz=3"])
    assert excinfo.value.message == "--set train.stepz=3: unknown key train.stepz"
    with pytest.raises(ConfigError) as excinfo:
        load(path, ["optimizer.lr=fast"])
    assert excinfo.value.message.startswith("--set optimizer.lr=fast: optimizer.lr='fast' has the wrong type")


# --------------------------------------------------------------------------- did-you-mean, types
@pytest.mark.parametrize("values, key, hint", [
    ({"optimiser": {}}, "optimiser", "did you mean optimizer?"),
    ({"optimizer": {"lrr": 1.0}}, "optimizer.lrr", "did you mean optimizer.lr?"),
    ({"plan": {"tensor_paralel": {}}}, "plan.tensor_paralel", "did you mean plan.tensor_parallel?"),
    ({"plan": {"tensor_parallel": {"sequence_paralel": True}}}, "plan.tensor_parallel.sequence_paralel",
     "did you mean plan.tensor_parallel.sequence_parallel?"),
    ({"train": {"step": "a:b", "eval_evry": 3}}, "train.eval_evry", "did you mean train.eval_every?"),
])
def test_unknown_key_suggests_the_closest(values, key, hint):
    with pytest.raises(ConfigError) as excinfo:
        from_dict({**MINIMAL, **values})
    assert excinfo.value.message == f"the given mapping: unknown key {key}"
    assert excinfo.value.suggestion.startswith(hint)
    assert "valid keys" in excinfo.value.suggestion


def test_unknown_key_far_from_any():
    with pytest.raises(ConfigError) as excinfo:
        from_dict({**MINIMAL, "zzzzzz": 1})
    assert "did you mean" not in excinfo.value.suggestion
    assert "model, data, train, mesh, plan" in excinfo.value.suggestion


@pytest.mark.parametrize("override, expected", [
    ("train.steps=many", "train.steps='many' has the wrong type: expected an integer"),
    ("optimizer.lr=fast", "optimizer.lr='fast' has the wrong type: expected a number"),
    ("logging.progress=maybe", "logging.progress='maybe' has the wrong type: expected true or false"),
    ("mesh.axes=data", "mesh.axes='data' has the wrong type: expected a list of strings"),
    ("mesh.shape=8", "mesh.shape=8 has the wrong type: expected a list of integers or null"),
    ("model.args=[1,2]", "model.args=[1, 2] has the wrong type: expected a mapping of names to values"),
    ("plan.data_parallel=3", "plan.data_parallel=3 has the wrong type: expected a mapping with keys axis, "
                             "accumulate_steps or null"),
])
def test_wrong_type_names_the_expected_type(override, expected):
    with pytest.raises(ConfigError) as excinfo:
        from_dict(MINIMAL, [override])
    assert expected in excinfo.value.message
    key = override.partition("=")[0]
    assert excinfo.value.suggestion.startswith(f"write {key} as ")


def test_wrong_type_in_a_file(tmp_path):
    path = write(tmp_path, "model: {factory: 'a:b'}\ndata: {factory: 'a:b', batch_size: lots}\ntrain: {step: 'a:b'}\n")
    with pytest.raises(ConfigError) as excinfo:
        load(path)
    assert excinfo.value.message == f"{path}: data.batch_size='lots' has the wrong type: expected an integer"


def test_missing_required_values():
    with pytest.raises(ConfigError, match="train.step is required but not set") as excinfo:
        from_dict({"model": MINIMAL["model"], "data": MINIMAL["data"], "train": {"steps": 3}})
    assert "--set train.step=" in excinfo.value.suggestion
    with pytest.raises(ConfigError, match="the given mapping: model is required"):
        from_dict({"data": MINIMAL["data"], "train": MINIMAL["train"]})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="line 2, column 13 is not valid YAML: mapping values") as excinfo:
        load(write(tmp_path, "model:\n  factory: a: b\n"))
    assert "indentation" in excinfo.value.suggestion
    with pytest.raises(ConfigError, match="holds a list, not a mapping of sections"):
        load(write(tmp_path, "- model\n- data\n"))
    with pytest.raises(ConfigError, match="model is required"):  # an empty file is the defaults
        load(write(tmp_path, ""))


# --------------------------------------------------------------------------- the sections' checks
@pytest.mark.parametrize("values, message", [
    ({"mesh": {"axes": ["data"], "shape": [2, 4]}}, "mesh.shape [2, 4] has 2 entries for 1 axes ['data']"),
    ({"mesh": {"axes": []}}, "mesh.axes is empty"),
    ({"train": {"step": "a:b", "steps": 0}}, "train.steps=0 must be at least 1"),
    ({"train": {"step": "a:b", "seed": -1}}, "train.seed=-1 is negative"),
    ({"train": {"step": "a:b", "seed": 2**32}}, "train.seed=4294967296 does not fit in 32 bits"),
    ({"data": {"factory": "a:b", "batch_size": 0}}, "data.batch_size=0 must be at least 1"),
    ({"checkpoint": {"every": 0}}, "checkpoint.every=0 must be at least 1"),
    ({"logging": {"every": 0}}, "logging.every=0 must be at least 1"),
    ({"optimizer": {"name": "adamww"}}, "optimizer.name='adamww' is not a Titanax optimizer"),
    ({"optimizer": {"schedule": "cosine"}}, "optimizer.schedule='cosine' is not a schedule"),
    ({"optimizer": {"warmup_steps": 10}}, "optimizer.warmup_steps is set but optimizer.schedule is constant"),
    ({"train": {"step": "a:b", "eval_step": "a:c", "eval_every": 15}, "logging": {"every": 10}},
     "train.eval_every=15 is not a multiple of logging.every=10"),
])
def test_section_checks_name_the_key(values, message):
    with pytest.raises(ConfigError) as excinfo:
        from_dict({**MINIMAL, **values})
    assert excinfo.value.message == f"the given mapping: {message}"
    assert excinfo.value.suggestion


def test_optimizer_name_suggestion():
    with pytest.raises(ConfigError) as excinfo:
        OptimizerConfig(name="lino")
    assert excinfo.value.suggestion == f"use one of {', '.join(OPTIMIZERS)} (did you mean lion?)"
    with pytest.raises(ConfigError, match="did you mean warmup_cosine"):
        OptimizerConfig(schedule="warmup_cosin")


# ------------------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_optimizer_build_every_name(name, schedule):
    warmup = 0 if schedule == "constant" else 5
    tx = OptimizerConfig(name=name, lr=1e-3, schedule=schedule, warmup_steps=warmup).build(total_steps=50)
    assert callable(tx.init) and callable(tx.update)


def test_optimizer_build_with_args():
    tx = OptimizerConfig(name="adamw", args={"weight_decay": 0.1, "clip_norm": 1.0, "b2": 0.95}).build(10)
    assert callable(tx.update)
    tx = OptimizerConfig(name="sgd", args={"momentum": 0.9}).build(10)
    assert callable(tx.update)


def test_optimizer_unknown_argument():
    with pytest.raises(ConfigError) as excinfo:
        OptimizerConfig(name="adamw", args={"weight_decayy": 0.1}).build(10)
    assert excinfo.value.message == "optimizer.args.weight_decayy is not an argument of tx.optim.adamw"
    assert "(did you mean weight_decay?)" in excinfo.value.suggestion


@pytest.mark.parametrize("optimizer,steps,names", [
    ({"schedule": "warmup_cosine", "warmup_steps": 100}, 50, ("optimizer.warmup_steps=100", "train.steps=50")),
    ({"schedule": "warmup_linear", "warmup_steps": 5, "lr": -1.0}, 50, ("optimizer.lr", "-1.0")),
    ({"args": {"moment_dtype": "bf16"}}, 50, ("optimizer.args.moment_dtype='bf16'", '"bfloat16"')),
])
def test_optimizer_schedule_errors_name_config_keys(optimizer, steps, names):
    from titanax.config.keys import keyed

    with pytest.raises(TitanaxError) as excinfo, keyed("optimizer"):  # as prepare() raises it
        OptimizerConfig(**optimizer).build(total_steps=steps)
    keyed_error = excinfo.value
    text = f"{keyed_error.message}\n{keyed_error.suggestion}"
    assert all(name in text for name in names), text
    assert keyed_error.message.startswith(names[0]), text  # the YAML keys lead, from the error's fields


# ------------------------------------------------------------------------------------------ plan
def test_plan_build_parts():
    plan = PlanConfig(data_parallel=DataParallelConfig(axis="data", accumulate_steps=2),
                      tensor_parallel=TensorParallelConfig(axis="model", sequence_parallel=True)).build()
    assert plan.data_parallel.axis == "data" and plan.data_parallel.accumulate_steps == 2
    assert plan.tensor_parallel.axis == "model" and plan.tensor_parallel.sequence_parallel
    assert plan.fsdp is None and plan.pipeline_parallel is None and plan.rules is None


def test_plan_build_with_rules_and_param_rules():
    cfg = from_dict({**MINIMAL, "plan": {"fsdp": {"axis": "fsdp"},
                                         "rules": [["vocab", None], ["mlp", "fsdp"], ["heads", ["fsdp"]]],
                                         "param_rules": [["dense/kernel$", ["embed", "mlp"]]],
                                         "strict": True}})
    plan = cfg.plan.build()
    assert plan.strict
    from jax.sharding import PartitionSpec as P

    resolved = plan.resolved_rules()  # the config's rules win over the FSDP preset's
    assert resolved.spec(("vocab",), (8,), {"fsdp": 2}) == P(None)
    assert resolved.spec(("mlp",), (8,), {"fsdp": 2}) == P("fsdp")
    assert resolved.spec(("heads",), (8,), {"fsdp": 2}) == P("fsdp")       # a list value becomes a tuple
    assert tuple(plan.rules.params) == (("dense/kernel$", ("embed", "mlp")),)


def test_plan_rule_that_is_not_a_pair():
    with pytest.raises(ConfigError, match=re.escape("plan.rules entry ['vocab'] is not a pair")):
        PlanConfig(rules=[["vocab"]]).build()
    with pytest.raises(ConfigError, match="plan.param_rules entry"):
        PlanConfig(param_rules=["kernel$"]).build()


def test_plan_part_errors_keep_the_plan_error():
    from titanax.exceptions import PlanError

    cfg = from_dict({**MINIMAL, "plan": {"pipeline_parallel": {"stages": 2, "microbatches": 2, "schedule": "1f1bb"}}})
    with pytest.raises(PlanError, match="schedule"):
        cfg.plan.build()


# ------------------------------------------------------------------------------------ checkpoint
def test_checkpoint_build_none_without_dir():
    assert CheckpointConfig().build() is None
    assert CheckpointConfig(dir=None, every=5).build() is None
    assert from_dict(MINIMAL, ["checkpoint.dir=null"]).checkpoint.build() is None


# ---------------------------------------------------------------------------------- import paths
def test_import_object_forms():
    import os.path

    import optax

    assert import_object("optax:adamw", "k") is optax.adamw
    assert import_object("os.path.join", "k") is os.path.join
    assert import_object("titanax.config.schema:RunConfig.__post_init__", "k") is RunConfig.__post_init__


@pytest.mark.parametrize("path, message", [
    ("", "model.factory is empty"),
    ("   ", "model.factory is empty"),
    ("CNN", "model.factory='CNN' is not an import path"),
    ("examples.mnist_dp.model:", "is not an import path"),
    ("titanax_no_such_module.model:CNN", "module 'titanax_no_such_module' cannot be found"),
    ("titanax.no_such_module:CNN", "module 'titanax.no_such_module' cannot be found"),
])
def test_import_object_errors(path, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as excinfo:
        import_object(path, "model.factory")
    assert excinfo.value.suggestion


def test_import_object_missing_attribute_suggests_close_names():
    with pytest.raises(ConfigError) as excinfo:
        import_object("titanax.config.schema:RunConfg", "model.factory")
    assert excinfo.value.message == ("model.factory='titanax.config.schema:RunConfg': titanax.config.schema "
                                     "has no attribute 'RunConfg'")
    assert excinfo.value.suggestion.startswith("did you mean RunConfig")
    with pytest.raises(ConfigError) as excinfo:  # nothing close: list what the module defines
        import_object("titanax.config.imports:zzz", "train.step")
    assert "titanax.config.imports defines: " in excinfo.value.suggestion


def test_import_object_broken_or_incomplete_module(tmp_path, monkeypatch):
    (tmp_path / "tx_test_broken_module.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "tx_test_needs_missing.py").write_text("import tx_test_not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing tx_test_broken_module failed with RuntimeError: boom") as excinfo:
        import_object("tx_test_broken_module:f", "train.step")
    assert "python -c 'import tx_test_broken_module'" in excinfo.value.suggestion
    with pytest.raises(ConfigError, match="needs module 'tx_test_not_installed_dependency'") as excinfo:
        import_object("tx_test_needs_missing:f", "data.factory")
    assert excinfo.value.suggestion == "pip install the package that provides tx_test_not_installed_dependency"


# --------------------------------------------------------------------- arguments of named factories
def _factory(width: int, rate: float = 0.1, name: str | None = None, sizes: tuple[int, ...] = (),
             mode: typing.Literal["a", "b"] = "a", dtype: typing.Any = None, path: str | os.PathLike = "",
             hidden: NotImportedHere = None):  # noqa: F821 - a name only a type checker resolves
    return None


def test_argument_types_judged_only_where_yaml_can_tell():
    for args in ({"width": 8, "rate": 1},                          # an integer is a float too
                 {"width": 8, "name": None, "sizes": [1, 2]},      # YAML lists fill tuple parameters
                 {"width": 8, "mode": "b", "dtype": "bfloat16"},   # Any: left to the call
                 {"width": 8, "path": 5, "hidden": 3}):            # a union with a class, an unresolvable name
        check_arguments(_factory, args, "model.args")
    with pytest.raises(ConfigError, match="model.args.width='8' does not fit"):
        check_arguments(_factory, {"width": "8"}, "model.args")


@pytest.mark.parametrize("args, message, suggestion", [
    ({"width": "8"}, "model.args.width='8' does not fit `width: int` in", "write model.args.width as an integer"),
    ({"width": 8.0}, "model.args.width=8.0 does not fit `width: int`", "as an integer"),
    ({"width": True}, "model.args.width=True does not fit `width: int`", "as an integer"),
    ({"width": 8, "rate": "fast"}, "model.args.rate='fast' does not fit `rate: float`", "as a number"),
    ({"width": 8, "name": 3}, "model.args.name=3 does not fit `name: str | None`", "as a string or null"),
    ({"width": 8, "sizes": 4}, "model.args.sizes=4 does not fit `sizes: tuple[int, ...]`", "a list of integers"),
    ({"width": 8, "mode": "c"}, "model.args.mode='c' does not fit `mode: typing.Literal['a', 'b']`", "a value of type"),
])
def test_argument_types_refused(args, message, suggestion):
    with pytest.raises(ConfigError) as excinfo:
        check_arguments(_factory, args, "model.args")
    assert message in excinfo.value.message and suggestion in excinfo.value.suggestion, excinfo.value


def test_nnx_class_arguments_are_read_from_init():
    """``inspect.signature`` of an NNX Module class reads ``(*args, **kwargs)`` (its metaclass's
    ``__call__``); the arguments are checked against its ``__init__``."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, width: int = 4, *, rngs: nnx.Rngs) -> None:
            self.linear = nnx.Linear(width, 1, rngs=rngs)

    check_arguments(Net, {"width": 3}, "model.args", supplied=("rngs",))
    with pytest.raises(ConfigError, match="model.args.widht is not an argument of .*Net") as excinfo:
        check_arguments(Net, {"widht": 3}, "model.args", supplied=("rngs",))
    assert excinfo.value.suggestion == "its arguments: width (did you mean width?)"
    with pytest.raises(ConfigError, match="model.args.width='3' does not fit `width: int`"):
        check_arguments(Net, {"width": "3"}, "model.args", supplied=("rngs",))


# --------------------------------------------------------------------------------------- the docs
def _schema_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: ``model.factory``, ``plan.data_parallel.axis``, ..."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
        if dataclasses.is_dataclass(inner):
            keys.append(key)
            keys.extend(_schema_keys(inner, f"{key}."))
        else:
            keys.append(key)
    return keys


def test_every_schema_key_is_documented():
    page = (REPO / "docs" / "cli.md").read_text()
    keys = _schema_keys()
    assert "plan.pipeline_parallel.schedule" in keys and "optimizer.args" in keys and len(keys) > 60
    missing = [key for key in keys if f"`{key}`" not in page]
    assert not missing, f"docs/cli.md does not describe {missing}"


def test_every_cli_option_is_documented():
    import typer

    from titanax.cli import app

    page = (REPO / "docs" / "cli.md").read_text()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f"titanax {name}" in page
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert f"`{opt}" in page, f"docs/cli.md does not describe {name} {opt}"
