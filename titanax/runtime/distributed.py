"""Multi-process start-up: find the cluster settings, then call ``jax.distributed.initialize`` once.

The settings are resolved by a pure function, :func:`resolve_cluster`, from explicit arguments and
environment variables, so every launcher (plain ``TITANAX_*`` variables as ``titanax launch`` sets them,
``JAX_*`` variables, SLURM, Open MPI, torchrun / Kubeflow, Kubernetes Indexed Jobs) is unit-testable
without starting anything. :func:`initialize` applies the result; a single process is a no-op that
never touches ``jax.distributed``.

Resolution order, field by field (the first source that sets a field wins):

1. explicit arguments of :func:`initialize` / :func:`resolve_cluster`;
2. ``TITANAX_COORDINATOR_ADDRESS`` / ``TITANAX_NUM_PROCESSES`` / ``TITANAX_PROCESS_ID`` /
   ``TITANAX_LOCAL_DEVICE_IDS``;
3. ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` / ``JAX_LOCAL_DEVICE_IDS``;
4. SLURM: ``SLURM_NTASKS``, ``SLURM_PROCID``, coordinator = first host of ``SLURM_STEP_NODELIST``
   (or ``SLURM_JOB_NODELIST``);
5. Open MPI: ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK`` (no coordinator: Open MPI does not
   say where rank 0 runs, so ``TITANAX_COORDINATOR_ADDRESS`` must be set);
6. torchrun / Kubeflow PyTorchJob (used when ``WORLD_SIZE`` and ``RANK`` are both set):
   ``WORLD_SIZE``, ``RANK``, coordinator ``MASTER_ADDR`` with port ``MASTER_PORT``; when
   ``LOCAL_WORLD_SIZE`` > 1 (several processes per node), ``LOCAL_RANK`` picks this process's one
   local device, as JAX itself does under SLURM;
7. Kubernetes Indexed Job / JobSet: ``JOB_COMPLETION_INDEX`` is the process id, used only when a
   higher source (normally ``TITANAX_NUM_PROCESSES`` and ``TITANAX_COORDINATOR_ADDRESS`` in the pod
   template) gives the number of processes; a lone ``JOB_COMPLETION_INDEX`` leaves a single-process
   run alone.

A coordinator address without a port gets ``TITANAX_COORDINATOR_PORT`` (or ``JAX_COORDINATOR_PORT``);
failing that, torchrun's ``MASTER_ADDR`` gets ``MASTER_PORT`` and SLURM's first host a port derived
from ``SLURM_JOB_ID`` (as JAX does, so two jobs sharing a node do not collide); anything else gets
:data:`DEFAULT_COORDINATOR_PORT`.

``TITANAX_CPU_DEVICES=K`` (set by ``titanax.launch.launch(..., cpu_devices_per_proc=K)``) makes
:func:`initialize` present ``K`` simulated CPU devices in this process
(:func:`~titanax.runtime.simulate_cpu_devices`) and use gloo for cross-process CPU collectives.

Before ``jax.distributed.initialize``, :func:`initialize` runs Titanax's own start-up rendezvous
(:mod:`titanax.runtime.rendezvous`), so that a process that never starts is named within
``TITANAX_INIT_TIMEOUT`` seconds instead of ending every process with JAX's C++ abort.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from titanax.exceptions import DistributedError, MeshError
from titanax.runtime import simulate as _simulate
from titanax.runtime.rendezvous import INIT_TIMEOUT_VAR, rendezvous

__all__ = [
    "DEFAULT_COORDINATOR_PORT",
    "DEFAULT_INIT_TIMEOUT_S",
    "CPU_DEVICES_VAR",
    "INIT_TIMEOUT_VAR",
    "ClusterSpec",
    "DistributedInfo",
    "resolve_cluster",
    "initialize",
    "parse_slurm_nodelist",
    "devices",
    "local_devices",
    "process_index",
    "process_count",
]

DEFAULT_COORDINATOR_PORT = 12355
"""Coordinator port used when neither a port variable nor a SLURM job id provides one."""

CPU_DEVICES_VAR = "TITANAX_CPU_DEVICES"
"""Environment variable asking :func:`initialize` for that many simulated CPU devices per process."""

DEFAULT_INIT_TIMEOUT_S = 120.0
"""Seconds :func:`initialize` waits for every process to join when neither
``initialization_timeout=`` nor ``TITANAX_INIT_TIMEOUT`` says otherwise."""

# Same ephemeral window JAX's own SLURM detection uses: every rank derives the same port from the job
# id, and concurrent jobs on one node rarely collide.
_SLURM_PORT_BASE = 65535 - 2**12 + 1
_SLURM_PORT_SPAN = 2**12


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """The multi-process settings :func:`resolve_cluster` found.

    Example:
      >>> spec = resolve_cluster({"TITANAX_NUM_PROCESSES": "2", "TITANAX_PROCESS_ID": "1",
      ...                         "TITANAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
      >>> spec.coordinator_address, spec.num_processes, spec.process_id, spec.source
      ('10.0.0.1:1234', 2, 1, 'env:TITANAX')
    """

    coordinator_address: str | None
    """``host:port`` of process 0; ``None`` only when ``num_processes == 1``."""
    num_processes: int
    """Total number of processes in the job (>= 1)."""
    process_id: int
    """This process's index, ``0 <= process_id < num_processes``."""
    local_device_ids: tuple[int, ...] | None = None
    """Local devices this process drives; ``None`` leaves the choice to JAX."""
    source: str = "explicit"
    """Where the settings came from, e.g. ``"explicit"``, ``"env:TITANAX"``, ``"env:JAX"``,
    ``"slurm"``, ``"openmpi"``, ``"torchrun"``, ``"kubernetes"``; several joined by ``+`` when fields
    came from different places."""

    @property
    def is_multiprocess(self) -> bool:
        """Whether more than one process takes part."""
        return self.num_processes > 1


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What :func:`initialize` set up (or found already set up).

    Example:
      >>> info = initialize()          # single process: nothing to start
      >>> (info.process_id, info.num_processes, info.source)
      (0, 1, 'default')
    """

    process_id: int
    """This process's index (``jax.process_index()``)."""
    num_processes: int
    """Number of processes (``jax.process_count()``)."""
    coordinator_address: str | None
    """``host:port`` of process 0, ``None`` for a single process."""
    source: str
    """Where the settings came from (see :attr:`ClusterSpec.source`); ``"default"`` when nothing was
    configured, ``"jax.distributed"`` when JAX had been initialized before Titanax was asked."""
    local_device_count: int
    """Devices this process drives."""
    global_device_count: int
    """Devices across all processes."""

    @property
    def is_multiprocess(self) -> bool:
        """Whether more than one process takes part."""
        return self.num_processes > 1

    @property
    def is_coordinator(self) -> bool:
        """Whether this is process 0 (the one that should write logs and checkpoints metadata)."""
        return self.process_id == 0


# --------------------------------------------------------------------------------------------------
# Pure resolution
# --------------------------------------------------------------------------------------------------

_FIELDS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One candidate value: where it comes from and how to turn it into a value (lazily, so a
    malformed variable of a lower-priority source that is never used does not raise)."""

    origin: str  # e.g. "TITANAX_NUM_PROCESSES" or "num_processes=" (an argument)
    source: str  # e.g. "env:TITANAX"
    get: Callable[[], Any]


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    # An exported-but-empty variable (`JAX_PROCESS_ID=`) means "unset", as shells usually intend.
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _parse_int(name: str, text: str, *, example: int = 0) -> int:
    try:
        return int(text)
    except ValueError:
        raise DistributedError(
            f"{name}={text!r} is not an integer",
            suggestion=f"set {name} to a whole number (e.g. {name}={example}) or unset it",
        ) from None


def _parse_id_list(name: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise DistributedError(
            f"{name}={text!r} is not a comma-separated list of device ids",
            suggestion=f"set {name} like {name}=0,1,2,3 or unset it",
        ) from None


def parse_slurm_nodelist(nodelist: str, *, variable: str = "nodelist") -> list[str]:
    """Expands a SLURM host list such as ``node[01-04,07],login1`` into host names.

    Handles comma-separated hosts, bracketed ranges and lists (zero padding kept), and several
    bracket groups in one name (``rack[1-2]-n[1-2]``). SLURM lists the hosts of a step in the order
    it places tasks, so the first host runs process 0.

    Args:
      nodelist: the value of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``.
      variable: the variable it came from, named in errors.

    Returns:
      The host names, in order.

    Raises:
      DistributedError: the list is empty or malformed (unbalanced brackets, a bad range).

    Example:
      >>> parse_slurm_nodelist("node[01-03,07],gpu5")
      ['node01', 'node02', 'node03', 'node07', 'gpu5']
    """

    def bad(why: str) -> DistributedError:
        return DistributedError(
            f"{variable}={nodelist!r} is not a SLURM host list: {why}",
            suggestion="run under srun/sbatch so SLURM sets it, or set TITANAX_COORDINATOR_ADDRESS="
            "<host of process 0>:<port> yourself",
        )

    def expand_group(body: str) -> list[str]:
        out: list[str] = []
        for part in body.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise bad(f"range {part!r} is not N or N-M")
            if not sep:
                out.append(lo)
                continue
            if int(hi) < int(lo):
                raise bad(f"range {part!r} runs backwards")
            # SLURM pads every number of a range to the width of its first bound (`[08-10]`).
            out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
        return out

    def expand_host(pattern: str) -> list[str]:
        hosts = [""]
        rest = pattern
        while rest:
            open_at = rest.find("[")
            if open_at < 0:
                if "]" in rest:
                    raise bad("']' without '['")
                hosts = [h + rest for h in hosts]
                break
            close_at = rest.find("]", open_at)
            if close_at < 0:
                raise bad("'[' without ']'")
            literal, body = rest[:open_at], rest[open_at + 1 : close_at]
            if "]" in literal:
                raise bad("']' without '['")
            hosts = [h + literal + n for h in hosts for n in expand_group(body)]
            rest = rest[close_at + 1 :]
        return hosts

    # Split on commas outside brackets only: `node[1,3],login` is two patterns, not three.
    patterns, depth, current = [], 0, ""
    for ch in nodelist.strip():
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            patterns.append(current)
            current = ""
        else:
            current += ch
    patterns.append(current)
    hosts = [h for p in patterns if p.strip() for h in expand_host(p.strip())]
    if not hosts:
        raise bad("no hosts in it")
    return hosts


def _as_int(value: Any) -> int | None:
    """An integer (numpy integers included) or None; bools and numeric strings are not counts."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _first_env(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    for name in names:
        value = _env_value(env, name)
        if value is not None:
            return name, value
    return None


def _port(env: Mapping[str, str], launcher_ports: Sequence[str] = ()) -> int:
    """The coordinator port: ``TITANAX_``/``JAX_COORDINATOR_PORT``, then the launcher's own port
    variables (``launcher_ports``, e.g. ``MASTER_PORT``), then one derived from ``SLURM_JOB_ID``, then
    the default."""
    found = _first_env(env, ("TITANAX_COORDINATOR_PORT", "JAX_COORDINATOR_PORT", *launcher_ports))
    if found is not None:
        name, text = found
        port = _parse_int(name, text)
        if not 0 < port < 65536:
            raise DistributedError(
                f"{name}={port} is not a TCP port",
                suggestion=f"set {name} to a free port between 1024 and 65535",
            )
        return port
    job = _env_value(env, "SLURM_JOB_ID")
    if job is not None and job.isdigit():
        return _SLURM_PORT_BASE + int(job) % _SLURM_PORT_SPAN
    return DEFAULT_COORDINATOR_PORT


def _has_port(address: str) -> bool:
    if address.startswith("["):  # IPv6 literal: [::1]:1234
        return bool(re.search(r"\]:\d+$", address))
    return ":" in address


def _slurm_coordinator(env: Mapping[str, str]) -> str:
    found = _first_env(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    if found is None:
        raise DistributedError(
            "SLURM_NTASKS is set but no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST says where "
            "process 0 runs",
            suggestion="launch with srun, or set TITANAX_COORDINATOR_ADDRESS=<host of process 0>:<port>",
        )
    name, text = found
    return f"{parse_slurm_nodelist(text, variable=name)[0]}:{_port(env)}"


def _torchrun_coordinator(env: Mapping[str, str]) -> str:
    address = _env_value(env, "MASTER_ADDR")
    if address is None:
        raise DistributedError(
            "WORLD_SIZE and RANK are set (torchrun / Kubeflow PyTorchJob) but MASTER_ADDR, the host "
            "of rank 0, is not",
            suggestion="launch with torchrun or a PyTorchJob (both set MASTER_ADDR), or set "
            "TITANAX_COORDINATOR_ADDRESS=<host of process 0>:<port>",
        )
    if _has_port(address):
        return address
    return f"{address}:{_port(env, ('MASTER_PORT',))}"


def _torchrun_shares_node(env: Mapping[str, str]) -> bool:
    """Whether torchrun runs several processes on this node (``LOCAL_WORLD_SIZE`` > 1, or malformed:
    then reading it names the variable), so that ``LOCAL_RANK`` should pick this process's device."""
    size = _env_value(env, "LOCAL_WORLD_SIZE")
    if size is None or _env_value(env, "LOCAL_RANK") is None:
        return False
    return not (size.isdigit() and int(size) <= 1)


def _torchrun_local_device_ids(env: Mapping[str, str]) -> tuple[int, ...]:
    # Several processes per node (torchrun --nproc-per-node N): each drives the device matching its
    # local rank, as JAX arranges under SLURM and Open MPI. One process per node keeps all devices.
    _parse_int("LOCAL_WORLD_SIZE", env["LOCAL_WORLD_SIZE"].strip())
    return (_parse_int("LOCAL_RANK", env["LOCAL_RANK"].strip()),)


def _layers(env: Mapping[str, str], explicit: Mapping[str, Any]) -> list[dict[str, _Setting]]:
    layers: list[dict[str, _Setting]] = []

    layer: dict[str, _Setting] = {}
    for field in _FIELDS:
        value = explicit.get(field)
        if value is not None:
            layer[field] = _Setting(f"{field}= argument", "explicit", lambda v=value: v)
    layers.append(layer)

    for prefix, source in (("TITANAX", "env:TITANAX"), ("JAX", "env:JAX")):
        layer = {}
        names = {
            "coordinator_address": (f"{prefix}_COORDINATOR_ADDRESS", lambda n, t: t),
            "num_processes": (f"{prefix}_NUM_PROCESSES", _parse_int),
            "process_id": (f"{prefix}_PROCESS_ID", _parse_int),
            "local_device_ids": (f"{prefix}_LOCAL_DEVICE_IDS", _parse_id_list),
        }
        for field, (name, parse) in names.items():
            text = _env_value(env, name)
            if text is not None:
                layer[field] = _Setting(name, source, lambda n=name, t=text, p=parse: p(n, t))
        layers.append(layer)

    def int_setting(name: str, source: str) -> _Setting:
        return _Setting(name, source, lambda: _parse_int(name, env[name].strip()))

    if _env_value(env, "SLURM_NTASKS") is not None:
        layer = {
            "num_processes": int_setting("SLURM_NTASKS", "slurm"),
            "coordinator_address": _Setting("SLURM nodelist", "slurm", lambda: _slurm_coordinator(env)),
        }
        if _env_value(env, "SLURM_PROCID") is not None:
            layer["process_id"] = int_setting("SLURM_PROCID", "slurm")
        layers.append(layer)

    if _env_value(env, "OMPI_COMM_WORLD_SIZE") is not None:
        layer = {"num_processes": int_setting("OMPI_COMM_WORLD_SIZE", "openmpi")}
        if _env_value(env, "OMPI_COMM_WORLD_RANK") is not None:
            layer["process_id"] = int_setting("OMPI_COMM_WORLD_RANK", "openmpi")
        layers.append(layer)

    # torchrun and Kubeflow's PyTorchJob. WORLD_SIZE alone is too generic a name to act on.
    if _env_value(env, "WORLD_SIZE") is not None and _env_value(env, "RANK") is not None:
        layer = {
            "num_processes": int_setting("WORLD_SIZE", "torchrun"),
            "process_id": int_setting("RANK", "torchrun"),
            "coordinator_address": _Setting(
                "MASTER_ADDR", "torchrun", lambda: _torchrun_coordinator(env)
            ),
        }
        if _torchrun_shares_node(env):
            layer["local_device_ids"] = _Setting(
                "LOCAL_RANK", "torchrun", lambda: _torchrun_local_device_ids(env)
            )
        layers.append(layer)

    # Kubernetes Indexed Job / JobSet: every pod gets JOB_COMPLETION_INDEX, nothing else. It is the
    # process id only when something above says how many processes there are; otherwise an indexed
    # job of independent single-process runs would be mistaken for a broken cluster.
    if _env_value(env, "JOB_COMPLETION_INDEX") is not None and any("num_processes" in earlier for earlier in layers):
        layers.append({"process_id": int_setting("JOB_COMPLETION_INDEX", "kubernetes")})
    return layers


def resolve_cluster(
    env: Mapping[str, str],
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> ClusterSpec | None:
    """Works out the multi-process settings from explicit values and an environment, starting nothing.

    Each field takes the first source that sets it, in the order explicit arguments, ``TITANAX_*``,
    ``JAX_*``, SLURM, Open MPI, torchrun / Kubeflow (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``),
    Kubernetes Indexed Job (``JOB_COMPLETION_INDEX``) (see the module docstring).

    Args:
      env: the environment to read (``os.environ`` in real use, a dict in tests).
      coordinator_address: ``host:port`` of process 0 (a missing port is filled in).
      num_processes: total number of processes.
      process_id: this process's index.
      local_device_ids: local devices this process should drive.

    Returns:
      The settings, or ``None`` when nothing configures a multi-process run. A result with
      ``num_processes == 1`` means an explicit single-process run.

    Raises:
      DistributedError: the settings are incomplete or contradict each other; the message names the
        variable or argument at fault.

    Example:
      >>> spec = resolve_cluster({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_ID": "77",
      ...                         "SLURM_STEP_NODELIST": "gpu[03-04]"})
      >>> spec.coordinator_address, spec.num_processes, spec.process_id, spec.source
      ('gpu03:61517', 4, 2, 'slurm')
    """
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": local_device_ids,
    }
    layers = _layers(env, explicit)
    chosen: dict[str, _Setting] = {}
    for field in _FIELDS:
        for layer in layers:
            if field in layer:
                chosen[field] = layer[field]
                break

    def origin(field: str) -> str:
        return chosen[field].origin

    n_set = chosen.get("num_processes")
    if n_set is None:
        for field in ("process_id", "coordinator_address"):
            if field in chosen:
                raise DistributedError(
                    f"{field} was given ({origin(field)}) but not the number of processes",
                    suggestion="also set TITANAX_NUM_PROCESSES (or pass num_processes=), or remove "
                    f"{origin(field)} for a single-process run",
                )
        if "local_device_ids" in chosen and chosen["local_device_ids"].source == "explicit":
            raise DistributedError(
                "local_device_ids= was given for a single-process run, where nothing applies it",
                suggestion="drop local_device_ids=, and pick devices with MeshSpec(devices=...) or "
                "CUDA_VISIBLE_DEVICES",
            )
        return None

    n = _as_int(n_set.get())
    if n is None:
        raise DistributedError(
            f"num_processes ({origin('num_processes')}) is {n_set.get()!r}, not an integer",
            suggestion="pass a whole number of processes, e.g. num_processes=2",
        )
    if n < 1:
        raise DistributedError(
            f"num_processes={n} ({origin('num_processes')}) must be at least 1",
            suggestion=f"set {origin('num_processes')} to the number of processes in the job",
        )

    if "process_id" in chosen:
        raw_pid = chosen["process_id"].get()
        pid = _as_int(raw_pid)
        if pid is None:
            raise DistributedError(
                f"process_id ({origin('process_id')}) is {raw_pid!r}, not an integer",
                suggestion="pass this process's index, e.g. process_id=0",
            )
    elif n == 1:
        pid = 0
    else:
        raise DistributedError(
            f"num_processes={n} ({origin('num_processes')}) but nothing says which process this is",
            suggestion="set TITANAX_PROCESS_ID to this process's index (0 for the coordinator) or pass "
            "process_id=",
        )
    if not 0 <= pid < n:
        where = f" ({origin('process_id')})" if "process_id" in chosen else ""
        raise DistributedError(
            f"process_id={pid}{where} is outside 0..{n - 1} for num_processes={n} "
            f"({origin('num_processes')})",
            suggestion="process ids run from 0 to num_processes-1; check that both come from the same "
            "launcher",
        )

    address: str | None = None
    # A launcher-derived coordinator (SLURM's nodelist, torchrun's MASTER_ADDR) means nothing to a
    # single process, and a malformed one must not stop it.
    if "coordinator_address" in chosen and (
        n > 1 or chosen["coordinator_address"].source not in ("slurm", "torchrun")
    ):
        address = str(chosen["coordinator_address"].get()).strip()
        if not address:
            raise DistributedError(
                f"the coordinator address ({origin('coordinator_address')}) is empty",
                suggestion="give the address of process 0 as host:port",
            )
        if not _has_port(address):
            address = f"{address}:{_port(env)}"
    elif n > 1:
        hint = (
            "Open MPI does not say where rank 0 runs: export TITANAX_COORDINATOR_ADDRESS=<host of rank "
            "0>:<port> to every rank"
            if n_set.source == "openmpi"
            else "set TITANAX_COORDINATOR_ADDRESS=<host of process 0>:<port> or pass coordinator_address="
        )
        raise DistributedError(
            f"num_processes={n} ({origin('num_processes')}) but no coordinator address was given",
            suggestion=hint,
        )

    ids: tuple[int, ...] | None = None
    if "local_device_ids" in chosen:
        raw = chosen["local_device_ids"].get()
        try:
            ids = (int(raw),) if isinstance(raw, int) else tuple(int(i) for i in raw)
        except (TypeError, ValueError):
            raise DistributedError(
                f"local_device_ids ({origin('local_device_ids')}) is {raw!r}, not a list of ints",
                suggestion="pass local device indices, e.g. local_device_ids=[0, 1]",
            ) from None

    sources: list[str] = []
    for field in ("num_processes", "process_id", "coordinator_address", "local_device_ids"):
        if field in chosen and (field != "coordinator_address" or address is not None):
            src = chosen[field].source
            if src not in sources:
                sources.append(src)
    return ClusterSpec(
        coordinator_address=address,
        num_processes=n,
        process_id=pid,
        local_device_ids=ids,
        source="+".join(sources),
    )


# --------------------------------------------------------------------------------------------------
# Start-up rendezvous (titanax/runtime/rendezvous.py)
# --------------------------------------------------------------------------------------------------

def _init_timeout(env: Mapping[str, str], explicit: object) -> tuple[float, str]:
    """Seconds every process waits for the others to join, and where that number came from."""
    value: object
    if explicit is not None:
        origin, value = f"initialization_timeout={explicit!r}", explicit
    elif (text := _env_value(env, INIT_TIMEOUT_VAR)) is not None:
        origin = f"{INIT_TIMEOUT_VAR}={text}"
        try:
            value = float(text)
        except ValueError:
            value = None
    else:
        return DEFAULT_INIT_TIMEOUT_S, f"the default, {INIT_TIMEOUT_VAR} changes it"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise DistributedError(
            f"{origin} is not a number of seconds above 0",
            suggestion=f"pass e.g. initialization_timeout=60 or set {INIT_TIMEOUT_VAR}=60: the seconds "
            "every process waits for the others to start",
        )
    return float(value), origin


def _rendezvous(spec: ClusterSpec, timeout_s: float, origin: str) -> None:
    """:func:`titanax.runtime.rendezvous.rendezvous` for a multi-process ``spec``."""
    assert spec.coordinator_address is not None  # resolve_cluster guarantees it for several processes
    rendezvous(spec.coordinator_address, spec.num_processes, spec.process_id, timeout_s, origin)


# --------------------------------------------------------------------------------------------------
# Applying it
# --------------------------------------------------------------------------------------------------

# The one piece of module state: what the first successful initialize() did, so a second call can
# return it (idempotent) or refuse a different setup instead of letting JAX fail obscurely.
_INITIALIZED: tuple[ClusterSpec | None, DistributedInfo] | None = None


def _jax_distributed_is_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    return bool(check()) if check is not None else False


def _info(spec: ClusterSpec | None, source: str) -> DistributedInfo:
    return DistributedInfo(
        process_id=jax.process_index(),
        num_processes=jax.process_count(),
        coordinator_address=spec.coordinator_address if spec is not None else None,
        source=source,
        local_device_count=jax.local_device_count(),
        global_device_count=jax.device_count(),
    )


def _cpu_devices_request(env: Mapping[str, str]) -> int | None:
    """The device count ``TITANAX_CPU_DEVICES`` asks for, or None when it is unset."""
    text = _env_value(env, CPU_DEVICES_VAR)
    if text is None:
        return None
    count = _parse_int(CPU_DEVICES_VAR, text, example=8)
    if count < 1:
        raise DistributedError(
            f"{CPU_DEVICES_VAR}={count} must be at least 1",
            suggestion=f"set {CPU_DEVICES_VAR} to the number of CPU devices each process should "
            f"simulate (e.g. {CPU_DEVICES_VAR}=4), or unset it to use the real devices",
        )
    return count


def _simulate_cpu_devices(count: int) -> None:
    try:
        _simulate.simulate_cpu_devices(count)
    except MeshError as e:
        raise DistributedError(
            f"{CPU_DEVICES_VAR}={count} cannot be applied: {e.message}",
            suggestion="call titanax initialize() first thing in the program, before any JAX "
            f"computation, or unset {CPU_DEVICES_VAR}",
        ) from e


def _cpu_only() -> bool:
    platforms = getattr(jax.config, "jax_platforms", None) or os.environ.get("JAX_PLATFORMS", "")
    return str(platforms).strip().lower() == "cpu"


def _use_gloo_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend need an implementation; gloo ships with jaxlib.

    It is already the default of jax 0.10.2 and 0.12; setting it guards against an environment that
    turned it off. An explicit ``"mpi"`` is the user's choice and is kept.
    """
    try:
        if getattr(jax.config, "jax_cpu_collectives_implementation", None) != "mpi":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a jax without the option: nothing to choose
        pass


def _conflicts(
    spec: ClusterSpec | None, info: DistributedInfo, recorded: ClusterSpec | None
) -> list[str]:
    """Fields of a new request that contradict what is already running."""
    if spec is None:
        return []
    out = []
    if spec.num_processes != info.num_processes:
        out.append(f"num_processes {info.num_processes} -> {spec.num_processes}")
    if spec.process_id != info.process_id:
        out.append(f"process_id {info.process_id} -> {spec.process_id}")
    if (
        spec.coordinator_address is not None
        and info.coordinator_address is not None
        and spec.coordinator_address != info.coordinator_address
    ):
        out.append(
            f"coordinator_address {info.coordinator_address!r} -> {spec.coordinator_address!r}"
        )
    if (
        spec.local_device_ids is not None
        and recorded is not None
        and recorded.local_device_ids is not None
        and spec.local_device_ids != recorded.local_device_ids
    ):
        out.append(f"local_device_ids {recorded.local_device_ids} -> {spec.local_device_ids}")
    return out


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    *,
    initialization_timeout: float | None = None,
) -> DistributedInfo:
    """Starts multi-process JAX if the arguments or the environment ask for it; otherwise does nothing.

    Call it first thing in a training script, before any other JAX call: JAX cannot join a cluster
    once its backend is running. Settings are resolved by :func:`resolve_cluster` from the arguments
    and ``os.environ``. A single process returns its info without calling ``jax.distributed``.
    Calling it again with the same (or no) settings returns the same info.

    Note: when ``local_device_ids`` is left unset under SLURM or Open MPI, JAX itself gives each
    process one device (the one matching its local rank). For one process per node driving every
    GPU, pass ``local_device_ids`` or set ``TITANAX_LOCAL_DEVICE_IDS=0,1,...``.

    Before ``jax.distributed.initialize`` every process reports to process 0 over the coordinator
    port (see the module docstring), so a process that never starts is named in a
    :class:`~titanax.exceptions.DistributedError` within ``initialization_timeout`` seconds on
    every process that did, instead of a C++ abort after JAX's 300 s.

    ``TITANAX_CPU_DEVICES=K`` (set by ``titanax.launch.launch(..., cpu_devices_per_proc=K)``)
    first makes this process simulate ``K`` CPU devices
    (:func:`~titanax.runtime.simulate_cpu_devices`) and, for a multi-process run, selects gloo for
    collectives between the processes' CPU devices (also done for any multi-process run with
    ``JAX_PLATFORMS=cpu``).

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: total number of processes.
      process_id: this process's index.
      local_device_ids: local devices this process drives.
      initialization_timeout: seconds every process waits for the others to join (process 0 for
        all of them, the others for process 0); if None, ``TITANAX_INIT_TIMEOUT``, else
        :data:`DEFAULT_INIT_TIMEOUT_S` (120). JAX's own registration gets the same limit.

    Returns:
      A :class:`DistributedInfo` describing the processes and devices.

    Raises:
      DistributedError: incomplete or contradictory settings, a malformed ``TITANAX_CPU_DEVICES``
        or one that comes after JAX started, a timeout that is not a positive number, a second
        call asking for a different setup, a process that did not join within the timeout
        (process 0 names the missing ids; the others name the coordinator's address), two
        processes with one id, or ``jax.distributed.initialize`` failing (the JAX error is
        chained).

    Example:
      >>> import titanax as tx
      >>> info = tx.runtime.initialize()   # reads TITANAX_*/JAX_*/SLURM/Open MPI/torchrun/k8s variables
      >>> info.num_processes
      1
    """
    global _INITIALIZED
    explicit: dict[str, Any] = dict(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    if _INITIALIZED is not None and _INITIALIZED[0] is not None:
        # A repeat call only has to agree with what is running: fields it leaves out are taken from
        # the first call, so `initialize()` after `initialize(num_processes=2, ...)` is not "incomplete".
        recorded_spec = _INITIALIZED[0]
        for field in _FIELDS:
            if explicit[field] is None:
                explicit[field] = getattr(recorded_spec, field)
    spec = resolve_cluster(os.environ, **explicit)
    timeout_s, timeout_origin = _init_timeout(os.environ, initialization_timeout)

    if _INITIALIZED is not None:
        recorded, info = _INITIALIZED
        conflicts = _conflicts(spec, info, recorded)
        if conflicts:
            raise DistributedError(
                f"initialize() was already called with a different setup ({'; '.join(conflicts)})",
                suggestion="call titanax initialize() once per process, with the same settings each time; "
                "a different cluster layout needs a fresh process",
            )
        return info

    from titanax.launch.local import follow_launcher

    follow_launcher()
    cpu_devices = _cpu_devices_request(os.environ)
    if cpu_devices is not None:
        # Before anything below starts the JAX backend (jax.process_index() does).
        _simulate_cpu_devices(cpu_devices)
    if spec is not None and spec.is_multiprocess and (cpu_devices is not None or _cpu_only()):
        _use_gloo_cpu_collectives()

    if _jax_distributed_is_initialized():
        # Someone called jax.distributed.initialize directly; adopt it if it agrees with the request.
        info = _info(spec, "jax.distributed")
        conflicts = _conflicts(spec, info, None)
        if conflicts:
            raise DistributedError(
                f"jax.distributed is already initialized with a different setup ({'; '.join(conflicts)})",
                suggestion="remove the direct jax.distributed.initialize call or make the Titanax "
                "settings match it",
            )
        _INITIALIZED = (spec, info)
        return info

    if spec is None or not spec.is_multiprocess:
        info = _info(spec, spec.source if spec is not None else "default")
        _INITIALIZED = (spec, info)
        return info

    kwargs: dict[str, Any] = dict(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
    )
    if spec.local_device_ids is not None:
        kwargs["local_device_ids"] = list(spec.local_device_ids)
    _rendezvous(spec, timeout_s, timeout_origin)
    # Everyone is up now, so JAX's registration is quick; the limit only matters for a process
    # that dies between the rendezvous and it.
    kwargs["initialization_timeout"] = max(1, math.ceil(timeout_s))
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"jax.distributed.initialize failed for process {spec.process_id}/{spec.num_processes} "
            f"with coordinator {spec.coordinator_address} (from {spec.source}): {first_line}",
            suggestion="call initialize() before any other JAX call, check that every process uses the "
            "same coordinator address and that process 0 can open its port",
        ) from e
    info = _info(spec, spec.source)
    _INITIALIZED = (spec, info)
    return info


def _reset_for_tests() -> None:
    """Forget the idempotency record (tests only; it does not shut JAX down)."""
    global _INITIALIZED
    _INITIALIZED = None


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------


def devices(backend: str | None = None) -> list[Any]:
    """All devices of all processes (``jax.devices``).

    Args:
      backend: platform name such as ``"cpu"`` or ``"gpu"``; the default backend if None.

    Returns:
      The global device list.

    Example:
      >>> len(devices()) == jax.device_count()
      True
    """
    return list(jax.devices(backend))


def local_devices(backend: str | None = None) -> list[Any]:
    """The devices this process drives (``jax.local_devices``).

    Args:
      backend: platform name; the default backend if None.

    Returns:
      This process's devices.

    Example:
      >>> len(local_devices()) == jax.local_device_count()
      True
    """
    return list(jax.local_devices(backend=backend))


def process_index() -> int:
    """This process's index (``jax.process_index``).

    Returns:
      0 in a single-process run.

    Example:
      >>> process_index()
      0
    """
    return int(jax.process_index())


def process_count() -> int:
    """Number of processes (``jax.process_count``).

    Returns:
      1 in a single-process run.

    Example:
      >>> process_count()
      1
    """
    return int(jax.process_count())
