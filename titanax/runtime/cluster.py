"""The multi-process settings of this run, worked out from arguments and the environment.

:func:`resolve_cluster` is a pure function of explicit values and an environment mapping, so every
launcher is unit-testable without starting anything; :func:`titanax.runtime.initialize` applies its
result. Each field takes the first source that sets it:

1. explicit arguments of :func:`~titanax.runtime.initialize` / :func:`resolve_cluster`;
2. ``TITANAX_COORDINATOR_ADDRESS`` / ``TITANAX_NUM_PROCESSES`` / ``TITANAX_PROCESS_ID`` /
   ``TITANAX_LOCAL_DEVICE_IDS`` (what ``titanax launch`` sets);
3. ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` / ``JAX_LOCAL_DEVICE_IDS``;
4. SLURM: ``SLURM_NTASKS``, ``SLURM_PROCID``, coordinator = first host of ``SLURM_STEP_NODELIST``
   (or ``SLURM_JOB_NODELIST``);
5. Open MPI: ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK`` (no coordinator: set
   ``TITANAX_COORDINATOR_ADDRESS``);
6. torchrun / Kubeflow PyTorchJob (when ``WORLD_SIZE`` and ``RANK`` are both set): ``WORLD_SIZE``,
   ``RANK``, coordinator ``MASTER_ADDR`` with port ``MASTER_PORT``; when ``LOCAL_WORLD_SIZE`` > 1,
   ``LOCAL_RANK`` picks this process's one local device;
7. Kubernetes Indexed Job / JobSet: ``JOB_COMPLETION_INDEX`` is the process id, used only when a
   higher source gives the number of processes.

A coordinator address without a port gets ``TITANAX_COORDINATOR_PORT`` (or ``JAX_COORDINATOR_PORT``);
failing that, torchrun's ``MASTER_ADDR`` gets ``MASTER_PORT`` and SLURM's first host the port JAX
derives from ``SLURM_JOB_ID``; anything else gets port 12355.

What is left to JAX: the fields resolved here are passed to ``jax.distributed.initialize``, which
still fills in what it detects and Titanax leaves unset (under SLURM and Open MPI, each process's
local device) and reads its own other variables (``JAX_COORDINATOR_BIND_ADDRESS``). A cluster
only JAX detects (Cloud TPU, mpi4py, Kubernetes through its API) is started with
``jax.distributed.initialize()`` before :func:`~titanax.runtime.initialize`, which adopts it.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from titanax.exceptions import DistributedError
from titanax.runtime.sources import (
    DERIVED_COORDINATOR_SOURCES,
    Setting,
    coordinator_port,
    has_port,
    layers,
)

__all__ = ["ClusterSpec", "resolve_cluster"]


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


def _as_int(value: Any) -> int | None:
    """An integer (numpy integers included) or None; bools and numeric strings are not counts."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _refuse_partial(chosen: Mapping[str, Setting]) -> None:
    """Without a number of processes, any other cluster setting is a mistake, not a single process."""
    for field in ("process_id", "coordinator_address"):
        if field in chosen:
            origin = chosen[field].origin
            raise DistributedError(
                f"{field} was given ({origin}) but not the number of processes",
                suggestion="also set TITANAX_NUM_PROCESSES (or pass num_processes=), or remove "
                f"{origin} for a single-process run",
            )
    if "local_device_ids" in chosen and chosen["local_device_ids"].source == "explicit":
        raise DistributedError(
            "local_device_ids= was given for a single-process run, where nothing applies it",
            suggestion="drop local_device_ids=, and pick devices with MeshSpec(devices=...) or "
            "CUDA_VISIBLE_DEVICES",
        )


def _num_processes(setting: Setting) -> int:
    raw = setting.get()
    n = _as_int(raw)
    if n is None:
        raise DistributedError(
            f"num_processes ({setting.origin}) is {raw!r}, not an integer",
            suggestion="pass a whole number of processes, e.g. num_processes=2",
        )
    if n < 1:
        raise DistributedError(
            f"num_processes={n} ({setting.origin}) must be at least 1",
            suggestion=f"set {setting.origin} to the number of processes in the job",
        )
    return n


