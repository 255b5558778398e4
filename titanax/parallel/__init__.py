"""Parallelism: rules, plans, layouts and ``tx.shard``."""

from titanax.parallel import presets
from titanax.parallel.context import constrain, current_mesh, current_rules, sharding_context
from titanax.parallel.plan import DP, FSDP, PP, TP, Plan
from titanax.parallel.pipeline_explicit import pipeline_value_and_grad
from titanax.parallel.pipeline_stack import PipelinedStack
from titanax.parallel.rules import Rules
from titanax.parallel.shard import ShardedModel, shard, tree_layout, tree_shardings
from titanax.parallel.sharding import Layout, ParamLayout

__all__ = [
    "DP", "FSDP", "PP", "TP", "Plan", "PipelinedStack", "pipeline_value_and_grad", "Rules", "presets", "constrain", "current_mesh", "current_rules",
    "sharding_context", "ShardedModel", "shard", "tree_layout", "tree_shardings", "Layout", "ParamLayout",
]
