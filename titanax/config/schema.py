"""The schema of a whole training run: one frozen dataclass per YAML section.

OmegaConf reads the YAML against these classes (``titanax.config.load``), so every key and type is
checked before anything is built; each class then turns itself into the Titanax object it
describes (``MeshConfig.spec()`` -> ``tx.MeshSpec``, ``PlanConfig.build()`` -> ``tx.Plan``, ...).

The sections of the plan parts, the plan and the precision are *generated* from ``tx.DP``,
``tx.FSDP``, ``tx.TP``, ``tx.PP``, ``tx.Plan`` and ``tx.Precision`` (:func:`~titanax.config.mirror.mirror`):
the same fields, types and defaults, so the YAML cannot drift from the Python API. The optimizer's
arguments are checked against the factory's own signature, and its schedule is called with the
arguments its signature names (:data:`SCHEDULE_KEYS`).

Validation that needs only the values themselves lives in ``__post_init__``; validation that needs
devices (an axis missing from the mesh, a mesh larger than the machine) is done by the objects they
build (``tx.Plan.validate``, ``tx.MeshSpec.build``), which raise ``TitanaxError`` with structured
fields that :mod:`titanax.config.keys` turns into YAML keys.
"""

from __future__ import annotations

import dataclasses
import os
import inspect
import typing
from typing import Any, Optional

from titanax import logging as tx_logging
from titanax.config.imports import OWNER, check_arguments, did_you_mean, strip_optional
from titanax.config.mirror import Written, mirror
from titanax.exceptions import ConfigError, TitanaxError
from titanax.exec.precision import Precision
from titanax.io.checkpoint import OrbaxCheckpoint
from titanax.optim import LR_SCHEDULES, OPTIMIZERS
from titanax.parallel.plan import DP, FSDP, PP, TP, Plan
from titanax.parallel.rules import Rules
from titanax.runtime import MeshSpec

__all__ = [
    "MeshConfig", "DataParallelConfig", "FSDPConfig", "TensorParallelConfig", "PipelineParallelConfig",
    "PlanConfig", "ModelConfig", "DataConfig", "OptimizerConfig", "PrecisionConfig", "CheckpointConfig",
    "LoggingConfig", "TrainConfig", "RunConfig", "SCHEDULE_KEYS", "key_hint", "keys_under",
]

SCHEDULE_KEYS: dict[str, str] = {
    "peak_value": "optimizer.lr", "value": "optimizer.lr", "warmup_steps": "optimizer.warmup_steps",
    "end_value": "optimizer.end_lr", "init_value": "optimizer.init_lr", "total_steps": "train.steps"}
"""The YAML key of each argument a learning-rate schedule (``tx.optim.LR_SCHEDULES``) takes."""


def _positive(owner: type, section: str, **values: Any) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{section}.{name}={value} must be at least 1",
                              suggestion=f"set {section}.{name} to a positive integer",
                              owner=owner.__name__, field=name, value=value)


@dataclasses.dataclass(kw_only=True, frozen=True)
class MeshConfig:
    """The device mesh (``tx.MeshSpec``)."""

    axes: tuple[str, ...] = ("data",)
    """Mesh axis names, outermost first."""
    shape: Optional[tuple[int, ...]] = None
    """Size of each axis; one entry may be ``-1`` (inferred). ``None``: every device on ``axes[0]``."""
    axis_types: Any = "auto"
    """``auto`` or ``explicit``, for all axes or one per axis (``tx.MeshSpec(axis_types=)``):
    ``explicit`` for models written in JAX's explicit-sharding style."""

    def __post_init__(self) -> None:
        if not self.axes:
            raise ConfigError("mesh.axes is empty", suggestion="e.g. mesh: {axes: [data]}",
                              owner="MeshConfig", field="axes", value=self.axes)
        if self.shape is not None and len(self.shape) != len(self.axes):
            raise ConfigError(
                f"mesh.shape {list(self.shape)} has {len(self.shape)} entries for {len(self.axes)} axes "
                f"{list(self.axes)}",
                suggestion="give one size per axis (one may be -1), or drop mesh.shape",
                owner="MeshConfig", field=("shape", "axes"), value=(self.shape, self.axes))

    def spec(self) -> MeshSpec:
        """The ``tx.MeshSpec`` (``build()`` it on the devices)."""
        kinds = self.axis_types if isinstance(self.axis_types, str) else tuple(self.axis_types)
        return MeshSpec(axes=tuple(self.axes), shape=None if self.shape is None else tuple(self.shape),
                        axis_types=kinds)


