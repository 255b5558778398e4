"""Typed optimizer factories over optax, with the defaults Titanax guarantees.

Each factory returns an ``optax.GradientTransformation`` whose state is optax's own (nothing
Titanax-specific is in it, so Orbax checkpoints and optax utilities work on it unchanged); the
transformation also remembers its learning rate, which :func:`~titanax.optim.learning_rate` reads
for the logged ``lr``. What they add over calling
optax directly:

* **Validated arguments.** A negative learning rate, ``b1 >= 1``, ``nesterov=True`` without
  momentum, an unknown ``decay_mask`` ... raise :class:`~titanax.exceptions.ConfigError` with a
  suggestion instead of training silently wrong (``owner="optimizer"``, ``field`` the argument;
  the checks live in :mod:`titanax.optim.arguments`).
* **Weight decay skips biases and norm scales by default.** ``decay_mask="default"`` decays only
  parameters with ``ndim >= 2`` (kernels, embeddings); biases, LayerNorm/RMSNorm scales and scalars
  are not decayed. ``decay_mask=None`` decays every parameter (optax's own default); a callable
  ``params -> bool tree`` or a bool pytree shaped like the parameters is passed to optax as is.
* **Gradient clipping by global norm first.** ``clip_norm=c`` chains
  ``optax.clip_by_global_norm(c)`` *before* the optimizer, so the norm is that of the raw
  gradients.
* **Moments in the parameters' dtype unless asked.** ``moment_dtype=None`` (the default) keeps
  every optimizer moment in its parameter's dtype: optax's ``mu_dtype=None`` creates the first
  moment with ``zeros_like(param)``, and the second moment always uses the parameter dtype. A
  reduced-precision first moment (e.g. ``moment_dtype="bfloat16"``) happens only when passed
  explicitly. The second moment (``nu``) is never reduced: optax offers no knob for it, and its
  squared-gradient range is what bfloat16 loses first.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import optax

from titanax.exceptions import ConfigError, TitanaxError
from titanax.optim.arguments import (
    DecayMask,
    LearningRate,
    check_beta,
    check_clip_norm,
    check_learning_rate,
    check_moment_dtype,
    check_real,
    check_weight_decay,
    optax_mask,
    with_clipping,
)

__all__ = ["adamw", "adam", "sgd", "lion", "adafactor", "as_optimizer", "OPTIMIZERS"]

# --------------------------------------------------------------------------- factories

def adamw(
    learning_rate: LearningRate,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    decay_mask: DecayMask = "default",
    clip_norm: float | None = None,
    moment_dtype: Any = None,
) -> optax.GradientTransformation:
    """AdamW (Adam with decoupled weight decay), optionally after global-norm gradient clipping.

    The update for a decayed parameter ``p`` is ``-lr * (adam_direction + weight_decay * p)``;
    with zero gradients a decayed kernel therefore shrinks by ``lr * weight_decay * p`` per step.

    Args:
      learning_rate: a float or an ``optax.Schedule`` (see :mod:`titanax.optim.schedules`).
      b1: decay rate of the first moment, in ``[0, 1)``.
      b2: decay rate of the second moment, in ``[0, 1)``.
      eps: added to the denominator, ``> 0``.
      weight_decay: decoupled weight-decay coefficient, ``>= 0``.
      decay_mask: which parameters are decayed. ``"default"``: only those with ``ndim >= 2``
        (no decay on biases, normalization scales or scalars); ``None``: all; a callable
        ``params -> bool pytree``; or a bool pytree shaped like the parameters.
      clip_norm: if given, gradients are first clipped to this global norm.
      moment_dtype: dtype of the first moment. ``None`` (default) keeps it in each parameter's
        dtype; a reduced precision (``"bfloat16"``) only when passed. The second moment always
        stays in the parameter dtype.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ConfigError: for an out-of-range or mistyped argument.

    Example:
      >>> import titanax as tx
      >>> opt = tx.optim.adamw(tx.optim.warmup_cosine(3e-4, warmup_steps=100, total_steps=10_000),
      ...                      weight_decay=0.1, clip_norm=1.0)
      >>> # state = opt.init(params); updates, state = opt.update(grads, state, params)
    """
    where = "tx.optim.adamw"
    lr = check_learning_rate(learning_rate, where)
    opt = optax.adamw(
        learning_rate=lr,
        b1=check_beta("b1", b1, where, "0.9"),
        b2=check_beta("b2", b2, where, "0.999 (0.95 for large language models)"),
        eps=check_real("eps", eps, where, low=0.0, low_open=True, hint="pass a small positive eps, e.g. 1e-8"),
        mu_dtype=check_moment_dtype(moment_dtype, where),
        weight_decay=check_weight_decay(weight_decay, where),
        mask=optax_mask(decay_mask, where),
    )
    return with_clipping(opt, check_clip_norm(clip_norm, where), learning_rate=lr)


def adam(
    learning_rate: LearningRate,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    moment_dtype: Any = None,
) -> optax.GradientTransformation:
    """Adam without weight decay, optionally after global-norm gradient clipping.

    Args:
      learning_rate: a float or an ``optax.Schedule``.
      b1: decay rate of the first moment, in ``[0, 1)``.
      b2: decay rate of the second moment, in ``[0, 1)``.
      eps: added to the denominator, ``> 0``.
      clip_norm: if given, gradients are first clipped to this global norm.
      moment_dtype: dtype of the first moment; ``None`` keeps each parameter's dtype.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ConfigError: for an out-of-range or mistyped argument.

    Example:
      >>> import titanax as tx
      >>> opt = tx.optim.adam(1e-3, clip_norm=1.0)
    """
    where = "tx.optim.adam"
    opt = optax.adam(
        learning_rate=(lr := check_learning_rate(learning_rate, where)),
        b1=check_beta("b1", b1, where, "0.9"),
        b2=check_beta("b2", b2, where, "0.999"),
        eps=check_real("eps", eps, where, low=0.0, low_open=True, hint="pass a small positive eps, e.g. 1e-8"),
        mu_dtype=check_moment_dtype(moment_dtype, where),
    )
    return with_clipping(opt, check_clip_norm(clip_norm, where), learning_rate=lr)


def sgd(
    learning_rate: LearningRate,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_mask: DecayMask = "default",
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Weight decay is added to the gradient before momentum (``g + weight_decay * p``, the classic
    SGD formulation), on the parameters selected by ``decay_mask``. The momentum buffer is kept
    in each parameter's dtype.

    Args:
      learning_rate: a float or an ``optax.Schedule``.
      momentum: momentum decay in ``[0, 1)``, or ``None`` for plain SGD (no state).
      nesterov: use Nesterov momentum (needs ``momentum``).
      weight_decay: L2 coefficient, ``>= 0``; ``0.0`` (default) adds nothing.
      decay_mask: which parameters are decayed; see :func:`adamw`.
      clip_norm: if given, gradients are first clipped to this global norm.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ConfigError: for an out-of-range or mistyped argument, or ``nesterov=True`` without
        momentum.

    Example:
      >>> import titanax as tx
      >>> opt = tx.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    """
    where = "tx.optim.sgd"
    lr = check_learning_rate(learning_rate, where)
    if momentum is not None:
        momentum = check_beta("momentum", momentum, where, "0.9")
    if not isinstance(nesterov, bool):
        raise ConfigError(f"{where}: nesterov must be True or False, got {nesterov!r}",
                          suggestion="pass nesterov=True or nesterov=False",
                          owner="optimizer", field="nesterov", value=nesterov)
    if nesterov and momentum is None:
        raise ConfigError(f"{where}: nesterov=True needs momentum, but momentum=None",
                          suggestion="pass momentum=0.9 (for example) with nesterov=True",
                          owner="optimizer", field=("nesterov", "momentum"), value=(nesterov, momentum))
    wd = check_weight_decay(weight_decay, where)
    mask = optax_mask(decay_mask, where)
    parts = []
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=mask))
    parts.append(optax.sgd(learning_rate=lr, momentum=momentum, nesterov=nesterov))
    opt = parts[0] if len(parts) == 1 else optax.chain(*parts)
    return with_clipping(opt, check_clip_norm(clip_norm, where), learning_rate=lr)


