"""Data: deterministic resumable loading, and host-local batches to global sharded arrays.

Example:
  >>> mesh = tx.MeshSpec(axes=("data",)).build()
  >>> plan = tx.Plan(data_parallel=tx.DP(axis="data"))
  >>> x, y = np.zeros((1024, 28, 28), np.float32), np.zeros(1024, np.int32)
  >>> loader = tx.data.ArrayLoader({"image": x, "label": y}, batch_size=256, seed=0)
  >>> data = tx.data.prefetch_to_device(loader, mesh=mesh, rules_or_plan=plan)
  >>> batch = next(data)          # {"image": jax.Array split over the batch axes, ...}
  >>> batch["image"].sharding.spec
  P('data', None, None)
  >>> resume_from = data.state()  # the loader state after the batches actually handed out
"""

from titanax.data.global_batch import (
    DataShard,
    batch_sharding,
    global_batch_size,
    process_data_shard,
    to_global,
)
from titanax.data.grain_source import GrainLoader
from titanax.data.loader import ArrayLoader
from titanax.data.prefetch import DevicePrefetcher, prefetch_to_device
from titanax.data.source import DataSource

__all__ = [
    "ArrayLoader",
    "DataShard",
    "DataSource",
    "DevicePrefetcher",
    "GrainLoader",
    "batch_sharding",
    "global_batch_size",
    "prefetch_to_device",
    "process_data_shard",
    "to_global",
]
