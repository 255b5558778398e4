"""The optimizer factories' arguments, checked: learning rates, decay rates, weight-decay masks,
gradient clipping and moment dtypes.

Every check raises :class:`~titanax.exceptions.ConfigError` with ``owner="optimizer"``, ``field``
the argument's name and ``value`` the bad value, so a caller (``titanax run``) can say which
setting it came from without reading the text.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax

from titanax.exceptions import ConfigError

__all__ = ["LearningRate", "DecayMask", "default_decay_mask"]

LearningRate = Union[float, optax.Schedule]
"""A learning rate: a non-negative float, or an ``optax.Schedule`` (``step -> value``)."""

DecayMask = Union[str, None, Callable[[Any], Any], Any]
"""``"default"`` (decay ``ndim >= 2`` only), ``None`` (decay all), ``params -> bool tree``, or a
bool pytree shaped like the parameters."""

OWNER = "optimizer"
"""The ``owner`` of every error about a factory argument."""


def default_decay_mask(params: Any) -> Any:
    """The ``decay_mask="default"`` rule: ``True`` (decay) exactly for leaves with ``ndim >= 2``.

    Kernels and embeddings are decayed; biases, normalization scales and scalars are not.

    Args:
      params: a parameter pytree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> default_decay_mask({"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)})
      {'bias': False, 'kernel': True}
    """
    return jax.tree.map(lambda p: len(jnp.shape(p)) >= 2, params)


def check_learning_rate(value: Any, where: str) -> LearningRate:
    """``value`` as a learning rate: a schedule, a scalar float array or a float ``>= 0``.

    Args:
      value: the ``learning_rate`` argument.
      where: the factory, for the message (``tx.optim.adamw``).

    Returns:
      The schedule or array unchanged, or the number as a float.
    """
    if callable(value):
        return value  # an optax schedule: step -> value
    if isinstance(value, jax.Array) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.floating):
        return value  # a scalar array (e.g. from a config sweep)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{where}: learning_rate must be a float or an optax schedule, got {value!r} "
            f"({type(value).__name__})",
            suggestion="pass a float (learning_rate=3e-4) or a schedule "
                       "(tx.optim.warmup_cosine(3e-4, warmup_steps=..., total_steps=...))",
            owner=OWNER, field="learning_rate", value=value,
        )
    if not math.isfinite(float(value)) or value < 0:
        raise ConfigError(
            f"{where}: learning_rate must be finite and >= 0, got {value!r}",
            suggestion="optax descends by itself (updates are -lr * direction); "
                       "pass a positive learning rate",
            owner=OWNER, field="learning_rate", value=value,
        )
    return float(value)


def check_real(name: str, value: Any, where: str, *, low: float | None = None,
               high: float | None = None, low_open: bool = False, high_open: bool = False,
               hint: str | None = None) -> float:
    """``value`` as a finite float within the given bounds.

    Args:
      name: the argument's name.
      value: its value.
      where: the factory, for the message.
      low: the lower bound (``None``: none); ``low_open`` excludes it.
      high: the upper bound (``None``: none); ``high_open`` excludes it.
      low_open: whether ``low`` itself is out of range.
      high_open: whether ``high`` itself is out of range.
      hint: the suggestion (a generic one by default).

    Returns:
      The value as a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be a finite real number, got {value!r}",
                          suggestion=hint or f"pass a float for {name}", owner=OWNER, field=name, value=value)
    value = float(value)
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if bad:
        lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
        hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
        raise ConfigError(f"{where}: {name}={value!r} is out of range; need {lo}{name}{hi}",
                          suggestion=hint or f"choose {lo}{name}{hi}", owner=OWNER, field=name, value=value)
    return value


def check_beta(name: str, value: Any, where: str, typical: str) -> float:
    """An exponential-decay rate in ``[0, 1)`` (``b1``, ``b2``, ``momentum``)."""
    return check_real(name, value, where, low=0.0, high=1.0, high_open=True,
                      hint=f"{name} is an exponential-decay rate in [0, 1); typical: {name}={typical}")


def check_weight_decay(value: Any, where: str) -> float:
    """A weight-decay coefficient ``>= 0``."""
    return check_real("weight_decay", value, where, low=0.0,
                      hint="pass weight_decay >= 0 (0.0 turns weight decay off)")


def check_clip_norm(value: Any, where: str) -> float | None:
    """A positive maximum global gradient norm, or ``None`` for no clipping."""
    if value is None:
        return None
    return check_real("clip_norm", value, where, low=0.0, low_open=True,
                      hint="pass a positive maximum global gradient norm (e.g. clip_norm=1.0), "
                           "or clip_norm=None for no clipping")


def optax_mask(decay_mask: Any, where: str) -> Any:
    """optax's ``mask=`` argument for a Titanax ``decay_mask``."""
    if isinstance(decay_mask, str):
        if decay_mask == "default":
            return default_decay_mask
        raise ConfigError(
            f"{where}: unknown decay_mask {decay_mask!r}",
            suggestion='use decay_mask="default" (decay only ndim >= 2), None (decay every '
                       "parameter), a function params -> bool pytree, or a bool pytree",
            owner=OWNER, field="decay_mask", value=decay_mask,
        )
    return decay_mask  # None, a callable, or a bool pytree: optax checks the structure


def check_moment_dtype(value: Any, where: str) -> Any:
    """A floating dtype for optimizer moments, or ``None`` (each parameter's own dtype)."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ConfigError(
            f"{where}: moment_dtype={value!r} is not a dtype",
            suggestion='pass a float dtype such as "float32" or "bfloat16", or None to keep '
                       "moments in each parameter's dtype",
            owner=OWNER, field="moment_dtype", value=value,
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(
            f"{where}: moment_dtype must be a floating dtype, got {dtype}",
            suggestion="pass a float dtype (float32, bfloat16, float16), or None to keep "
                       "moments in each parameter's dtype",
            owner=OWNER, field="moment_dtype", value=value,
        )
    return dtype


def with_clipping(opt: optax.GradientTransformation, clip_norm: float | None, *,
                  learning_rate: LearningRate | None = None) -> optax.GradientTransformation:
    """``opt`` after ``optax.clip_by_global_norm(clip_norm)`` (clipping the raw gradients), or
    ``opt`` itself for ``clip_norm=None``; remembering ``learning_rate`` when given."""
    if clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    if learning_rate is None:
        return opt
    from titanax.optim.learning_rate import with_learning_rate

    return with_learning_rate(opt, learning_rate)
