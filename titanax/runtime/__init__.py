"""Runtime: multi-process start-up, device meshes and per-axis process groups.

Example:
  >>> from titanax.runtime import MeshSpec, ProcessGroups, initialize
  >>> info = initialize()                                   # no-op for a single process
  >>> mesh = MeshSpec(axes=("data", "tensor"), shape=(-1, 2)).build()   # doctest: +SKIP
  >>> ProcessGroups(mesh).size("data")                      # doctest: +SKIP
  4
"""

from titanax.runtime.cluster import ClusterSpec, resolve_cluster
from titanax.runtime.compile_cache import enable_compile_cache
from titanax.runtime.distributed import DistributedInfo, initialize
from titanax.runtime.mesh import MeshSpec, describe_mesh
from titanax.runtime.process_groups import ProcessGroups
from titanax.runtime.simulate import simulate_cpu_devices

__all__ = [
    "ClusterSpec",
    "DistributedInfo",
    "MeshSpec",
    "ProcessGroups",
    "describe_mesh",
    "enable_compile_cache",
    "initialize",
    "resolve_cluster",
    "simulate_cpu_devices",
]