# ------------------------------------------------------------------- generated from the domain classes
_RULE_PAIRS = Optional[list[Any]]
"""Rules in YAML: ``[[logical_name, mesh_axis_or_axes_or_null], ...]``."""


def _pair(key: str, item: Any) -> tuple[Any, Any]:
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise ConfigError(f"{key} entry {item!r} is not a pair",
                          suggestion=f"write each {key} entry as [name, value], e.g. [vocab, null]",
                          owner=OWNER, field=key)
    first, second = item
    return first, tuple(second) if isinstance(second, list) else second


def _rules(key: str, rules: list[Any] | None, params: list[Any] | None = None, *,
           owner: str | None = None) -> Rules | None:
    """``tx.Rules`` from YAML pairs (``None`` when there are none). ``owner`` claims the errors of
    ``tx.Rules`` itself, which cannot know whose rules it checks (``TP``'s or the plan's)."""
    if not rules and not params:
        return None
    pairs = [_pair(key, r) for r in rules or ()]
    paths = [_pair("plan.param_rules", r) for r in params or ()]
    try:
        return Rules(pairs, params=paths)
    except TitanaxError as error:
        if owner is None or error.owner != "Rules":
            raise
        raise error.replace(owner=owner, field="rules") from None


def _part(section: Any) -> Any:
    return None if section is None else section.build()


DataParallelConfig = mirror(DP, "DataParallelConfig", module=__name__,
                            doc="``tx.DP``: parameters replicated, batch split.")
FSDPConfig = mirror(FSDP, "FSDPConfig", module=__name__,
                    doc="``tx.FSDP``: parameters, optimizer state and batch split (ZeRO-3).")
TensorParallelConfig = mirror(
    TP, "TensorParallelConfig", module=__name__, doc="``tx.TP``: matmuls split (Megatron).",
    written={"rules": Written(_RULE_PAIRS, lambda tp: _rules("plan.tensor_parallel.rules", tp.rules, owner="TP"))})
PipelineParallelConfig = mirror(PP, "PipelineParallelConfig", module=__name__,
                                doc="``tx.PP``: the model's ``tx.nn.LayerStack`` split into stages.")
PlanConfig = mirror(
    Plan, "PlanConfig", module=__name__,
    doc="``tx.Plan``: which parallelism runs over which mesh axis (``plan.param_rules`` joins "
        "``plan.rules`` in its ``tx.Rules``).",
    written={
        "data_parallel": Written(Optional[DataParallelConfig], lambda plan: _part(plan.data_parallel)),
        "fsdp": Written(Optional[FSDPConfig], lambda plan: _part(plan.fsdp)),
        "tensor_parallel": Written(Optional[TensorParallelConfig], lambda plan: _part(plan.tensor_parallel)),
        "pipeline_parallel": Written(Optional[PipelineParallelConfig], lambda plan: _part(plan.pipeline_parallel)),
        "rules": Written(_RULE_PAIRS, lambda plan: _rules("plan.rules", plan.rules, plan.param_rules)),
    },
    extra={"param_rules": (Optional[list[Any]], None)})