def lion(
    learning_rate: LearningRate,
    *,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    decay_mask: DecayMask = "default",
    clip_norm: float | None = None,
    moment_dtype: Any = None,
) -> optax.GradientTransformation:
    """Lion (sign of an interpolated momentum) with decoupled weight decay.

    Lion's updates have unit magnitude per element, so its learning rate is typically 3-10x
    smaller than AdamW's and its weight decay 3-10x larger.

    Args:
      learning_rate: a float or an ``optax.Schedule``.
      b1: interpolation rate for the update direction, in ``[0, 1)``.
      b2: decay rate of the momentum, in ``[0, 1)``.
      weight_decay: decoupled weight-decay coefficient, ``>= 0``.
      decay_mask: which parameters are decayed; see :func:`adamw`.
      clip_norm: if given, gradients are first clipped to this global norm.
      moment_dtype: dtype of the momentum; ``None`` keeps each parameter's dtype.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ConfigError: for an out-of-range or mistyped argument.

    Example:
      >>> import titanax as tx
      >>> opt = tx.optim.lion(1e-4, weight_decay=1e-2)
    """
    where = "tx.optim.lion"
    opt = optax.lion(
        learning_rate=(lr := check_learning_rate(learning_rate, where)),
        b1=check_beta("b1", b1, where, "0.9"),
        b2=check_beta("b2", b2, where, "0.99"),
        mu_dtype=check_moment_dtype(moment_dtype, where),
        weight_decay=check_weight_decay(weight_decay, where),
        mask=optax_mask(decay_mask, where),
    )
    return with_clipping(opt, check_clip_norm(clip_norm, where), learning_rate=lr)


