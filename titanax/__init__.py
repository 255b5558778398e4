"""Titanax: train a single-device Flax model on many devices by describing the parallelism.

Example:
  >>> import titanax as tx
  >>> mesh = tx.MeshSpec(axes=("data",)).build()                       # doctest: +SKIP
  >>> sm = tx.shard(model, tx.Plan(data_parallel=tx.DP(axis="data")), mesh, example=x)
  >>> print(sm.describe())
"""

from titanax import data, exceptions, io, logging, nn, optim, profiling
from titanax.exceptions import (
    CheckpointError,
    CollectiveError,
    ConfigError,
    DistributedError,
    MeshError,
    NonFiniteError,
    PlanError,
    ShardingError,
    TitanaxError,
    TitanaxWarning,
)
from titanax.exec import (
    CheckpointHook,
    Engine,
    LossScale,
    Precision,
    StepFunction,
    TrainState,
    collectives,
    create_train_state,
    step_fn,
    value_and_grad,
)
from titanax.parallel import presets as rules
from titanax.parallel.context import constrain, sharding_context
from titanax.parallel.plan import DP, FSDP, PP, TP, Plan
from titanax.parallel.rules import Rules
from titanax.parallel.shard import ShardedModel, shard, tree_layout, tree_shardings
from titanax import config, runtime
from titanax.runtime import MeshSpec, ProcessGroups, initialize, simulate_cpu_devices

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CollectiveError", "ConfigError", "DistributedError", "MeshError", "NonFiniteError", "PlanError", "ShardingError", "TitanaxError",
    "TitanaxWarning", "exceptions", "profiling", "rules", "constrain", "sharding_context",
    "DP", "FSDP", "PP", "TP", "Plan", "Rules", "ShardedModel", "shard", "tree_layout", "tree_shardings",
    "MeshSpec", "ProcessGroups", "nn",
    "initialize", "simulate_cpu_devices", "runtime", "config", "data", "io", "logging", "optim", "CheckpointHook",
    "Engine", "LossScale", "Precision", "StepFunction", "TrainState", "collectives",
    "create_train_state", "step_fn", "value_and_grad", "__version__",
]
