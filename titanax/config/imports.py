"""Objects named in a run configuration by import path (``package.module:attribute``), and the
checks of the arguments a configuration gives them.

Every error here is a ``ConfigError`` whose ``owner`` is ``"RunConfig"`` and whose ``field`` is the
whole dotted key (``model.args.hidden``): the configuration owns those values itself.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from titanax.exceptions import ConfigError

__all__ = ["call_signature", "check_arguments", "describe_type", "did_you_mean", "import_object", "qualified_name",
           "strip_optional"]

OWNER = "RunConfig"
"""The ``owner`` of errors about a key the configuration holds; ``field`` is the dotted key."""


def did_you_mean(word: str, options: Any) -> str:
    """`` (did you mean X?)`` for the option closest to ``word``, or ``""`` when none is close."""
    match = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


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
        raise ConfigError(f"{key} is empty", suggestion=f"set {key} to package.module:attribute",
                          owner=OWNER, field=key, value=path)
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(f"{key}={path!r} is not an import path",
                          suggestion=f"write {key} as package.module:attribute, e.g. examples.mnist_dp.model:CNN",
                          owner=OWNER, field=key, value=path)
    module = _import_module(module_name, key, path)
    obj: Any = module
    walked = module_name
    for part in attribute.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"{walked} defines: {', '.join(names[:12])}"
            raise ConfigError(f"{key}={path!r}: {walked} has no attribute {part!r}", suggestion=hint,
                              owner=OWNER, field=key, value=path)
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
                f"it (the current folder, {os.getcwd()}, is on the import path)",
                owner=OWNER, field=key, value=path) from None
        raise ConfigError(f"{key}={path!r}: importing {name} needs module {missing!r}, which is not installed",
                          suggestion=f"pip install the package that provides {missing}",
                          owner=OWNER, field=key, value=path) from None
    except Exception as error:  # the user's module itself is broken
        raise ConfigError(f"{key}={path!r}: importing {name} failed with {type(error).__name__}: {error}",
                          suggestion=f"run python -c 'import {name}' to see the full error",
                          owner=OWNER, field=key, value=path) from None


def check_arguments(factory: Callable[..., Any], kwargs: Mapping[str, Any], key: str, *,
                    supplied: tuple[str, ...] = (), name: str | None = None) -> None:
    """Check, before calling it, that ``factory(**kwargs)`` fits the factory's signature.

    Args:
      factory: the callable a configuration names.
      kwargs: the keyword arguments the configuration gives it.
      key: the configuration key that holds ``kwargs`` (named in errors).
      supplied: arguments Titanax passes itself (not expected in ``kwargs``).
      name: how errors name ``factory``; its module and qualified name by default.

    Raises:
      ConfigError: an argument the factory does not take (with the closest one it does), or one it
        needs that neither ``kwargs`` nor ``supplied`` gives.

    Example:
      >>> check_arguments(lambda *, width, depth=2: None, {"width": 8}, "model.args")
    """
    signature = call_signature(factory)
    if signature is None:  # a builtin without a signature: let the call speak
        return
    params = signature.parameters
    name = name or qualified_name(factory)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in supplied]
    for arg in kwargs:
        if arg not in params and not takes_any:
            raise ConfigError(f"{key}.{arg} is not an argument of {name}",
                              suggestion=f"its arguments: {', '.join(named) or 'none'}{did_you_mean(arg, named)}",
                              owner=OWNER, field=f"{key}.{arg}", value=kwargs[arg])
    try:
        signature.bind(**kwargs, **{arg: None for arg in supplied})
    except TypeError as error:
        raise ConfigError(f"{name} cannot be called with {key}: {error}",
                          suggestion=f"add the missing value under {key}", owner=OWNER, field=key) from None
    for arg, value in kwargs.items():
        if arg in params:
            _check_type(factory, params[arg], value, f"{key}.{arg}", name)


def _check_type(factory: Any, param: inspect.Parameter, value: Any, key: str, name: str) -> None:
    """Refuse a value of a type the factory's annotation rules out (``hidden: int`` given
    ``'abc'``), which would otherwise fail deep inside the model's first call. Only annotations
    YAML values can be judged by (numbers, strings, booleans, lists, mappings, unions of them) are
    checked; anything else (a dtype, a callable, ``Any``) is left to the call."""
    hint = _resolve_annotation(factory, param.annotation)
    if hint is None or _fits(value, hint) is not False:
        return
    written = param.annotation if isinstance(param.annotation, str) else inspect.formatannotation(hint)
    expected = describe_type(hint)
    raise ConfigError(f"{key}={value!r} does not fit `{param.name}: {written}` in {name}",
                      suggestion=f"write {key} as {expected}" if "another kind" not in expected
                      else f"give {key} a value of type {written}", owner=OWNER, field=key, value=value)


def _resolve_annotation(factory: Any, annotation: Any) -> Any:
    """An annotation as a type (a string annotation evaluated in the factory's module), or
    ``None`` when there is none or it cannot be evaluated."""
    if annotation is inspect.Parameter.empty:
        return None
    if not isinstance(annotation, str):
        return annotation
    module = sys.modules.get(getattr(factory, "__module__", ""), None)
    try:
        return eval(annotation, dict(vars(module)) if module else {})  # noqa: S307 - the user's own annotation
    except Exception:  # a name only a type checker sees (TYPE_CHECKING imports): nothing to judge by
        return None


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether a YAML value fits ``hint``: ``True``, ``False``, or ``None`` when it cannot be told."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(value, member) for member in typing.get_args(hint)]
        return True if True in verdicts else None if None in verdicts else False
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an integer is a float too (`lr: 1`)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))  # YAML has lists only; a tuple parameter takes one
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping)
    return None


def call_signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    """The parameters ``factory(...)`` takes, or ``None`` when Python cannot tell.

    A class whose metaclass defines ``__call__(*args, **kwargs)`` (every ``flax.nnx.Module``:
    ``inspect.signature(MyModel)`` reads ``(*args, **kwargs)`` under Flax 0.12) is read through its
    ``__init__`` instead, so that ``rngs`` and the model's own arguments are seen.

    Args:
      factory: a function or a class.

    Returns:
      The signature, without ``self`` for a class.

    Example:
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, width: int, *, rngs: nnx.Rngs): ...
      >>> list(call_signature(Net).parameters)
      ['width', 'rngs']
    """
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    kinds = {p.kind for p in signature.parameters.values()}
    if isinstance(factory, type) and kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        try:
            init = inspect.signature(factory.__init__)
        except (TypeError, ValueError):
            return signature
        return init.replace(parameters=list(init.parameters.values())[1:])
    return signature


def qualified_name(obj: Any) -> str:
    """``module.QualifiedName`` of a class or function, for messages."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def strip_optional(hint: Any) -> Any:
    """``X`` from ``Optional[X]`` / ``X | None``; other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def describe_type(hint: Any) -> str:
    """A type hint in words for configuration errors (``an integer``, ``a list of strings``)."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    hint = strip_optional(hint)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    origin = typing.get_origin(hint)
    if hint in names:
        text = names[hint]
    elif origin in (tuple, list):
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        text = f"a list of {names.get(inner, 'a value').split(' ', 1)[-1]}s"
    elif origin is dict:
        text = "a mapping of names to values"
    elif dataclasses.is_dataclass(hint):
        text = f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(hint))}"
    else:
        text = "a value of another kind"
    return f"{text} or null" if optional else text
