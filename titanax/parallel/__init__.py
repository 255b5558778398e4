"""Parallelism: rules, plans, layouts, ``tx.shard`` and pipelines."""

from titanax.parallel import presets
from titanax.parallel.context import constrain, current_mesh, current_rules, sharding_context
from titanax.parallel.layer_order import LayerOrder
from titanax.parallel.layout import Layout, ParamLayout
from titanax.parallel.pipeline_explicit import pipeline_value_and_grad
from titanax.parallel.pipeline_stack import PipelinedStack
from titanax.parallel.plan import DP, FSDP, PP, TP, Plan
from titanax.parallel.rules import Rules
from titanax.parallel.schedules import Schedule, build_schedule
from titanax.parallel.shard import shard, tree_layout, tree_shardings
from titanax.parallel.sharded_model import ShardedModel

__all__ = [
    # rules and plans
    "Rules", "presets", "DP", "FSDP", "TP", "PP", "Plan",
    # laying out
    "shard", "ShardedModel", "tree_layout", "tree_shardings", "Layout", "ParamLayout",
    "constrain", "sharding_context", "current_rules", "current_mesh",
    # pipelines
    "PipelinedStack", "pipeline_value_and_grad", "Schedule", "build_schedule", "LayerOrder",
]
