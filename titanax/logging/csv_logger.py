"""A CSV metrics file that survives restarts and metrics that appear part-way through a run.

(Named ``csv_logger`` so that it never shadows the standard library's ``csv`` module.)
"""

from __future__ import annotations

import csv
import os
import tempfile
from typing import IO

from titanax.exceptions import TitanaxError
from titanax.logging.base import Logger, check_destination, check_path

__all__ = ["CSV"]

_STEP = "step"


class CSV(Logger):
    """Appends one row per logged step to a CSV file: ``step`` first, then one column per metric.

    Restarts: if the file already exists with a header, rows are appended under that header, so a
    resumed run continues the same file (a resumed run may repeat the steps between its last
    checkpoint and the crash; keep the last row of a step when reading). New metrics: when a metric
    name not in the header appears, the file is rewritten once with the union of the columns (old
    columns first, new ones after, in first-seen order); existing rows get empty cells for the new
    columns, and later rows leave missing metrics empty. The rewrite goes to a temporary file that
    then replaces the original, so a crash mid-rewrite leaves the old file intact.

    Each row is flushed as it is written, so the file can be read (or tailed) while training runs.
    Parent directories are created. Only process 0 touches the file.

    Args:
      path: the CSV file.
      every: write every ``every``-th step (and the last one).

    Example:
      >>> import csv, tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), "run", "metrics.csv")
      >>> with CSV(path) as lg:
      ...     lg.log(1, {"loss": 0.5})
      ...     lg.log(2, {"loss": 0.25, "lr": 0.001})
      >>> with open(path, newline="") as f:
      ...     [dict(r) for r in csv.DictReader(f)]
      [{'step': '1', 'loss': '0.5', 'lr': ''}, {'step': '2', 'loss': '0.25', 'lr': '0.001'}]
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1) -> None:
        super().__init__(every=every)
        self.path = check_path(path, "CSV", "path", 'CSV("runs/x/metrics.csv")')
        check_destination(self.path, "CSV", "path", directory=False)
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter | None = None
        self._columns: list[str] = []

    # -- opening ---------------------------------------------------------------------------------

    def _read_header(self) -> list[str] | None:
        """The existing file's header, or None when the file is missing or empty."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return None
        with open(self.path, newline="") as f:
            header = next(csv.reader(f), None)
        if not header or header[0] != _STEP:
            raise TitanaxError(
                f"{self.path} exists but is not a Titanax metrics CSV (its first column is "
                f"{header[0] if header else None!r}, expected {_STEP!r})",
                suggestion="point CSV(...) at a new file, or move the existing one away",
                owner="CSV", field="path", value=self.path,
            )
        return header

    def _open(self) -> None:
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        header = self._read_header()
        if header is not None:
            self._ensure_trailing_newline()
        self._columns = header if header is not None else [_STEP]
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns, restval="")
        if header is None:
            self._writer.writeheader()

    def _ensure_trailing_newline(self) -> None:
        # A process killed mid-write can leave a partial last line; start ours on a fresh line so the
        # damage stays confined to that one row.
        with open(self.path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) not in (b"\n", b"\r"):
                f.write(b"\r\n")

    def _add_columns(self, new: list[str]) -> None:
        """Rewrites the file with ``new`` columns appended to the header (see the class docstring)."""
        assert self._file is not None
        self._file.close()
        self._file = None
        columns = self._columns + new
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        fd, tmp = tempfile.mkstemp(prefix=".metrics-", suffix=".csv.tmp",
                                   dir=os.path.dirname(self.path) or ".")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as out:
                writer = csv.DictWriter(out, fieldnames=columns, restval="")
                writer.writeheader()
                for row in rows:
                    # DictReader puts the cells of over-long (damaged) rows under the key None.
                    row.pop(None, None)  # type: ignore[call-overload]
                    writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._columns = columns
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns, restval="")

    # -- Logger hooks ----------------------------------------------------------------------------

    def write(self, step: int, metrics: dict[str, int | float]) -> None:
        if _STEP in metrics:
            raise TitanaxError(
                f"metric name {_STEP!r} clashes with the CSV's step column",
                suggestion="rename the metric (e.g. 'global_step'); the step is recorded already",
            )
        if self._file is None:
            self._open()
        new = [k for k in metrics if k not in self._columns]
        if new:
            self._add_columns(new)
        assert self._writer is not None and self._file is not None
        # repr-exact floats (csv writes str(float), the shortest round-tripping form).
        self._writer.writerow({_STEP: step, **metrics})
        self._file.flush()

    def on_close(self) -> None:
        if self._file is not None:
            f, self._file, self._writer = self._file, None, None
            f.close()