def adafactor(
    learning_rate: LearningRate,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    weight_decay: float | None = None,
    decay_mask: DecayMask = "default",
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    eps: float = 1e-30,
    clip_norm: float | None = None,
    moment_dtype: Any = None,
) -> optax.GradientTransformation:
    """Adafactor (factored second moments), a thin wrapper over ``optax.adafactor``.

    Factored statistics are kept in each parameter's dtype. Note optax's Adafactor applies
    ``weight_decay`` after the learning rate (the decay is *not* scaled by it).

    Args:
      learning_rate: a float or an ``optax.Schedule``.
      decay_rate: exponent of the second-moment decay schedule (optax's ``decay_rate``).
      clipping_threshold: per-block RMS clipping of updates, or ``None`` for none.
      momentum: first-moment decay in ``[0, 1)``, or ``None`` (default: no first moment).
      weight_decay: decay rate, or ``None`` for none.
      decay_mask: which parameters are decayed; see :func:`adamw`.
      factored: factor the second moment of matrices.
      min_dim_size_to_factor: only factor dimensions at least this large.
      eps: regularizer added to the squared gradients.
      clip_norm: if given, gradients are first clipped to this global norm.
      moment_dtype: dtype of the momentum buffer (when ``momentum`` is set); ``None`` keeps each
        parameter's dtype (optax alone would use float32).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ConfigError: for an out-of-range or mistyped argument.

    Example:
      >>> import titanax as tx
      >>> opt = tx.optim.adafactor(1e-2, momentum=0.9)
    """
    where = "tx.optim.adafactor"
    lr = check_learning_rate(learning_rate, where)
    if clipping_threshold is not None:
        clipping_threshold = check_real("clipping_threshold", clipping_threshold, where, low=0.0,
                                   low_open=True, hint="pass a positive threshold or None")
    if momentum is not None:
        momentum = check_beta("momentum", momentum, where, "0.9")
    if weight_decay is not None:
        weight_decay = check_weight_decay(weight_decay, where)
    if isinstance(min_dim_size_to_factor, bool) or not isinstance(min_dim_size_to_factor, int) \
            or min_dim_size_to_factor < 1:
        raise ConfigError(f"{where}: min_dim_size_to_factor must be an int >= 1, got "
                          f"{min_dim_size_to_factor!r}", suggestion="e.g. min_dim_size_to_factor=128",
                          owner="optimizer", field="min_dim_size_to_factor", value=min_dim_size_to_factor)
    opt = optax.adafactor(
        learning_rate=lr,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=check_real("decay_rate", decay_rate, where, low=0.0, low_open=True,
                         hint="pass a positive decay_rate (optax default 0.8)"),
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        dtype_momentum=check_moment_dtype(moment_dtype, where),
        weight_decay_rate=weight_decay,
        eps=check_real("eps", eps, where, low=0.0, low_open=True, hint="pass a small positive eps"),
        factored=bool(factored),
        weight_decay_mask=optax_mask(decay_mask, where) if weight_decay else None,
    )
    return with_clipping(opt, check_clip_norm(clip_norm, where), learning_rate=lr)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": adamw, "adam": adam, "sgd": sgd, "lion": lion, "adafactor": adafactor}
