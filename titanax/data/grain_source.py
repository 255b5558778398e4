"""``GrainLoader``: batches from a Grain ``MapDataset`` that resume on any number of processes.

The records form one *global* stream: epoch ``e`` visits the dataset in the order of Grain's
``MapDataset.shuffle(seed)`` reseeded for ``e`` (``.repeat()``), and epochs follow each other.
Global batch ``k`` is records ``[k * batch_size, (k + 1) * batch_size)`` of that stream whatever the
number of processes or devices; each process reads its share of it. Grain's
``grain.experimental.ElasticIterator`` does the slicing, batching and threaded prefetching; its
state is the number of records the whole job has consumed (``global_next_index``), the same on every
process. That number, not a per-process iterator position, is what the checkpoint keeps, so a run
saved on 8 devices (or processes) resumes on 4 with no record seen twice or skipped.

``grain`` is imported only when a loader is built (``pip install 'titanax[grain]'``).
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from titanax.data.loader import this_process
from titanax.exceptions import ConfigError

__all__ = ["GrainLoader"]

_STATE_KIND = "titanax.data.GrainLoader"
_STATE_VERSION = 1
_NEXT = "global_next_index"  # the key of grain's ElasticIterator state


def _grain() -> Any:
    try:
        import grain
        import grain.experimental
    except ImportError as err:
        raise ConfigError("tx.data.GrainLoader needs the 'grain' package, which is not installed",
                          suggestion="pip install 'titanax[grain]' (or: pip install 'grain>=0.2.18')",
                          owner="GrainLoader", field="dataset") from err
    if not hasattr(grain.experimental, "ElasticIterator"):
        raise ConfigError(
            f"tx.data.GrainLoader needs grain.experimental.ElasticIterator, which grain "
            f"{getattr(grain, '__version__', '(unknown version)')} lacks",
            suggestion="pip install -U 'grain>=0.2.18'", owner="GrainLoader", field="dataset")
    return grain


def _check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    # bool is an Integral; batch_size=True is a mistake, not a batch of one.
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        limit = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"GrainLoader {name}={value!r} must be an integer {limit}",
                          suggestion=f"pass {name} as a whole number {limit}",
                          owner="GrainLoader", field=name, value=value)
    return int(value)


def _as_map_dataset(grain: Any, dataset: Any) -> Any:
    """A ``MapDataset`` over ``dataset``; a random-access source (``__len__`` + ``__getitem__``:
    a list, an array, ``grain.sources.ArrayRecordDataSource``) is wrapped with ``MapDataset.source``."""
    if isinstance(dataset, grain.MapDataset):
        return dataset
    if isinstance(dataset, (grain.IterDataset, grain.DataLoader)):
        raise ConfigError(
            f"tx.data.GrainLoader needs random access to the records, got a {type(dataset).__name__}: "
            "its iterator state belongs to one process's shard and cannot be resumed on another "
            "number of processes",
            suggestion="pass the grain.MapDataset (or the random-access data source) the pipeline is "
            "built from, with per-record .map() transformations; GrainLoader shuffles, shards and "
            "batches it", owner="GrainLoader", field="dataset", value=type(dataset).__name__)
    random_access = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if random_access and not isinstance(dataset, (str, bytes, Mapping)):
        return grain.MapDataset.source(dataset)
    raise ConfigError(
        f"tx.data.GrainLoader cannot read records from a {type(dataset).__name__}",
        suggestion="pass a grain.MapDataset, or a sequence of records (a list, a NumPy array, a "
        "grain.sources.ArrayRecordDataSource)", owner="GrainLoader", field="dataset",
        value=type(dataset).__name__)


class GrainLoader(Iterator[Any]):
    """Shuffled, resumable batches from a Grain ``MapDataset``, split across processes.

    Global batch ``k`` is records ``[k * batch_size, (k + 1) * batch_size)`` of the global stream
    (the dataset shuffled by ``(seed, epoch)``, epoch after epoch); process ``p`` of ``P`` reads the
    records ``k * batch_size + p + j * P`` of it (``j < batch_size // P``, Grain's
    ``ElasticIterator`` slicing), so together the processes read each global batch exactly once. A
    batch may hold the last records of one epoch and the first of the next; each epoch still visits
    every record exactly once.

    :meth:`state` is the number of records consumed by the whole job (Grain's iterator state, the
    same on every process); restoring it on another number of processes or devices, or with another
    ``batch_size``, continues the same stream: no record is repeated or skipped.

    Args:
      dataset: a ``grain.MapDataset`` of records (pytrees of arrays of one shape each, e.g.
        ``{"tokens": ..., "label": ...}``), with any per-record ``.map()``; or a random-access source
        (a list, an array, ``grain.sources.ArrayRecordDataSource``). Not ``filter``-ed: a filter
        changes how many records a batch consumes.
      batch_size: the GLOBAL batch size (summed over processes).
      seed: seeds the shuffle (Grain reseeds it for every epoch), in ``[0, 2**32)``.
      shuffle: ``False`` visits the records in order every epoch.
      epochs: stop before the first batch that would go past this many epochs; ``None``: forever.
      process_index: this process's data-shard index; ``None`` takes ``jax.process_index()``.
        When processes share batch rows (tensor parallelism across processes) pass
        ``tx.data.process_data_shard(mesh, plan).index``.
      process_count: number of data shards; ``None`` takes ``jax.process_count()`` (see above).
      read_options: a ``grain.ReadOptions`` (threads reading records, batches prefetched);
        default 4 threads and 8 batches ahead.

    Raises:
      ConfigError: ``grain`` is not installed; the dataset is an ``IterDataset``/``DataLoader`` or
        filtered; a batch larger than the dataset or not divisible by ``process_count``; a bad
        index, count, seed or epoch count.

    Example:
      >>> import grain
      >>> records = grain.MapDataset.range(64).map(lambda i: {"x": np.full(4, i, np.float32)})
      >>> loader = tx.data.GrainLoader(records, batch_size=16, seed=0, process_index=0, process_count=1)
      >>> next(loader)["x"].shape           # this process's share of the global batch
      (16, 4)
      >>> saved = loader.state()             # JSON; the engine stores it with each checkpoint
      >>> saved["grain"]
      {'global_next_index': 16}
      >>> half = tx.data.GrainLoader(records, batch_size=16, seed=0, process_index=1, process_count=2)
      >>> half.restore(saved).local_batch_size   # resumes on 2 processes: 8 of the next 16 records each
      8
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        read_options: Any = None,
    ) -> None:
        grain = _grain()
        records = _as_map_dataset(grain, dataset)
        try:
            self.num_records = len(records)
        except TypeError as err:
            raise ConfigError(f"tx.data.GrainLoader needs a dataset with a length: {err}",
                              suggestion="pass a finite MapDataset; GrainLoader repeats it itself",
                              owner="GrainLoader", field="dataset") from err
        if self.num_records >= sys.maxsize:
            raise ConfigError(
                "tx.data.GrainLoader got an endless dataset (MapDataset.repeat() before it)",
                suggestion="pass one epoch of records; GrainLoader repeats it (epochs=None: forever)",
                owner="GrainLoader", field="dataset")
        if self.num_records == 0:
            raise ConfigError("tx.data.GrainLoader got a dataset with no records",
                              suggestion="pass at least batch_size records", owner="GrainLoader",
                              field="dataset")
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0, maximum=2**32 - 1)
        self.shuffle = bool(shuffle)
        self.epochs = None if epochs is None else _check_int("epochs", epochs, minimum=1)
        process_index, process_count = this_process(process_index, process_count)
        self.process_count = _check_int("process_count", process_count, minimum=1)
        self.process_index = _check_int("process_index", process_index, minimum=0,
                                        maximum=self.process_count - 1)
        if self.batch_size > self.num_records:
            raise ConfigError(
                f"GrainLoader batch_size={self.batch_size} is larger than the dataset "
                f"({self.num_records} records): a batch would hold a record twice",
                suggestion=f"use batch_size <= {self.num_records}", owner="GrainLoader",
                field="batch_size", value=self.batch_size)
        if self.batch_size % self.process_count:
            lower = self.batch_size // self.process_count * self.process_count
            raise ConfigError(
                f"global batch_size={self.batch_size} does not divide over {self.process_count} "
                "processes", suggestion=f"use a multiple of {self.process_count}, e.g. "
                + (f"{lower} or " if lower else "") + f"{lower + self.process_count}",
                owner="GrainLoader", field="batch_size", value=self.batch_size)
        stream = records.shuffle(seed=self.seed) if self.shuffle else records
        # repeat() reseeds the shuffle for every epoch; record e * N + i of the stream is record i
        # of epoch e, on every process and for every batch size.
        self._stream = stream.repeat(self.epochs)
        self._read_options = read_options if read_options is not None else grain.ReadOptions(
            num_threads=4, prefetch_buffer_size=8)
        self._iterator = self._elastic()

    def _elastic(self) -> Any:
        grain = _grain()
        shard = grain.sharding.ShardOptions(shard_index=self.process_index,
                                            shard_count=self.process_count, drop_remainder=True)
        try:
            return grain.experimental.ElasticIterator(self._stream, self.batch_size, shard,
                                                      read_options=self._read_options)
        except ValueError as err:  # grain refuses filtered datasets
            raise ConfigError(f"tx.data.GrainLoader cannot resume this dataset exactly: {err}",
                              suggestion="drop records before building the MapDataset (a filter "
                              "changes how many records a batch consumes)", owner="GrainLoader",
                              field="dataset") from err

    # ----------------------------------------------------------------------------- geometry
    @property
    def local_batch_size(self) -> int:
        """Records this process yields per batch: ``batch_size // process_count``."""
        return self.batch_size // self.process_count

    @property
    def next_index(self) -> int:
        """Records of the global stream consumed so far, by all processes together."""
        return int(self._iterator.get_state()[_NEXT])

    @property
    def epoch(self) -> int:
        """The epoch the next record comes from."""
        return self.next_index // self.num_records

    @property
    def position(self) -> int:
        """Records of the current epoch already consumed (by all processes together)."""
        return self.next_index % self.num_records

    # ---------------------------------------------------------------------------- iteration
    def __iter__(self) -> GrainLoader:
        return self

    def __next__(self) -> Any:
        if self.epochs is not None and self.next_index + self.batch_size > self.epochs * self.num_records:
            raise StopIteration
        return next(self._iterator)

    def close(self) -> None:
        """Stop Grain's reading threads (a later ``next`` starts them again)."""
        self._iterator.close()

    # -------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Where the loader is: JSON, identical on every process, independent of their number.

        Returns:
          ``{"kind", "version", "grain": {"global_next_index": n}, "epoch", "position", "seed",
          "shuffle", "num_records", "batch_size"}``: ``n`` records of the global stream have been
          consumed (Grain's ``ElasticIterator`` state); the rest identifies the stream so that
          :meth:`restore` refuses a state saved for other data.
        """
        return {
            "kind": _STATE_KIND,
            "version": _STATE_VERSION,
            "grain": dict(self._iterator.get_state()),
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": self.num_records,
            "batch_size": self.batch_size,
        }

    def restore(self, state: Mapping[str, Any]) -> GrainLoader:
        """Continue the global stream after a :meth:`state`, on this loader's processes.

        The saving run may have had another number of processes or devices, or another batch size:
        the next batch starts with the first record no process had consumed.

        Args:
          state: a dict from :meth:`state` (possibly after a JSON round trip).

        Returns:
          ``self``.

        Raises:
          ConfigError: the state is malformed, or was saved for another number of records, seed
            or shuffle setting.
        """
        wrong = ConfigError(f"not a GrainLoader state: {state!r:.200}",
                            suggestion="pass the dict that GrainLoader.state() returned, unmodified",
                            owner="GrainLoader", field="state")
        if not isinstance(state, Mapping) or state.get("kind") != _STATE_KIND:
            raise wrong
        if state.get("version") != _STATE_VERSION:
            raise wrong.replace(message=f"GrainLoader state version {state.get('version')!r} is not "
                                f"{_STATE_VERSION}", suggestion="restore with the Titanax version that "
                                "saved the state")
        saved = state.get("grain")
        index = saved.get(_NEXT) if isinstance(saved, Mapping) else None
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise wrong
        mine = self.state()
        different = {k: (state.get(k), mine[k]) for k in ("num_records", "seed", "shuffle")
                     if state.get(k) != mine[k]}
        if different:
            described = ", ".join(f"{k}: saved {s!r}, this loader {m!r}" for k, (s, m) in different.items())
            raise ConfigError(
                f"GrainLoader state was saved for a different record stream ({described})",
                suggestion="build the loader over the same dataset with the same seed and shuffle",
                owner="GrainLoader", field="state")
        self._iterator.set_state(dict(saved))
        return self

    def __repr__(self) -> str:
        return (f"GrainLoader({self.num_records} records, batch_size={self.batch_size}, "
                f"process {self.process_index}/{self.process_count}, epoch={self.epoch}, "
                f"position={self.position})")
