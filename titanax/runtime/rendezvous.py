"""Start-up: Titanax's own rendezvous before ``jax.distributed.initialize``

When a process of the job never starts (or dies before it connects), ``jax.distributed.initialize``
cannot say so: with jax 0.10 every process that did start waits ``initialization_timeout`` (JAX's
default: 300 s) in the coordination service's ``RegisterTask`` and is then aborted by a C++ check
failure (``DEADLINE_EXCEEDED``, exit 134) that Python cannot catch, and neither the coordinator nor
the others learn which process was missing. So :func:`titanax.runtime.initialize` first runs a small rendezvous of
its own on the coordinator's port:

* process 0 listens on the coordinator port (on every interface, as JAX's service does, or on
  ``JAX_COORDINATOR_BIND_ADDRESS``); every other process connects, retrying until process 0
  listens, and says ``(number of processes, its id)``;
* when every id has reported, process 0 tells each to go, waits for them to hang up (so the
  closed connections' ``TIME_WAIT`` state stays on their side, not on its port), closes the
  listener, and all call ``jax.distributed.initialize``, whose gRPC service then binds the same
  port;
* when the timeout passes first, process 0 raises :class:`~titanax.exceptions.DistributedError`
  naming the ids that never reported (and those that connected, then hung up) and sends the same
  verdict to everyone connected; a process that could not reach process 0 at all says that the
  coordinator at ``host:port`` never answered. Two processes with the same id, or a different
  number of processes, are refused at once.

It uses only the coordinator's port, which every cluster that runs JAX must already open, and
plain TCP, so no port or service is added. The timeout is ``initialization_timeout=`` of
:func:`initialize`, else ``TITANAX_INIT_TIMEOUT`` (seconds, e.g. ``TITANAX_INIT_TIMEOUT=300`` for
a cluster whose processes start minutes apart), else 120 s; JAX gets the same timeout for its own
registration. What this cannot cover is a process that dies in the instant between the
rendezvous and JAX's registration: JAX's abort after the timeout remains.
A job must use Titanax's :func:`initialize` in every process: a process 0 that calls
``jax.distributed.initialize`` itself never answers the rendezvous (the others say so), and
Titanax's process 0 reports such a peer as missing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from titanax.exceptions import DistributedError
from titanax.runtime.env_vars import INIT_TIMEOUT_VAR

__all__ = ["rendezvous"]


class _Job(NamedTuple):
    coordinator_address: str
    num_processes: int
    process_id: int


# Protocol name and version on the first line a process sends, so that process 0 tells a Titanax
# process from anything else that connects to its port.
_GREETING = "TITANAX-JOIN 1"
_LINE_LIMIT = 4096
_GREETING_WAIT_S = 5.0  # how long process 0 waits for a connection's first line
_HANGUP_WAIT_S = 5.0  # how long process 0 waits for the others to close after "GO"
_ANSWER_GRACE_S = 10.0  # how long past process 0's own deadline a process waits for its verdict
_CONNECT_ATTEMPT_S = 5.0
_RETRY_PAUSE_S = (0.1, 1.0)  # first and largest pause between a process's connection attempts


def _processes(ids: Sequence[int]) -> str:
    """``process 3`` or ``processes 1-4, 7``: ids as ranges, so a large job's list stays short."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"process {text}" if len(ids) == 1 else f"processes {text}"


def _host_port(address: str, what: str = "the coordinator address") -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # IPv6 literal
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"{what} {address!r} is not host:port",
            suggestion="give the address of process 0 as host:port, e.g. 10.0.0.1:12355",
        )
    return host, int(port)