def _process_id(setting: Setting | None, n: int, n_origin: str) -> int:
    if setting is None:
        if n == 1:
            return 0
        raise DistributedError(
            f"num_processes={n} ({n_origin}) but nothing says which process this is",
            suggestion="set TITANAX_PROCESS_ID to this process's index (0 for the coordinator) or pass "
            "process_id=",
        )
    raw = setting.get()
    pid = _as_int(raw)
    if pid is None:
        raise DistributedError(
            f"process_id ({setting.origin}) is {raw!r}, not an integer",
            suggestion="pass this process's index, e.g. process_id=0",
        )
    if not 0 <= pid < n:
        raise DistributedError(
            f"process_id={pid} ({setting.origin}) is outside 0..{n - 1} for num_processes={n} "
            f"({n_origin})",
            suggestion="process ids run from 0 to num_processes-1; check that both come from the same "
            "launcher",
        )
    return pid


def _coordinator(
    env: Mapping[str, str], setting: Setting | None, n: int, n_setting: Setting
) -> str | None:
    # A launcher-derived coordinator (SLURM's nodelist, torchrun's MASTER_ADDR) means nothing to a
    # single process, and a malformed one must not stop it.
    if setting is not None and (n > 1 or setting.source not in DERIVED_COORDINATOR_SOURCES):
        address = str(setting.get()).strip()
        if not address:
            raise DistributedError(
                f"the coordinator address ({setting.origin}) is empty",
                suggestion="give the address of process 0 as host:port",
            )
        return address if has_port(address) else f"{address}:{coordinator_port(env)}"
    if n == 1:
        return None
    hint = (
        "Open MPI does not say where rank 0 runs: export TITANAX_COORDINATOR_ADDRESS=<host of rank "
        "0>:<port> to every rank"
        if n_setting.source == "openmpi"
        else "set TITANAX_COORDINATOR_ADDRESS=<host of process 0>:<port> or pass coordinator_address="
    )
    raise DistributedError(
        f"num_processes={n} ({n_setting.origin}) but no coordinator address was given",
        suggestion=hint,
    )


def _local_device_ids(setting: Setting | None) -> tuple[int, ...] | None:
    if setting is None:
        return None
    raw = setting.get()
    try:
        return (int(raw),) if isinstance(raw, int) else tuple(int(i) for i in raw)
    except (TypeError, ValueError):
        raise DistributedError(
            f"local_device_ids ({setting.origin}) is {raw!r}, not a list of ints",
            suggestion="pass local device indices, e.g. local_device_ids=[0, 1]",
        ) from None


def _sources(chosen: Mapping[str, Setting], has_coordinator: bool) -> str:
    """``"slurm+env:TITANAX"``: the sources of the fields used, in a fixed field order, once each."""
    out: list[str] = []
    for field in ("num_processes", "process_id", "coordinator_address", "local_device_ids"):
        used = field in chosen and (field != "coordinator_address" or has_coordinator)
        if used and chosen[field].source not in out:
            out.append(chosen[field].source)
    return "+".join(out)


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
    chosen: dict[str, Setting] = {}
    for layer in layers(env, explicit):  # highest priority first: the first to set a field wins
        for field, setting in layer.items():
            chosen.setdefault(field, setting)

    n_setting = chosen.get("num_processes")
    if n_setting is None:
        _refuse_partial(chosen)
        return None
    n = _num_processes(n_setting)
    pid = _process_id(chosen.get("process_id"), n, n_setting.origin)
    address = _coordinator(env, chosen.get("coordinator_address"), n, n_setting)
    ids = _local_device_ids(chosen.get("local_device_ids"))
    return ClusterSpec(
        coordinator_address=address,
        num_processes=n,
        process_id=pid,
        local_device_ids=ids,
        source=_sources(chosen, address is not None),
    )
