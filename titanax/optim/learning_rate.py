"""The learning rate an optimizer applied at its latest update, for the logged ``lr``.

optax keeps a schedule inside the update function, out of reach; the factories of
:mod:`titanax.optim` therefore hand back a transformation that also remembers its learning rate
(:func:`with_learning_rate`), evaluated at the update count optax keeps in the optimizer state.
An optimizer made with ``optax.inject_hyperparams`` carries the value in its state already.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

__all__ = ["learning_rate", "with_learning_rate"]


class _WithLearningRate(optax.GradientTransformationExtraArgs):
    """An optax transformation that remembers the learning rate it was built with.

    Its fields are optax's own (``init``, ``update``), so optax, ``jax.jit`` and equality see the
    plain transformation; the learning rate is an attribute beside them.
    """

    learning_rate: Any


def with_learning_rate(opt: optax.GradientTransformation, lr: Any) -> optax.GradientTransformation:
    """``opt``, remembering ``lr`` (a float or an ``optax.Schedule``) for :func:`learning_rate`."""
    opt = optax.with_extra_args_support(opt)
    out = _WithLearningRate(opt.init, opt.update)
    out.learning_rate = lr
    return out


def _find(tree: Any, kind: type) -> list[Any]:
    return [node for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
            if isinstance(node, kind)]


def learning_rate(optimizer: optax.GradientTransformation, opt_state: Any) -> float | None:
    """The learning rate of ``optimizer``'s latest update (its first, before any).

    Args:
      optimizer: the optimizer; a factory of :mod:`titanax.optim` or one made with
        ``optax.inject_hyperparams`` is understood, others give ``None``.
      opt_state: its state (sharded arrays are fine: only a scalar is fetched).

    Returns:
      The learning rate as a float, or ``None`` when it cannot be known.

    Example:
      >>> import titanax as tx, jax.numpy as jnp
      >>> opt = tx.optim.sgd(tx.optim.warmup_linear(1.0, warmup_steps=10, total_steps=20))
      >>> state = opt.init({"w": jnp.zeros(2)})
      >>> for _ in range(3):
      ...     _, state = opt.update({"w": jnp.ones(2)}, state)
      >>> round(learning_rate(opt, state), 3)   # the third update's rate
      0.2
    """
    injected = [s for s in _find(opt_state, optax.InjectHyperparamsState) if "learning_rate" in s.hyperparams]
    if injected:
        return float(jax.device_get(injected[0].hyperparams["learning_rate"]))
    lr = getattr(optimizer, "learning_rate", None)
    if lr is None:
        return None
    if not callable(lr):
        return float(lr)
    counts = _find(opt_state, optax.ScaleByScheduleState)
    if not counts:
        return None
    count = int(np.asarray(jax.device_get(counts[0].count)))
    return float(lr(max(count - 1, 0)))
