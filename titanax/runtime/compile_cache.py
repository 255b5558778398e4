"""JAX's persistent compilation cache, opted into: a run started again (a resume, the next job of
a sweep) loads its compiled step from disk instead of compiling it.

Example:
  >>> enable_compile_cache("/tmp/titanax-compile-cache")   # doctest: +SKIP
"""

from __future__ import annotations

import os

import jax

from titanax.exceptions import ConfigError

__all__ = ["enable_compile_cache"]


def enable_compile_cache(directory: str | os.PathLike[str]) -> str:
    """Caches every compiled program of this process in ``directory`` (created if missing).

    Every program is cached, however quickly it compiled (JAX's default skips those under 1 s, which
    on a small model is every step). Hits and misses show in the step's compile report
    (:class:`~titanax.exec.compilation.CompileRecord`). Call it before the first compile; several
    processes and runs may share the directory.

    Args:
      directory: where the executables go (a local or shared file system path).

    Returns:
      The absolute directory.

    Raises:
      ConfigError: ``directory`` exists and is not a writable directory.
    """
    path = os.path.abspath(os.fspath(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"compile cache directory {path!r} cannot be created: {error.strerror}",
                          suggestion="give a writable directory, e.g. --compile-cache ~/.cache/titanax",
                          owner="train", field="compile_cache", value=os.fspath(directory)) from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"compile cache directory {path!r} is not writable",
                          suggestion="give a directory this user can write to",
                          owner="train", field="compile_cache", value=os.fspath(directory))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
