"""Learning-rate schedules: validated, named by what they do, built from optax's own schedules.

Every function returns an ``optax.Schedule`` (a function from the step count to a value), so the
result can be passed as ``learning_rate=`` to any factory in :mod:`titanax.optim` or to optax.
Bad arguments (a negative step count, warm-up longer than the run, a NaN value) raise
:class:`~titanax.exceptions.ConfigError` with a suggestion, before anything is traced; its
``owner`` is ``"schedule"`` and its ``field`` the argument (``peak_value``, ``total_steps``, ...).
:data:`LR_SCHEDULES` names them (``optimizer.schedule`` in a run configuration).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable

import optax

from titanax.exceptions import ConfigError

__all__ = ["warmup_cosine", "warmup_linear", "constant", "LR_SCHEDULES"]

OWNER = "schedule"
"""The ``owner`` of every error about a schedule's argument."""


def _value(name: str, value: Any, where: str) -> float:
    """A finite, non-negative Python float, or a ConfigError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{where}: {name} must be a real number, got {value!r} ({type(value).__name__})",
            suggestion=f"pass a float, e.g. {name}=3e-4", owner=OWNER, field=name, value=value,
        )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"{where}: {name} must be finite and >= 0, got {value!r}",
            suggestion=f"pass a non-negative float for {name} (learning rates are never negative)",
            owner=OWNER, field=name, value=value,
        )
    return value


def _steps(name: str, value: Any, where: str, *, positive: bool = False) -> int:
    """A non-negative (or positive) Python int, or a ConfigError naming the argument."""
    try:
        if isinstance(value, bool):
            raise TypeError
        steps = operator.index(value)
    except TypeError:
        raise ConfigError(
            f"{where}: {name} must be an integer number of steps, got {value!r} "
            f"({type(value).__name__})",
            suggestion=f"pass an int, e.g. {name}=1000 (use int(...) on computed step counts)",
            owner=OWNER, field=name, value=value,
        ) from None
    low = 1 if positive else 0
    if steps < low:
        raise ConfigError(
            f"{where}: {name} must be >= {low}, got {steps}",
            suggestion=f"pass {name} >= {low}", owner=OWNER, field=name, value=steps,
        )
    return steps


def _warmup_and_total(warmup_steps: Any, total_steps: Any, where: str) -> tuple[int, int]:
    warmup = _steps("warmup_steps", warmup_steps, where)
    total = _steps("total_steps", total_steps, where, positive=True)
    if warmup > total:
        raise ConfigError(
            f"{where}: warmup_steps={warmup} is longer than total_steps={total}",
            suggestion="total_steps counts the whole run including warm-up; "
                       f"use warmup_steps <= {total} or raise total_steps",
            owner=OWNER, field=("warmup_steps", "total_steps"), value=(warmup, total),
        )
    return warmup, total


def warmup_cosine(
    peak_value: float,
    *,
    warmup_steps: int,
    total_steps: int,
    end_value: float = 0.0,
    init_value: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    The value is ``init_value`` at step 0, ``peak_value`` at step ``warmup_steps`` and
    ``end_value`` from step ``total_steps`` on. ``total_steps`` is the length of the whole run,
    warm-up included (as in ``optax.warmup_cosine_decay_schedule``'s ``decay_steps``). With
    ``warmup_steps == total_steps`` the value warms up and then stays at ``end_value``.

    Args:
      peak_value: the value reached at the end of warm-up.
      warmup_steps: steps of linear warm-up, ``0 <= warmup_steps <= total_steps``.
      total_steps: steps of the whole schedule, ``>= 1``.
      end_value: the value at and after ``total_steps``.
      init_value: the value at step 0.

    Returns:
      An ``optax.Schedule``: ``step -> value``.

    Raises:
      ConfigError: for negative or non-finite values, non-integer or negative step counts, or
        ``warmup_steps > total_steps``.

    Example:
      >>> import titanax as tx
      >>> lr = tx.optim.warmup_cosine(1e-3, warmup_steps=100, total_steps=1000)
      >>> round(float(lr(100)), 6), round(float(lr(1000)), 6)
      (0.001, 0.0)
      >>> opt = tx.optim.adamw(lr)
    """
    where = "warmup_cosine"
    peak = _value("peak_value", peak_value, where)
    end = _value("end_value", end_value, where)
    init = _value("init_value", init_value, where)
    warmup, total = _warmup_and_total(warmup_steps, total_steps, where)
    if warmup == total:  # optax's cosine part needs a positive length
        return optax.join_schedules(
            [optax.linear_schedule(init, peak, warmup), optax.constant_schedule(end)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=init, peak_value=peak, warmup_steps=warmup, decay_steps=total, end_value=end)


def warmup_linear(
    peak_value: float,
    *,
    warmup_steps: int,
    total_steps: int,
    end_value: float = 0.0,
    init_value: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then linear decay to ``end_value``.

    The value is ``init_value`` at step 0, ``peak_value`` at step ``warmup_steps``, falls in a
    straight line to ``end_value`` at step ``total_steps`` and stays there.

    Args:
      peak_value: the value reached at the end of warm-up.
      warmup_steps: steps of linear warm-up, ``0 <= warmup_steps <= total_steps``.
      total_steps: steps of the whole schedule, warm-up included, ``>= 1``.
      end_value: the value at and after ``total_steps``.
      init_value: the value at step 0.

    Returns:
      An ``optax.Schedule``: ``step -> value``.

    Raises:
      ConfigError: for negative or non-finite values, non-integer or negative step counts, or
        ``warmup_steps > total_steps``.

    Example:
      >>> import titanax as tx
      >>> lr = tx.optim.warmup_linear(1.0, warmup_steps=10, total_steps=20)
      >>> [float(lr(s)) for s in (0, 5, 10, 15, 20, 30)]
      [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    where = "warmup_linear"
    peak = _value("peak_value", peak_value, where)
    end = _value("end_value", end_value, where)
    init = _value("init_value", init_value, where)
    warmup, total = _warmup_and_total(warmup_steps, total_steps, where)
    return optax.join_schedules(
        [optax.linear_schedule(init, peak, warmup), optax.linear_schedule(peak, end, total - warmup)],
        [warmup])


def constant(value: float) -> optax.Schedule:
    """The same value at every step.

    Args:
      value: the learning rate (finite, ``>= 0``).

    Returns:
      An ``optax.Schedule``: ``step -> value``.

    Raises:
      ConfigError: for a negative, non-finite or non-numeric value.

    Example:
      >>> import titanax as tx
      >>> float(tx.optim.constant(0.1)(12345))
      0.1
    """
    return optax.constant_schedule(_value("value", value, "constant"))


LR_SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "constant": constant, "warmup_cosine": warmup_cosine, "warmup_linear": warmup_linear}
"""The learning-rate schedules by name (``optimizer.schedule`` in a run configuration). Not to be
confused with the pipeline schedules of :data:`titanax.parallel.schedules.SCHEDULES`."""