PrecisionConfig = mirror(
    Precision, "PrecisionConfig", module=__name__,
    doc="``tx.Precision``: the dtypes parameters are stored and computed in.",
    written={"loss_scale": Written(Optional[Any], lambda precision: precision.loss_scale)})  # null, dynamic or a number


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """The model: any callable that returns a Flax model, named by import path."""

    factory: str
    """``package.module:attribute`` (or ``package.module.attribute``): a Linen module class, an NNX
    module class, or a function returning one. If it takes ``rngs``, it is called as an NNX factory
    ``factory(**args, rngs=rngs)``; otherwise ``factory(**args)`` must return a Linen module."""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments for ``factory``."""
    input: Optional[str] = None
    """Linen only: the key of the batch given to ``module.init`` (e.g. ``image``); ``None`` gives the
    whole batch."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataConfig:
    """The data: a function returning a ``tx.data.DataSource``, named by import path."""

    factory: str
    """``package.module:function`` called as ``function(**args, batch_size=..., seed=...)``; it
    returns ``tx.data.DataSource(train=..., eval=..., example=...)``."""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments for ``factory``."""
    batch_size: int = 32
    """Examples per global batch (over all processes)."""

    def __post_init__(self) -> None:
        _positive(DataConfig, "data", batch_size=self.batch_size)


@dataclasses.dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    """The optimizer (a ``tx.optim`` factory) and its learning-rate schedule."""

    name: str = "adamw"
    """A key of ``tx.optim.OPTIMIZERS``: ``adamw``, ``adam``, ``sgd``, ``lion`` or ``adafactor``."""
    lr: float = 1e-3
    """Peak learning rate (the schedule's ``peak_value``, or ``constant``'s ``value``)."""
    schedule: str = "constant"
    """A key of ``tx.optim.LR_SCHEDULES``: ``constant``, ``warmup_cosine`` or ``warmup_linear``."""
    warmup_steps: int = 0
    """Steps of linear warm-up (not for ``constant``)."""
    end_lr: float = 0.0
    """Learning rate at the last step (``warmup_cosine``, ``warmup_linear``)."""
    init_lr: float = 0.0
    """Learning rate at step 0, where the warm-up starts (``warmup_cosine``, ``warmup_linear``)."""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The factory's other keyword arguments (``weight_decay``, ``clip_norm``, ``b1``, ...), checked
    against its signature."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name={self.name!r} is not a Titanax optimizer",
                              suggestion=f"use one of {', '.join(OPTIMIZERS)}{did_you_mean(self.name, OPTIMIZERS)}",
                              owner="OptimizerConfig", field="name", value=self.name)
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"optimizer.schedule={self.schedule!r} is not a schedule",
                              suggestion=f"use one of {', '.join(LR_SCHEDULES)}"
                              f"{did_you_mean(self.schedule, LR_SCHEDULES)}",
                              owner="OptimizerConfig", field="schedule", value=self.schedule)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        used = _schedule_keys(self.schedule)
        for key in sorted(set(SCHEDULE_KEYS.values()) - used):  # set, but the schedule never reads it
            section, _, name = key.partition(".")
            if section == "optimizer" and getattr(self, name) != defaults[name]:
                takers = [s for s in LR_SCHEDULES if key in _schedule_keys(s)]
                raise ConfigError(f"{key} is set but optimizer.schedule is {self.schedule}",
                                  suggestion=f"set optimizer.schedule: {' or '.join(takers)}, or drop {key}",
                                  owner="OptimizerConfig", field=(name, "schedule"),
                                  value=(getattr(self, name), self.schedule))

    def build(self, total_steps: int) -> Any:
        """The optax ``GradientTransformation`` for a run of ``total_steps`` (``train.steps``).

        Raises:
          ConfigError: ``optimizer.args`` does not fit the factory's signature, or the factory or
            schedule refuses a value (``owner`` ``"optimizer"`` or ``"schedule"``).
        """
        factory = OPTIMIZERS[self.name]
        check_arguments(factory, self.args, "optimizer.args", supplied=("learning_rate",),
                        name=f"tx.optim.{self.name}")
        values = {"optimizer.lr": self.lr, "optimizer.warmup_steps": self.warmup_steps,
                  "optimizer.end_lr": self.end_lr, "optimizer.init_lr": self.init_lr, "train.steps": total_steps}
        schedule = LR_SCHEDULES[self.schedule]
        lr = schedule(**{name: values[SCHEDULE_KEYS[name]] for name in inspect.signature(schedule).parameters})
        return factory(lr, **self.args)


def _schedule_keys(name: str) -> set[str]:
    """The YAML keys the learning-rate schedule ``name`` reads."""
    return {SCHEDULE_KEYS[p] for p in inspect.signature(LR_SCHEDULES[name]).parameters}


@dataclasses.dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """``tx.io.OrbaxCheckpoint``: where and how often the run is saved (and resumed from)."""

    dir: Optional[str] = None
    """Checkpoint directory; ``None`` turns checkpointing off. A run resumes from its latest step."""
    every: int = 1000
    """Steps between checkpoints (the last step is always saved)."""
    keep: Optional[int] = 3
    """Checkpoints kept (``None``: all)."""
    async_save: bool = True
    """Write in the background while training continues."""

    def __post_init__(self) -> None:
        _positive(CheckpointConfig, "checkpoint", every=self.every, keep=self.keep)

    def build(self) -> OrbaxCheckpoint | None:
        """The ``tx.io.OrbaxCheckpoint``, or ``None`` without ``dir``."""
        if self.dir is None:
            return None
        return OrbaxCheckpoint(self.dir, every=self.every, keep=self.keep, async_save=self.async_save)


@dataclasses.dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    """Where metrics go (only process 0 writes)."""

    every: int = 10
    """Steps between logged metrics (the only host-device sync of the loop)."""
    progress: bool = True
    """A live progress bar on a terminal (plain lines elsewhere)."""
    csv: Optional[str] = None
    """Also append metrics to this CSV file."""
    tensorboard: Optional[str] = None
    """Also write TensorBoard events to this folder (needs ``titanax[tensorboard]``)."""
    flops_per_example: Optional[float] = None
    """Model FLOPs per example for MFU; ``None`` reads XLA's cost analysis when the peak is known."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU; ``None`` looks the device kind up."""
    wandb: Optional[dict[str, Any]] = None
    """Also log to Weights & Biases: ``tx.logging.WandB``'s arguments (``{project: my-project, mode:
    offline}``; needs ``titanax[wandb]``). ``titanax run`` puts W&B's files in the run directory and
    hands it the resolved configuration."""
    profile_steps: Optional[str] = None
    """``"first:stop"``, quoted: trace these steps with ``jax.profiler`` (``"5:8"``: steps 5, 6, 7)."""
    profile_dir: Optional[str] = None
    """Where the profiler trace goes (TensorBoard's ``--logdir``); ``None``: ``profile/`` in the run
    directory (``profile`` without one)."""

    def __post_init__(self) -> None:
        _positive(LoggingConfig, "logging", every=self.every)
        if self.profile_steps is not None:
            from titanax.exec.trace import ProfileWindow

            if str(self.profile_steps).isdigit():  # YAML 1.1 reads an unquoted 5:8 as 5*60+8
                raise ConfigError(f"logging.profile_steps={self.profile_steps} is a number, not first:stop",
                                  suggestion="quote it: profile_steps: \"5:8\" (YAML reads 5:8 unquoted as the "
                                  "base-60 number 308)", owner="LoggingConfig", field="profile_steps",
                                  value=self.profile_steps)
            try:
                ProfileWindow.parse(str(self.profile_steps), self.profile_dir)
            except ConfigError as error:
                raise error.replace(owner="LoggingConfig", field="profile_steps") from None

    def build(self, run_config: Optional[dict[str, Any]] = None) -> list[Any]:
        """The loggers: ``Basic``, and ``CSV`` / ``TensorBoard`` / ``WandB`` when set; ``run_config``
        is the configuration W&B shows with the run."""
        loggers: list[Any] = [tx_logging.Basic(progress=self.progress)]
        if self.csv:
            loggers.append(tx_logging.CSV(self.csv))
        if self.tensorboard:
            loggers.append(tx_logging.TensorBoard(self.tensorboard))
        if self.wandb is not None:
            arguments = dict(self.wandb)
            if run_config is not None:
                arguments.setdefault("config", run_config)
            try:
                loggers.append(tx_logging.WandB(**arguments))
            except TypeError as error:
                raise ConfigError(f"logging.wandb: {error}", suggestion="give tx.logging.WandB's arguments: "
                                  "project, name, mode, dir, and wandb.init's", owner="LoggingConfig",
                                  field="wandb", value=self.wandb) from None
        return loggers


