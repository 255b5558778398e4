"""Titanax: train a single-device Flax model on many devices by describing the parallelism.

Example:
  >>> import flax.linen as nn, jax.numpy as jnp, titanax as tx
  >>> mesh = tx.MeshSpec(axes=("data",)).build()          # every device (here 8 simulated CPUs)
  >>> x = jnp.ones((16, 4))
  >>> sm = tx.shard(nn.Dense(8), tx.Plan(data_parallel=tx.DP(axis="data")), mesh, example=x)
  >>> sm(x).shape                                         # the batch split over the 8 devices
  (16, 8)
  >>> print(sm.describe())                                # doctest: +ELLIPSIS
  Plan
    DP    over 'data' (8 devices)
  ...
  kernel  4x8    float32  -             P(None, None)       128 B  128 B
  ...
"""

from titanax import config, data, exceptions, io, logging, nn, optim, parallel, planner, profiling, runtime
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
    Engine,
    LossScale,
    Precision,
    RecompileWarning,
    StepFunction,
    TrainState,
    collectives,
    create_train_state,
    step_fn,
    value_and_grad,
)
from titanax.parallel import (
    DP,
    FSDP,
    PP,
    TP,
    Plan,
    Rules,
    ShardedModel,
    constrain,
    presets,
    shard,
    sharding_context,
    tree_layout,
    tree_shardings,
)
from titanax.planner import autoplan
from titanax.runtime import MeshSpec, ProcessGroups, initialize, simulate_cpu_devices
from titanax.version import __version__

__all__ = [
    # devices and meshes
    "simulate_cpu_devices", "initialize", "MeshSpec", "ProcessGroups",
    # layout
    "Rules", "presets", "DP", "FSDP", "TP", "PP", "Plan", "shard", "ShardedModel",
    "tree_layout", "tree_shardings", "constrain", "sharding_context",
    # training
    "Engine", "TrainState", "create_train_state", "step_fn", "StepFunction", "value_and_grad",
    "Precision", "LossScale", "collectives", "RecompileWarning",
    # choosing the plan
    "autoplan",
    # errors
    "TitanaxError", "MeshError", "PlanError", "ShardingError", "CollectiveError", "DistributedError",
    "CheckpointError", "ConfigError", "NonFiniteError", "TitanaxWarning",
    # packages
    "runtime", "parallel", "nn", "optim", "data", "io", "logging", "profiling", "config", "planner",
    "exceptions",
    "__version__",
]
