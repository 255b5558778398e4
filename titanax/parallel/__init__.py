"""Parallelism: rules, plans, layouts and ``tx.shard``."""

from titanax.parallel import presets
from titanax.parallel.context import constrain, current_mesh, current_rules, sharding_context
from titanax.parallel.plan import DP, FSDP, TP, Plan
from titanax.parallel.rules import Rules
from titanax.parallel.shard import ShardedModel, shard, tree_layout, tree_shardings
from titanax.parallel.sharding import Layout, ParamLayout

__all__ = [
    "DP", "FSDP", "TP", "Plan", "Rules", "presets", "constrain", "current_mesh", "current_rules",
    "sharding_context", "ShardedModel", "shard", "tree_layout", "tree_shardings", "Layout", "ParamLayout",
]
