"""The schema of a whole training run: one frozen dataclass per YAML section.

OmegaConf reads the YAML against these classes (``titanax.config.load``), so every key and type is
checked before anything is built; each class then turns itself into the Titanax object it
describes (``MeshConfig.spec()`` -> ``tx.MeshSpec``, ``PlanConfig.build()`` -> ``tx.Plan``, ...).
Validation that needs only the values themselves lives in ``__post_init__``; validation that needs
devices (an axis missing from the mesh, a mesh larger than the machine) is done by the objects they
build (``tx.Plan.validate``, ``tx.MeshSpec.build``), which already raise ``TitanaxError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from titanax.exceptions import ConfigError

__all__ = [
    "MeshConfig", "DataParallelConfig", "FSDPConfig", "TensorParallelConfig", "PipelineParallelConfig",
    "PlanConfig", "ModelConfig", "DataConfig", "OptimizerConfig", "PrecisionConfig", "CheckpointConfig",
    "LoggingConfig", "TrainConfig", "RunConfig",
]

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "adafactor")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")


def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{section}.{name}={value} must be at least 1",
                              suggestion=f"set {section}.{name} to a positive integer")


@dataclasses.dataclass(kw_only=True, frozen=True)
class MeshConfig:
    """The device mesh (``tx.MeshSpec``)."""

    axes: tuple[str, ...] = ("data",)
    """Mesh axis names, outermost first."""
    shape: Optional[tuple[int, ...]] = None
    """Size of each axis; one entry may be ``-1`` (inferred). ``None``: every device on ``axes[0]``."""

    def __post_init__(self) -> None:
        if not self.axes:
            raise ConfigError("mesh.axes is empty", suggestion="e.g. mesh: {axes: [data]}")
        if self.shape is not None and len(self.shape) != len(self.axes):
            raise ConfigError(
                f"mesh.shape {list(self.shape)} has {len(self.shape)} entries for {len(self.axes)} axes "
                f"{list(self.axes)}",
                suggestion="give one size per axis (one may be -1), or drop mesh.shape")

    def spec(self) -> Any:
        from titanax.runtime import MeshSpec

        return MeshSpec(axes=tuple(self.axes), shape=None if self.shape is None else tuple(self.shape))


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataParallelConfig:
    """``tx.DP``: parameters replicated, batch split."""

    axis: str = "data"
    """Mesh axis the batch is split over."""
    accumulate_steps: int = 1
    """Microbatches accumulated per optimizer step."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class FSDPConfig:
    """``tx.FSDP``: parameters, optimizer state and batch split (ZeRO-3)."""

    axis: str = "fsdp"
    """Mesh axis the parameters and batch are split over."""
    shard_unnamed: bool = True
    """Also shard parameters the model gave no logical names (largest divisible dimension)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class TensorParallelConfig:
    """``tx.TP``: matmuls split (Megatron)."""

    axis: str = "tensor"
    """Mesh axis the matmuls are split over."""
    sequence_parallel: bool = False
    """Also split the sequence dimension outside attention and MLP."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class PipelineParallelConfig:
    """``tx.PP``: the model's ``tx.nn.LayerStack`` split into stages."""

    axis: str = "pipe"
    """Mesh axis the stages are split over (its size equals ``stages``)."""
    stages: int = 2
    """Pipeline stages."""
    microbatches: int = 2
    """Microbatches per step (at least ``stages``)."""
    repeats: int = 1
    """Virtual stages per device (``circular``, ``interleaved``)."""
    schedule: str = "gpipe"
    """``gpipe``, ``circular``, ``1f1b``, ``interleaved`` or ``zbh1``."""
    remat: str = "none"
    """Recompute inside a stage: ``none``, ``full``, ``save_dots``, ``save_dots_no_batch``, ``offload``
    (GPU/TPU); the model's ``tx.nn.LayerStack(remat=)`` applies inside it per layer."""
    recompute: bool = False
    """``1f1b``/``interleaved``: stash one input per microbatch and recompute the stage in the
    backward slot, instead of stashing every layer's residuals."""
    nan_bubbles: bool = False
    """Debug: feed NaN into idle slots (results must not change)."""
    unroll_ticks: bool = False
    """Unroll the tick loop (exact cost analysis, longer compile)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class PlanConfig:
    """``tx.Plan``: which parallelism runs over which mesh axis."""

    data_parallel: Optional[DataParallelConfig] = None
    """Data parallelism (``{}`` for the defaults)."""
    fsdp: Optional[FSDPConfig] = None
    """Fully sharded data parallelism."""
    tensor_parallel: Optional[TensorParallelConfig] = None
    """Tensor parallelism."""
    pipeline_parallel: Optional[PipelineParallelConfig] = None
    """Pipeline parallelism."""
    rules: Optional[list[Any]] = None
    """Extra logical rules that win over the parts' own: ``[[logical_name, mesh_axis_or_null], ...]``."""
    param_rules: Optional[list[Any]] = None
    """Path rules for unannotated parameters: ``[[path_regex, [logical names...]], ...]``."""
    strict: bool = False
    """Raise instead of warning on unmapped names and indivisible dimensions."""

    def build(self) -> Any:
        """The ``tx.Plan`` (its own checks raise ``PlanError``)."""
        from titanax.parallel.plan import DP, FSDP, PP, TP, Plan
        from titanax.parallel.rules import Rules

        def part(value: Any, kind: type) -> Any:
            return None if value is None else kind(**dataclasses.asdict(value))

        rules = None
        if self.rules or self.param_rules:
            rules = Rules([_pair("plan.rules", r) for r in self.rules or ()],
                          params=[_pair("plan.param_rules", r) for r in self.param_rules or ()])
        return Plan(data_parallel=part(self.data_parallel, DP), fsdp=part(self.fsdp, FSDP),
                    tensor_parallel=part(self.tensor_parallel, TP),
                    pipeline_parallel=part(self.pipeline_parallel, PP), rules=rules, strict=self.strict)


