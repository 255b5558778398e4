"""A local multi-process launcher, like ``torchrun --standalone``: N copies of a command on this machine.

Each process gets the ``TITANAX_*`` variables :func:`titanax.runtime.initialize` reads (coordinator,
number of processes, process id), so the launched script needs no arguments to join the others.
With ``cpu_devices_per_proc`` each process also simulates that many CPU devices, which turns one
laptop into a small multi-host cluster (2 processes x 4 CPU devices = an 8-device global mesh).

Failure handling is the point: when one process dies, the others are usually blocked in a
collective waiting for it and would hang until XLA's timeout (minutes). The launcher notices the
first failure, says which process failed and how, stops the rest (SIGTERM, then SIGKILL after a
grace period, to the whole process group so that grandchildren go too) and returns the failed
process's exit code.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, TextIO

from titanax.exceptions import DistributedError
from titanax.runtime.env_vars import LAUNCHER_PID_VAR

__all__ = ["launch", "child_environment", "free_port", "exit_code"]

_PREFIX = "titanax launch:"
_FORCE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_POLL_S = 0.05
_READER_JOIN_S = 5.0


def free_port(host: str = "") -> int:
    """A TCP port that is free right now, found by binding port 0 (the OS picks one).

    Another program may take it before the coordinator binds it; that race is small on one machine.

    Args:
      host: the interface to bind; ``""`` means all.

    Returns:
      The port number.

    Example:
      >>> 0 < free_port() < 65536
      True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _strip_force_device_count(xla_flags: str) -> str:
    return " ".join(
        f for f in xla_flags.split() if f.split("=", 1)[0] != _FORCE_DEVICES_FLAG
    )


def child_environment(
    base: Mapping[str, str],
    *,
    process_id: int,
    nprocs: int,
    coordinator_address: str,
    cpu_devices_per_proc: int | None = None,
) -> dict[str, str]:
    """The environment of one launched process: ``base`` plus the ``TITANAX_*`` cluster variables.

    Sets ``TITANAX_COORDINATOR_ADDRESS``, ``TITANAX_NUM_PROCESSES``, ``TITANAX_PROCESS_ID``,
    ``TITANAX_LOCAL_PROCESS_ID``, ``TITANAX_LAUNCHER_PID`` (so that the process dies with the
    launcher: :mod:`titanax.runtime.launcher`) and ``PYTHONUNBUFFERED=1`` (so output streams as it
    is printed).
    With ``cpu_devices_per_proc`` it also sets ``TITANAX_CPU_DEVICES`` and drops
    ``--xla_force_host_platform_device_count`` from ``XLA_FLAGS``, which would otherwise compete
    with it.

    Args:
      base: the environment to start from (not modified).
      process_id: this process's index.
      nprocs: number of processes.
      coordinator_address: ``host:port`` of process 0.
      cpu_devices_per_proc: simulated CPU devices per process, or None for the real devices.

    Returns:
      A new dict.

    Example:
      >>> env = child_environment({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
      ...                         process_id=1, nprocs=2, coordinator_address="localhost:1234",
      ...                         cpu_devices_per_proc=4)
      >>> env["TITANAX_PROCESS_ID"], env["TITANAX_CPU_DEVICES"], "XLA_FLAGS" in env
      ('1', '4', False)
    """
    env = dict(base)
    env.update(
        TITANAX_COORDINATOR_ADDRESS=coordinator_address,
        TITANAX_NUM_PROCESSES=str(nprocs),
        TITANAX_PROCESS_ID=str(process_id),
        TITANAX_LOCAL_PROCESS_ID=str(process_id),
        PYTHONUNBUFFERED="1",
    )
    env[LAUNCHER_PID_VAR] = str(os.getpid())
    if cpu_devices_per_proc is not None:
        env["TITANAX_CPU_DEVICES"] = str(cpu_devices_per_proc)
        if "XLA_FLAGS" in env:
            flags = _strip_force_device_count(env["XLA_FLAGS"])
            if flags:
                env["XLA_FLAGS"] = flags
            else:
                del env["XLA_FLAGS"]
    return env


def exit_code(returncode: int) -> int:
    """A shell-style exit status: a process killed by signal ``S`` (``Popen`` says ``-S``) is ``128 + S``.

    Args:
      returncode: ``Popen.returncode``.

    Returns:
      The status a shell would report.

    Example:
      >>> exit_code(3), exit_code(-9)
      (3, 137)
    """
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"failed with exit code {returncode}"


