"""The environment variables Titanax itself defines, and how every variable is read.

Only ``TITANAX_*`` names live here; a launcher's own variables (``SLURM_NTASKS``, ``WORLD_SIZE``)
are named where they are read (:mod:`titanax.runtime.sources`). Reading is strict and says which
variable is at fault: a malformed value raises :class:`~titanax.exceptions.DistributedError` with
the variable's name, its value and a value that would work.

``titanax.launch`` imports these names to set them in the processes it starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from titanax.exceptions import DistributedError

CPU_DEVICES_VAR = "TITANAX_CPU_DEVICES"
"""Simulated CPU devices each process should present (``titanax launch --cpu-devices-per-proc``)."""

INIT_TIMEOUT_VAR = "TITANAX_INIT_TIMEOUT"
"""Seconds every process waits for the others to join (:mod:`titanax.runtime.rendezvous`)."""

LAUNCHER_PID_VAR = "TITANAX_LAUNCHER_PID"
"""Process id of the ``titanax launch`` that started this process (:mod:`titanax.runtime.launcher`)."""


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value of ``name``, or None when it is unset or empty."""
    # An exported-but-empty variable (`JAX_PROCESS_ID=`) means "unset", as shells usually intend.
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def first_env(env: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    """``(name, value)`` of the first of ``names`` that is set, or None."""
    for name in names:
        value = env_value(env, name)
        if value is not None:
            return name, value
    return None


def parse_int(name: str, text: str, *, example: int = 0) -> int:
    """``text`` (the value of variable ``name``) as an integer; the error names the variable."""
    try:
        return int(text)
    except ValueError:
        raise DistributedError(
            f"{name}={text!r} is not an integer",
            suggestion=f"set {name} to a whole number (e.g. {name}={example}) or unset it",
        ) from None


def parse_id_list(name: str, text: str) -> tuple[int, ...]:
    """``text`` such as ``"0,1, 2"`` (the value of variable ``name``) as device ids."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise DistributedError(
            f"{name}={text!r} is not a comma-separated list of device ids",
            suggestion=f"set {name} like {name}=0,1,2,3 or unset it",
        ) from None
