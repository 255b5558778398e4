"""A console logger: one readable line per logged step, with a progress bar on a terminal."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TextIO

from titanax.exceptions import TitanaxError
from titanax.logging.base import Logger
from titanax.units import human_bytes, human_count

__all__ = ["Basic", "format_metrics"]

_RATE_SUFFIX = "_per_s"
STEP_RATE = "steps_per_s"
"""The metric :class:`~titanax.logging.ThroughputMeter` reports the step rate under; :class:`Basic`
takes the rate and ETA from it, so that they and examples/s describe the same interval."""


def _si(value: float) -> str:
    """Three significant digits and an SI suffix: ``22.3k``, ``1.25M``, ``5.08``."""
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale * 0.9995:
            return f"{value / scale:#.3g}".rstrip(".") + suffix
    return f"{value:#.3g}".rstrip(".")


def _format_number(key: str, value: int | float) -> str:
    if key.endswith("bytes") and math.isfinite(value):
        return human_bytes(value)
    if isinstance(value, int):
        # Counters (tokens seen, epoch) stay exact while short; huge ones get SI prefixes.
        return str(value) if abs(value) < 1_000_000 else human_count(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if key.endswith(_RATE_SUFFIX) or abs(value) >= 1e4:
        return _si(value)
    if value == 0:
        return "0"
    if abs(value) < 0.01:
        return f"{value:.2e}"  # a learning rate: 3.00e-04
    # 4 significant digits, trailing zeros kept: "loss 3.000" says the loss is 3 to 4 digits.
    return f"{value:#.4g}".rstrip(".")


def _format_item(key: str, value: int | float) -> str:
    if key == "mfu" and isinstance(value, float) and math.isfinite(value):
        return f"mfu {100 * value:.1f}%"
    if key.endswith(_RATE_SUFFIX) and len(key) > len(_RATE_SUFFIX):
        # "tokens_per_s" -> "22.3k tokens/s": reads as a rate, the way people say it.
        return f"{_format_number(key, value)} {key[: -len(_RATE_SUFFIX)]}/s"
    return f"{key} {_format_number(key, value)}"


def _format_rate(steps_per_s: float) -> str:
    if steps_per_s >= 1:
        return f"{_si(steps_per_s)} steps/s"
    return f"{_si(1 / steps_per_s)} s/step"  # slow steps read better as seconds per step


def _format_duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def format_metrics(step: int, metrics: dict[str, int | float], total_steps: int | None = None) -> str:
    """Formats one step's metrics the way :class:`Basic` prints them (without rate and ETA).

    Floats get 4 significant digits (``loss 3.000``), small ones scientific notation (``lr
    3.00e-04``), large ones an SI suffix (``22.3k``); keys ending in ``_per_s`` read as rates
    (``12.3k examples/s``), keys ending in ``bytes`` as sizes, ``mfu`` as a percentage. The step
    rate (``steps_per_s``) is left to the caller (:class:`Basic` prints it last, with the ETA).

    Args:
      step: the step number.
      metrics: metric name -> Python number, printed in insertion order.
      total_steps: the last step, shown as ``step 120/1000`` when given.

    Returns:
      A line such as ``"step 120/1000 | loss 0.4123 | 12.3k examples/s"``.

    Example:
      >>> format_metrics(120, {"loss": 3.0, "lr": 3e-4, "examples_per_s": 12300.0}, total_steps=1000)
      'step 120/1000 | loss 3.000 | lr 3.00e-04 | 12.3k examples/s'
    """
    head = f"step {step}/{total_steps}" if total_steps is not None else f"step {step}"
    return " | ".join([head] + [_format_item(k, v) for k, v in metrics.items() if k != STEP_RATE])


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - closed or exotic streams are simply not terminals
        return False


class Basic(Logger):
    """Prints metrics as readable lines, with rate and ETA; a live progress bar on a terminal.

    On a terminal (``stream.isatty()``) with ``progress=True`` and a known ``total_steps``, a
    ``rich`` progress bar shows step, percentage, rate and ETA, and each logged line scrolls above
    it. Anywhere else (CI logs, files, captured subprocess output, notebooks) each logged step is
    one plain line::

        step 120/1000 | loss 0.4123 | accuracy 0.9125 | 12.3k examples/s | 2.45 steps/s | eta 0:05:59

    The step rate and the ETA come from the logged ``steps_per_s`` when there is one (the
    :class:`~titanax.logging.ThroughputMeter`'s, over the same interval as examples/s and
    tokens/s); otherwise from this logger's own clock, over the interval since the previous
    logged step. The first logged step then shows no rate: its interval holds the compile.

    Args:
      every: print every ``every``-th step (and the last one).
      stream: where to write; ``None`` (the default) means ``sys.stdout`` as it is at the time of
        writing, so output redirected later (or captured by pytest) is followed.
      progress: show rate, ETA and (on a terminal) the progress bar; ``False`` prints only the step
        and the metrics.
      clock: a monotonic clock in seconds; replace it in tests.

    Example:
      >>> import io
      >>> out = io.StringIO()
      >>> with Basic(stream=out, progress=False) as lg:
      ...     lg.log(1, {"loss": 0.41234, "accuracy": 0.9125})
      >>> print(out.getvalue(), end="")
      step 1 | loss 0.4123 | accuracy 0.9125
    """

    def __init__(
        self,
        every: int = 1,
        stream: TextIO | None = None,
        progress: bool = True,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(every=every)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise TitanaxError(
                f"Basic(stream=...) needs a writable text stream, got {type(stream).__name__}",
                suggestion="pass sys.stdout, sys.stderr, an open text file or io.StringIO()",
                owner="Basic", field="stream",
            )
        self._stream = stream
        self.progress = bool(progress)
        self._clock = clock
        self._last: tuple[int, float] | None = None  # (step, time) of the previous logged step
        self._bar: Any = None  # rich.progress.Progress while a bar is shown
        self._task: Any = None

    @property
    def stream(self) -> TextIO:
        """The stream lines go to (``sys.stdout`` now, when none was given)."""
        return self._stream if self._stream is not None else sys.stdout

    def on_start(self, *, total_steps: int | None, start_step: int) -> None:
        self.on_close()  # a second fit with the same logger starts a fresh bar and clock
        self._last = None
        stream = self.stream
        if self.progress and total_steps is not None and total_steps > start_step and _isatty(stream):
            self._open_bar(stream, total_steps, start_step)

    def _open_bar(self, stream: TextIO, total_steps: int, start_step: int) -> None:
        # Imported here: only terminal runs need rich's rendering machinery.
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        console = Console(file=stream, force_terminal=True)
        # auto_refresh=False: no background thread; the bar redraws when a step is logged.
        self._bar = Progress(
            TextColumn("step {task.fields[step]}/{task.fields[last]}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("eta {task.fields[eta]}"),
            console=console,
            auto_refresh=False,
        )
        self._task = self._bar.add_task(
            "train", total=total_steps - start_step, completed=0,
            step=start_step, last=total_steps, rate="", eta="?",
        )
        self._bar.start()

    def _steps_per_s(self, step: int, metrics: dict[str, int | float]) -> float | None:
        now, last = self._clock(), self._last
        self._last = (step, now)
        rate = metrics.get(STEP_RATE)
        if rate is not None:
            return float(rate) if rate > 0 else None
        if last is not None and step > last[0] and now > last[1]:
            return (step - last[0]) / (now - last[1])
        return None

    def write(self, step: int, metrics: dict[str, int | float]) -> None:
        line = format_metrics(step, metrics, self.total_steps)
        rate_text, eta_text = "", "?"
        if self.progress:
            rate = self._steps_per_s(step, metrics)
            if rate is not None:
                rate_text = _format_rate(rate)
                line += f" | {rate_text}"
                if self.total_steps is not None and step <= self.total_steps:
                    eta_text = _format_duration((self.total_steps - step) / rate)
                    line += f" | eta {eta_text}"
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
            self._bar.update(
                self._task, completed=step - self.start_step, step=step,
                rate=rate_text, eta=eta_text, refresh=True,
            )
            return
        stream = self.stream
        stream.write(line + "\n")
        stream.flush()

    def on_close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.stop()
