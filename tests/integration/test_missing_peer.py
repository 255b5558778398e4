"""A process of a multi-process job that never starts: `initialize()` names it within the timeout.

JAX alone waits 300 s and then aborts every process that did start with a C++ check failure that
names nobody; Titanax's rendezvous on the coordinator port (titanax/runtime/rendezvous.py) makes
process 0 name the missing ids and the others name the coordinator's address. These tests run the
rendezvous in this test process (threads play the other processes), so they start no JAX process;
`test_launch_jax.py` covers a real `titanax launch` with a process that exits before joining.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import jax
import pytest

from titanax.exceptions import DistributedError
from titanax.launch import free_port
from titanax.runtime import ClusterSpec, initialize
from titanax.runtime import distributed as dist


@pytest.fixture
def clean_init(monkeypatch):
    """No cluster variables, no earlier initialize(), and jax.distributed never reached: each test
    here fails before it (the test process's JAX runs already and cannot join a cluster)."""
    for name in list(os.environ):
        if name.startswith(("TITANAX_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                            "SLURM_", "OMPI_")) or name in ("WORLD_SIZE", "RANK", "JOB_COMPLETION_INDEX"):
            monkeypatch.delenv(name)

    def unreachable(**kwargs):
        raise AssertionError(f"jax.distributed.initialize must not be reached: {kwargs}")

    monkeypatch.setattr(jax.distributed, "initialize", unreachable)
    dist._reset_for_tests()
    yield monkeypatch
    dist._reset_for_tests()


class _Process(threading.Thread):
    """Another process of the job, played by a thread: runs the rendezvous, keeps its error."""

    def __init__(self, address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.spec = ClusterSpec(address, num_processes, process_id)
        self.timeout_s = timeout_s
        self.error: DistributedError | None = None
        self.start()

    def run(self) -> None:
        try:
            dist._rendezvous(self.spec, self.timeout_s, f"timeout={self.timeout_s:g}")
        except DistributedError as e:
            self.error = e

    def outcome(self) -> DistributedError | None:
        self.join(timeout=30)
        assert not self.is_alive(), f"process {self.spec.process_id} is still waiting"
        return self.error


def test_coordinator_names_the_missing_process_within_the_timeout(clean_init):
    # Process 0 (this test, through initialize) and process 1 start; process 2 of 3 never does.
    address = f"localhost:{free_port()}"
    peer = _Process(address, 3, 1, timeout_s=30)
    start = time.monotonic()
    with pytest.raises(DistributedError) as info:
        initialize(coordinator_address=address, num_processes=3, process_id=0, initialization_timeout=10)
    elapsed = time.monotonic() - start
    assert 10 <= elapsed < 15, elapsed
    assert info.value.message == (
        f"the coordinator (process 0) at {address} waited 10 s (initialization_timeout=10) for the "
        "other processes: process 2 of 3 never connected")
    assert "process 2 can reach port" in info.value.suggestion
    assert "TITANAX_INIT_TIMEOUT" in info.value.suggestion
    # Process 1 was told the same, at the same moment, instead of waiting for JAX.
    error = peer.outcome()
    assert error is not None and error.message == (
        f"process 1 of 3 cannot start, process 0 reports: {info.value.message}"), error
    assert dist._INITIALIZED is None  # a failed start is not recorded


def test_a_process_without_its_coordinator_names_the_address(clean_init):
    port = free_port()  # nothing listens there: process 0 never started
    clean_init.setenv("TITANAX_INIT_TIMEOUT", "2")
    clean_init.setenv("TITANAX_NUM_PROCESSES", "2")
    clean_init.setenv("TITANAX_PROCESS_ID", "1")
    clean_init.setenv("TITANAX_COORDINATOR_ADDRESS", f"localhost:{port}")
    start = time.monotonic()
    with pytest.raises(DistributedError) as info:
        initialize()
    assert 2 <= time.monotonic() - start < 6
    assert info.value.message == (
        f"process 1 of 2: the coordinator (process 0) at localhost:{port} never answered within 2 s "
        f"(TITANAX_INIT_TIMEOUT=2): nothing listened on port {port} there")


@pytest.mark.parametrize("value, culprit", [(0, "initialization_timeout=0"),
                                            (float("nan"), "initialization_timeout=nan"),
                                            ("soon", "TITANAX_INIT_TIMEOUT=soon")])
def test_the_timeout_must_be_seconds(clean_init, value, culprit):
    if isinstance(value, str):
        clean_init.setenv("TITANAX_INIT_TIMEOUT", value)
        value = None
    with pytest.raises(DistributedError) as info:
        initialize(initialization_timeout=value)
    assert info.value.message == f"{culprit} is not a number of seconds above 0"


def test_the_timeout_comes_from_the_argument_then_the_variable_then_the_default():
    assert dist._init_timeout({"TITANAX_INIT_TIMEOUT": "30"}, 5) == (5.0, "initialization_timeout=5")
    assert dist._init_timeout({"TITANAX_INIT_TIMEOUT": "30"}, None) == (30.0, "TITANAX_INIT_TIMEOUT=30")
    seconds, origin = dist._init_timeout({}, None)
    assert seconds == dist.DEFAULT_INIT_TIMEOUT_S <= 120 and "TITANAX_INIT_TIMEOUT" in origin


def test_every_process_joins_and_the_port_is_free_for_jax():
    address = f"127.0.0.1:{free_port()}"
    peers = [_Process(address, 3, i, timeout_s=10) for i in (2, 1)]
    dist._rendezvous(ClusterSpec(address, 3, 0), 10, "test")
    assert [p.outcome() for p in peers] == [None, None]
    # JAX's coordination service binds the same port next (gRPC sets SO_REUSEADDR as well).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))


def test_two_processes_with_one_id_are_refused_at_once():
    address = f"127.0.0.1:{free_port()}"
    first = _Process(address, 3, 1, timeout_s=10)
    coordinator = _Process(address, 3, 0, timeout_s=10)
    time.sleep(0.5)
    second = _Process(address, 3, 1, timeout_s=10)
    error = coordinator.outcome()
    assert error is not None and error.message.startswith(
        "two processes say they are process 1 (on 127.0.0.1 and on 127.0.0.1)"), error
    for peer in (first, second):
        assert "two processes say they are process 1" in str(peer.outcome())


def test_a_different_number_of_processes_is_refused_at_once():
    address = f"127.0.0.1:{free_port()}"
    coordinator = _Process(address, 2, 0, timeout_s=10)
    peer = _Process(address, 4, 3, timeout_s=10)
    error = coordinator.outcome()
    assert error is not None and error.message == (
        f"process 3 (on 127.0.0.1) was started for 4 processes, process 0 (the coordinator at "
        f"{address}) for 2"), error
    assert error.message in str(peer.outcome())


def test_a_process_that_hangs_up_and_a_stranger_are_named():
    # Three processes, so that process 0 is still waiting (for process 2) when process 1 leaves.
    port = free_port()
    address = f"127.0.0.1:{port}"
    coordinator = _Process(address, 3, 0, timeout_s=2)
    time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", port)) as quitter:
        quitter.sendall(b"TITANAX-JOIN 1 3 1\n")
        assert quitter.recv(64).startswith(b"WAIT ")
    with socket.create_connection(("127.0.0.1", port)) as grpc_client:
        grpc_client.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    error = coordinator.outcome()
    assert error is not None and error.message == (
        f"the coordinator (process 0) at {address} waited 2 s (timeout=2) for the other processes: "
        "process 2 of 3 never connected; process 1 (on 127.0.0.1) connected and then hung up; "
        "1 connection(s) from 127.0.0.1 did not come from titanax.runtime.initialize()"), error


def test_the_coordinator_port_in_use():
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(DistributedError, match=f"cannot listen on port {port} .* already in use"):
            dist._rendezvous(ClusterSpec(f"localhost:{port}", 2, 0), 5, "test")
