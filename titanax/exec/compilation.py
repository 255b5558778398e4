"""When a step function compiles: how long it took, whether the persistent cache served it, and,
when it compiles again, which argument changed.

JAX compiles a jitted function again for every new shape, dtype or sharding of its arguments, and
says nothing: a batch whose last dimension drifts, or a state whose layout changed, quietly costs
a compile per step. :class:`CompileWatch` sees every compile of one step function (the jitted
function's cache grows), times it from JAX's own monitoring events, and warns once per recompile
with the argument paths that differ from the previous compile.

Example:
  >>> watch = CompileWatch("train_step")
  >>> f = jax.jit(lambda x: x * 2)
  >>> _ = watch.call(f, (jnp.ones(4),), {"x": jnp.ones(4)})
  >>> watch.compiles, watch.records[0].seconds > 0
  (1, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding

from titanax.exceptions import TitanaxWarning, user_stacklevel

__all__ = ["CompileRecord", "CompileWatch", "RecompileWarning", "argument_signature", "changed_arguments",
           "compile_clock"]

# JAX's monitoring events (jax._src.dispatch / compiler / compilation_cache), stable since 0.4.
_DURATIONS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_seconds",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_seconds",
    "/jax/core/compile/backend_compile_duration": "backend_seconds",
}
_EVENTS = {
    "/jax/compilation_cache/cache_hits": "cache_hits",
    "/jax/compilation_cache/cache_misses": "cache_misses",
}


class RecompileWarning(TitanaxWarning):
    """A step function compiled again: an argument's shape, dtype or sharding changed."""


@dataclasses.dataclass
class CompileRecord:
    """What one compile (or a stretch of code with several) cost, from JAX's monitoring events."""

    trace_seconds: float = 0.0
    """Tracing the Python function to a jaxpr."""

    lower_seconds: float = 0.0
    """Lowering the jaxpr to StableHLO."""

    backend_seconds: float = 0.0
    """XLA's compile (or, with the persistent cache, its lookup)."""

    cache_hits: int = 0
    """Executables served by the persistent compilation cache (``jax_compilation_cache_dir``)."""

    cache_misses: int = 0
    """Persistent-cache lookups that found nothing and compiled."""

    @property
    def seconds(self) -> float:
        """Trace + lower + backend seconds."""
        return self.trace_seconds + self.lower_seconds + self.backend_seconds

    def describe(self) -> str:
        """``"4.21 s (trace 0.31 s, lower 0.22 s, XLA 3.68 s)"``, with the cache's hits and misses
        when it was consulted."""
        text = (f"{self.seconds:.2f} s (trace {self.trace_seconds:.2f} s, lower {self.lower_seconds:.2f} s, "
                f"XLA {self.backend_seconds:.2f} s)")
        if self.cache_hits or self.cache_misses:
            text += f"; persistent cache: {self.cache_hits} hit(s), {self.cache_misses} miss(es)"
        return text


_local = threading.local()
_registered = False
_register_lock = threading.Lock()


def _open_records() -> list[CompileRecord]:
    if not hasattr(_local, "records"):
        _local.records = []
    return _local.records


def _on_duration(event: str, duration: float, **_: Any) -> None:
    field = _DURATIONS.get(event)
    if field is not None:
        for record in _open_records():
            setattr(record, field, getattr(record, field) + duration)


def _on_event(event: str, **_: Any) -> None:
    field = _EVENTS.get(event)
    if field is not None:
        for record in _open_records():
            setattr(record, field, getattr(record, field) + 1)


def _register() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _registered = True


@contextlib.contextmanager
def compile_clock() -> Iterator[CompileRecord]:
    """Adds up the compiles JAX does on this thread inside the block.

    Returns:
      A context manager yielding the :class:`CompileRecord` it fills.

    Example:
      >>> with compile_clock() as record:
      ...     _ = jax.jit(lambda x: x + 1)(jnp.ones(3))
      >>> record.backend_seconds > 0
      True
    """
    _register()
    record = CompileRecord()
    records = _open_records()
    records.append(record)
    try:
        yield record
    finally:
        records.remove(record)