def _listen(address: str, env: Mapping[str, str]) -> socket.socket:
    """A listening socket where JAX's coordination service will bind: ``JAX_COORDINATOR_BIND_ADDRESS``
    if set, else every interface (IPv6 and IPv4 on one socket, as gRPC's ``[::]``) at the
    coordinator's port."""
    bind = (env.get("JAX_COORDINATOR_BIND_ADDRESS") or "").strip() or None
    if bind is not None:
        host, port = _host_port(bind, "JAX_COORDINATOR_BIND_ADDRESS")
        try:
            candidates = [
                (family, sockaddr)
                for family, _, _, _, sockaddr in socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            ]
        except socket.gaierror as e:
            raise DistributedError(
                f"JAX_COORDINATOR_BIND_ADDRESS={bind} names a host that does not resolve: {e.strerror}",
                suggestion="set it to an address of this machine, e.g. [::]:PORT, or unset it",
            ) from e
    else:
        _, port = _host_port(address)
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    last: OSError | None = None
    for family, sockaddr in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # no IPv6 on this machine
            last = e
            continue
        try:
            # Binding over connections of an earlier run still in TIME_WAIT, as gRPC will.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(128)
            return sock
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise DistributedError(
                    f"process 0 cannot listen on port {port} for the coordinator {address}: "
                    "the port is already in use",
                    suggestion="another program, a run that is still alive or a second process 0 "
                    "holds it: choose another port (TITANAX_COORDINATOR_PORT, titanax launch --port) "
                    "or stop that program",
                ) from e
            last = e
    raise DistributedError(
        f"process 0 cannot listen on port {port} for the coordinator {address}: "
        f"{getattr(last, 'strerror', None) or last}",
        suggestion="choose a port above 1024 that this machine may open (TITANAX_COORDINATOR_PORT)",
    ) from last


def _read_line(stream: Any, conn: socket.socket, deadline: float) -> str | None:
    """The next line from ``stream`` (a ``conn.makefile("rb")``), None at end of stream.

    Raises:
      TimeoutError: ``deadline`` (``time.monotonic()``) passed first.
    """
    conn.settimeout(max(deadline - time.monotonic(), 1e-3))
    raw = stream.readline(_LINE_LIMIT)
    if not raw:
        return None
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def _send_line(conn: socket.socket, text: str) -> bool:
    """Sends one line; False when the other side is gone."""
    try:
        conn.settimeout(_GREETING_WAIT_S)
        conn.sendall((text.replace("\n", " ") + "\n").encode())
        return True
    except OSError:
        return False


def _parse_greeting(line: str | None) -> tuple[int, int] | None:
    """``(number of processes, process id)`` from a process's first line, None if it is not one."""
    prefix = _GREETING + " "
    if line is None or not line.startswith(prefix):
        return None
    words = line[len(prefix):].split()
    if len(words) != 2 or not all(w.isdigit() for w in words):
        return None
    return int(words[0]), int(words[1])


def _refusal(error: DistributedError) -> str:
    return "FAIL " + json.dumps({"message": error.message, "suggestion": error.suggestion})


