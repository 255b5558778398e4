"""Weights & Biases: metrics to a W&B run (``pip install "titanax[wandb]"``).

``mode="offline"`` writes the run under ``dir`` with no network (``wandb sync`` uploads it later);
that is how the tests run it. Only process 0 logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from titanax.exceptions import TitanaxError
from titanax.logging.base import Logger

__all__ = ["WandB"]

_MODES = ("online", "offline", "disabled")


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise TitanaxError(
            f"tx.logging.WandB needs the wandb package, which is not installed ({e})",
            suggestion='pip install "titanax[wandb]"  (or: pip install wandb)',
            owner="WandB",
        ) from None
    return wandb


class WandB(Logger):
    """Logs metrics to a Weights & Biases run: one ``run.log(metrics, step=step)`` per logged step.

    The run starts at the first :meth:`start` (or :meth:`log`) and finishes at :meth:`close`.

    Args:
      project: the W&B project.
      name: the run's display name (default: W&B's own).
      dir: where W&B writes its files (``titanax run``: the run directory).
      mode: ``"online"``, ``"offline"`` (no network; ``wandb sync <dir>/wandb/offline-run-*``
        uploads it later) or ``"disabled"``; ``None``: W&B's default (``WANDB_MODE``, else online).
      config: the run's configuration, shown with the run (``titanax run`` passes the resolved one).
      every: log every ``every``-th step (and the last one).
      **init_kwargs: more ``wandb.init`` arguments (``entity``, ``tags``, ``group`` ...).

    Raises:
      TitanaxError: wandb is not installed, or ``mode`` is not one of W&B's.

    Example:
      >>> lg = WandB(project="titanax-demo", mode="offline", dir="runs/demo")   # doctest: +SKIP
    """

    def __init__(self, project: str | None = None, *, name: str | None = None,
                 dir: str | os.PathLike[str] | None = None, mode: str | None = None,
                 config: Mapping[str, Any] | None = None, every: int = 1, **init_kwargs: Any) -> None:
        super().__init__(every=every)
        self._wandb = _import_wandb()  # on every process, so a missing extra fails before training
        if mode is not None and mode not in _MODES:
            raise TitanaxError(f"WandB(mode={mode!r}) is not a W&B mode",
                               suggestion=f"use one of {', '.join(map(repr, _MODES))}", owner="WandB",
                               field="mode", value=mode)
        self._init = dict(init_kwargs, project=project, name=name, mode=mode,
                          config=dict(config) if config is not None else None,
                          dir=None if dir is None else os.fspath(dir))
        self._run: Any = None

    @property
    def run(self) -> Any:
        """The ``wandb`` run (``None`` before the first log, and on processes other than 0)."""
        return self._run

    def on_start(self, *, total_steps: int | None, start_step: int) -> None:
        if self._run is None:
            if self._init["dir"] is not None:
                os.makedirs(self._init["dir"], exist_ok=True)
            self._run = self._wandb.init(**{k: v for k, v in self._init.items() if v is not None})

    def write(self, step: int, metrics: dict[str, int | float]) -> None:
        if self._run is None:
            self.on_start(total_steps=None, start_step=step)
        self._run.log(dict(metrics), step=step)

    def on_close(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()
