"""``PipelinedStack``: what ``tx.shard`` puts in place of a model's ``tx.nn.LayerStack`` under ``PP``.

The transform is explicit and visible: after ``tx.shard(model, plan_with_pp, mesh)`` the model's
stack attribute *is* a :class:`PipelinedStack` (``print(sm.module)`` shows it), holding the same
variables under the same names (checkpoints and layouts do not change), plus the plan's ``PP``
part and the mesh. Called plainly it runs the pipeline's forward loop; inside
``tx.value_and_grad`` (``titanax.parallel.pipeline_explicit``) an explicit schedule runs forward
and backward together. ``tx.nn.LayerStack`` itself knows nothing of pipelines.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from titanax.exceptions import PlanError
from titanax.nn.stack import LayerStack
from titanax.parallel.context import current_stack_split
from titanax.parallel.pipeline import pipeline_forward

__all__ = ["PipelinedStack", "find_pipelined_stack", "pipeline_model"]


class PipelinedStack(LayerStack):
    """A ``LayerStack`` whose layers run as the stages of the plan's pipeline.

    Attributes:
      layer: the stacked block (leaves ``[num_layers, ...]``, in pipeline order: see
        ``titanax.parallel.layer_order``).
      pp: the plan's ``tx.PP``.
      mesh: the mesh whose ``pp.axis`` the stages are split over.
      path: where the stack sits in the model (``("blocks",)``): its parameters are the model
        parameters under ``path + ("layer",)``.
    """

    def __init__(self, stack: LayerStack, pp: Any, mesh: Mesh, path: tuple[Any, ...]) -> None:
        # Not LayerStack.__init__: the layers exist already; they are taken over, not rebuilt.
        self.layer = stack.layer
        self.num_layers = stack.num_layers
        self.unroll = stack.unroll
        self.remat = stack.remat
        self.pp = pp
        self.mesh = mesh
        self.path = tuple(path)

    def __call__(self, x: jax.Array) -> jax.Array:
        layer, params = self.layer_fn()
        split = current_stack_split()
        if split is not None:
            return split.record(self, x, params)
        with jax.named_scope(f"{type(self.layer).__name__}_pipeline"):
            return pipeline_forward(layer, params, x, self.pp, self.mesh, unroll=self.unroll)

    @property
    def param_prefix(self) -> str:
        """The ``/``-joined path every parameter of the stack starts with (``"blocks/layer/"``)."""
        return "/".join(str(k) for k in (*self.path, "layer")) + "/"


def _stacks(module: Any) -> list[tuple[tuple[Any, ...], LayerStack]]:
    return [(tuple(path), node) for path, node in nnx.iter_graph(module) if isinstance(node, LayerStack)]


def pipeline_model(module: Any, pp: Any, mesh: Mesh) -> Any:
    """Replace the model's one ``tx.nn.LayerStack`` by a :class:`PipelinedStack` (in place).

    Args:
      module: the NNX model (built, or abstract from ``nnx.eval_shape``).
      pp: the plan's ``tx.PP``.
      mesh: the mesh.

    Returns:
      The model (the same object, unless the model *is* the stack).

    Raises:
      PlanError: the model holds no stack or several, or the stack's layers do not split into
        ``stages * repeats`` chunks.
    """
    stacks = _stacks(module)
    if len(stacks) != 1:
        raise PlanError(
            f"pipeline parallelism needs exactly one tx.nn.LayerStack in the model; found {len(stacks)}",
            suggestion="hold the repeated block in one tx.nn.LayerStack(make_block, num_layers, rngs=rngs), "
            "or drop pipeline_parallel from the plan",
        )
    path, stack = stacks[0]
    chunks = pp.stages * pp.repeats
    if stack.num_layers % chunks:
        raise PlanError(
            f"the layer stack has {stack.num_layers} layers, which do not split into {pp.stages} stages x "
            f"{pp.repeats} repeats ({chunks} equal chunks)",
            suggestion=f"use a layer count that is a multiple of {chunks}, or change PP(stages=, repeats=)",
        )
    pipelined = PipelinedStack(stack, pp, mesh, path)
    if not path:
        return pipelined
    parent = module
    for key in path[:-1]:
        parent = getattr(parent, key) if isinstance(key, str) and hasattr(parent, key) else parent[key]
    if isinstance(path[-1], str) and hasattr(parent, path[-1]):
        setattr(parent, path[-1], pipelined)
    else:
        parent[path[-1]] = pipelined
    return module


def find_pipelined_stack(model: Any) -> PipelinedStack:
    """The :class:`PipelinedStack` of a sharded model (``tx.shard`` under ``PP``) or of a module.

    Raises:
      PlanError: there is none (the plan has no ``PP``).
    """
    if isinstance(model, PipelinedStack):
        return model
    module = getattr(model, "module", model)
    found = [node for _, node in nnx.iter_graph(module) if isinstance(node, PipelinedStack)]
    if len(found) != 1:
        raise PlanError("the model has no pipelined layer stack",
                        suggestion="shard the model with a plan that has pipeline_parallel=tx.PP(...)")
    return found[0]
