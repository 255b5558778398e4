"""The local launcher: environment, output prefixing, failure propagation, stopping stragglers.

Children are tiny ``python -c`` programs that never import JAX, so the whole file runs in seconds.
Children that must be alive when something happens write a file in ``tmp_path`` once they are
ready, and the other side waits for it, so nothing depends on timing luck.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import threading
import time

import pytest

from titanax.exceptions import DistributedError, TitanaxError
from titanax.launch import child_environment, exit_code, launch

PY = sys.executable


class _Buffer(io.TextIOBase):
    """A StringIO that may be written from the launcher's threads while a test reads it."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def getvalue(self) -> str:
        with self._lock:
            return "".join(self._parts)


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a non-reaping PID 1 counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _pids(output: str, tag: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{tag} (\d+)", output)]


def _ready_then(tmp_path, body: str) -> str:
    """Child code for process 0: run ``body`` setup, say READY (by file), then sleep."""
    return (
        "import os, signal, subprocess, sys, time\n"
        f"{body}\n"
        "print('PID', os.getpid(), flush=True)\n"
        f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
        "time.sleep(600)\n"
    )


def _fail_when_ready(tmp_path, code: int) -> str:
    """Child code for process 1: wait until process 0 is ready, then exit with ``code``."""
    return (
        "import os, sys, time\n"
        f"while not os.path.exists({str(tmp_path / 'ready')!r}):\n"
        "    time.sleep(0.02)\n"
        f"sys.exit({code})\n"
    )


def _by_process(tmp_path, *codes: str) -> list[str]:
    """One ``python -c`` command that runs ``codes[TITANAX_PROCESS_ID]``."""
    src = (
        "import os\n"
        f"codes = {list(codes)!r}\n"
        "exec(codes[int(os.environ['TITANAX_PROCESS_ID'])])\n"
    )
    return [PY, "-c", src]


# --------------------------------------------------------------------------------------------------
# Success: environment and output
# --------------------------------------------------------------------------------------------------


def test_all_succeed_env_and_prefixed_output():
    code = (
        "import os, sys\n"
        "keys = ['TITANAX_COORDINATOR_ADDRESS', 'TITANAX_NUM_PROCESSES', 'TITANAX_PROCESS_ID',\n"
        "        'TITANAX_LOCAL_PROCESS_ID', 'PYTHONUNBUFFERED', 'TITANAX_CPU_DEVICES']\n"
        "print('ENV', *[os.environ.get(k, '-') for k in keys])\n"
        "pid = os.environ['TITANAX_PROCESS_ID']\n"
        "for i in range(50):\n"
        "    print(f'OUT{pid}-{i}-' + 'x' * 2000)\n"
        "    print(f'ERR{pid}-{i}-' + 'y' * 2000, file=sys.stderr)\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    out = _Buffer()
    assert launch([PY, "-c", code], nprocs=2, port=23456, stdout=out) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert all(line.startswith(("[p0] ", "[p1] ", "titanax launch: ")) for line in lines), text[:500]
    for i in (0, 1):
        assert re.search(rf"^titanax launch: started process {i} of 2 \(pid \d+\)$", text, re.M)
        env_line = next(line for line in lines if line.startswith(f"[p{i}] ENV"))
        assert env_line.split()[2:] == ["localhost:23456", "2", str(i), str(i), "1", "-"]
        # Every line arrives whole, in the order the process printed it.
        for stream, fill in (("OUT", "x"), ("ERR", "y")):
            got = [line for line in lines if line.startswith(f"[p{i}] {stream}")]
            assert got == [f"[p{i}] {stream}{i}-{k}-" + fill * 2000 for k in range(50)]
        assert f"[p{i}] no newline at the end" in lines


@pytest.mark.parametrize("verbose", [False, True])
def test_runtime_connection_chatter_is_dropped_even_interleaved(verbose):
    # what a process with 4 CPU devices printed under `titanax launch`: its ranks' Gloo lines, two of
    # them interleaved piece by piece; a line that only mentions Gloo is the user's and stays
    code = (
        "import sys\n"
        "e = sys.stderr\n"
        "e.write('[Gloo] Rank 2 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\\n')\n"
        "e.write('[Gloo] Rank [Gloo] Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\\n')\n"
        "e.write('0 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\\n')\n"
        "print('[Gloo] Rank 0 connected; my own line about peer ranks')\n"
        "print('8 peer ranks')\n"
        "print('step 1/8 | loss 5.425')\n"
    )
    out = _Buffer()
    assert launch([PY, "-c", code], nprocs=1, stdout=out, verbose=verbose) == 0
    lines = out.getvalue().splitlines()
    assert "[p0] step 1/8 | loss 5.425" in lines
    assert "[p0] [Gloo] Rank 0 connected; my own line about peer ranks" in lines
    assert "[p0] 8 peer ranks" in lines  # made of the pieces, but none of the message's own phrases
    chatter = [line for line in lines if "is connected to 3 peer ranks" in line]
    assert len(chatter) == (3 if verbose else 0), lines


def test_free_port_and_host_and_explicit_env():
    code = "import os; print('ADDR', os.environ['TITANAX_COORDINATOR_ADDRESS'], os.environ.get('HOME', '-'))"
    out = _Buffer()
    env = {"PATH": os.environ.get("PATH", ""), "ONLY_THIS": "1"}
    assert launch([PY, "-c", code], nprocs=1, host="127.0.0.1", env=env, stdout=out) == 0
    (line,) = [line for line in out.getvalue().splitlines() if "ADDR" in line]
    host, port = line.split()[2].rsplit(":", 1)
    assert host == "127.0.0.1" and 0 < int(port) < 65536
    assert line.split()[3] == "-"  # env= replaces os.environ, it does not add to it


def test_cpu_devices_set_and_forced_device_count_dropped():
    code = "import os; print('FLAGS', repr(os.environ.get('XLA_FLAGS')), os.environ['TITANAX_CPU_DEVICES'])"
    out = _Buffer()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8 --xla_bar",
    }
    assert launch([PY, "-c", code], nprocs=2, cpu_devices_per_proc=3, env=env, stdout=out) == 0
    flags = [line for line in out.getvalue().splitlines() if "FLAGS" in line]
    assert len(flags) == 2
    assert all(line.endswith("FLAGS '--xla_foo=1 --xla_bar' 3") for line in flags), flags


def test_child_environment():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "KEEP": "1"}
    env = child_environment(base, process_id=1, nprocs=4, coordinator_address="h:1",
                            cpu_devices_per_proc=2)
    assert base == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "KEEP": "1"}
    assert "XLA_FLAGS" not in env and env["KEEP"] == "1"
    assert (env["TITANAX_NUM_PROCESSES"], env["TITANAX_PROCESS_ID"], env["TITANAX_CPU_DEVICES"]) == (
        "4", "1", "2")
    # Without simulated devices the user's XLA_FLAGS are theirs: kept as they are.
    env = child_environment(base, process_id=0, nprocs=2, coordinator_address="h:1")
    assert env["XLA_FLAGS"] == base["XLA_FLAGS"] and "TITANAX_CPU_DEVICES" not in env
    assert (exit_code(0), exit_code(3), exit_code(-9), exit_code(-15)) == (0, 3, 137, 143)


