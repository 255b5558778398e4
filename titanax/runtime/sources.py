"""Where the multi-process settings can come from: one reader per launcher, highest priority first.

Each reader turns an environment into a *layer*: the fields it can set, each a :class:`Setting`
that knows its origin (the variable or argument, named in errors) and parses lazily, so a malformed
variable of a lower-priority launcher that is never used does not raise.
:func:`titanax.runtime.resolve_cluster` takes each field from the first layer that sets it.

Titanax reads SLURM and Open MPI itself although ``jax.distributed.initialize`` detects them too: it
needs the number of processes, this process's id and the coordinator before JAX starts, for its
start-up rendezvous (:mod:`titanax.runtime.rendezvous`), and JAX's detection runs only inside
``jax.distributed.initialize``. What JAX derives from these launchers after that, it still derives:
each process's local device (``SLURM_LOCALID``, ``OMPI_COMM_WORLD_LOCAL_RANK``) is left to JAX.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from titanax.exceptions import DistributedError
from titanax.runtime.env_vars import env_value, first_env, parse_id_list, parse_int
from titanax.runtime.slurm import parse_slurm_nodelist

FIELDS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
"""The settings a layer can provide, in :class:`~titanax.runtime.ClusterSpec`'s names."""

DEFAULT_COORDINATOR_PORT = 12355
"""Coordinator port used when neither a port variable nor a SLURM job id provides one."""

# JAX's own SLURM detection derives the port from the job id in this window, so that every rank
# agrees without talking and concurrent jobs on one node rarely collide; using the same numbers
# keeps a job's port the one JAX would have chosen.
_SLURM_PORT_BASE = 65535 - 2**12 + 1
_SLURM_PORT_SPAN = 2**12

# Sources whose coordinator is derived from the launcher's own variables: meaningless, and not
# parsed, for a single process.
DERIVED_COORDINATOR_SOURCES = ("slurm", "torchrun")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One candidate value of a field: where it comes from and how to read it (lazily)."""

    origin: str  # e.g. "TITANAX_NUM_PROCESSES" or "num_processes= argument"
    source: str  # e.g. "env:TITANAX"
    get: Callable[[], Any]


Layer = dict[str, Setting]


def coordinator_port(env: Mapping[str, str], launcher_ports: Sequence[str] = ()) -> int:
    """The port for a coordinator address given without one.

    ``TITANAX_COORDINATOR_PORT`` / ``JAX_COORDINATOR_PORT``, then the launcher's own port variables
    (``launcher_ports``, e.g. ``MASTER_PORT``), then one derived from ``SLURM_JOB_ID``, then
    :data:`DEFAULT_COORDINATOR_PORT`.
    """
    found = first_env(env, ("TITANAX_COORDINATOR_PORT", "JAX_COORDINATOR_PORT", *launcher_ports))
    if found is not None:
        name, text = found
        port = parse_int(name, text)
        if not 0 < port < 65536:
            raise DistributedError(
                f"{name}={port} is not a TCP port",
                suggestion=f"set {name} to a free port between 1024 and 65535",
            )
        return port
    job = env_value(env, "SLURM_JOB_ID")
    if job is not None and job.isdigit():
        return _SLURM_PORT_BASE + int(job) % _SLURM_PORT_SPAN
    return DEFAULT_COORDINATOR_PORT


def has_port(address: str) -> bool:
    """Whether ``address`` ends in ``:port`` (``[::1]`` is an IPv6 host without one)."""
    if address.startswith("["):
        return bool(re.search(r"\]:\d+$", address))
    return ":" in address


def _int_setting(env: Mapping[str, str], name: str, source: str) -> Setting:
    return Setting(name, source, lambda: parse_int(name, env[name].strip()))


def explicit_layer(explicit: Mapping[str, Any]) -> Layer:
    """The arguments of ``initialize`` / ``resolve_cluster`` that are not None."""
    return {
        field: Setting(f"{field}= argument", "explicit", lambda v=value: v)
        for field in FIELDS
        if (value := explicit.get(field)) is not None
    }


def variables_layer(env: Mapping[str, str], prefix: str) -> Layer:
    """``{prefix}_COORDINATOR_ADDRESS``, ``_NUM_PROCESSES``, ``_PROCESS_ID``, ``_LOCAL_DEVICE_IDS``.

    ``prefix`` is ``TITANAX`` (what ``titanax launch`` sets) or ``JAX``. JAX itself reads only
    ``JAX_COORDINATOR_ADDRESS`` and ``JAX_LOCAL_DEVICE_IDS``; the count and id under the same prefix
    let a job name all four the same way.
    """
    readers: dict[str, tuple[str, Callable[[str, str], Any]]] = {
        "coordinator_address": (f"{prefix}_COORDINATOR_ADDRESS", lambda n, t: t),
        "num_processes": (f"{prefix}_NUM_PROCESSES", parse_int),
        "process_id": (f"{prefix}_PROCESS_ID", parse_int),
        "local_device_ids": (f"{prefix}_LOCAL_DEVICE_IDS", parse_id_list),
    }
    layer: Layer = {}
    for field, (name, parse) in readers.items():
        text = env_value(env, name)
        if text is not None:
            layer[field] = Setting(name, f"env:{prefix}", lambda n=name, t=text, p=parse: p(n, t))
    return layer


def _slurm_coordinator(env: Mapping[str, str]) -> str:
    found = first_env(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    if found is None:
        raise DistributedError(
            "SLURM_NTASKS is set but no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST says where "
            "process 0 runs",
            suggestion="launch with srun, or set TITANAX_COORDINATOR_ADDRESS=<host of process 0>:<port>",
        )
    name, text = found
    return f"{parse_slurm_nodelist(text, variable=name)[0]}:{coordinator_port(env)}"


def slurm_layer(env: Mapping[str, str]) -> Layer:
    """SLURM (``srun``): ``SLURM_NTASKS``, ``SLURM_PROCID``, process 0 on the first listed host."""
    if env_value(env, "SLURM_NTASKS") is None:
        return {}
    layer = {
        "num_processes": _int_setting(env, "SLURM_NTASKS", "slurm"),
        "coordinator_address": Setting("SLURM nodelist", "slurm", lambda: _slurm_coordinator(env)),
    }
    if env_value(env, "SLURM_PROCID") is not None:
        layer["process_id"] = _int_setting(env, "SLURM_PROCID", "slurm")
    return layer


def openmpi_layer(env: Mapping[str, str]) -> Layer:
    """Open MPI (``mpirun``): ``OMPI_COMM_WORLD_SIZE`` and ``OMPI_COMM_WORLD_RANK``; no coordinator."""
    if env_value(env, "OMPI_COMM_WORLD_SIZE") is None:
        return {}
    layer = {"num_processes": _int_setting(env, "OMPI_COMM_WORLD_SIZE", "openmpi")}
    if env_value(env, "OMPI_COMM_WORLD_RANK") is not None:
        layer["process_id"] = _int_setting(env, "OMPI_COMM_WORLD_RANK", "openmpi")
    return layer


def _torchrun_coordinator(env: Mapping[str, str]) -> str:
    address = env_value(env, "MASTER_ADDR")
    if address is None:
        raise DistributedError(
            "WORLD_SIZE and RANK are set (torchrun / Kubeflow PyTorchJob) but MASTER_ADDR, the host "
            "of rank 0, is not",
            suggestion="launch with torchrun or a PyTorchJob (both set MASTER_ADDR), or set "
            "TITANAX_COORDINATOR_ADDRESS=<host of process 0>:<port>",
        )
    if has_port(address):
        return address
    return f"{address}:{coordinator_port(env, ('MASTER_PORT',))}"


def _torchrun_shares_node(env: Mapping[str, str]) -> bool:
    """Whether torchrun runs several processes on this node (``LOCAL_WORLD_SIZE`` > 1, or malformed:
    then reading it names the variable), so that ``LOCAL_RANK`` should pick this process's device."""
    size = env_value(env, "LOCAL_WORLD_SIZE")
    if size is None or env_value(env, "LOCAL_RANK") is None:
        return False
    return not (size.isdigit() and int(size) <= 1)


