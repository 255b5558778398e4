"""Objects named in a run configuration by import path (``package.module:attribute``)."""

from __future__ import annotations

import difflib
import importlib
import os
from typing import Any

from titanax.exceptions import ConfigError

__all__ = ["import_object"]


def import_object(path: str, key: str) -> Any:
    """The object ``path`` names.

    Args:
      path: ``package.module:attribute`` (``attribute`` may be dotted: ``module:Class.method``), or
        ``package.module.attribute``.
      key: the configuration key that holds ``path`` (named in errors).

    Returns:
      The object.

    Raises:
      ConfigError: the module cannot be imported, or has no such attribute (the closest names are
        suggested).

    Example:
      >>> import_object("optax:adamw", "optimizer.factory").__name__
      'adamw'
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{key} is empty", suggestion=f"set {key} to package.module:attribute")
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(f"{key}={path!r} is not an import path",
                          suggestion=f"write {key} as package.module:attribute, e.g. examples.mnist_dp.model:CNN")
    module = _import_module(module_name, key, path)
    obj: Any = module
    walked = module_name
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"{walked} defines: {', '.join(names[:12])}"
            raise ConfigError(f"{key}={path!r}: {walked} has no attribute {part!r}", suggestion=hint)
        obj = getattr(obj, part)
        walked = f"{walked}.{part}"
    return obj


def _import_module(name: str, key: str, path: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = error.name or name
        if name == missing or name.startswith(missing + "."):
            raise ConfigError(
                f"{key}={path!r}: module {missing!r} cannot be found",
                suggestion="check the spelling, install the package, or run from the folder that holds "
                f"it (the current folder, {os.getcwd()}, is on the import path)") from None
        raise ConfigError(f"{key}={path!r}: importing {name} needs module {missing!r}, which is not installed",
                          suggestion=f"pip install the package that provides {missing}") from None
    except Exception as error:  # the user's module itself is broken
        raise ConfigError(f"{key}={path!r}: importing {name} failed with {type(error).__name__}: {error}",
                          suggestion=f"run python -c 'import {name}' to see the full error") from None