def _layout(leaf: Any) -> tuple[Any, ...]:
    sharding = getattr(leaf, "sharding", None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding  # within one mesh
    return (tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf).__name__)), spec)


def argument_signature(arguments: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Every array leaf's path -> ``(shape, dtype, sharding spec)``.

    Args:
      arguments: argument name -> pytree (``{"state": state, "batch": batch}``); leaves may be
        donated (deleted) arrays: their shape, dtype and sharding stay readable.

    Returns:
      ``{"batch['x']": ((32, 64), "int32", PartitionSpec('data',)), ...}``.

    Example:
      >>> argument_signature({"batch": {"x": np.zeros((2, 3), np.float32)}})
      {"batch['x']": ((2, 3), 'float32', None)}
    """
    out: dict[str, tuple[Any, ...]] = {}
    for name, tree in arguments.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[name + jax.tree_util.keystr(path)] = _layout(leaf)
    return out


def changed_arguments(old: Mapping[str, tuple[Any, ...]], new: Mapping[str, tuple[Any, ...]],
                      limit: int = 5) -> list[str]:
    """What differs between two :func:`argument_signature` results, one line per argument path.

    Example:
      >>> changed_arguments({"batch['x']": ((32, 64), "int32", None)}, {"batch['x']": ((16, 64), "int32", None)})
      ["batch['x']: shape (32, 64) -> (16, 64)"]
    """
    lines = []
    for path in list(old) + [p for p in new if p not in old]:
        if path not in new:
            lines.append(f"{path}: gone")
        elif path not in old:
            lines.append(f"{path}: new argument {new[path][0]} {new[path][1]}")
        elif old[path] != new[path]:
            parts = [f"{what} {before} -> {after}"
                     for what, before, after in zip(("shape", "dtype", "sharding"), old[path], new[path])
                     if before != after]
            lines.append(f"{path}: " + ", ".join(parts))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


class CompileWatch:
    """Counts and times one step function's compiles, and warns when it compiles again.

    Attributes:
      name: the step function's name, for messages.
      records: one :class:`CompileRecord` per compile, in order.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.records: list[CompileRecord] = []
        self.recompiles = 0
        """Compiles in a scope that had compiled before: the ones that warned."""
        self._signatures: dict[Any, dict[str, tuple[Any, ...]]] = {}

    @property
    def compiles(self) -> int:
        """Compiles so far (the first included)."""
        return len(self.records)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], arguments: Mapping[str, Any],
             scope: Any = None) -> Any:
        """``fn(*args)``, noting a compile if the jitted ``fn``'s cache grew.

        Args:
          fn: a ``jax.jit`` function.
          args: its positional arguments.
          arguments: the same arguments by name, for the message of a recompile (which names
            the first caller outside Titanax).
          scope: what a compile is expected once per (a step function: the mesh and the state's
            structure): the first compile in a scope is not a recompile, so one step function
            trained on two meshes, or by two runs, warns for neither.

        Returns:
          What ``fn`` returns.
        """
        size = fn._cache_size()
        with compile_clock() as record:
            out = fn(*args)
        # The cache can also grow by an entry that JAX's in-memory caches fill (an output state fed
        # back in, sometimes after a retrace): only an executable XLA built or loaded counts.
        if fn._cache_size() != size and (record.backend_seconds > 0 or record.cache_hits):
            self.records.append(record)
            signature = argument_signature(arguments)
            previous = self._signatures.get(scope)
            if previous is not None:
                self.recompiles += 1
                changes = changed_arguments(previous, signature) or [
                    "no argument's shape, dtype or sharding changed (a new Python value or static argument?)"]
                warnings.warn(RecompileWarning(
                    f"step {self.name!r} compiled again (compile {self.compiles}, {record.seconds:.2f} s): "
                    + "; ".join(changes) + ". Keep shapes fixed (pad or drop the last batch) so each "
                    "step reuses the compiled program."), stacklevel=user_stacklevel())
            self._signatures[scope] = signature
        return out