def _torchrun_local_device_ids(env: Mapping[str, str]) -> tuple[int, ...]:
    # Several processes per node (torchrun --nproc-per-node N): each drives the device matching its
    # local rank, as JAX arranges under SLURM and Open MPI. One process per node keeps all devices.
    parse_int("LOCAL_WORLD_SIZE", env["LOCAL_WORLD_SIZE"].strip())
    return (parse_int("LOCAL_RANK", env["LOCAL_RANK"].strip()),)


def torchrun_layer(env: Mapping[str, str]) -> Layer:
    """torchrun and Kubeflow's PyTorchJob, which JAX does not detect: ``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``:``MASTER_PORT``, and ``LOCAL_RANK`` when processes share a node."""
    # WORLD_SIZE alone is too generic a name to act on.
    if env_value(env, "WORLD_SIZE") is None or env_value(env, "RANK") is None:
        return {}
    layer = {
        "num_processes": _int_setting(env, "WORLD_SIZE", "torchrun"),
        "process_id": _int_setting(env, "RANK", "torchrun"),
        "coordinator_address": Setting("MASTER_ADDR", "torchrun", lambda: _torchrun_coordinator(env)),
    }
    if _torchrun_shares_node(env):
        layer["local_device_ids"] = Setting(
            "LOCAL_RANK", "torchrun", lambda: _torchrun_local_device_ids(env)
        )
    return layer


def kubernetes_layer(env: Mapping[str, str], higher: Sequence[Layer]) -> Layer:
    """Kubernetes Indexed Job / JobSet: ``JOB_COMPLETION_INDEX`` is the process id.

    JAX's Kubernetes detection asks the cluster's API (and needs the ``kubernetes`` package and a
    role allowed to read pods); the index needs neither. It counts only when a ``higher`` layer
    says how many processes there are: otherwise an indexed job of independent single-process runs
    would be mistaken for a broken cluster.
    """
    if env_value(env, "JOB_COMPLETION_INDEX") is None:
        return {}
    if not any("num_processes" in layer for layer in higher):
        return {}
    return {"process_id": _int_setting(env, "JOB_COMPLETION_INDEX", "kubernetes")}


def layers(env: Mapping[str, str], explicit: Mapping[str, Any]) -> list[Layer]:
    """Every source's layer, highest priority first (see :mod:`titanax.runtime.cluster`)."""
    found = [
        explicit_layer(explicit),
        variables_layer(env, "TITANAX"),
        variables_layer(env, "JAX"),
        slurm_layer(env),
        openmpi_layer(env),
        torchrun_layer(env),
    ]
    found.append(kubernetes_layer(env, found))
    return [layer for layer in found if layer]