# --------------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------------


def test_one_failure_stops_the_others_and_their_children(tmp_path):
    spawn = (
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('GRANDCHILD', g.pid, flush=True)"
    )
    out = _Buffer()
    start = time.monotonic()
    rc = launch(_by_process(tmp_path, _ready_then(tmp_path, spawn), _fail_when_ready(tmp_path, 3)),
                nprocs=2, stdout=out)
    elapsed = time.monotonic() - start
    text = out.getvalue()
    assert rc == 3, text
    assert elapsed < 8, elapsed  # the sleeper dies on SIGTERM, no grace period spent
    assert re.search(r"^titanax launch: process 1 \(pid \d+\) failed with exit code 3; stopping the "
                     r"other processes$", text, re.M), text
    (sleeper,), (grandchild,) = _pids(text, "PID"), _pids(text, "GRANDCHILD")
    assert _wait_for(lambda: not _alive(sleeper), 5), "process 0 still runs"
    assert _wait_for(lambda: not _alive(grandchild), 5), "process 0's child still runs"


def test_a_failure_names_the_processes_that_had_already_exited(tmp_path):
    # Processes 1 and 2 leave at once with code 0 (as one that never joins the job would); process 0
    # fails once both are gone (its peers never came): the failure, last line included, names them.
    leave = f"import os; open({str(tmp_path)!r} + f'/gone{{os.getpid()}}', 'w').close()"
    fail_when_alone = (
        "import glob, os, sys, time\n"
        f"while len(pids := glob.glob({str(tmp_path / 'gone*')!r})) < 2:\n"
        "    time.sleep(0.02)\n"
        "while any(os.path.exists('/proc/' + p.rsplit('gone', 1)[1]) for p in pids):\n"
        "    time.sleep(0.02)\n"
        "sys.exit(4)\n"
    )
    out = _Buffer()
    rc = launch(_by_process(tmp_path, fail_when_alone, leave, leave), nprocs=3, stdout=out)
    text = out.getvalue()
    assert rc == 4, text
    pids = {int(i): pid for i, pid in re.findall(r"started process (\d) of 3 \(pid (\d+)\)", text)}
    failure = (f"process 0 (pid {pids[0]}) failed with exit code 4 after processes 1 (pid {pids[1]}), "
               f"2 (pid {pids[2]}) had exited with code 0")
    assert text.strip().splitlines()[-1] == f"titanax launch: stopped: {failure}", text