class _Output:
    """Whole lines to one stream from many threads, flushed one by one."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            try:
                self._stream.write(text if text.endswith("\n") else text + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed or broken stream must not kill the launcher
                pass


# Runtime chatter every process prints on a healthy start: one Gloo line per rank and peer count,
# "[Gloo] Rank 0 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3". A
# process's ranks print theirs from several threads at once, piece by piece, so the pieces of two
# lines arrive interleaved ("[Gloo] Rank [Gloo] Rank 1 is connected to ..." then "0 is connected to
# ..."): a line holding one of the message's own phrases and nothing but its pieces is chatter.
_CHATTER_PIECES = re.compile(r"\[Gloo\] Rank |Expected number of connected peer ranks is :|is connected to"
                             r"|peer ranks\.?|\d+|\s+")
_CHATTER_PHRASES = ("[Gloo] Rank ", "is connected to", "Expected number of connected peer ranks")


def _is_chatter(text: str) -> bool:
    return any(phrase in text for phrase in _CHATTER_PHRASES) and not _CHATTER_PIECES.sub("", text)


def _pump(pipe: IO[bytes], prefix: str, out: _Output, verbose: bool = False) -> None:
    with contextlib.suppress(OSError, ValueError):
        with pipe:
            for raw in iter(pipe.readline, b""):
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if verbose or not _is_chatter(text):
                    out.line(prefix + text)


def _validate(
    command: Sequence[str],
    nprocs: int,
    cpu_devices_per_proc: int | None,
    port: int | None,
    grace_s: float,
) -> list[str]:
    if isinstance(command, (str, bytes)):
        raise DistributedError(
            f"launch() got the command as one string ({command!r}); it runs an argument list, "
            "without a shell",
            suggestion=f"pass a list, e.g. {shlex.split(command) if isinstance(command, str) else []!r}"
            " (shlex.split(text) splits a command line)",
        )
    argv = [str(a) for a in command]
    if not argv:
        raise DistributedError(
            "launch() got an empty command",
            suggestion="pass the program and its arguments, e.g. "
            "[sys.executable, 'train.py', '--steps', '100']",
        )

    def positive_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not positive_int(nprocs):
        raise DistributedError(
            f"nprocs={nprocs!r} must be a whole number of processes, at least 1",
            suggestion="use e.g. nprocs=2 (titanax launch --nprocs 2)",
        )
    if cpu_devices_per_proc is not None and not positive_int(cpu_devices_per_proc):
        raise DistributedError(
            f"cpu_devices_per_proc={cpu_devices_per_proc!r} must be a whole number of devices, "
            "at least 1",
            suggestion="use e.g. cpu_devices_per_proc=4, or leave it unset to use the real devices",
        )
    if port is not None and not (
        isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536
    ):
        raise DistributedError(
            f"port={port!r} is not a TCP port",
            suggestion="pass a free port between 1024 and 65535, or leave it unset to pick one",
        )
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or grace_s < 0:
        raise DistributedError(
            f"grace_s={grace_s!r} must be a number of seconds, at least 0",
            suggestion="use e.g. grace_s=10 (0 kills at once)",
        )
    return [_own_program(argv[0]), *argv[1:]]


def _own_program(program: str) -> str:
    """A bare program name runs from the launcher's own environment first: ``.venv/bin/titanax
    launch -- titanax run ...`` from a shell that never activated the venv starts the venv's
    ``titanax`` (and its ``python3``), not whatever ``PATH`` finds, or nothing."""
    if os.sep in program or (os.altsep and os.altsep in program):
        return program
    own = os.path.join(os.path.dirname(sys.executable), program)
    return own if os.path.isfile(own) and os.access(own, os.X_OK) else program


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Sends ``sig`` to the process group ``proc`` leads (its own session, so grandchildren too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    if proc.returncode is None:  # the leader left its group (setpgid): signal it directly
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.send_signal(sig)


def _stop(
    procs: Sequence[subprocess.Popen],
    waiters: Sequence[threading.Thread],
    grace_s: float,
    out: _Output,
    hurry: Callable[[], bool] = lambda: False,
) -> None:
    """SIGTERM every process group, wait up to ``grace_s`` (or until ``hurry()``, e.g. a second
    Ctrl-C), SIGKILL what is left.

    ``waiters`` reap the processes (one thread each, blocked in ``Popen.wait``), so a process has
    exited once its ``returncode`` is set.
    """
    for proc in procs:
        # Groups whose leader already exited are signalled too: its children may still run.
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.returncode is None for p in procs) and not hurry():
        time.sleep(_POLL_S)
    for i, proc in enumerate(procs):
        if proc.returncode is None:
            why = "the launcher was interrupted again" if hurry() else (
                f"it did not exit within {grace_s:g}s of SIGTERM")
            out.line(f"{_PREFIX} process {i} (pid {proc.pid}): {why}; sending SIGKILL")
        _signal_group(proc, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    for waiter in waiters:
        waiter.join(timeout=max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _forward_signals(received: list[int]) -> Iterator[None]:
    """Records SIGINT/SIGTERM sent to the launcher (only the main thread can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: object) -> None:
        received.append(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def launch(
    command: Sequence[str],
    *,
    nprocs: int,
    cpu_devices_per_proc: int | None = None,
    port: int | None = None,
    host: str = "localhost",
    grace_s: float = 10.0,
    env: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    verbose: bool = False,
) -> int:
    """Runs ``nprocs`` copies of ``command`` on this machine as one multi-process JAX job; waits for them.

    Process ``i`` gets ``TITANAX_COORDINATOR_ADDRESS=host:port``, ``TITANAX_NUM_PROCESSES=nprocs``,
    ``TITANAX_PROCESS_ID=i`` and ``TITANAX_LOCAL_PROCESS_ID=i`` (see :func:`child_environment`), so
    a script that calls :func:`titanax.runtime.initialize` joins the others. Every line a process
    prints (stdout and stderr) is copied to ``stdout`` prefixed ``[p{i}] ``, except the collective
    runtime's per-rank connection lines (``[Gloo] Rank 0 is connected to 1 peer ranks ...``),
    shown only with ``verbose=True``.

    When every process exits 0 the result is 0. As soon as one exits otherwise, the launcher prints
    ``titanax launch: process 1 (pid 1234) failed with exit code 3; stopping the other processes``
    (or ``... was killed by SIGKILL ...``), sends SIGTERM to the others' process groups, waits up
    to ``grace_s`` seconds, SIGKILLs what is left, repeats the failure as its last line
    (``titanax launch: stopped: process 1 ...``, after what the others printed as they died) and
    returns the failed process's exit code (``128 + signal`` for a signal). When processes had
    already exited with code 0 before the failure (e.g. one that never called
    :func:`~titanax.runtime.initialize`, so the others waited for it in vain), the failure names them:
    ``... process 0 (pid 1233) failed with exit code 1 after process 1 (pid 1234) had exited with
    code 0``. The SIGKILL matters: Titanax's engine and JAX's preemption
    notifier catch SIGTERM to act on it later, and a process blocked in a collective with a dead
    peer never gets there. SIGINT / SIGTERM sent to the launcher (when it runs in the main thread)
    stop all processes the same way (a second one skips the grace period) and return 130 / 143.
    Each process runs in its own session, so the signals reach its children as well.

    Args:
      command: the program and its arguments, run without a shell
        (e.g. ``[sys.executable, "train.py"]``).
      nprocs: number of processes (>= 1).
      cpu_devices_per_proc: simulate this many CPU devices in each process (``TITANAX_CPU_DEVICES``);
        None uses the real devices.
      port: the coordinator's port; None picks a free one.
      host: the coordinator's host name, as the processes should reach it.
      grace_s: seconds between SIGTERM and SIGKILL when stopping processes.
      env: the base environment of the processes; ``os.environ`` if None.
      stdout: where the processes' output and the launcher's messages go; ``sys.stdout`` (looked
        up at call time) if None.
      verbose: also copy the runtime's per-rank connection lines (``titanax launch --debug``).

    Returns:
      0 if every process succeeded, else the exit code of the first process that failed (130 / 143
      when the launcher was interrupted).

    Raises:
      DistributedError: an empty command, ``nprocs`` or ``cpu_devices_per_proc`` below 1, a bad
        port or grace period, or a program that cannot be started.

    Example:
      >>> import sys
      >>> launch([sys.executable, "-c", "import os; print(os.environ['TITANAX_PROCESS_ID'])"],
      ...        nprocs=2)                                                  # doctest: +SKIP
      titanax launch: started process 0 of 2 (pid 4101)
      titanax launch: started process 1 of 2 (pid 4102)
      [p0] 0
      [p1] 1
      0
    """
    argv = _validate(command, nprocs, cpu_devices_per_proc, port, grace_s)
    out = _Output(stdout if stdout is not None else sys.stdout)
    base = dict(os.environ if env is None else env)
    address = f"{host}:{port if port is not None else free_port()}"

    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []  # output readers, then exit waiters
    waiters: list[threading.Thread] = []
    exits: queue.SimpleQueue[int] = queue.SimpleQueue()  # process indices, in the order they exit
    received: list[int] = []
    outcome: list[str] = []  # why the launcher stopped the processes, repeated after their last output

    def reap(i: int, proc: subprocess.Popen) -> None:
        proc.wait()
        exits.put(i)

    def thread(target: Callable[..., None], *args: object, name: str) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name=name)
        t.start()
        threads.append(t)
        return t

    with _forward_signals(received):
        try:
            for i in range(nprocs):
                child_env = child_environment(
                    base,
                    process_id=i,
                    nprocs=nprocs,
                    coordinator_address=address,
                    cpu_devices_per_proc=cpu_devices_per_proc,
                )
                try:
                    proc = subprocess.Popen(
                        argv,
                        env=child_env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        start_new_session=True,
                    )
                except OSError as e:
                    raise DistributedError(
                        f"cannot start {argv[0]!r} for process {i}: {e.strerror or e}",
                        suggestion="check the program name: a bare name is looked up in the "
                        f"launcher's environment ({os.path.dirname(sys.executable)}), then on PATH; "
                        "give a path otherwise",
                    ) from e
                procs.append(proc)
                out.line(f"{_PREFIX} started process {i} of {nprocs} (pid {proc.pid})")
                thread(_pump, proc.stdout, f"[p{i}] ", out, verbose, name=f"titanax-launch-p{i}-out")
                thread(_pump, proc.stderr, f"[p{i}] ", out, verbose, name=f"titanax-launch-p{i}-err")
                waiters.append(thread(reap, i, proc, name=f"titanax-launch-p{i}-wait"))
            return _wait(procs, waiters, exits, received, grace_s, out, outcome)
        except BaseException:
            # A failed start, KeyboardInterrupt outside the main-thread handler, ...: leave nothing.
            if procs:
                _stop(procs, waiters, grace_s, out)
            raise
        finally:
            # Let the readers copy what the processes printed last (a grandchild that still holds
            # a pipe open is not waited for beyond a few seconds).
            deadline = time.monotonic() + _READER_JOIN_S
            for t in threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            if outcome and len(procs) > 1:  # the others' last words (stack traces) came after it
                out.line(f"{_PREFIX} {outcome[0]}")


