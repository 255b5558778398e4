"""Run configurations: a whole training run as one YAML file, checked against a typed schema.

Example:
  >>> from titanax import config
  >>> cfg = config.load("examples/configs/mnist_dp.yaml", ["train.steps=20"])  # doctest: +SKIP
  >>> metrics = config.train(cfg)                                               # doctest: +SKIP

The same file runs from the command line: ``titanax run examples/configs/mnist_dp.yaml``.
"""

from titanax.config.imports import import_object
from titanax.config.loader import from_dict, load
from titanax.config.run import Prepared, prepare, train
from titanax.config.run_dir import RunDirectory, resolve_run_directory
from titanax.config.schema import (
    CheckpointConfig,
    DataConfig,
    DataParallelConfig,
    FSDPConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    OutputConfig,
    PipelineParallelConfig,
    PlanConfig,
    PrecisionConfig,
    RunConfig,
    TensorParallelConfig,
    TrainConfig,
)

__all__ = [
    "load", "from_dict", "prepare", "train", "Prepared", "import_object", "RunConfig", "MeshConfig",
    "PlanConfig", "DataParallelConfig", "FSDPConfig", "TensorParallelConfig", "PipelineParallelConfig",
    "ModelConfig", "DataConfig", "OptimizerConfig", "PrecisionConfig", "CheckpointConfig", "LoggingConfig",
    "TrainConfig", "OutputConfig", "RunDirectory", "resolve_run_directory",
]
