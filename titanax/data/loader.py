"""``ArrayLoader``: a deterministic, resumable batch iterator over in-memory arrays.

The loader walks one *global* stream of batches — epoch ``e`` visits the examples in the order of a
permutation drawn from ``(seed, e)`` — and each process yields only its contiguous slice of every
global batch. The position in that stream (epoch, batches consumed) is the whole state, so it is
the same on every process and does not depend on how many processes there are: save it from any
one process and restore it on all of them, even after changing the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from titanax.exceptions import TitanaxError

__all__ = ["ArrayLoader"]

_STATE_KIND = "titanax.data.ArrayLoader"
_STATE_VERSION = 1


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    # bool is an int subclass; ArrayLoader(batch_size=True) is a mistake, not a batch of one.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise TitanaxError(
            f"ArrayLoader {name}={value!r} must be an integer >= {minimum}",
            suggestion=f"pass {name} as a whole number, at least {minimum}",
        )
    return int(value)


def this_process(process_index: Any, process_count: Any) -> tuple[Any, Any]:
    """``(process_index, process_count)`` with a ``None`` taken from JAX (``jax.process_index()``,
    ``jax.process_count()``); JAX is imported only then, so a loader given both stays JAX-free."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


class ArrayLoader(Iterator[dict[str, np.ndarray]]):
    """Shuffled, seedable, resumable batches of in-memory arrays, split across processes.

    Each epoch draws a fresh permutation from ``(seed, epoch)``. Global batch ``i`` of an epoch is
    examples ``perm[i * batch_size:(i + 1) * batch_size]``; process ``p`` of ``P`` yields rows
    ``[p * batch_size // P, (p + 1) * batch_size // P)`` of it, so all processes together cover the
    global batch exactly once and :func:`~titanax.data.to_global` reassembles it.

    The loader is its own iterator (like a file): ``iter(loader)`` continues where it is.

    Args:
      arrays: name -> array, all with the same leading length (the number of examples).
      batch_size: the GLOBAL batch size (summed over processes).
      seed: seeds every epoch's permutation (an integer >= 0).
      shuffle: ``False`` visits examples in order every epoch.
      drop_remainder: drop the last, smaller batch of an epoch. With ``False`` that batch has
        ``len % batch_size`` examples, which must still divide by ``process_count`` (and, once on
        devices, by the batch mesh axes).
      process_index: this process's data-shard index; ``None`` takes ``jax.process_index()``.
        When processes share batch rows (tensor parallelism across processes) pass
        ``process_data_shard(mesh, plan).index`` instead.
      process_count: number of data shards; ``None`` takes ``jax.process_count()`` (see above).
      epochs: stop after this many epochs; ``None`` iterates forever.

    Raises:
      TitanaxError: arrays of different lengths, a batch larger than the data, a batch that does
        not divide by ``process_count``, a bad index or count.

    Example:
      >>> x, y = np.zeros((512, 2), np.float32), np.arange(512)
      >>> loader = tx.data.ArrayLoader({"x": x, "y": y}, batch_size=128, seed=0)
      >>> batch = next(loader)               # {"x": x[idx], "y": y[idx]}, this process's slice
      >>> batch["x"].shape
      (128, 2)
      >>> saved = loader.state()             # JSON-serialisable; store it with the checkpoint
      >>> resumed = tx.data.ArrayLoader.from_state({"x": x, "y": y}, saved)
      >>> bool((next(resumed)["y"] == next(loader)["y"]).all())   # the same next batch
      True
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        epochs: int | None = None,
    ) -> None:
        self._arrays = self._check_arrays(arrays)
        self.num_examples = next(iter(self._arrays.values())).shape[0]
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.seed = _check_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.epochs = None if epochs is None else _check_int("epochs", epochs, minimum=0)
        process_index, process_count = this_process(process_index, process_count)
        self.process_count = _check_int("process_count", process_count, minimum=1)
        self.process_index = _check_int("process_index", process_index, minimum=0)
        if self.process_index >= self.process_count:
            raise TitanaxError(
                f"ArrayLoader process_index={self.process_index} is not below "
                f"process_count={self.process_count}",
                suggestion="pass process_index in range(process_count), e.g. from "
                "tx.data.process_data_shard(mesh, plan)",
            )
        if self.batch_size > self.num_examples:
            raise TitanaxError(
                f"ArrayLoader batch_size={self.batch_size} is larger than the data "
                f"({self.num_examples} examples)",
                suggestion=f"use batch_size <= {self.num_examples}",
            )
        if self.batch_size % self.process_count:
            raise TitanaxError(
                f"global batch_size={self.batch_size} does not divide over "
                f"{self.process_count} processes",
                suggestion=f"use a multiple of {self.process_count}, e.g. "
                f"{max(1, self.batch_size // self.process_count) * self.process_count}",
            )
        remainder = self.num_examples % self.batch_size
        if not self.drop_remainder and remainder % self.process_count:
            raise TitanaxError(
                f"the last batch of each epoch has {remainder} examples, which do not divide over "
                f"{self.process_count} processes",
                suggestion="pass drop_remainder=True, or a batch_size that leaves a remainder "
                f"divisible by {self.process_count}",
            )
        self._epoch = 0
        self._position = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @staticmethod
    def _check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(arrays, Mapping) or not arrays:
            raise TitanaxError(
                f"ArrayLoader needs a non-empty mapping of name -> array, got {type(arrays).__name__}",
                suggestion="pass e.g. {'image': x_train, 'label': y_train}",
            )
        checked = {}
        for name, value in arrays.items():
            if not isinstance(name, str):
                raise TitanaxError(
                    f"ArrayLoader array names must be strings, got {name!r}",
                    suggestion="name the arrays with strings, e.g. {'image': x, 'label': y}",
                )
            array = np.asarray(value)
            if array.ndim == 0:
                raise TitanaxError(
                    f"ArrayLoader array {name!r} is a scalar; it has no examples to batch",
                    suggestion="give arrays whose first dimension indexes the examples",
                )
            checked[name] = array
        lengths = {name: a.shape[0] for name, a in checked.items()}
        if len(set(lengths.values())) != 1:
            raise TitanaxError(
                f"ArrayLoader arrays have different numbers of examples: {lengths}",
                suggestion="give every array the same leading length (one row per example)",
            )
        if next(iter(lengths.values())) == 0:
            raise TitanaxError(
                "ArrayLoader arrays hold no examples",
                suggestion="pass at least batch_size examples",
            )
        return checked

    # ----------------------------------------------------------------------------- geometry
    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last, smaller one included when ``drop_remainder=False``)."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    @property
    def local_batch_size(self) -> int:
        """Rows this process yields per full batch: ``batch_size // process_count``."""
        return self.batch_size // self.process_count

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches already consumed in the current epoch."""
        return self._position

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which ``epoch`` visits the examples (the same on every process)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        if self._perm_epoch != epoch:
            # SeedSequence over (seed, epoch): independent, reproducible streams per epoch, with no
            # state carried between epochs, so any epoch can be regenerated on resume.
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_examples), epoch
        assert self._perm is not None
        return self._perm

    # ---------------------------------------------------------------------------- iteration
    def __iter__(self) -> ArrayLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self._epoch >= self.epochs:
            raise StopIteration
        start = self._position * self.batch_size
        size = min(self.batch_size, self.num_examples - start)
        local = size // self.process_count
        begin = start + self.process_index * local
        indices = self.permutation(self._epoch)[begin:begin + local]
        # Fancy indexing copies: every batch is a fresh array, so a batch already handed to an
        # asynchronous device transfer is never overwritten by the next one.
        batch = {name: array[indices] for name, array in self._arrays.items()}
        self._position += 1
        if self._position >= self.steps_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        return batch

    # -------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Where the loader is: JSON-serialisable, identical on every process.

        Returns:
          ``{"epoch", "position", "seed", ...}``: the next batch is batch ``position`` of epoch
          ``epoch``; the other fields identify the stream so :meth:`restore` can refuse a state
          saved for different data or settings. Process index and count are not part of it.

        Example:
          >>> json.dumps(loader.state())                                     # doctest: +SKIP
          '{"kind": "titanax.data.ArrayLoader", "version": 1, "epoch": 0, "position": 3, ...}'
        """
        return {
            "kind": _STATE_KIND,
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
            "keys": sorted(self._arrays),
        }

    def restore(self, state: Mapping[str, Any]) -> ArrayLoader:
        """Continue from a :meth:`state`: the next batch is the one that followed it.

        Args:
          state: a dict from :meth:`state` (possibly after a JSON round trip).

        Returns:
          ``self``.

        Raises:
          TitanaxError: the state is malformed, or was saved for a different number of examples,
            array names, seed, batch size, shuffle or drop_remainder.

        Example:
          >>> loader.restore(json.loads(saved_text))                          # doctest: +SKIP
        """
        if not isinstance(state, Mapping) or state.get("kind") != _STATE_KIND:
            raise TitanaxError(
                f"not an ArrayLoader state: {state!r:.200}",
                suggestion="pass the dict that ArrayLoader.state() returned",
            )
        if state.get("version") != _STATE_VERSION:
            raise TitanaxError(
                f"ArrayLoader state version {state.get('version')!r} is not {_STATE_VERSION}",
                suggestion="restore with the Titanax version that saved the state",
            )
        missing = [k for k in ("epoch", "position", "seed", "batch_size", "num_examples", "shuffle",
                               "drop_remainder", "keys") if k not in state]
        if missing:
            raise TitanaxError(
                f"ArrayLoader state lacks {missing}",
                suggestion="pass the dict that ArrayLoader.state() returned, unmodified",
            )
        mine = self.state()
        different = {k: (state[k], mine[k]) for k in ("num_examples", "keys", "seed", "batch_size",
                                                      "shuffle", "drop_remainder")
                     if _normal(state[k]) != _normal(mine[k])}
        if different:
            described = ", ".join(f"{k}: saved {s!r}, this loader {m!r}" for k, (s, m) in different.items())
            raise TitanaxError(
                f"ArrayLoader state was saved for a different data stream ({described})",
                suggestion="build the loader over the same arrays with the same settings, e.g. "
                "ArrayLoader.from_state(arrays, state)",
            )
        epoch, position = state["epoch"], state["position"]
        for name, value in (("epoch", epoch), ("position", position)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TitanaxError(
                    f"ArrayLoader state has {name}={value!r}, not an integer >= 0",
                    suggestion="pass the dict that ArrayLoader.state() returned, unmodified",
                )
        if position > self.steps_per_epoch:
            raise TitanaxError(
                f"ArrayLoader state position {position} is past the {self.steps_per_epoch} batches "
                "of an epoch",
                suggestion="pass the dict that ArrayLoader.state() returned, unmodified",
            )
        if position == self.steps_per_epoch:
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position
        return self

    @classmethod
    def from_state(
        cls,
        arrays: Mapping[str, np.ndarray],
        state: Mapping[str, Any],
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        epochs: int | None = None,
    ) -> ArrayLoader:
        """A loader over ``arrays`` with the settings recorded in ``state``, positioned after it.

        Args:
          arrays: the same arrays the state was saved for.
          state: a dict from :meth:`state`.
          process_index: as in the constructor (may differ from the saving run).
          process_count: as in the constructor (may differ from the saving run).
          epochs: as in the constructor.

        Returns:
          The restored loader.

        Raises:
          TitanaxError: as :meth:`restore`.

        Example:
          >>> loader = ArrayLoader.from_state({"x": x, "y": y}, saved)         # doctest: +SKIP
        """
        if not isinstance(state, Mapping) or state.get("kind") != _STATE_KIND:
            raise TitanaxError(
                f"not an ArrayLoader state: {state!r:.200}",
                suggestion="pass the dict that ArrayLoader.state() returned",
            )
        settings = {}
        for key in ("batch_size", "seed", "shuffle", "drop_remainder"):
            if key not in state:
                raise TitanaxError(
                    f"ArrayLoader state lacks {key!r}",
                    suggestion="pass the dict that ArrayLoader.state() returned, unmodified",
                )
            settings[key] = state[key]
        loader = cls(arrays, **settings, process_index=process_index, process_count=process_count,
                     epochs=epochs)
        return loader.restore(state)

    def __repr__(self) -> str:
        return (f"ArrayLoader({self.num_examples} examples, batch_size={self.batch_size}, "
                f"process {self.process_index}/{self.process_count}, epoch={self._epoch}, "
                f"position={self._position}/{self.steps_per_epoch})")


def _normal(value: Any) -> Any:
    # A JSON round trip turns the sorted key tuple into a list; compare them as lists.
    return list(value) if isinstance(value, (list, tuple)) else value
