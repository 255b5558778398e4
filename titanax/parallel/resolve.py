"""What ``tx.shard``, the Engine and ``tx.data`` check first: the mesh to use (given, or set by
``jax.set_mesh``; Auto or Explicit axes) and the rules a plan or bare rules stand for."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from titanax.exceptions import MeshError, PlanError, ShardingError
from titanax.parallel.plan import Plan
from titanax.parallel.rules import Rules

__all__ = ["PlanOrRules", "resolve_mesh", "resolve_rules"]

PlanOrRules = Plan | Rules


def resolve_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh`` if given, else the concrete mesh set by ``jax.set_mesh``.

    Raises:
      ShardingError: neither is there.
    """
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise ShardingError(
                f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}",
                suggestion="build one with tx.MeshSpec(axes=...).build()",
            )
        return _check_axis_types(mesh)
    ambient = jax.sharding.get_mesh()
    if isinstance(ambient, Mesh) and not ambient.empty:
        return _check_axis_types(ambient)
    raise ShardingError(
        "no mesh given and none set with jax.set_mesh",
        suggestion="pass mesh=tx.MeshSpec(axes=('data',)).build(), or enter `with jax.set_mesh(mesh):`",
    )


def _check_axis_types(mesh: Mesh) -> Mesh:
    """A training mesh has Auto or Explicit axes; Manual axes exist only inside ``shard_map``."""
    manual = [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
              if kind not in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit)]
    if manual:
        kinds = {name: kind.name for name, kind in zip(mesh.axis_names, mesh.axis_types)}
        names = tuple(mesh.axis_names)
        raise MeshError(
            f"mesh axes {manual} are neither Auto nor Explicit (axis types: {kinds})",
            suggestion=f"build the mesh with tx.MeshSpec(axes={names!r}, shape={tuple(mesh.devices.shape)!r}, "
            "axis_types='auto' or 'explicit').build(); Titanax enters shard_map itself in manual mode "
            "(@tx.step_fn(manual=True))",
        )
    return mesh


def resolve_rules(plan_or_rules: PlanOrRules, mesh: Mesh) -> tuple[Plan | None, Rules]:
    """Validate a plan (or bare rules) against ``mesh`` and return ``(plan, rules)``."""
    if isinstance(plan_or_rules, Plan):
        plan_or_rules.validate(mesh)
        return plan_or_rules, plan_or_rules.resolved_rules()
    if isinstance(plan_or_rules, Rules):
        plan_or_rules.validate(dict(mesh.shape))
        return None, plan_or_rules
    raise PlanError(
        f"expected a tx.Plan or tx.Rules, got {type(plan_or_rules).__name__}",
        suggestion="pass tx.Plan(data_parallel=tx.DP(axis='data')) or tx.Rules([('batch', 'data')])",
    )