def test_sigterm_ignored_is_killed_after_grace(tmp_path):
    ignore = "signal.signal(signal.SIGTERM, lambda *a: None)"
    out = _Buffer()
    start = time.monotonic()
    rc = launch(_by_process(tmp_path, _ready_then(tmp_path, ignore), _fail_when_ready(tmp_path, 1)),
                nprocs=2, grace_s=1, stdout=out)
    elapsed = time.monotonic() - start
    text = out.getvalue()
    assert rc == 1, text
    assert 1.0 <= elapsed < 8, elapsed
    assert re.search(r"^titanax launch: process 0 \(pid \d+\): it did not exit within 1s of SIGTERM; "
                     r"sending SIGKILL$", text, re.M), text
    (stubborn,) = _pids(text, "PID")
    assert _wait_for(lambda: not _alive(stubborn), 5)


def test_process_killed_by_a_signal(tmp_path):
    out = _Buffer()
    result: list[int] = []
    code = _ready_then(tmp_path, "")
    runner = threading.Thread(
        target=lambda: result.append(launch([PY, "-c", code], nprocs=2, grace_s=2, stdout=out)),
        daemon=True,
    )
    runner.start()
    assert _wait_for(lambda: len(_pids(out.getvalue(), "PID")) == 2, 30), out.getvalue()
    (victim,) = _pids(out.getvalue(), r"\[p1\] PID")
    os.kill(victim, signal.SIGKILL)
    runner.join(60)
    assert not runner.is_alive(), "launch() did not return after a process was killed"
    text = out.getvalue()
    assert result == [137], text
    assert f"titanax launch: process 1 (pid {victim}) was killed by SIGKILL; stopping the other " \
           "processes" in text
    (other,) = _pids(text, r"\[p0\] PID")
    assert _wait_for(lambda: not _alive(other), 5)


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_launcher_interrupted_stops_everything(tmp_path, sig, expected):
    # launch() runs in this (main) thread, so it installs its handlers; the signal goes to pytest's
    # own process while launch() is waiting, and must end up stopping the children instead.
    assert threading.current_thread() is threading.main_thread()
    out = _Buffer()
    code = _ready_then(tmp_path, "")

    def interrupt() -> None:
        if _wait_for(lambda: len(_pids(out.getvalue(), "PID")) == 2, 30):
            os.kill(os.getpid(), sig)

    threading.Thread(target=interrupt, daemon=True).start()
    rc = launch([PY, "-c", code], nprocs=2, grace_s=2, stdout=out)
    text = out.getvalue()
    assert rc == expected, text
    assert f"titanax launch: received {signal.Signals(sig).name}; stopping all processes" in text
    for pid in _pids(text, "PID"):
        assert _wait_for(lambda pid=pid: not _alive(pid), 5)
    assert signal.getsignal(signal.SIGINT) is not None  # handlers restored (pytest's or default)


def test_second_interrupt_skips_the_grace_period(tmp_path):
    out = _Buffer()
    code = _ready_then(tmp_path, "signal.signal(signal.SIGTERM, lambda *a: None)")

    def interrupt_twice() -> None:
        if _wait_for(lambda: len(_pids(out.getvalue(), "PID")) == 2, 30):
            os.kill(os.getpid(), signal.SIGINT)
            if _wait_for(lambda: "received SIGINT" in out.getvalue(), 10):
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    start = time.monotonic()
    rc = launch([PY, "-c", code], nprocs=2, grace_s=60, stdout=out)
    text = out.getvalue()
    assert rc == 130 and time.monotonic() - start < 20, text
    assert "the launcher was interrupted again; sending SIGKILL" in text
    for pid in _pids(text, "PID"):
        assert _wait_for(lambda pid=pid: not _alive(pid), 5)


# --------------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(command=[], nprocs=1), "empty command"),
        (dict(command=f"{PY} -c pass", nprocs=1), "one string"),
        (dict(command=[PY, "-c", "pass"], nprocs=0), "nprocs=0"),
        (dict(command=[PY, "-c", "pass"], nprocs=True), "nprocs=True"),
        (dict(command=[PY, "-c", "pass"], nprocs=2.0), "nprocs=2.0"),
        (dict(command=[PY, "-c", "pass"], nprocs=1, cpu_devices_per_proc=0), "cpu_devices_per_proc=0"),
        (dict(command=[PY, "-c", "pass"], nprocs=1, port=70000), "port=70000"),
        (dict(command=[PY, "-c", "pass"], nprocs=1, grace_s=-1), "grace_s=-1"),
        (dict(command=["/no/such/titanax-program", "x"], nprocs=2), "/no/such/titanax-program"),
    ],
)
def test_bad_arguments(kwargs, culprit):
    out = _Buffer()
    with pytest.raises(DistributedError) as info:
        launch(stdout=out, **kwargs)
    err = info.value
    assert isinstance(err, TitanaxError)
    assert culprit in err.message and err.suggestion
    assert "started process" not in out.getvalue()
