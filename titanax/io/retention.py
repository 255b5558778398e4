"""Which checkpoints a run keeps: ``keep_best`` ranks saves by a logged metric, and the newest save
always stays, because a resume starts from it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from titanax.exceptions import CheckpointError

__all__ = ["BestMetric", "KeepBestAndNewest", "parse_keep_best"]


@dataclasses.dataclass(frozen=True)
class BestMetric:
    """``keep_best``: the logged metric that ranks saves, and whether lower or higher is better."""

    metric: str
    mode: str

    def score(self, metrics: Mapping[str, Any] | None) -> float | None:
        """How good a save with ``metrics`` is, higher better; ``None`` when it does not carry the
        metric. A non-finite value (a diverged evaluation) ranks last."""
        if not metrics or self.metric not in metrics:
            return None
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            return -math.inf
        return -value if self.mode == "min" else value

    def orbax_score(self, metrics: Mapping[str, Any] | None) -> float:
        """:meth:`score` for Orbax, which wants a number for every save: one without the metric
        ranks last."""
        score = self.score(metrics)
        return -math.inf if score is None else score


@dataclasses.dataclass(frozen=True)
class KeepBestAndNewest:
    """Orbax preservation policy for ``keep_best``: the ``keep`` best saves that carry the metric,
    plus the newest save whatever it carries, because a resume starts from it.

    Orbax's own ``BestN`` either deletes a save without metrics at once (so a forced save at
    preemption would vanish) or keeps every such save forever; neither is what a run wants.
    Orbax applies the policy after the new step is committed, so deletion never races a save.
    """

    best: BestMetric
    keep: int | None

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        if self.keep is None or not checkpoints:
            return [True] * len(checkpoints)
        newest = max(info.step for info in checkpoints)
        scores = {info.step: self.best.score(info.metrics) for info in checkpoints}
        ranked = sorted((step for step, score in scores.items() if score is not None),
                        key=lambda step: scores[step], reverse=True)
        kept = set(ranked[: self.keep]) | {newest}
        return [info.step in kept for info in checkpoints]


def parse_keep_best(keep_best: str | tuple[str, str] | None) -> BestMetric | None:
    if keep_best is None:
        return None
    if isinstance(keep_best, str):
        name, mode = keep_best, "min"
    elif isinstance(keep_best, (tuple, list)) and len(keep_best) == 2:
        name, mode = keep_best
    else:
        raise CheckpointError(f"OrbaxCheckpoint(keep_best={keep_best!r}) is not a metric name or "
                              "(name, 'min' | 'max')",
                              suggestion="write keep_best='eval/loss' or keep_best=('eval/accuracy', 'max')")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"OrbaxCheckpoint(keep_best={keep_best!r}) needs a metric name",
                              suggestion="write keep_best='eval/loss'")
    if mode not in ("min", "max"):
        raise CheckpointError(f"keep_best mode {mode!r} is not 'min' or 'max'",
                              suggestion=f"write keep_best=({name!r}, 'max') or keep_best=({name!r}, 'min')")
    return BestMetric(name, mode)