def _pair(where: str, item: Any) -> tuple[Any, Any]:
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise ConfigError(f"{where} entry {item!r} is not a pair",
                          suggestion=f"write each {where} entry as [name, value], e.g. [vocab, null]")
    first, second = item
    return first, tuple(second) if isinstance(second, list) else second


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
        _positive("data", batch_size=self.batch_size)


@dataclasses.dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    """The optimizer (a ``tx.optim`` factory) and its learning-rate schedule."""

    name: str = "adamw"
    """``adamw``, ``adam``, ``sgd``, ``lion`` or ``adafactor``."""
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: str = "constant"
    """``constant``, ``warmup_cosine`` or ``warmup_linear`` (decay to ``end_lr`` at the last step)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 (not for ``constant``)."""
    end_lr: float = 0.0
    """Learning rate at the last step (``warmup_cosine``, ``warmup_linear``)."""
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other keyword arguments of the factory: ``weight_decay``, ``clip_norm``, ``b1``, ..."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name={self.name!r} is not a Titanax optimizer",
                              suggestion=f"use one of {', '.join(OPTIMIZERS)}{did_you_mean(self.name, OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optimizer.schedule={self.schedule!r} is not a schedule",
                              suggestion=f"use one of {', '.join(SCHEDULES)}{did_you_mean(self.schedule, SCHEDULES)}")
        if self.schedule == "constant" and self.warmup_steps:
            raise ConfigError("optimizer.warmup_steps is set but optimizer.schedule is constant",
                              suggestion="set optimizer.schedule: warmup_cosine (or warmup_linear)")

    def build(self, total_steps: int) -> Any:
        """The optax ``GradientTransformation`` for a run of ``total_steps``."""
        from titanax import optim
        from titanax.config.imports import check_arguments

        factory = getattr(optim, self.name)
        check_arguments(factory, self.args, "optimizer.args", supplied=("learning_rate",),
                        name=f"tx.optim.{self.name}")
        if self.schedule == "constant":
            lr = optim.constant(self.lr)
        else:
            lr = getattr(optim, self.schedule)(self.lr, warmup_steps=self.warmup_steps,
                                               total_steps=total_steps, end_value=self.end_lr)
        return factory(lr, **self.args)


@dataclasses.dataclass(kw_only=True, frozen=True)
class PrecisionConfig:
    """``tx.Precision``: the dtypes parameters are stored and computed in."""

    params: str = "float32"
    """Stored (master) parameters and optimizer state."""
    compute: str = "float32"
    """Forward and backward (``bfloat16`` on accelerators)."""
    loss_scale: Optional[Any] = None
    """``null``, ``dynamic`` or a fixed number (float16 needs one)."""

    def build(self) -> Any:
        from titanax.exec.precision import Precision

        return Precision(params=self.params, compute=self.compute, loss_scale=self.loss_scale)


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
        _positive("checkpoint", every=self.every, keep=self.keep)

    def build(self) -> Any:
        if self.dir is None:
            return None
        from titanax.io.checkpoint import OrbaxCheckpoint

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

    def __post_init__(self) -> None:
        _positive("logging", every=self.every)

    def build(self) -> list[Any]:
        from titanax import logging

        loggers: list[Any] = [logging.Basic(progress=self.progress)]
        if self.csv:
            loggers.append(logging.CSV(self.csv))
        if self.tensorboard:
            loggers.append(logging.TensorBoard(self.tensorboard))
        return loggers


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

    def __post_init__(self) -> None:
        _positive("train", steps=self.steps, eval_every=self.eval_every, on_nonfinite=self.on_nonfinite)
        if self.seed < 0:
            raise ConfigError(f"train.seed={self.seed} is negative", suggestion="use a seed >= 0")
        if self.seed >= 2**32:  # JAX keys (without jax_enable_x64) keep the low 32 bits only
            raise ConfigError(f"train.seed={self.seed} does not fit in 32 bits",
                              suggestion=f"use a seed below 2**32 = {2**32}: JAX would keep only the low 32 "
                              f"bits and train exactly as with train.seed={self.seed % 2**32}")


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

    def __post_init__(self) -> None:
        every = self.train.eval_every
        if every is not None and self.train.eval_step is not None and every % self.logging.every:
            raise ConfigError(
                f"train.eval_every={every} is not a multiple of logging.every={self.logging.every}",
                suggestion="evaluations happen at log steps: make train.eval_every a multiple of logging.every")


def did_you_mean(word: str, options: Any) -> str:
    import difflib

    match = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {match[0]}?)" if match else ""