def _make_room_for_connections(count: int) -> None:
    """Raises this process's soft open-file limit (often 1024) towards the hard one, so process 0 can
    hold one connection per process of a large job (JAX's coordination service needs as many)."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 256  # the connections, plus what the process has open already
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))


def _gather(spec: _Job, address: str, timeout_s: float, origin: str) -> None:
    """Process 0's side: wait until every other id has reported, then tell them all to go."""
    n = spec.num_processes
    deadline = time.monotonic() + timeout_s
    joined: dict[int, tuple[socket.socket, str]] = {}  # id -> (connection, its host)
    left: dict[int, str] = {}  # ids that connected and then hung up -> their host
    strangers: list[str] = []  # hosts of connections that did not speak the protocol
    _make_room_for_connections(n - 1)
    listener = _listen(address, os.environ)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)

    def refuse(conn: socket.socket, error: DistributedError) -> DistributedError:
        _send_line(conn, _refusal(error))
        conn.close()
        return error

    def admit() -> None:
        try:
            conn, sockaddr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise DistributedError(
                    f"process 0 (the coordinator at {address}) ran out of file descriptors after "
                    f"{len(joined)} of {n - 1} processes connected",
                    suggestion=f"raise the open-file limit of process 0 (ulimit -n) above {n + 256}",
                ) from e
            return  # a connection reset before it was accepted
        host = str(sockaddr[0]).removeprefix("::ffff:")  # an IPv4 peer on the dual-stack socket
        try:
            with conn.makefile("rb") as stream:
                line = _read_line(stream, conn, min(deadline, time.monotonic() + _GREETING_WAIT_S))
        except OSError:  # includes TimeoutError: it said nothing
            line = None
        claim = _parse_greeting(line)
        if claim is None:
            strangers.append(host)
            conn.close()
            return
        their_n, pid = claim
        if their_n != n:
            raise refuse(conn, DistributedError(
                f"process {pid} (on {host}) was started for {their_n} processes, process 0 (the "
                f"coordinator at {address}) for {n}",
                suggestion="give every process the same number of processes (TITANAX_NUM_PROCESSES, "
                "or the launcher's task count)",
            ))
        if pid == 0 or pid in joined:
            first = "the coordinator's own host" if pid == 0 else joined[pid][1]
            raise refuse(conn, DistributedError(
                f"two processes say they are process {pid} (on {first} and on {host}); the "
                f"coordinator is at {address}",
                suggestion=f"give each process its own id from 0 to {n - 1} (TITANAX_PROCESS_ID, "
                "or the launcher's rank)",
            ))
        joined[pid] = (conn, host)
        left.pop(pid, None)
        selector.register(conn, selectors.EVENT_READ, pid)
        _send_line(conn, f"WAIT {max(deadline - time.monotonic(), 0.0):.3f}")

    def hung_up(pid: int) -> None:
        # A joined process sends nothing more until "GO": anything readable is its end of stream.
        conn, host = joined.pop(pid)
        selector.unregister(conn)
        conn.close()
        left[pid] = host

    def handle(events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _ in events:
            if key.fileobj is listener:
                admit()
            else:
                hung_up(key.data)

    try:
        while True:
            remaining = deadline - time.monotonic()
            if len(joined) == n - 1:
                handle(selector.select(timeout=0))  # one that hung up just now is missing too
                if len(joined) == n - 1:
                    break
            elif remaining <= 0:
                raise _missing(n, address, timeout_s, origin, joined, left, strangers)
            else:
                handle(selector.select(timeout=remaining))
        for conn, _ in joined.values():
            _send_line(conn, "GO")
        # They hang up first, so that the closed connections' TIME_WAIT stays on their side.
        hangup_deadline = time.monotonic() + _HANGUP_WAIT_S
        while joined and (remaining := hangup_deadline - time.monotonic()) > 0:
            for key, _ in selector.select(timeout=remaining):
                if key.fileobj is not listener:
                    conn, _ = joined.pop(key.data)
                    selector.unregister(conn)
                    conn.close()
    except DistributedError as error:
        for conn, _ in joined.values():
            _send_line(conn, _refusal(error))
        raise
    finally:
        for conn, _ in joined.values():
            conn.close()
        selector.close()
        listener.close()


def _missing(
    n: int,
    address: str,
    timeout_s: float,
    origin: str,
    joined: Mapping[int, Any],
    left: Mapping[int, str],
    strangers: Sequence[str],
) -> DistributedError:
    missing = [i for i in range(1, n) if i not in joined]
    absent = [i for i in missing if i not in left]
    parts = []
    if absent:
        parts.append(f"{_processes(absent)} of {n} never connected")
    for pid, host in sorted(left.items()):
        parts.append(f"process {pid} (on {host}) connected and then hung up")
    message = (
        f"the coordinator (process 0) at {address} waited {timeout_s:g} s ({origin}) for the other "
        f"processes: {'; '.join(parts)}"
    )
    if strangers:
        hosts = ", ".join(sorted(set(strangers)))
        message += (
            f"; {len(strangers)} connection(s) from {hosts} did not come from "
            "titanax.runtime.initialize()"
        )
    _, port = _host_port(address)
    return DistributedError(
        message,
        suggestion=f"start all {n} processes (ids 0 to {n - 1}) with the same coordinator address; "
        f"check that {_processes(missing)} can reach port {port} of process 0's host and "
        f"call{'s' if len(missing) == 1 else ''} titanax.runtime.initialize() (titanax run does); "
        f"if the processes start more than {timeout_s:g} s apart, raise {INIT_TIMEOUT_VAR} (or "
        "initialization_timeout=)",
    )


def _connect(
    spec: _Job, address: str, deadline: float, timeout_s: float, origin: str
) -> socket.socket:
    """A connection to process 0, retried until ``deadline`` (it may start after this process)."""
    host, port = _host_port(address)
    pause = _RETRY_PAUSE_S[0]
    while True:
        try:
            return socket.create_connection(
                (host, port), timeout=max(min(deadline - time.monotonic(), _CONNECT_ATTEMPT_S), 1e-3)
            )
        except OSError as e:
            last = e
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(pause, remaining))  # the last attempt comes at the deadline
        pause = min(2 * pause, _RETRY_PAUSE_S[1])
    if isinstance(last, socket.gaierror):
        why = f"the host name {host!r} does not resolve ({last.strerror})"
    elif isinstance(last, ConnectionRefusedError):
        why = f"nothing listened on port {port} there"
    elif isinstance(last, TimeoutError):
        why = "connection attempts got no reply (a firewall dropping them?)"
    else:
        why = str(getattr(last, "strerror", None) or last)
    raise DistributedError(
        f"process {spec.process_id} of {spec.num_processes}: the coordinator (process 0) at "
        f"{address} never answered within {timeout_s:g} s ({origin}): {why}",
        suggestion=f"check that process 0 started (its output says why not) with the same "
        f"coordinator address, and that this machine can reach {host} port {port}; if process 0 "
        f"starts more than {timeout_s:g} s after this one, raise {INIT_TIMEOUT_VAR} (or "
        "initialization_timeout=)",
    ) from last


