"""``tx.value_and_grad``: ``jax.value_and_grad`` that also runs 1F1B pipelines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from titanax.exceptions import PlanError
from titanax.parallel import pipeline_explicit

__all__ = ["value_and_grad"]


def value_and_grad(loss_fn: Callable[..., Any], *, has_aux: bool = False,
                   batch_argnum: int = -1) -> Callable[..., tuple[Any, Any]]:
    """Loss and gradient with respect to the first argument, whatever the plan.

    Without a pipeline, or under ``gpipe``/``circular``, this is ``jax.value_and_grad``. Under
    ``PP(schedule="1f1b" | "interleaved" | "zbh1")`` the model's pipelined layer stack runs forward and
    backward together, one microbatch at a time, with the rest of the model (head and loss) on the
    last stage: the loss must be a mean over the examples of the batch argument, which is split into
    the plan's microbatches along its first dimension.

    Args:
      loss_fn: ``(params, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      has_aux: ``loss_fn`` also returns auxiliary data (not under 1f1b/interleaved/zbh1).
      batch_argnum: which positional argument of ``loss_fn`` is the batch (default the last).

    Returns:
      ``(params, *args) -> (loss, grads)``, as ``jax.value_and_grad``.

    Example:
      >>> @tx.step_fn                                                       # doctest: +SKIP
      ... def train_step(state, batch):
      ...     loss, grads = tx.value_and_grad(loss_fn)(state.params, state, batch)
      ...     return state.apply_gradients(grads=grads), {"loss": loss}
    """

    def run(params: Any, *args: Any) -> tuple[Any, Any]:
        if not has_aux:
            explicit = pipeline_explicit.value_and_grad(loss_fn, params, args, batch_argnum)
            if explicit is not None:
                return explicit
        elif pipeline_explicit.needs_explicit(loss_fn, params, args):
            raise PlanError("tx.value_and_grad(has_aux=True) cannot run a 1f1b/interleaved/zbh1 pipeline",
                            suggestion="return only the loss, and compute other metrics in a separate "
                            "forward pass, or use schedule='gpipe'/'circular'")
        return jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)

    return run