def _wait(
    procs: Sequence[subprocess.Popen],
    waiters: Sequence[threading.Thread],
    exits: queue.SimpleQueue[int],
    received: list[int],
    grace_s: float,
    out: _Output,
    outcome: list[str],
) -> int:
    finished = 0
    # Processes that exited 0 while others still ran: when another then fails, an early exit (a
    # process that never joined the job, so the others waited for it in vain) is a likely cause,
    # so the failure names them.
    succeeded: list[int] = []
    while finished < len(procs):
        if received:
            sig = received[0]
            out.line(
                f"{_PREFIX} received {signal.Signals(sig).name}; stopping "
                f"{'all processes' if len(procs) > 1 else 'the process'}"
            )
            _stop(procs, waiters, grace_s, out, hurry=lambda: len(received) > 1)
            return 128 + sig
        try:
            i = exits.get(timeout=_POLL_S)  # short, so that a signal is noticed quickly
        except queue.Empty:
            continue
        finished += 1
        rc = procs[i].returncode
        if rc == 0:
            succeeded.append(i)
        else:
            others = any(p.returncode is None for p in procs)
            failure = f"process {i} (pid {procs[i].pid}) {_describe(rc)}"
            if succeeded:
                earlier = ", ".join(f"{j} (pid {procs[j].pid})" for j in sorted(succeeded))
                plural = "es" if len(succeeded) > 1 else ""
                failure += f" after process{plural} {earlier} had exited with code 0"
            outcome.append(f"stopped: {failure}")
            out.line(f"{_PREFIX} {failure}" + ("; stopping the other processes" if others else ""))
            _stop(procs, waiters, grace_s, out, hurry=lambda: bool(received))
            return exit_code(rc)
    return 0
