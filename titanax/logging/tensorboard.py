"""TensorBoard event files, written with ``tensorboardX``'s record writer and protos.

``tensorboardX`` is an optional extra (``pip install "titanax[tensorboard]"``); importing
:mod:`titanax.logging` does not need it, constructing :class:`TensorBoard` does.

Why not ``tensorboardX.SummaryWriter``: it queues events through a ``multiprocessing.Queue`` to a
background thread, so ``flush()`` can return before a just-added event reaches the file, and it
``fsync``s on every flush. Here events are written synchronously with tensorboardX's
``RecordWriter`` (which also handles ``gs://`` and ``s3://`` paths) and flushed on a timer.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

from titanax.exceptions import TitanaxError
from titanax.logging.base import Logger, check_destination, check_path

__all__ = ["TensorBoard"]

_INSTALL = 'pip install "titanax[tensorboard]"  (or: pip install tensorboardX)'
_file_counter = itertools.count()  # two writers opened in the same second get distinct files


def _import_tensorboardx() -> Any:
    try:
        from tensorboardX import record_writer
        from tensorboardX.proto import event_pb2, summary_pb2
    except ImportError as e:
        raise TitanaxError(
            f"tx.logging.TensorBoard needs the tensorboardX package, which is not installed ({e})",
            suggestion=_INSTALL, owner="TensorBoard", field="logdir",
        ) from None
    return record_writer, event_pb2, summary_pb2


class TensorBoard(Logger):
    """Writes metrics as TensorBoard scalars (one event per logged step, all metrics in it).

    Each run (each :meth:`start`, or the first :meth:`log` without one) opens a new event file in
    ``logdir``. A run that resumes at ``start_step > 0`` first writes a "session start" marker at
    that step, so TensorBoard hides the points the crashed run logged at or after it (the same
    ``purge_step`` mechanism as ``tensorboardX.SummaryWriter``). Only process 0 writes.

    Args:
      logdir: the directory for event files (created if missing; ``gs://`` / ``s3://`` work when
        tensorboardX's cloud dependencies are installed).
      every: write every ``every``-th step (and the last one).
      flush_secs: flush the file when this many seconds have passed since the last flush (and on
        close); 0 flushes after every write.

    Raises:
      TitanaxError: if tensorboardX is not installed, or an argument is invalid.

    Example:
      >>> import tempfile
      >>> with TensorBoard(tempfile.mkdtemp()) as tb:    # doctest: +SKIP
      ...     tb.log(10, {"loss": 0.5})
      >>> # tensorboard --logdir <that dir>
    """

    def __init__(self, logdir: str | os.PathLike[str], every: int = 1, *, flush_secs: float = 10.0) -> None:
        super().__init__(every=every)
        # Checked at construction on every process, so a missing extra fails before training.
        self._record_writer, self._event_pb2, self._summary_pb2 = _import_tensorboardx()
        self.logdir = check_path(logdir, "TensorBoard", "logdir", 'TensorBoard("runs/x/tb")')
        check_destination(self.logdir, "TensorBoard", "logdir", directory=True)
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or flush_secs < 0:
            raise TitanaxError(
                f"TensorBoard(flush_secs={flush_secs!r}) must be a number >= 0",
                suggestion="use e.g. flush_secs=10 (0 flushes after every write)",
                owner="TensorBoard", field="flush_secs", value=flush_secs,
            )
        self.flush_secs = float(flush_secs)
        self._writer: Any = None  # tensorboardX RecordWriter for the open file
        self._last_flush = 0.0
        self.file_path: str | None = None  # the event file being written, once opened

    def _open(self, purge_step: int | None) -> None:
        self._record_writer.directory_check(self.logdir)
        # TensorBoard reads every file whose name contains "tfevents"; pid and a counter make the
        # name unique even for two writers opened in the same second on one host.
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
                f".{os.getpid()}.{next(_file_counter)}")
        self.file_path = os.path.join(self.logdir, name)  # also right for gs://bucket/dir on POSIX
        self._writer = self._record_writer.RecordWriter(self.file_path)
        event_pb2 = self._event_pb2
        self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write_event(event_pb2.Event(
                wall_time=time.time(), step=purge_step,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._flush()

    def _write_event(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    def _flush(self) -> None:
        self._writer.flush()
        self._last_flush = time.monotonic()

    def on_start(self, *, total_steps: int | None, start_step: int) -> None:
        self.on_close()
        self._open(purge_step=start_step if start_step > 0 else None)

    def write(self, step: int, metrics: dict[str, int | float]) -> None:
        if self._writer is None:
            self._open(purge_step=None)
        summary_pb2 = self._summary_pb2
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()])
        self._write_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self._flush()

    def on_close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.flush()
            writer.close()