"""The factories by name (``optimizer.name`` in a run configuration)."""


# --------------------------------------------------------------------------- as_optimizer

def as_optimizer(obj: Any) -> optax.GradientTransformation:
    """Check that ``obj`` is an optax optimizer and return it unchanged.

    Any ``optax.GradientTransformation`` (including ``optax.GradientTransformationExtraArgs``,
    chains and the factories of :mod:`titanax.optim`) is returned as is. Anything else raises with
    a suggestion: a bare learning rate, an uncalled factory, a ``flax.nnx.Optimizer`` (Titanax
    keeps the optimizer state itself, sharded like the parameters), an ``optax.MultiSteps``
    wrapper (use ``tx.DP(accumulate_steps=k)``) or an ``(init, update)`` tuple.

    Args:
      obj: the optimizer to check.

    Returns:
      ``obj``, typed as an ``optax.GradientTransformation``.

    Raises:
      TitanaxError: if ``obj`` is not an optax gradient transformation.

    Example:
      >>> import optax, titanax as tx
      >>> opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
      >>> tx.optim.as_optimizer(opt) is opt
      True
    """
    if isinstance(obj, optax.GradientTransformation):
        if not (callable(obj.init) and callable(obj.update)):
            raise TitanaxError(
                "optimizer: GradientTransformation whose init/update are not callable",
                suggestion="build it as optax.GradientTransformation(init_fn, update_fn)")
        return obj
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, optax.MultiSteps):
        raise TitanaxError(
            "optimizer: got an optax.MultiSteps wrapper; Titanax accumulates gradients itself",
            suggestion="pass the inner optimizer and set tx.DP(axis=..., accumulate_steps=k); "
                       "or, to keep optax's accumulation, pass multi_steps.gradient_transformation()")
    if _is_nnx_optimizer(obj):
        raise TitanaxError(
            f"optimizer: got a flax.nnx.Optimizer ({kind}); Titanax creates and shards the "
            "optimizer state itself",
            suggestion="pass the optax transformation you gave nnx.Optimizer, e.g. "
                       "optimizer=tx.optim.adamw(3e-4) or optax.adamw(3e-4)")
    if isinstance(obj, (numbers.Number, jax.Array)) and not isinstance(obj, bool):
        raise TitanaxError(
            f"optimizer: got the number {obj!r}, not an optimizer",
            suggestion=f"wrap the learning rate in an optimizer: tx.optim.adamw({obj!r}) or "
                       f"tx.optim.sgd({obj!r})")
    if isinstance(obj, str):
        raise TitanaxError(
            f"optimizer: got the string {obj!r}, not an optimizer",
            suggestion="build one: tx.optim.adamw(3e-4), tx.optim.sgd(0.1, momentum=0.9), ...")
    if callable(obj) and not hasattr(obj, "init"):
        name = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
        raise TitanaxError(
            f"optimizer: got the callable {name!r}, not an optimizer (a factory not yet called?)",
            suggestion=f"call it with a learning rate: {name}(3e-4)")
    if isinstance(obj, tuple) and len(obj) == 2 and all(callable(f) for f in obj):
        raise TitanaxError(
            "optimizer: got a plain (init, update) tuple",
            suggestion="wrap it: optax.GradientTransformation(init_fn, update_fn)")
    raise TitanaxError(
        f"optimizer: expected an optax.GradientTransformation, got {kind}",
        suggestion="pass tx.optim.adamw(...), tx.optim.sgd(...) or any optax optimizer "
                   "(optax.adamw(...), optax.chain(...))")


def _is_nnx_optimizer(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return isinstance(obj, nnx.Optimizer)
