"""The errors Titanax raises: each names the culprit and carries a suggestion.

Every misconfiguration Titanax can detect before compiling is a :class:`TitanaxError` subclass, so
``except tx.TitanaxError`` catches all of them while XLA's own errors pass through untouched. Each
subclass also derives from the builtin exception it refines (``MeshError`` is a ``ValueError``,
``DistributedError`` a ``RuntimeError``, ...), so code written against the builtins keeps working.

Besides the text, an error carries *structured fields*: ``owner`` (the class or section that holds
the bad value: ``"DP"``, ``"Precision"``, ``"MeshSpec"``, ``"optimizer"``, ...), ``field`` (the
parameter, e.g. ``"axis"``) and ``value``. Programs read those, never the text: ``titanax run``
maps ``(owner, field)`` to the YAML key the value came from (``("DP", "axis")`` is
``plan.data_parallel.axis``).
"""

from __future__ import annotations

from typing import Any, Union

__all__ = [
    "TitanaxError",
    "MeshError",
    "PlanError",
    "ShardingError",
    "CollectiveError",
    "DistributedError",
    "CheckpointError",
    "ConfigError",
    "NonFiniteError",
    "TitanaxWarning",
]

Field = Union[str, tuple[str, ...], None]
"""A parameter name, or several when the error is about their combination (``warmup_steps``
longer than ``total_steps``)."""


class TitanaxError(Exception):
    """Base class of every error Titanax raises on bad input.

    Args:
      message: what is wrong, naming the parameter, axis or value at fault (for people).
      suggestion: what to change to make it right.
      owner: the class or configuration section that owns the bad value, e.g. ``"DP"``,
        ``"Precision"``, ``"MeshSpec"``, ``"optimizer"``, ``"schedule"``, ``"OrbaxCheckpoint"``.
      field: the parameter of ``owner`` at fault (``"axis"``), or a tuple of parameters when the
        error is about their combination.
      value: the bad value of ``field`` (a tuple, one per name, when ``field`` is a tuple);
        ``None`` when not given.

    Example:
      >>> try:
      ...     raise MeshError("mesh needs 16 devices, found 8", suggestion="use shape=(-1, 2)",
      ...                     owner="MeshSpec", field="shape", value=(4, 4))
      ... except TitanaxError as e:
      ...     print(e.suggestion, e.owner, e.field, e.value)
      use shape=(-1, 2) MeshSpec shape (4, 4)
    """

    def __init__(self, message: str, *, suggestion: str | None = None, owner: str | None = None,
                 field: Field = None, value: Any = None) -> None:
        self.message = message
        self.suggestion = suggestion
        self.owner = owner
        self.field = field
        self.value = value
        super().__init__(message)

    def __str__(self) -> str:
        if self.suggestion:
            return f"{self.message}\n  Suggestion: {self.suggestion}"
        return self.message

    @property
    def fields(self) -> tuple[tuple[str, Any], ...]:
        """``field`` and ``value`` as ``(name, value)`` pairs (none without a field)."""
        if self.field is None:
            return ()
        if isinstance(self.field, tuple):
            values = self.value if isinstance(self.value, tuple) else (None,) * len(self.field)
            return tuple(zip(self.field, values))
        return ((self.field, self.value),)

    def _keywords(self) -> dict[str, Any]:
        """The constructor's keyword arguments that rebuild this error (subclasses add theirs)."""
        return {"suggestion": self.suggestion, "owner": self.owner, "field": self.field, "value": self.value}

    def replace(self, **changes: Any) -> TitanaxError:
        """A copy of this error, of the same class, with ``changes`` applied.

        Args:
          **changes: ``message``, ``suggestion``, ``owner``, ``field``, ``value`` (and a subclass's
            own arguments, e.g. ``NonFiniteError``'s ``step``).

        Returns:
          The new error; every field not named in ``changes`` is kept.

        Example:
          >>> e = PlanError("DP(axis='') is empty", owner="DP", field="axis", value="")
          >>> e.replace(message="plan.data_parallel.axis: " + e.message).field
          'axis'
        """
        message = changes.pop("message", self.message)
        return type(self)(message, **{**self._keywords(), **changes})

    def __reduce__(self):  # keep every field across pickling (multi-process launchers)
        return (_rebuild, (type(self), self.message, self._keywords()))


def _rebuild(cls: type[TitanaxError], message: str, keywords: dict[str, Any]) -> TitanaxError:
    return cls(message, **keywords)


class MeshError(TitanaxError, ValueError):
    """A device mesh that cannot be built: wrong shape, unknown axis, too few devices."""


class PlanError(TitanaxError, ValueError):
    """A parallelism plan or rule set that does not fit the mesh or contradicts itself."""


class ShardingError(TitanaxError, ValueError):
    """A parameter, input or activation that cannot be laid out as asked."""


class CollectiveError(TitanaxError, ValueError):
    """A collective over an axis that is not in the current mesh, or on mismatched trees."""


class DistributedError(TitanaxError, RuntimeError):
    """A multi-process setup that is incomplete or inconsistent (a peer missing, a coordinator
    that does not answer): a failure of the running job, hence a ``RuntimeError``."""


class ConfigError(TitanaxError, ValueError):
    """A setting that cannot be used: a run configuration (YAML, ``--set`` override or import
    path), or an argument of an optimizer, a learning-rate schedule, ``Precision`` or ``Engine``
    that is out of range or contradicts another."""


class CheckpointError(TitanaxError, ValueError):
    """A checkpoint, or a checkpoint setting, that cannot be used: a step that is missing,
    incomplete or corrupt, a checkpoint that does not fit the state to restore, a directory that is
    a file or holds what Titanax did not write, a ``keep_best`` metric the run never logs.

    It is a ``ValueError``: each is Titanax's verdict on a value (a path, a step, a saved tree, a
    metric name). The operating system's own failures while Orbax reads or writes (a full disk, a
    permission) are not wrapped and reach the caller as the ``OSError`` they are; where Titanax
    names one in its own words (a damaged step), the ``OSError`` is the ``__cause__``.
    """


class NonFiniteError(TitanaxError, FloatingPointError):
    """Training produced a non-finite loss or gradients for as many steps in a row as allowed.

    Attributes:
      step: the first step of the run of non-finite steps.
    """

    def __init__(self, message: str, *, suggestion: str | None = None, step: int | None = None,
                 owner: str | None = None, field: Field = None, value: Any = None) -> None:
        super().__init__(message, suggestion=suggestion, owner=owner, field=field, value=value)
        self.step = step

    def _keywords(self) -> dict[str, Any]:
        return {**super()._keywords(), "step": self.step}


class TitanaxWarning(UserWarning):
    """Something Titanax worked around (e.g. an axis dropped from an indivisible dimension).

    With ``Rules(strict=True)`` the same conditions raise instead.
    """


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that names the first caller outside Titanax: the
    line in the user's script or notebook, not the library frame that noticed the problem.

    Example:
      >>> user_stacklevel() >= 1
      True
    """
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
