"""``tx.data.DataSource``: what a data factory named in a run configuration returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["DataSource"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataSource:
    """The batches of a run, as ``titanax run`` / ``titanax describe`` consume them.

    A data factory (``data.factory`` in the YAML) is called as ``factory(**data.args,
    batch_size=<global batch>, seed=<train.seed>)`` and returns one of these.

    Example:
      >>> import numpy as np
      >>> import titanax as tx
      >>> def digits(*, batch_size: int, seed: int) -> tx.data.DataSource:
      ...     x = np.zeros((64, 8), np.float32); y = np.zeros((64,), np.int32)
      ...     return tx.data.DataSource(
      ...         train=lambda: tx.data.ArrayLoader({"x": x, "y": y}, batch_size=batch_size, seed=seed),
      ...         example={"x": x[:batch_size], "y": y[:batch_size]})
      >>> digits(batch_size=16, seed=0).example["x"].shape
      (16, 8)
    """

    train: Iterable[Any] | Callable[[], Iterable[Any]]
    """Training batches: this process's slice of each global batch (a ``tx.data.ArrayLoader`` splits
    by process itself and resumes exactly from a checkpoint), or a function returning them — called
    only when training starts, so ``titanax describe`` never loads the data."""
    example: Any
    """One global batch (NumPy arrays, or ``jax.ShapeDtypeStruct``) with the full global batch size:
    the shapes a step is compiled for, and the input a Linen model is initialized from."""
    eval: Iterable[Any] | Callable[[], Iterable[Any]] | None = None
    """Held-out batches (a list, or a function returning a fresh iterable for each evaluation),
    split by process like ``train``; ``None``: no evaluation."""
    tokens_per_example: int | None = None
    """Tokens in one example (sequence models), to log tokens/s."""
    description: str | None = None
    """One line printed at the start of a run (what the data is)."""
    vocab_size: int | None = None
    """Token ids in the batches lie in ``[0, vocab_size)`` (a tokenizer's vocabulary). ``titanax run``
    then checks that every parameter axis an NNX model names ``vocab`` (embedding rows, output
    columns) is at least this long: an id past the end does not fail in JAX, it is silently clamped."""

    def train_batches(self) -> Iterable[Any]:
        """The training iterable (calls ``train`` if it is a function)."""
        return self.train() if callable(self.train) and not hasattr(self.train, "__next__") else self.train
