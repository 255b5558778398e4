"""Multi-process start-up: :func:`initialize` starts ``jax.distributed`` once, with clear errors.

The settings come from :func:`~titanax.runtime.resolve_cluster` (arguments, ``TITANAX_*``/``JAX_*``
variables, SLURM, Open MPI, torchrun / Kubeflow, Kubernetes Indexed Jobs: see
:mod:`titanax.runtime.cluster`); a single process is a no-op that never touches ``jax.distributed``.
What Titanax adds around ``jax.distributed.initialize``:

* a start-up rendezvous on the coordinator port (:mod:`titanax.runtime.rendezvous`), so that a
  process that never starts is named within ``TITANAX_INIT_TIMEOUT`` seconds instead of ending every
  process with JAX's C++ abort;
* ``TITANAX_CPU_DEVICES=K`` (set by ``titanax launch --cpu-devices-per-proc K``): this process
  simulates ``K`` CPU devices (:func:`~titanax.runtime.simulate_cpu_devices`) and uses gloo for
  cross-process CPU collectives;
* idempotency: a repeat call returns the first call's :class:`DistributedInfo` or refuses a
  different setup, and a ``jax.distributed`` someone else started is adopted when it agrees;
* :class:`~titanax.exceptions.DistributedError` naming the setting at fault, with a suggestion.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from titanax.exceptions import DistributedError, MeshError
from titanax.runtime import simulate as _simulate
from titanax.runtime.env_vars import CPU_DEVICES_VAR, INIT_TIMEOUT_VAR, env_value, parse_int
from titanax.runtime.launcher import follow_launcher
from titanax.runtime.sources import FIELDS
from titanax.runtime.cluster import ClusterSpec, resolve_cluster
from titanax.runtime.rendezvous import rendezvous

__all__ = ["DistributedInfo", "initialize"]

DEFAULT_INIT_TIMEOUT_S = 120.0
"""Seconds :func:`initialize` waits for every process to join when neither
``initialization_timeout=`` nor ``TITANAX_INIT_TIMEOUT`` says otherwise."""


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


def _init_timeout(env: Mapping[str, str], explicit: object) -> tuple[float, str]:
    """Seconds every process waits for the others to join, and where that number came from."""
    value: object
    if explicit is not None:
        origin, value = f"initialization_timeout={explicit!r}", explicit
    elif (text := env_value(env, INIT_TIMEOUT_VAR)) is not None:
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


# The one piece of module state: what the first successful initialize() did, so a second call can
# return it (idempotent) or refuse a different setup instead of letting JAX fail obscurely.
_INITIALIZED: tuple[ClusterSpec | None, DistributedInfo] | None = None


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
    text = env_value(env, CPU_DEVICES_VAR)
    if text is None:
        return None
    count = parse_int(CPU_DEVICES_VAR, text, example=8)
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


def _start_jax(spec: ClusterSpec, timeout_s: float) -> None:
    """``jax.distributed.initialize`` with the resolved settings; its failure as a DistributedError."""
    kwargs: dict[str, Any] = {
        "coordinator_address": spec.coordinator_address,
        "num_processes": spec.num_processes,
        "process_id": spec.process_id,
        # Everyone is up after the rendezvous, so JAX's registration is quick; the limit only
        # matters for a process that dies between the rendezvous and it.
        "initialization_timeout": max(1, math.ceil(timeout_s)),
    }
    # Left unset, JAX picks them itself (one device per process under SLURM and Open MPI).
    if spec.local_device_ids is not None:
        kwargs["local_device_ids"] = list(spec.local_device_ids)
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


def _start(spec: ClusterSpec | None, timeout_s: float, timeout_origin: str) -> DistributedInfo:
    """The first call's work: CPU devices, then adopt a running ``jax.distributed`` or start one."""
    follow_launcher()
    cpu_devices = _cpu_devices_request(os.environ)
    if cpu_devices is not None:
        # Before anything below starts the JAX backend (jax.process_index() does).
        _simulate_cpu_devices(cpu_devices)
    if spec is not None and spec.is_multiprocess and (cpu_devices is not None or _cpu_only()):
        _use_gloo_cpu_collectives()

    if jax.distributed.is_initialized():
        # Someone called jax.distributed.initialize directly (e.g. for a cluster only JAX
        # detects); adopt it if it agrees with the request.
        info = _info(spec, "jax.distributed")
        conflicts = _conflicts(spec, info, None)
        if conflicts:
            raise DistributedError(
                f"jax.distributed is already initialized with a different setup ({'; '.join(conflicts)})",
                suggestion="remove the direct jax.distributed.initialize call or make the Titanax "
                "settings match it",
            )
        return info
    if spec is None or not spec.is_multiprocess:
        return _info(spec, spec.source if spec is not None else "default")
    _rendezvous(spec, timeout_s, timeout_origin)
    _start_jax(spec, timeout_s)
    return _info(spec, spec.source)


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
    once its backend is running. Settings are resolved by :func:`~titanax.runtime.resolve_cluster`
    from the arguments and ``os.environ``. A single process returns its info without calling
    ``jax.distributed``. Calling it again with the same (or no) settings returns the same info.

    Note: when ``local_device_ids`` is left unset under SLURM or Open MPI, JAX itself gives each
    process one device (the one matching its local rank). For one process per node driving every
    GPU, pass ``local_device_ids`` or set ``TITANAX_LOCAL_DEVICE_IDS=0,1,...``. For a cluster only
    JAX detects (Cloud TPU, mpi4py, Kubernetes through its API), call
    ``jax.distributed.initialize()`` first: this function then adopts it.

    Before ``jax.distributed.initialize`` every process reports to process 0 over the coordinator
    port, so a process that never starts is named in a :class:`~titanax.exceptions.DistributedError`
    within ``initialization_timeout`` seconds on every process that did, instead of a C++ abort
    after JAX's 300 s.

    ``TITANAX_CPU_DEVICES=K`` (set by ``titanax launch --cpu-devices-per-proc K``) first makes this
    process simulate ``K`` CPU devices (:func:`~titanax.runtime.simulate_cpu_devices`) and, for a
    multi-process run, selects gloo for collectives between the processes' CPU devices (also done
    for any multi-process run with ``JAX_PLATFORMS=cpu``).

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: total number of processes.
      process_id: this process's index.
      local_device_ids: local devices this process drives.
      initialization_timeout: seconds every process waits for the others to join (process 0 for
        all of them, the others for process 0); if None, ``TITANAX_INIT_TIMEOUT``, else 120.
        JAX's own registration gets the same limit.

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
      >>> info = tx.initialize()   # reads TITANAX_*/JAX_*/SLURM/Open MPI/torchrun/k8s variables
      >>> info.num_processes
      1
    """
    global _INITIALIZED
    explicit: dict[str, Any] = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": local_device_ids,
    }
    if _INITIALIZED is not None and _INITIALIZED[0] is not None:
        # A repeat call only has to agree with what is running: fields it leaves out are taken from
        # the first call, so `initialize()` after `initialize(num_processes=2, ...)` is not "incomplete".
        for field in FIELDS:
            if explicit[field] is None:
                explicit[field] = getattr(_INITIALIZED[0], field)
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

    info = _start(spec, timeout_s, timeout_origin)
    _INITIALIZED = (spec, info)  # only now: a failed start is not recorded
    return info


def _reset_for_tests() -> None:
    """Forget the idempotency record (tests only; it does not shut JAX down)."""
    global _INITIALIZED
    _INITIALIZED = None