@dataclasses.dataclass(kw_only=True, frozen=True)
class OutputConfig:
    """The run directory ``titanax run`` writes (``<root>/<name>-<time>/``): the resolved
    configuration, and every output left unset elsewhere — the metrics CSV, TensorBoard events,
    checkpoints, profiler traces."""

    enabled: bool = True
    """Write a run directory; ``false``: only the outputs the configuration names."""
    root: Optional[str] = None
    """Where run directories go; ``None``: ``$TITANAX_RUNS``, else ``runs``."""
    name: Optional[str] = None
    """The run's name, the directory's prefix; ``None``: the configuration file's name."""
    dir: Optional[str] = None
    """This directory instead of a new one (``--run-dir``): to resume a run, give the directory it
    printed; its ``checkpoints/`` are where it continues from."""

    def __post_init__(self) -> None:
        for field in ("root", "name", "dir"):
            value = getattr(self, field)
            if value is not None and not str(value).strip():
                raise ConfigError(f"output.{field} is empty", suggestion=f"remove output.{field} or give a path",
                                  owner="OutputConfig", field=field, value=value)
        if self.name is not None and ("/" in self.name or os.sep in self.name):
            raise ConfigError(f"output.name={self.name!r} holds a path separator",
                              suggestion="give a plain name; set output.root for where run directories go",
                              owner="OutputConfig", field="name", value=self.name)


