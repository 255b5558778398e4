"""Configuration sections generated from the dataclasses they configure, so the two cannot drift.

``mirror(tx.PP, "PipelineParallelConfig")`` is a frozen dataclass with one field per field of
``tx.PP``: the same name, type and default (a field ``PP`` requires is required in YAML too), which
OmegaConf reads YAML against, and a ``build()`` that calls ``tx.PP(**values)``. A field whose type
YAML cannot hold (``TP.rules`` is a ``tx.Rules``) is given a :class:`Written` form: its YAML type and
how the section's values become the field's value. A field added to the domain class appears in
YAML with no change here, and one whose type has no YAML form fails at import, not silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Optional

__all__ = ["Written", "mirror", "domain_of"]

_SCALARS = (str, int, float, bool)


@dataclasses.dataclass(frozen=True)
class Written:
    """How a domain field is written in YAML when its Python type is not a YAML value."""

    hint: Any
    """The YAML type (OmegaConf checks values against it), e.g. ``Optional[list[Any]]``."""
    build: Callable[[Any], Any]
    """The section's values (the config object) -> the domain field's value."""


def _yaml_hint(hint: Any) -> Any:
    """``hint`` as OmegaConf reads it (``X | None`` becomes ``Optional[X]``), or ``None`` when YAML
    cannot hold it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and type(None) in args:
            inner = _yaml_hint(members[0])
            return None if inner is None else Optional[inner]
        return None  # a union of several types: give it a Written form
    if hint in _SCALARS or hint is Any:
        return hint
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in _SCALARS:
        return hint
    return None


def mirror(domain: type, name: str, *, written: Mapping[str, Written] | None = None,
           extra: Mapping[str, tuple[Any, Any]] | None = None, doc: str | None = None,
           module: str | None = None) -> type:
    """A frozen configuration dataclass with the fields of the dataclass ``domain``.

    Args:
      domain: the dataclass to mirror (``tx.DP``, ``tx.Precision``, ...).
      name: the generated class's name (``DataParallelConfig``).
      written: YAML forms for fields whose type YAML cannot hold, by field name.
      extra: YAML-only fields, ``name -> (type, default)``, read by a ``written`` builder (e.g.
        ``plan.param_rules``, which joins ``plan.rules`` in one ``tx.Rules``).
      doc: the class docstring (by default, one naming ``domain``).
      module: the module that binds the class to ``name`` (for ``repr`` and pickling).

    Returns:
      The class. ``build()`` returns ``domain(**values)``; ``__domain__`` is ``domain``.

    Raises:
      TypeError: a field of ``domain`` whose type YAML cannot hold has no ``written`` form (a
        programming error, raised at import).

    Example:
      >>> import dataclasses
      >>> @dataclasses.dataclass(kw_only=True, frozen=True)
      ... class Part:
      ...     axis: str = "data"
      ...     stages: int
      >>> PartConfig = mirror(Part, "PartConfig")
      >>> PartConfig(stages=2).build()
      Part(axis='data', stages=2)
    """
    written = dict(written or {})
    hints = typing.get_type_hints(domain)
    specs: list[tuple[str, Any, Any]] = []
    for field in dataclasses.fields(domain):
        if not field.init:
            continue
        if field.name in written:
            hint = written[field.name].hint
        else:
            hint = _yaml_hint(hints[field.name])
            if hint is None:
                raise TypeError(f"{domain.__name__}.{field.name}: {hints[field.name]} has no YAML form; "
                                f"give mirror({domain.__name__}, ...) a Written form for it")
        if field.default is not dataclasses.MISSING:
            specs.append((field.name, hint, dataclasses.field(default=field.default)))
        elif field.default_factory is not dataclasses.MISSING:
            specs.append((field.name, hint, dataclasses.field(default_factory=field.default_factory)))
        else:
            specs.append((field.name, hint, dataclasses.field()))  # required in YAML as in Python
    for key, (hint, default) in (extra or {}).items():
        specs.append((key, hint, dataclasses.field(default=default)))
    names = [f.name for f in dataclasses.fields(domain) if f.init]

    def build(self: Any) -> Any:
        values = {n: written[n].build(self) if n in written else getattr(self, n) for n in names}
        return domain(**values)

    build.__doc__ = f"The ``{domain.__name__}`` these values describe (its own checks raise)."
    cls = dataclasses.make_dataclass(name, specs, kw_only=True, frozen=True,
                                     namespace={"build": build, "__domain__": domain})
    if module is not None:
        cls.__module__ = module
    cls.__doc__ = doc or f"``{domain.__module__}.{domain.__qualname__}`` as a YAML section: the same fields."
    return cls


def domain_of(section: type) -> type | None:
    """The dataclass a configuration section mirrors (``None`` for a hand-written section)."""
    return getattr(section, "__domain__", None)
