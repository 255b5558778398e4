"""The logger interface every Titanax logger implements, plus the null and fan-out loggers.

The engine calls, in order::

    logger.start(total_steps=..., start_step=...)   # once per fit (optional)
    logger.log(step, metrics)                         # after steps; values are Python scalars
    logger.close()                                    # once, also when training raised

Only process 0 of a multi-process run writes anything. That rule lives here, once: the public
``start`` / ``log`` / ``close`` are template methods that check it (and ``every``) and then call the
hooks a subclass implements — :meth:`Logger.write` (required), :meth:`Logger.on_start` and
:meth:`Logger.on_close` (optional). A subclass therefore never has to think about processes.
"""

from __future__ import annotations

import abc
import numbers
import operator
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import jax

from titanax.exceptions import TitanaxError

__all__ = ["Logger", "NullLogger", "MultiLogger"]


def _check_every(every: Any, owner: str) -> int:
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise TitanaxError(
            f"{owner}(every={every!r}): every must be a positive int (log every N-th step)",
            suggestion="pass every=1 to log each step, or e.g. every=100",
            owner=owner, field="every", value=every,
        )
    return int(every)


def check_path(value: Any, owner: str, field: str, example: str) -> str:
    """``os.fspath(value)``, or a TitanaxError naming the logger (``owner``) and its argument
    (``field``) that wanted a path."""
    import os

    try:
        return os.fspath(value)
    except TypeError:
        raise TitanaxError(
            f"{owner}({field}=...) needs a path, got {type(value).__name__} {value!r}",
            suggestion=f"pass a str or pathlib.Path, e.g. {example}", owner=owner, field=field, value=value,
        ) from None


def check_destination(path: str, owner: str, field: str, *, directory: bool) -> None:
    """Refuse, at construction, a log destination that writing would fail on after training
    started: a file where a directory must go (or the reverse), or a path under a file."""
    import os

    want = "a directory" if directory else "a file"
    if os.path.exists(path) and os.path.isdir(path) != directory:
        raise TitanaxError(
            f"{owner}({field}=...): {path} exists and is not {want}",
            suggestion=f"give {owner} {want} path of its own", owner=owner, field=field, value=path,
        )
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise TitanaxError(f"{owner}({field}=...): {path} cannot be created: {existing} is a file",
                           suggestion="choose a path whose folders are folders, e.g. runs/<name>/...",
                           owner=owner, field=field, value=path)


def _check_step(step: Any, what: str) -> int:
    # numpy / jax integer scalars are accepted through __index__; floats and bools are not, because a
    # float step (e.g. 1.5) is always a caller bug.
    if isinstance(step, bool):
        raise TitanaxError(f"{what} must be an int, got bool {step!r}", suggestion="pass the step number")
    try:
        return operator.index(step)
    except TypeError:
        raise TitanaxError(
            f"{what} must be an int, got {type(step).__name__} {step!r}",
            suggestion="pass the integer step number, e.g. int(state.step)",
        ) from None


