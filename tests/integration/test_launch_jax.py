"""`titanax.launch.launch` with real JAX: 2 processes x 2 simulated CPU devices form one 4-device
job (TITANAX_CPU_DEVICES + gloo collectives), a process that dies leaves no peer hanging in a
collective, and one that exits without joining is named within TITANAX_INIT_TIMEOUT."""

from __future__ import annotations

import io
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from titanax.launch import free_port, launch

ROOT = pathlib.Path(__file__).parents[2]

# Each process feeds its own rows of a global (4,) array; a shard_map psum over all 4 devices
# (2 per process) needs cross-process CPU collectives: 1 + 1 + 2 + 2 = 6 everywhere.
SCRIPT = """
import titanax as tx
info = tx.runtime.initialize()
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((4,), ("data",))
local = np.full((2,), jax.process_index() + 1, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, global_shape=(4,))
total = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b, "data"), mesh=mesh,
                              in_specs=P("data"), out_specs=P()))(x)
print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(),
      jax.local_device_count(), float(np.asarray(total.addressable_data(0))[0]), info.source, flush=True)
"""

# Process 1 dies abruptly right after joining (os._exit, as a crash or the OOM killer would: a plain
# sys.exit would wait in JAX's shutdown barrier for process 0); process 0 then waits in a collective
# for it, and only the launcher can end the job before XLA's timeouts do.
DIES = """
import os
import titanax as tx
info = tx.runtime.initialize()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
if info.process_id == 1:
    print("EXITING", flush=True)
    os._exit(3)
mesh = jax.make_mesh((4,), ("data",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones(2, np.float32), (4,))
print("WAITING", flush=True)
jax.block_until_ready(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x))
print("UNREACHABLE", flush=True)
"""


# Process 1 exits (code 0) without joining, as a script with a wrong branch would; process 0 waits
# for it in initialize() until TITANAX_INIT_TIMEOUT.
NEVER_JOINS = """
import os, sys
if os.environ["TITANAX_PROCESS_ID"] == "1":
    sys.exit(0)
import titanax as tx
tx.runtime.initialize()
print("UNREACHABLE", flush=True)
"""


class _Buffer(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            return super().write(text)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_two_processes_two_cpu_devices_each():
    out = _Buffer()
    rc = launch([sys.executable, "-c", SCRIPT], nprocs=2, cpu_devices_per_proc=2, env=_env(),
                stdout=out, grace_s=5)
    text = out.getvalue()
    assert rc == 0, text[-6000:]
    results = sorted(line.split()[1:] for line in text.splitlines() if " RESULT " in line)
    assert results == [["RESULT", "0", "2", "4", "2", "6.0", "env:TITANAX"],
                       ["RESULT", "1", "2", "4", "2", "6.0", "env:TITANAX"]], text[-6000:]
    assert all(line.startswith(f"[p{line.split()[2]}] ") for line in text.splitlines()
               if " RESULT " in line)


def test_dead_peer_does_not_leave_the_other_hanging():
    out = _Buffer()
    start = time.monotonic()
    rc = launch([sys.executable, "-c", DIES], nprocs=2, cpu_devices_per_proc=2, env=_env(),
                stdout=out, grace_s=2)
    elapsed = time.monotonic() - start
    text = out.getvalue()
    assert rc == 3, text[-6000:]
    assert re.search(r"titanax launch: process 1 \(pid \d+\) failed with exit code 3", text), text[-6000:]
    assert "UNREACHABLE" not in text
    # The failure is also the last line, after whatever the stopped process printed when it died.
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"titanax launch: stopped: process 1 \(pid \d+\) failed with exit code 3", last), last
    assert elapsed < 25, elapsed  # well before the 30 s gloo / collective timeouts


def test_a_process_that_never_joins_is_named():
    out = _Buffer()
    port = free_port()
    start = time.monotonic()
    rc = launch([sys.executable, "-c", NEVER_JOINS], nprocs=2, port=port,
                env={**_env(), "TITANAX_INIT_TIMEOUT": "2"}, stdout=out, grace_s=2)
    elapsed = time.monotonic() - start
    text = out.getvalue()
    assert rc == 1, text[-6000:]
    assert (f"[p0] titanax.exceptions.DistributedError: the coordinator (process 0) at localhost:{port} "
            "waited 2 s (TITANAX_INIT_TIMEOUT=2) for the other processes: process 1 of 2 never connected"
            ) in text, text[-6000:]
    assert "UNREACHABLE" not in text
    # The launcher's last line names the process that left, not only the one that failed.
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"titanax launch: stopped: process 0 \(pid \d+\) failed with exit code 1 "
                        r"after process 1 \(pid \d+\) had exited with code 0", last), last
    assert elapsed < 25, elapsed  # not JAX's 300 s


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return False


def test_processes_die_with_a_sigkilled_launcher(tmp_path):
    # The launcher cannot stop its processes when it is SIGKILLed itself; initialize() asked Linux to.
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = tmp_path / "sleeper.py"
    script.write_text("import time, titanax as tx\ntx.runtime.initialize()\n"
                      "print('READY', flush=True)\ntime.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launcher = subprocess.Popen([sys.executable, "-m", "titanax.cli", "launch", "--nprocs", "2",
                                 "--cpu-devices-per-proc", "1", "--", sys.executable, str(script)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    pids, ready = [], 0
    try:
        for line in launcher.stdout:
            if match := re.search(r"started process \d of 2 \(pid (\d+)\)", line):
                pids.append(int(match[1]))
            ready += "READY" in line
            if ready == 2:
                break
        assert len(pids) == 2 and all(map(_alive, pids)), (pids, ready)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, pids)), f"left running: {[p for p in pids if _alive(p)]}"
    finally:
        launcher.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
