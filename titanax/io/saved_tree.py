"""Whether a saved checkpoint fits the state it is restored into: paths, shapes and dtypes read
from Orbax's metadata compared with the target before any array is read, so a checkpoint of
another model or optimizer is refused by name and a dtype change is a warning."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from titanax.exceptions import CheckpointError, TitanaxWarning, user_stacklevel

__all__ = ["check_fits", "key_path", "show_path", "target_layout"]

# What a differing array says about the run that wrote the checkpoint, by the TrainState field
# it sits in.
_WRITTEN_WITH = {
    "params": "model",
    "model_state": "model",
    "opt_state": "optimizer",
    "loss_scale": "loss scaling (Precision(loss_scale=...))",
    "rng": "PRNG key implementation",
}


def check_fits(where: str, saved: dict[tuple[str, ...], Any], wanted: dict[tuple[str, ...], Any]) -> None:
    """Raise when the arrays saved at ``where`` are not those of the state to restore; warn when they are
    but some dtypes differ (Orbax would cast them silently)."""
    missing = [path for path in wanted if path not in saved]
    extra = [path for path in saved if path not in wanted]
    reshaped = [path for path in wanted if path in saved and saved[path][0] != wanted[path][0]]
    if missing or extra or reshaped:
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"the state has {show_path(missing[0])} {_describe(wanted[missing[0]])}, "
                             "which the checkpoint lacks" + _more(missing, "such arrays"))
            if extra:
                parts.append(f"the checkpoint has {show_path(extra[0])} {_describe(saved[extra[0]])}, "
                             "which the state lacks" + _more(extra, "such arrays"))
            detail, first = "; ".join(parts), (missing or extra)[0]
        else:
            first = reshaped[0]
            detail = (f"{show_path(first)} is {_describe(saved[first])} in the checkpoint and "
                      f"{_describe(wanted[first])} in the state"
                      + _more(reshaped, "arrays differ in shape"))
        written_with = _WRITTEN_WITH.get(first[0], "model")
        raise CheckpointError(
            f"{where} does not fit the state to restore: {detail}",
            suggestion=f"it was written with another {written_with}: restore it into a state built "
            "like the run that wrote it, or give this run a directory of its own",
        )
    recast = [path for path in wanted if saved[path][1] not in (None, wanted[path][1])]
    if recast:
        first = recast[0]
        warnings.warn(
            f"{where} stores {show_path(first)} as {saved[first][1]}; it is restored as "
            f"{wanted[first][1]}, the dtype of the state to restore ({len(recast)} of "
            f"{len(wanted)} arrays change dtype). To keep the saved values exactly, restore "
            "under the Precision the run was saved with",
            TitanaxWarning, stacklevel=user_stacklevel())


def key_path(path: Sequence[Any]) -> tuple[str, ...]:
    """A key path as strings, the same for the state and for Orbax's metadata of it (a
    namedtuple's attribute there is a dict key, a tuple's index a list index). Unlike
    ``path_string`` it keeps an NNX Variable's ``value``: the metadata has it as a dict key, and
    matching must be exact; :func:`show_path` drops it for messages."""
    parts = []
    for key in path:
        for field in ("key", "name", "idx"):
            if hasattr(key, field):
                parts.append(str(getattr(key, field)))
                break
        else:
            parts.append(str(key))
    return tuple(parts)


def target_layout(target: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Path -> (shape, dtype) of the arrays a restore into ``target`` reads; a typed PRNG key as
    the key data Orbax stores for it."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        out[key_path(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out


def show_path(path: tuple[str, ...]) -> str:
    """``params/up/kernel``: an NNX Variable's trailing ``value`` left out, as in ``describe()``."""
    parts = path[:-1] if len(path) > 1 and path[-1] == "value" else path
    return "/".join(parts)


def _describe(entry: tuple[tuple[int, ...], np.dtype]) -> str:
    shape, dtype = entry
    return f"{shape} {dtype}"


def _more(paths: Sequence[Any], what: str) -> str:
    return f" ({len(paths)} {what})" if len(paths) > 1 else ""
