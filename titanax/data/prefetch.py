"""Keep the next few batches on their way to the devices while the current step runs.

``jax.make_array_from_process_local_data`` (like ``jax.device_put``) returns before the copy has
finished, so a small queue of already-placed batches overlaps host-to-device transfers with compute
without any thread.

Resuming: a prefetcher has pulled up to ``size - 1`` batches from its source that the consumer has
not received yet, so the *source's* state is ahead of training. :meth:`DevicePrefetcher.state`
returns the source state recorded right after the last batch the consumer *received* — save that
one (the engine does) and restore it into the source (or into the prefetcher) to resume without
skipping or repeating a batch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jax.sharding import Mesh

from titanax.data.global_batch import DataShard, RulesOrPlan, batch_layout, to_global
from titanax.data.grain_source import GrainLoader
from titanax.data.loader import ArrayLoader
from titanax.exceptions import ShardingError, TitanaxError

__all__ = ["DevicePrefetcher", "prefetch_to_device"]


class DevicePrefetcher(Iterator[Any]):
    """An iterator of global batches that converts up to ``size`` source batches ahead.

    Made by :func:`prefetch_to_device`; see there. Besides iterating, it forwards the source's
    resumable state, corrected for batches pulled but not yet handed out (:meth:`state`,
    :meth:`restore`), so code that checkpoints "the data" can treat an :class:`ArrayLoader` and a
    prefetcher over one alike.

    Attributes:
      size: the look-ahead bound.
      source: the wrapped iterable (e.g. the :class:`~titanax.data.ArrayLoader`).
    """

    def __init__(self, source: Iterable[Any], *, mesh: Mesh, rules_or_plan: RulesOrPlan, size: int = 2):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise TitanaxError(
                f"prefetch size={size!r} must be an integer >= 1",
                suggestion="use size=2 (one batch transferring while one is used); 1 disables look-ahead",
            )
        if not isinstance(source, Iterable):
            raise TitanaxError(
                f"prefetch_to_device needs an iterable of batches, got {type(source).__name__}",
                suggestion="pass an ArrayLoader, a generator, or any iterator of dicts of NumPy arrays",
            )
        # Resolve now: a plan that does not fit the mesh fails here, not at the first batch.
        layout = batch_layout(mesh, rules_or_plan)
        _check_source_shard(source, layout.shard)
        self.size = size
        self.source = source
        self._mesh = layout.mesh
        self._rules_or_plan = rules_or_plan
        self._iterator: Iterator[Any] = iter(source)
        self._buffer: collections.deque[tuple[Any, Any]] = collections.deque()
        self._exhausted = False
        self._pulled = 0  # source batches pulled since construction or the last restore
        self._consumed_state: Any = None  # source state after the last batch handed out

    def _source_state(self) -> Any:
        state = getattr(self.source, "state", None)
        return state() if callable(state) else None

    def _fill(self) -> None:
        while len(self._buffer) < self.size and not self._exhausted:
            if self._pulled == 0:
                # The state before anything was pulled is what "nothing consumed yet" resumes from.
                self._consumed_state = self._source_state()
            try:
                local = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                break
            self._pulled += 1
            # Record the source state *now*, while it points just past this batch.
            self._buffer.append((to_global(local, self._mesh, self._rules_or_plan), self._source_state()))

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        self._fill()
        if not self._buffer:
            raise StopIteration
        batch, state = self._buffer.popleft()
        self._consumed_state = state
        return batch

    @property
    def in_flight(self) -> int:
        """Batches pulled from the source and placed, not yet handed out."""
        return len(self._buffer)

    def state(self) -> Any:
        """The source's state just after the last batch this prefetcher handed out.

        Returns:
          What ``source.state()`` returned at that moment (before any batch was handed out: the
          source's state before the first pull), so restoring it resumes with the next unseen batch.

        Raises:
          TitanaxError: the source has no ``state()`` method.

        Example:
          >>> mesh = tx.MeshSpec(axes=("data",)).build()
          >>> loader = tx.data.ArrayLoader({"x": np.zeros((256, 2))}, batch_size=64)
          >>> data = tx.data.prefetch_to_device(loader, mesh=mesh, rules_or_plan=tx.presets.data_parallel())
          >>> batch = next(data)
          >>> data.state()["position"]     # one batch handed out; the loader itself has run ahead
          1
        """
        if not callable(getattr(self.source, "state", None)):
            raise TitanaxError(
                f"the prefetched source ({type(self.source).__name__}) has no state() to save",
                suggestion="wrap a tx.data.ArrayLoader (or any iterator with state()/restore()) to "
                "resume data exactly",
            )
        if self._pulled == 0 and not self._buffer:
            return self._source_state()
        return self._consumed_state

    def restore(self, state: Mapping[str, Any]) -> DevicePrefetcher:
        """Drop the batches in flight and restore the source to ``state``.

        Args:
          state: a state from :meth:`state` (or the source's own ``state()``).

        Returns:
          ``self``; the next batch is the one that followed ``state``.

        Raises:
          TitanaxError: the source has no ``restore()`` method (or refuses the state).
        """
        restore = getattr(self.source, "restore", None)
        if not callable(restore):
            raise TitanaxError(
                f"the prefetched source ({type(self.source).__name__}) has no restore()",
                suggestion="restore the data source yourself before wrapping it in prefetch_to_device",
            )
        restore(state)
        self._buffer.clear()
        self._iterator = iter(self.source)
        self._exhausted = False
        self._pulled = 0
        self._consumed_state = None
        return self


def _check_source_shard(source: Any, shard: DataShard) -> None:
    """Refuse a loader cut for a different process layout than the mesh's.

    Nothing else would notice: with tensor parallelism across processes, a loader left at its
    default (one part per process) feeds replicas different rows and JAX assembles a batch whose
    copies disagree, silently.
    """
    if not isinstance(source, (ArrayLoader, GrainLoader)):
        return
    mine = (source.process_index, source.process_count)
    if mine != tuple(shard):
        kind = type(source).__name__
        raise ShardingError(
            f"the {kind} loads part {mine[0]} of {mine[1]} of each batch, but on this mesh "
            f"this process feeds part {shard.index} of {shard.count}",
            suggestion="build the loader with shard = tx.data.process_data_shard(mesh, plan); "
            f"{kind}(..., process_index=shard.index, process_count=shard.count)",
        )


def prefetch_to_device(
    iterator: Iterable[Any],
    *,
    mesh: Mesh,
    rules_or_plan: RulesOrPlan,
    size: int = 2,
) -> DevicePrefetcher:
    """Place host-local batches on the mesh ahead of use, ``size`` at a time.

    Each item of ``iterator`` (this process's slice of a global batch, a pytree of NumPy arrays) is
    turned into global ``jax.Array``s by :func:`~titanax.data.to_global`. Nothing is pulled until the
    first ``next()``; after the consumer has received ``k`` batches, at most ``k + size - 1`` have
    been pulled from ``iterator`` (``size=1`` pulls on demand).

    Resuming: do not save ``loader.state()`` while a prefetcher wraps it — the loader is up to
    ``size - 1`` batches ahead. Save ``prefetcher.state()``, the loader state right after the last
    batch handed out, and on restart restore it with ``ArrayLoader.from_state`` /
    ``loader.restore`` (before wrapping) or ``prefetcher.restore``.

    The source must yield fresh arrays: transfers are asynchronous (and on CPU may alias host
    memory), so a source that refills one NumPy buffer in place would change batches in flight.
    :class:`~titanax.data.ArrayLoader` yields fresh arrays.

    Args:
      iterator: an iterable of host-local batches (e.g. an :class:`~titanax.data.ArrayLoader`).
      mesh: the mesh.
      rules_or_plan: a :class:`~titanax.Plan` or :class:`~titanax.Rules` (``batch`` resolves through
        them).
      size: look-ahead bound, >= 1.

    Returns:
      A :class:`DevicePrefetcher`: an iterator of global batches with ``state()``/``restore()``.

    Raises:
      TitanaxError: ``size`` is not a positive integer, or the plan does not fit the mesh.
      ShardingError: ``iterator`` is an :class:`~titanax.data.ArrayLoader` whose
        ``(process_index, process_count)`` is not :func:`~titanax.data.process_data_shard` of this
        mesh and plan.

    Example:
      >>> mesh = tx.MeshSpec(axes=("data",)).build()
      >>> loader = tx.data.ArrayLoader({"x": np.zeros((256, 2)), "y": np.arange(256)}, batch_size=64)
      >>> data = tx.data.prefetch_to_device(loader, mesh=mesh, rules_or_plan=tx.presets.data_parallel())
      >>> for step, batch in zip(range(3), data):
      ...     pass                                # state, metrics = train_step(state, batch)
      >>> batch["y"].sharding.spec                # on the devices, split over the batch axes
      P('data',)
      >>> resume_from = data.state()              # save it with the checkpoint
    """
    return DevicePrefetcher(iterator, mesh=mesh, rules_or_plan=rules_or_plan, size=size)
