"""The errors Titanax raises: each names the culprit and carries a suggestion.

Every misconfiguration Titanax can detect before compiling is a :class:`TitanaxError` subclass, so
``except tx.TitanaxError`` catches all of them while XLA's own errors pass through untouched.
"""

from __future__ import annotations

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


class TitanaxError(Exception):
    """Base class of every error Titanax raises on bad input.

    Args:
      message: what is wrong, naming the parameter, axis or value at fault.
      suggestion: what to change to make it right.

    Example:
      >>> try:
      ...     raise MeshError("mesh needs 16 devices, found 8", suggestion="use shape=(-1, 2)")
      ... except TitanaxError as e:
      ...     print(e.suggestion)
      use shape=(-1, 2)
    """

    def __init__(self, message: str, *, suggestion: str | None = None) -> None:
        self.message = message
        self.suggestion = suggestion
        super().__init__(message)

    def __str__(self) -> str:
        if self.suggestion:
            return f"{self.message}\n  Suggestion: {self.suggestion}"
        return self.message

    def __reduce__(self):  # keep `suggestion` across pickling (multi-process launchers)
        return (_rebuild, (type(self), self.message, self.suggestion))


def _rebuild(cls: type[TitanaxError], message: str, suggestion: str | None) -> TitanaxError:
    return cls(message, suggestion=suggestion)


class MeshError(TitanaxError):
    """A device mesh that cannot be built: wrong shape, unknown axis, too few devices."""


class PlanError(TitanaxError):
    """A parallelism plan or rule set that does not fit the mesh or contradicts itself."""


class ShardingError(TitanaxError):
    """A parameter, input or activation that cannot be laid out as asked."""


class CollectiveError(TitanaxError):
    """A collective over an axis that is not in the current mesh, or on mismatched trees."""


class DistributedError(TitanaxError):
    """A multi-process setup that is incomplete or inconsistent."""


class ConfigError(TitanaxError):
    """A run configuration (YAML, ``--set`` override or import path) that cannot be used."""


class CheckpointError(TitanaxError):
    """A checkpoint that is missing, incomplete or corrupt, or does not fit the state to restore."""


class NonFiniteError(TitanaxError):
    """Training produced a non-finite loss or gradients for as many steps in a row as allowed.

    Attributes:
      step: the first step of the run of non-finite steps.
    """

    def __init__(self, message: str, *, suggestion: str | None = None, step: int | None = None) -> None:
        super().__init__(message, suggestion=suggestion)
        self.step = step

    def __reduce__(self):
        return (_rebuild_nonfinite, (self.message, self.suggestion, self.step))


def _rebuild_nonfinite(message: str, suggestion: str | None, step: int | None) -> NonFiniteError:
    return NonFiniteError(message, suggestion=suggestion, step=step)


class TitanaxWarning(UserWarning):
    """Something Titanax worked around (e.g. an axis dropped from an indivisible dimension).

    With ``Rules(strict=True)`` the same conditions raise instead.
    """
