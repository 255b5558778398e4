"""``titanax plot``: curves of a run's metrics CSV (what :class:`~titanax.logging.CSV` and ``titanax
run``'s ``logging.csv`` write) as PNG files: loss (train and held-out), throughput, MFU.

Needs matplotlib, an optional extra: ``pip install "titanax[plot]"``. Figures are drawn with
matplotlib's object API (no ``pyplot``), so plotting changes no global matplotlib state.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
from typing import Any

from titanax.exceptions import TitanaxError

__all__ = ["plot_metrics", "read_metrics"]

_STEP = "step"
# (file stem, y label, [(column, legend label)], scale): each figure plots those of its columns present.
_FIGURES: tuple[tuple[str, str, tuple[tuple[str, str], ...], float], ...] = (
    ("loss", "loss", (("loss", "train"), ("eval/loss", "held-out")), 1.0),
    ("throughput", "tokens/s", (("tokens_per_s", "tokens/s"),), 1.0),
    ("throughput", "examples/s", (("examples_per_s", "examples/s"),), 1.0),
    ("mfu", "MFU (% of peak FLOP/s)", (("mfu", "MFU"),), 100.0),
)


def read_metrics(path: str | os.PathLike[str]) -> dict[str, tuple[list[int], list[float]]]:
    """The numeric columns of a Titanax metrics CSV.

    A resumed run may repeat steps (those between its last checkpoint and the crash): the last row
    of a step wins. Empty cells (a metric logged only at some steps, such as ``eval/loss``) and
    cells that are not finite numbers are left out.

    Args:
      path: the CSV file, ``step`` first.

    Returns:
      ``{column: (steps, values)}``, steps ascending.

    Raises:
      TitanaxError: the file is missing or is not a Titanax metrics CSV.

    Example:
      >>> import tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "metrics.csv")
      >>> with open(path, "w") as f:
      ...     _ = f.write("step,loss,eval/loss\\n1,2.5,\\n2,2.0,2.2\\n1,2.4,\\n")
      >>> read_metrics(path)
      {'loss': ([1, 2], [2.4, 2.0]), 'eval/loss': ([2], [2.2])}
    """
    target = pathlib.Path(path).expanduser()
    try:
        with open(target, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except OSError as error:
        raise TitanaxError(f"cannot read the metrics file {str(target)!r}: {error.strerror or error}",
                           suggestion="give the CSV a run writes (logging.csv in its configuration, or "
                           "tx.logging.CSV(path))", field="path", value=str(target)) from None
    if not header or header[0] != _STEP:
        raise TitanaxError(f"{str(target)!r} is not a Titanax metrics CSV: its first column is "
                           f"{header[0] if header else None!r}, not {_STEP!r}",
                           suggestion="give the CSV tx.logging.CSV writes (logging.csv in a run configuration)",
                           field="path", value=str(target))
    by_step: dict[int, list[str]] = {}
    for row in rows:
        try:
            by_step[int(row[0])] = row
        except (ValueError, IndexError):
            continue  # a damaged line (a process killed mid-write)
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, column in enumerate(header[1:], start=1):
        steps, values = [], []
        for step in sorted(by_step):
            row = by_step[step]
            try:
                value = float(row[i])
            except (ValueError, IndexError):
                continue
            if math.isfinite(value):
                steps.append(step)
                values.append(value)
        if steps:
            out[column] = (steps, values)
    return out


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TitanaxError("plotting metrics needs matplotlib, which is not installed",
                           suggestion='pip install "titanax[plot]" (or pip install matplotlib)') from None
    return Figure


def plot_metrics(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[pathlib.Path]:
    """Draw a metrics CSV's curves as PNG files: ``loss.png`` (train ``loss`` and held-out
    ``eval/loss``), ``throughput.png`` (``tokens_per_s``, else ``examples_per_s``) and ``mfu.png``;
    each only when the CSV has its columns.

    Args:
      path: the metrics CSV (``titanax run``'s ``logging.csv``, or ``tx.logging.CSV(path)``).
      out_dir: the directory to write to (created); default the CSV's own directory.

    Returns:
      The PNG files written.

    Raises:
      TitanaxError: matplotlib is missing, the CSV cannot be read, or it has none of those columns.

    Example:
      >>> plot_metrics("runs/x/metrics.csv", out_dir="runs/x/plots")   # doctest: +SKIP
      [PosixPath('runs/x/plots/loss.png'), PosixPath('runs/x/plots/throughput.png')]
    """
    figure_class = _figure_class()
    metrics = read_metrics(path)
    out = pathlib.Path(out_dir).expanduser() if out_dir is not None else pathlib.Path(path).expanduser().parent
    if out.exists() and not out.is_dir():
        raise TitanaxError(f"cannot write plots into {str(out)!r}: it is a file",
                           suggestion="give --out a directory", field="out_dir", value=str(out))
    written: list[pathlib.Path] = []
    for stem, ylabel, columns, scale in _FIGURES:
        present = [(column, label) for column, label in columns if column in metrics]
        if not present or any(p.stem == stem for p in written):
            continue
        fig = figure_class(figsize=(7, 4), dpi=100, layout="constrained")
        ax = fig.add_subplot()
        for column, label in present:
            steps, values = metrics[column]
            ax.plot(steps, [v * scale for v in values], marker="o" if len(steps) < 30 else None,
                    markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} — {pathlib.Path(path).name}")
        ax.grid(True, alpha=0.3)
        if len(present) > 1:
            ax.legend()
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{stem}.png"
        fig.savefig(target, format="png")
        written.append(target)
    if not written:
        wanted = sorted({column for _, _, columns, _ in _FIGURES for column, _ in columns})
        raise TitanaxError(f"{str(path)!r} has none of the columns plotted ({', '.join(wanted)}); it has "
                           f"{sorted(metrics) or 'no numeric column'}",
                           suggestion="log the loss from the training step ({'loss': loss}); throughput and "
                           "MFU are logged by the engine", field="path", value=str(path))
    return written