def _to_scalar(key: str, value: Any) -> int | float:
    """Turns a metric value into a Python int or float, naming the metric when that is impossible."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers
        return int(value)
    try:
        # numpy floats, 0-d numpy arrays and 0-d jax arrays (the last blocks on the device).
        return float(value)
    except (TypeError, ValueError):
        raise TitanaxError(
            f"metric {key!r} is not a scalar: {type(value).__name__} {value!r:.80}",
            suggestion="log Python numbers (e.g. float(loss)); reduce arrays to a scalar first",
        ) from None


def _normalize(metrics: Any) -> dict[str, int | float]:
    if not isinstance(metrics, Mapping):
        raise TitanaxError(
            f"metrics must be a mapping of name -> number, got {type(metrics).__name__}",
            suggestion='pass a dict such as {"loss": 0.41}',
        )
    out: dict[str, int | float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TitanaxError(
                f"metric names must be str, got {type(key).__name__} {key!r}",
                suggestion="use string keys in the metrics dict",
            )
        out[key] = _to_scalar(key, value)
    return out


class Logger(abc.ABC):
    """Base class of every Titanax logger.

    Subclasses implement :meth:`write` (and optionally :meth:`on_start` / :meth:`on_close`); the
    public :meth:`start`, :meth:`log` and :meth:`close` call them only on process 0, only for the
    steps selected by ``every``, and with metric values already turned into Python numbers.

    Args:
      every: log every ``every``-th step (``step % every == 0``), plus the final step when
        ``total_steps`` is known.

    Example:
      >>> class Recorder(Logger):
      ...     def __init__(self):
      ...         super().__init__(every=2)
      ...         self.rows = []
      ...     def write(self, step, metrics):
      ...         self.rows.append((step, metrics["loss"]))
      >>> with Recorder() as r:
      ...     for s in range(1, 5):
      ...         r.log(s, {"loss": 1.0 / s})
      >>> r.rows
      [(2, 0.5), (4, 0.25)]
    """

    # Class-level defaults so a subclass that forgets super().__init__() still works.
    every: int = 1
    total_steps: int | None = None
    start_step: int = 0

    def __init__(self, every: int = 1) -> None:
        self.every = _check_every(every, type(self).__name__)

    @property
    def _active(self) -> bool:
        """Whether this process writes. Read on every call so tests (and late
        ``jax.distributed.initialize``) see the current process index."""
        return jax.process_index() == 0

    # -- the template methods the engine calls -------------------------------------------------

    def start(self, *, total_steps: int | None, start_step: int = 0) -> None:
        """Announces a run: the step it resumes from and the step it ends at.

        Args:
          total_steps: the last step the run will log (``None`` if unknown). Progress and ETA are
            measured from ``start_step`` to it.
          start_step: the step the run starts (or resumes) from; 0 for a fresh run.
        """
        if total_steps is not None:
            total_steps = _check_step(total_steps, "total_steps")
        start_step = _check_step(start_step, "start_step")
        self.total_steps = total_steps
        self.start_step = start_step
        if self._active:
            self.on_start(total_steps=total_steps, start_step=start_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records ``metrics`` for ``step`` (on process 0, if ``every`` selects the step).

        Args:
          step: the step number the metrics belong to.
          metrics: metric name -> Python number (numpy / 0-d array scalars are converted).

        Raises:
          TitanaxError: if the step is not an int or a metric is not a scalar.
        """
        # Validate on every process (not only process 0), so a bad call fails everywhere alike
        # instead of stopping process 0 while the others carry on into the next collective.
        step = _check_step(step, "step")
        if not self._selected(step):
            return  # before _normalize: converting a skipped step's device arrays would sync
        metrics = _normalize(metrics)
        if self._active:
            self.write(step, metrics)

    def _selected(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def close(self) -> None:
        """Flushes and releases files. Safe to call more than once."""
        if self._active:
            self.on_close()

    # -- hooks for subclasses -------------------------------------------------------------------

    @abc.abstractmethod
    def write(self, step: int, metrics: dict[str, int | float]) -> None:
        """Writes one record. Called only on process 0, for steps selected by ``every``.

        Args:
          step: the step number.
          metrics: metric name -> Python int or float.
        """

    def on_start(self, *, total_steps: int | None, start_step: int) -> None:  # noqa: B027
        """Called by :meth:`start` on process 0. Default: nothing."""

    def on_close(self) -> None:  # noqa: B027
        """Called by :meth:`close` on process 0; must tolerate repeated calls. Default: nothing."""

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> Logger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NullLogger(Logger):
    """A logger that records nothing (the engine's default when no logger is given).

    Example:
      >>> NullLogger().log(1, {"loss": 0.5})
    """

    def write(self, step: int, metrics: dict[str, int | float]) -> None:
        pass


def _raise_collected(errors: list[BaseException], action: str) -> None:
    if not errors:
        return
    first = errors[0]
    for other in errors[1:]:
        # Keep the others visible without hiding the first traceback.
        first.add_note(f"MultiLogger.{action}: another logger also failed: {other!r}")
    raise first


class MultiLogger(Logger):
    """Sends every call to several loggers.

    Each child applies its own ``every`` and process-0 rule. If a child raises, the others are still
    called (so one broken logger cannot leave another's file unclosed); the first error is then
    re-raised with the others attached as notes.

    Args:
      loggers: the loggers to fan out to, in order. Nested ``MultiLogger``s are allowed.

    Raises:
      TitanaxError: if an item is not a :class:`Logger`.

    Example:
      >>> import io
      >>> from titanax.logging import Basic
      >>> out = io.StringIO()
      >>> with MultiLogger([Basic(stream=out, progress=False), NullLogger()]) as lg:
      ...     lg.log(1, {"loss": 0.5})
      >>> out.getvalue()
      'step 1 | loss 0.5000\\n'
    """

    def __init__(self, loggers: Iterable[Logger]) -> None:
        super().__init__(every=1)
        if isinstance(loggers, Logger):
            loggers = [loggers]
        try:
            items = list(loggers)
        except TypeError:
            raise TitanaxError(
                f"MultiLogger expects a list of loggers, got {type(loggers).__name__}",
                suggestion="pass e.g. [tx.logging.Basic(), tx.logging.CSV('metrics.csv')]",
            ) from None
        for i, item in enumerate(items):
            if not isinstance(item, Logger):
                raise TitanaxError(
                    f"MultiLogger item {i} is a {type(item).__name__}, not a titanax Logger",
                    suggestion="subclass titanax.logging.Logger and implement write(step, metrics)",
                )
        self.loggers: list[Logger] = items

    # The children gate themselves (process index, every), so MultiLogger overrides the template
    # methods directly rather than the hooks: gating twice would apply its own every=1 in between.
    def _selected(self, step: int) -> bool:
        return any(lg._selected(step) for lg in self.loggers)

    def start(self, *, total_steps: int | None, start_step: int = 0) -> None:
        if total_steps is not None:
            total_steps = _check_step(total_steps, "total_steps")
        start_step = _check_step(start_step, "start_step")
        self.total_steps, self.start_step = total_steps, start_step
        errors: list[BaseException] = []
        for lg in self.loggers:
            try:
                lg.start(total_steps=total_steps, start_step=start_step)
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        _raise_collected(errors, "start")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        # Validate once here so a bad input raises one clear error, not one per child.
        step = _check_step(step, "step")
        if not self._selected(step):
            return
        metrics = _normalize(metrics)
        errors: list[BaseException] = []
        for lg in self.loggers:
            try:
                lg.log(step, metrics)
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        _raise_collected(errors, "log")

    def close(self) -> None:
        errors: list[BaseException] = []
        for lg in self.loggers:
            try:
                lg.close()
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        _raise_collected(errors, "close")

    def write(self, step: int, metrics: dict[str, int | float]) -> None:
        # Reached only if someone calls the hook directly; forward without re-gating.
        for lg in self.loggers:
            lg.write(step, metrics)
