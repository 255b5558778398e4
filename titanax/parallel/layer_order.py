"""Pipeline order: how a ``tx.nn.LayerStack`` is stored under ``PP(repeats=v)`` with ``v > 1``.

The stack's leaves are ``[L, ...]`` with ``layers`` on dim 0, split over the pipeline mesh axis
in contiguous blocks of ``L / p``. With ``p`` stages, ``v`` repeats and ``Lc = L / (v p)`` layers
per chunk, stage ``s`` runs chunks ``s, p + s, 2p + s, ...``; in natural order those are spread
over every device, so each step would move the whole stack (and its gradients) between devices.
In pipeline order the stored index ``q = s (v Lc) + r Lc + k`` holds the natural layer
``n = (r p + s) Lc + k`` (stage ``s``, repeat ``r``, layer ``k`` of the chunk): each device's
contiguous block is exactly its chunks, in the order it runs them.

``tx.shard`` stores the stack in pipeline order under such a plan (``ShardedModel.layer_order``);
checkpoints are always written in natural order (:mod:`titanax.io.checkpoint`), so they restore
under any plan. With ``v = 1`` (or ``p = 1``) both orders coincide.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from titanax.exceptions import PlanError
from titanax.nn.stack import LAYERS
from titanax.parallel.annotations import tree_leaves
from titanax.parallel.opt_slots import kept_dims, map_param_slots
from titanax.parallel.layout import Layout, path_string

__all__ = ["LayerOrder", "layer_order_for", "stack_paths"]

_NATURAL, _PIPELINE = "natural", "pipeline"


@dataclasses.dataclass(frozen=True)
class LayerOrder:
    """Where each layer of the stack is stored: pipeline order for ``stages`` x ``repeats``.

    Hashable (a static field of ``TrainState``, hence of every jitted step).

    Attributes:
      num_layers: ``L``, the stack's leading dimension.
      stages: ``p``.
      repeats: ``v``.
      paths: the ``/``-joined paths (as :func:`~titanax.parallel.layout.path_string` writes
        them) of the stack's leaves, relative to the model's state: the same paths in the
        parameters tree and in the model-state tree.
    """

    num_layers: int
    stages: int
    repeats: int
    paths: tuple[str, ...]

    def __post_init__(self) -> None:
        chunks = self.stages * self.repeats
        if self.stages < 1 or self.repeats < 1 or self.num_layers % chunks:
            raise PlanError(
                f"the layer stack has {self.num_layers} layers, which do not split into {self.stages} "
                f"stages x {self.repeats} repeats ({chunks} equal chunks)",
                suggestion=f"use a layer count that is a multiple of {chunks}, or change PP(stages=, repeats=)",
            )

    @property
    def layers_per_chunk(self) -> int:
        """``Lc = L / (v p)``."""
        return self.num_layers // (self.stages * self.repeats)

    @property
    def permutation(self) -> np.ndarray:
        """``permutation[q]`` is the natural layer stored at index ``q`` (``stored = natural[perm]``)."""
        v, p, lc = self.repeats, self.stages, self.layers_per_chunk
        return np.arange(self.num_layers).reshape(v, p, lc).swapaxes(0, 1).reshape(-1)

    @property
    def is_identity(self) -> bool:
        """Whether both orders coincide (one repeat or one stage)."""
        return self.repeats == 1 or self.stages == 1

    # -------------------------------------------------------------------------- conversions
    def to_natural(self, params: Any, opt_state: Any = None,
                   optimizer: Any = None) -> tuple[Any, Any]:
        """Stack leaves (and the optimizer slots that mirror them) from pipeline to natural order.

        Args:
          params: a tree with the model's paths (parameters; the model state works too) holding
            the stack in pipeline order. Arrays keep their shardings (the conversion runs as one
            ``jax.jit`` whose ``out_shardings`` are the inputs'); traced values are converted in
            place of the trace; ``jax.ShapeDtypeStruct``s come back as they are (shapes do not
            change).
          opt_state: an optimizer state for ``params``, or ``None``.
          optimizer: the optax transformation ``opt_state`` belongs to (needed with ``opt_state``).

        Returns:
          ``(params, opt_state)`` in natural order.

        Raises:
          PlanError: a stack leaf's dim 0 is not ``num_layers``; ``opt_state`` without ``optimizer``.
        """
        return self._convert(params, opt_state, optimizer, _NATURAL)

    def to_pipeline(self, params: Any, opt_state: Any = None,
                    optimizer: Any = None) -> tuple[Any, Any]:
        """The inverse of :meth:`to_natural` (same arguments): natural to pipeline order."""
        return self._convert(params, opt_state, optimizer, _PIPELINE)

    def _reorder(self, x: Any, to: str) -> Any:
        """One ``[L, ...]`` array in the other order: a reshape and a transpose of the chunk grid."""
        v, p, lc = self.repeats, self.stages, self.layers_per_chunk
        grid = (v, p) if to == _PIPELINE else (p, v)  # natural is [v, p, Lc], pipeline [p, v, Lc]
        return x.reshape(*grid, lc, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    def _convert(self, params: Any, opt_state: Any, optimizer: Any, to: str) -> tuple[Any, Any]:
        if self.is_identity:
            return params, opt_state
        param_flags = self._param_flags(params)
        trees, flags = [params], list(param_flags)
        if opt_state is not None:
            if optimizer is None:
                raise PlanError("converting an optimizer state between layer orders needs its optimizer",
                                suggestion="pass optimizer= (e.g. state.optimizer)")
            trees.append(opt_state)
            flags += _slot_flags(optimizer, opt_state, params, param_flags, self.num_layers)
        leaves, treedef = jax.tree.flatten(tuple(trees))
        if len(leaves) != len(flags):  # a slot tree that optax.tree_map_params could not mirror
            raise PlanError(f"cannot match the optimizer state's {len(leaves) - len(param_flags)} "
                            f"arrays to its parameters' {len(param_flags)}",
                            suggestion="report this optimizer: its state does not mirror its parameters")
        chosen = [i for i, flag in enumerate(flags) if flag]
        if not chosen or any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            return params, opt_state  # nothing to move, or shapes only (they do not change)
        selected = tuple(leaves[i] for i in chosen)
        if any(isinstance(x, jax.core.Tracer) for x in selected) or not all(
                isinstance(x, jax.Array) for x in selected):
            moved = tuple(self._reorder(x, to) for x in selected)  # inside a trace, or host arrays
        else:
            moved = _reorderer(self, to, tuple(x.sharding for x in selected))(selected)
        for i, x in zip(chosen, moved):
            leaves[i] = x
        out = jax.tree.unflatten(treedef, leaves)
        return out[0], (out[1] if opt_state is not None else opt_state)

    def _param_flags(self, params: Any) -> list[bool]:
        """Per leaf of ``params``: whether it is a stack leaf (checked to be ``[L, ...]``)."""
        flags = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            is_stack = path_string(path) in self.paths
            shape = tuple(getattr(leaf, "shape", ()))
            if is_stack and (not shape or shape[0] != self.num_layers):
                raise PlanError(
                    f"stack array {path_string(path)!r} has shape {shape}, not "
                    f"[{self.num_layers}, ...]: it cannot be put in pipeline order",
                    suggestion="give only the tx.nn.LayerStack's layer axis the logical name 'layers'",
                )
            flags.append(is_stack)
        return flags


@functools.lru_cache(maxsize=64)
def _reorderer(order: LayerOrder, to: str, shardings: tuple[Any, ...]) -> Any:
    """One jitted conversion per (order, direction, layout), kept so that saves do not retrace."""
    return jax.jit(lambda xs: tuple(order._reorder(x, to) for x in xs), out_shardings=shardings)


def _slot_flags(optimizer: Any, opt_state: Any, params: Any, param_flags: list[bool],
                num_layers: int) -> list[bool]:
    """Per leaf of ``opt_state``: whether it is a slot of a stack parameter whose dim 0 is still
    the layer dim (Adam's moments; a factored slot that kept dim 0).

    A slot that dropped the layer dim (a factored statistic reduced over layers) holds nothing per
    layer and is left as it is; so is every non-parameter leaf (step counts). Slots are found as
    :func:`titanax.exec.state.opt_state_shardings` finds them (:func:`map_param_slots`).
    A factored slot whose shape matches the parameter's in two ways (e.g. ``[L]`` of an
    ``[L, L]`` parameter) is taken to keep dim 0.
    """
    def keeps_layers(slot: Any, param: Any, flag: bool) -> bool:
        if not flag or not hasattr(slot, "shape"):
            return False
        slot_shape, param_shape = tuple(slot.shape), tuple(param.shape)
        if slot_shape == param_shape:
            return True
        kept = kept_dims(slot_shape, param_shape)
        return bool(kept) and kept[0] == 0 and slot_shape[0] == num_layers

    flag_tree = jax.tree.unflatten(jax.tree.structure(params), param_flags)
    return list(jax.tree.leaves(map_param_slots(optimizer, keeps_layers, opt_state, params, flag_tree,
                                                other=lambda _: False)))


def stack_paths(layout_or_state: Layout | Any) -> tuple[str, ...]:
    """The paths of the leaves whose logical names start with ``layers`` (the stack's).

    Args:
      layout_or_state: a :class:`~titanax.parallel.layout.Layout` (names after path rules), or
        a state whose leaves carry annotations (an ``nnx.State``; names from the annotations).

    Returns:
      The paths, in tree order.
    """
    if isinstance(layout_or_state, Layout):
        entries: Sequence[Any] = layout_or_state.entries
    else:
        entries = tree_leaves(layout_or_state)
    return tuple(e.path for e in entries if e.names and e.names[0] == LAYERS and e.shape)


def layer_order_for(plan: Any, layout: Layout, prefix: str | None = None) -> LayerOrder | None:
    """The :class:`LayerOrder` a plan stores its stack in, or ``None`` (natural order: no
    pipeline, or ``repeats == 1``).

    Args:
      plan: the :class:`~titanax.Plan` (or ``None``).
      layout: the model's layout (its ``layers`` leaves are the stack).
      prefix: the stack's parameter path prefix (``PipelinedStack.param_prefix``): every leaf
        under it is the stack's, named or not; without it the ``layers`` names decide.

    Returns:
      The order, or ``None``.

    Raises:
      PlanError: no leaf is named ``layers``, or the stack's leaves differ in length.
    """
    pp = getattr(plan, "pipeline_parallel", None)
    if pp is None or pp.repeats == 1:
        return None
    paths = stack_paths(layout) if prefix is None else \
        tuple(e.path for e in layout.entries if e.path.startswith(prefix) and e.shape)
    lengths = {layout[path].shape[0] for path in paths}
    if len(lengths) != 1:
        problem = ("no array of the model has the logical name 'layers' on its first dimension"
                   if not lengths else f"the arrays named 'layers' have {sorted(lengths)} layers")
        raise PlanError(
            f"PP(repeats={pp.repeats}) stores the tx.nn.LayerStack in pipeline order, but {problem}",
            suggestion="keep the LayerStack's 'layers' name (path rules must not rename its first "
            "dimension), or use PP(repeats=1)",
        )
    return LayerOrder(lengths.pop(), pp.stages, pp.repeats, paths)
