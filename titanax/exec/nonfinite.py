"""Stopping a run whose loss or gradients stop being finite.

A step whose gradients are not finite skips its update inside the compiled step
(:meth:`~titanax.TrainState.apply_gradients`), so the state — and every checkpoint written from
it — stays finite. The engine watches each step's ``skipped_steps`` count and loss as the step
completes and stops once ``limit`` steps in a row went bad, naming them.
"""

from __future__ import annotations

import math

from titanax.exceptions import NonFiniteError
from titanax.exec.precision import Precision

__all__ = ["NonFiniteWatch", "default_limit"]


def default_limit(precision: Precision) -> int:
    """Consecutive non-finite steps tolerated by default: 1, or under dynamic loss scaling (where an
    overflow step is part of the method) enough halvings for the scale to reach 1, plus one."""
    if not precision.dynamic:
        return 1
    return int(math.log2(max(precision.initial_scale, 1.0))) + 2


class NonFiniteWatch:
    """Counts consecutive bad steps and raises :class:`NonFiniteError` at ``limit``.

    Args:
      limit: how many bad steps in a row stop the run (1: the first one does).
      skipped_steps: the state's ``skipped_steps`` before the first observed step.
    """

    def __init__(self, limit: int, skipped_steps: int) -> None:
        self.limit = limit
        self._skipped = skipped_steps
        self._bad: list[tuple[int, float | None]] = []

    def observe(self, step: int, skipped_steps: float, loss: float | None) -> None:
        """Record step ``step``'s cumulative ``skipped_steps`` and its ``loss`` (if it has one).

        Raises:
          NonFiniteError: this is the ``limit``-th bad step in a row.
        """
        skipped = skipped_steps > self._skipped
        self._skipped = skipped_steps
        if not skipped and (loss is None or math.isfinite(loss)):
            self._bad = []
            return
        self._bad.append((step, loss))
        if len(self._bad) >= self.limit:
            raise self._error()

    def _error(self) -> NonFiniteError:
        first, last = self._bad[0][0], self._bad[-1][0]
        losses = ", ".join(f"{loss}" for _, loss in self._bad[:4] if loss is not None)
        where = f"step {first}" if first == last else f"steps {first} to {last} ({len(self._bad)} in a row)"
        return NonFiniteError(
            f"{where}: the loss or gradients are not finite" + (f" (loss {losses})" if losses else "")
            + f"; the update of each was skipped, so the state is that of step {first - 1} and no "
            f"checkpoint holds a non-finite value. Stopped after {self.limit} bad step(s) in a row "
            f"(Engine(on_nonfinite={self.limit}))",
            suggestion=f"look at the data of step {first} (a corrupt or extreme batch), lower the "
            "learning rate or clip gradients (optax.clip_by_global_norm); to skip isolated bad "
            "batches and go on, allow more in a row with Engine(on_nonfinite=N). Running again "
            "resumes from the newest checkpoint",
            step=first,
        )