@dataclasses.dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """The loop: step functions by import path, length, evaluation, seed."""

    step: str
    """``package.module:function``: the training step, ``(state, batch) -> (state, metrics)``."""
    eval_step: Optional[str] = None
    """``(state, batch) -> metrics`` on held-out data (needs ``DataSource.eval``)."""
    eval_summary: Optional[str] = None
    """``metrics -> extra metrics`` from the averaged evaluation metrics (``perplexity = exp(loss)``)."""
    steps: int = 100
    """Optimizer steps to train (a resumed run stops at the same step)."""
    eval_every: Optional[int] = None
    """Steps between evaluations (``None``: only at the end); a multiple of ``logging.every``."""
    eval_at_start: bool = False
    """Also evaluate before the first step (to report how far training moved the held-out loss)."""
    seed: int = 0
    """Seed of the initialization, the per-step PRNG and the data order (0 to 2**32 - 1)."""
    on_nonfinite: Optional[int] = None
    """Stop after this many steps in a row with a non-finite loss or gradients (each one's update
    is skipped); ``None``: 1, or enough for a dynamic loss scale to fall to 1 (``Engine(on_nonfinite=)``)."""
    compile_cache: Optional[str] = None
    """A directory for JAX's persistent compilation cache (a restarted run loads its compiled step)."""

    def __post_init__(self) -> None:
        _positive(TrainConfig, "train", steps=self.steps, eval_every=self.eval_every, on_nonfinite=self.on_nonfinite)
        if self.seed < 0:
            raise ConfigError(f"train.seed={self.seed} is negative", suggestion="use a seed >= 0",
                              owner="TrainConfig", field="seed", value=self.seed)
        if self.seed >= 2**32:  # JAX keys (without jax_enable_x64) keep the low 32 bits only
            raise ConfigError(f"train.seed={self.seed} does not fit in 32 bits",
                              suggestion=f"use a seed below 2**32 = {2**32}: JAX would keep only the low 32 "
                              f"bits and train exactly as with train.seed={self.seed % 2**32}",
                              owner="TrainConfig", field="seed", value=self.seed)


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunConfig:
    """A whole training run, as read from YAML by ``titanax.config.load``.

    Example:
      >>> from titanax.config import load
      >>> cfg = load("examples/configs/mnist_dp.yaml", overrides=["train.steps=20"])  # doctest: +SKIP
      >>> cfg.train.steps                                                               # doctest: +SKIP
      20
    """

    model: ModelConfig
    """The model factory."""
    data: DataConfig
    """The data factory and the global batch size."""
    train: TrainConfig
    """Step functions, length, evaluation, seed."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """The device mesh."""
    plan: PlanConfig = dataclasses.field(
        default_factory=lambda: PlanConfig(data_parallel=DataParallelConfig()))
    """The parallelism plan (default, when the file has no ``plan`` section: data parallel over
    ``data``; a ``plan`` section holds exactly the parts it names)."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    """Parameter and compute dtypes."""
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    """Checkpoints (off unless ``checkpoint.dir`` is set)."""
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    """Loggers and MFU inputs."""
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    """The run directory (``titanax run``)."""

    def __post_init__(self) -> None:
        every = self.train.eval_every
        if every is not None and self.train.eval_step is not None and every % self.logging.every:
            raise ConfigError(
                f"train.eval_every={every} is not a multiple of logging.every={self.logging.every}",
                suggestion="evaluations happen at log steps: make train.eval_every a multiple of logging.every",
                owner=OWNER, field=("train.eval_every", "logging.every"), value=(every, self.logging.every))


# -------------------------------------------------------------------------------- the schema's keys
def key_hint(key: str) -> Any:
    """The type the schema gives a dotted key (``plan.fsdp.axis`` -> ``str``), or ``None`` when
    the schema has no such key (or it lies inside a free mapping such as ``optimizer.args``)."""
    hint: Any = RunConfig
    for part in key.split(".") if key else ():
        hint = strip_optional(hint)
        if not dataclasses.is_dataclass(hint):
            return None
        hints = typing.get_type_hints(hint)
        if part not in hints:
            return None
        hint = hints[part]
    return hint


def keys_under(section: str) -> list[str] | None:
    """The keys of a section (``""``: the top level), or ``None`` when ``section`` is no section."""
    hint = strip_optional(key_hint(section))
    if not dataclasses.is_dataclass(hint):
        return None
    return [f.name for f in dataclasses.fields(hint)]
