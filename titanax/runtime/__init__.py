"""Runtime: multi-process start-up, device meshes and per-axis process groups.

Example:
  >>> from titanax.runtime import MeshSpec, ProcessGroups, initialize
  >>> info = initialize()                                   # no-op for a single process
  >>> mesh = MeshSpec(axes=("data", "tensor"), shape=(-1, 2)).build()   # doctest: +SKIP
  >>> ProcessGroups(mesh).size("data")                      # doctest: +SKIP
  4
"""

from titanax.runtime.distributed import (
    CPU_DEVICES_VAR,
    DEFAULT_COORDINATOR_PORT,
    DEFAULT_INIT_TIMEOUT_S,
    INIT_TIMEOUT_VAR,
    ClusterSpec,
    DistributedInfo,
    devices,
    initialize,
    local_devices,
    parse_slurm_nodelist,
    process_count,
    process_index,
    resolve_cluster,
)
from titanax.runtime.mesh import MeshSpec, describe_mesh
from titanax.runtime.process_groups import AxisNames, ProcessGroups
from titanax.runtime.simulate import simulate_cpu_devices

__all__ = [
    "CPU_DEVICES_VAR",
    "DEFAULT_COORDINATOR_PORT",
    "DEFAULT_INIT_TIMEOUT_S",
    "INIT_TIMEOUT_VAR",
    "AxisNames",
    "ClusterSpec",
    "DistributedInfo",
    "MeshSpec",
    "ProcessGroups",
    "describe_mesh",
    "devices",
    "initialize",
    "local_devices",
    "parse_slurm_nodelist",
    "process_count",
    "process_index",
    "resolve_cluster",
    "simulate_cpu_devices",
]