def _report(spec: _Job, address: str, timeout_s: float, origin: str) -> None:
    """Every other process's side: say who it is to process 0 and wait for its verdict."""
    deadline = time.monotonic() + timeout_s
    me = f"process {spec.process_id} of {spec.num_processes}"
    _, port = _host_port(address)
    with _connect(spec, address, deadline, timeout_s, origin) as conn, conn.makefile("rb") as stream:
        _send_line(conn, f"{_GREETING} {spec.num_processes} {spec.process_id}")
        # Process 0 answers at once with how long it will still wait, then with its verdict.
        answer_by = max(deadline, time.monotonic()) + _ANSWER_GRACE_S
        line: str | None = None
        try:
            line = _read_line(stream, conn, answer_by)
            if line is not None and line.startswith("WAIT "):
                try:
                    answer_by = time.monotonic() + float(line.split()[1]) + _ANSWER_GRACE_S
                except ValueError:
                    pass
                line = _read_line(stream, conn, answer_by)
        except TimeoutError:
            raise DistributedError(
                f"{me}: the coordinator (process 0) at {address} took the connection but gave no "
                "verdict in time",
                suggestion=f"check what runs on port {port} there: process 0 answers at once",
            ) from None
        except OSError:
            line = None  # reset by a process 0 that died
        if line == "GO":
            return
        if line is not None and line.startswith("FAIL "):
            try:
                verdict = json.loads(line[len("FAIL "):])
                message, suggestion = str(verdict["message"]), verdict.get("suggestion")
            except (ValueError, KeyError, TypeError):
                message, suggestion = line[len("FAIL "):], None
            # Every verdict of process 0 names its address already.
            raise DistributedError(f"{me} cannot start, process 0 reports: {message}",
                                   suggestion=suggestion)
        if line is None:
            raise DistributedError(
                f"{me}: the coordinator (process 0) at {address} hung up before every process had "
                "joined",
                suggestion="process 0 probably exited: its output says why",
            )
        raise DistributedError(
            f"{me}: what answers at {address} is not Titanax's process 0 (it said {line[:40]!r})",
            suggestion="every process must call titanax.runtime.initialize() (titanax run does); "
            "if process 0 already started without this process (this one was restarted?), restart "
            f"the whole job; otherwise another program holds port {port} there",
        )


def rendezvous(address: str, num_processes: int, process_id: int, timeout_s: float, origin: str) -> None:
    """Wait until every process of the job has reported to process 0 (see the module docstring).

    Args:
      address: the coordinator's ``host:port`` (process 0's, as for ``jax.distributed``).
      num_processes: how many processes the job has (more than one).
      process_id: this process's id, ``0 <= process_id < num_processes``.
      timeout_s: seconds to wait for the others.
      origin: where ``timeout_s`` came from, named in errors (e.g. ``"TITANAX_INIT_TIMEOUT=10"``).

    Raises:
      DistributedError: a process did not report within ``timeout_s`` (process 0 names the ids;
        the others quote process 0, or say it never answered), two processes claim one id, or
        they disagree on the number of processes.
    """
    job = _Job(address, num_processes, process_id)
    if process_id == 0:
        _gather(job, address, timeout_s, origin)
    else:
        _report(job, address, timeout_s, origin)
