"""Rules: the one mapping from logical axis names to mesh axes.

A model names the *meaning* of each dimension (``"embed"``, ``"mlp"``, ``"batch"``); a :class:`Rules`
value says which mesh axes those meanings are split over. Rules are plain immutable values: print
them, add them (``a + b``: ``a`` first), compare them, and scope them with ``with rules:``.

Semantics (tested in ``tests/unit/test_rules.py``):

* rules are ordered ``(logical_name, mesh_axes)`` pairs and the **first match wins**;
* a mesh axis already used by another dimension of the same array is skipped, falling back to the
  next rule for that name;
* mesh axes of size 1 are dropped (a rule left empty falls through to the next one);
* a mesh axis that does not divide its dimension is dropped with a :class:`TitanaxWarning`
  (``strict=True``: :class:`ShardingError`);
* a logical name that no rule maps and that is not declared ``replicated`` is replicated with a
  warning (``strict=True``: :class:`ShardingError`);
* ``params=`` path-regex rules give logical names to parameters by path; they override model
  annotations when both match.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jax.sharding import PartitionSpec

from titanax.exceptions import PlanError, ShardingError, TitanaxWarning, user_stacklevel
from titanax.parallel.scope import pop_rules, push_rules

__all__ = ["Rules", "MeshAxes", "LogicalNames"]

MeshAxes = str | tuple[str, ...] | None
"""What a logical name maps to: one mesh axis, several (major to minor), or ``None`` (replicated)."""

LogicalNames = tuple[str | None, ...]
"""One logical name (or ``None``) per leading dimension of an array."""


def _as_axes(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def _spec_entry(axes: Sequence[str]) -> str | tuple[str, ...] | None:
    if not axes:
        return None
    if len(axes) == 1:
        return axes[0]
    return tuple(axes)


@dataclasses.dataclass(frozen=True, init=False)
class Rules:
    """Ordered logical-name to mesh-axes rules, plus path-regex rules for unannotated parameters.

    Args:
      rules: ``(logical_name, mesh_axes)`` pairs; ``mesh_axes`` is a mesh axis name, a tuple of
        them, or ``None`` to declare the name replicated. Order matters: the first usable match
        wins.
      params: ``(regex, logical_names)`` pairs matched with ``re.search`` against a parameter's
        path (``"Block_0/Dense_0/kernel"``); the first match gives the parameter its logical names.
      replicated: logical names that are replicated on purpose; strict mode does not flag them.
      unnamed: a mesh axis over which parameters that carry no logical names at all are sharded,
        on their largest dimension it divides (FSDP for unannotated models); ``None`` leaves them
        replicated.
      max_replicated_bytes: a parameter larger than this that ends up fully replicated although
        it is not replicated on purpose (no names, or names some rule would shard) is flagged: the
        silent cost of a missing rule. ``None`` checks nothing.
      strict: raise :class:`ShardingError` instead of warning on an unmapped name, an indivisible
        dimension, a path rule that matched no parameter, or a large parameter left replicated.

    Example:
      >>> rules = Rules([("batch", "data"), ("mlp", "tensor")],
      ...               params=[(r"Dense_0/kernel$", ("embed", "mlp"))], replicated=["embed"])
      >>> rules.names_for_path("Dense_0/kernel")
      ('embed', 'mlp')
    """

    rules: tuple[tuple[str, MeshAxes], ...]
    params: tuple[tuple[str, LogicalNames], ...]
    replicated: frozenset[str]
    unnamed: MeshAxes
    max_replicated_bytes: int | None
    strict: bool

    def __init__(
        self,
        rules: Iterable[tuple[str, MeshAxes]] = (),
        *,
        params: Iterable[tuple[str, Sequence[str | None]]] = (),
        replicated: Iterable[str] = (),
        unnamed: MeshAxes = None,
        max_replicated_bytes: int | None = None,
        strict: bool = False,
    ) -> None:
        object.__setattr__(self, "rules", _check_logical_rules(rules))
        object.__setattr__(self, "params", _check_path_rules(params))
        if isinstance(replicated, str):
            replicated = (replicated,)
        object.__setattr__(self, "replicated", frozenset(replicated))
        object.__setattr__(self, "unnamed", unnamed if unnamed is None else _spec_entry(_as_axes(unnamed)))
        object.__setattr__(self, "max_replicated_bytes", max_replicated_bytes)
        object.__setattr__(self, "strict", bool(strict))

    # ----------------------------------------------------------------------------------- values
    def __add__(self, other: Rules) -> Rules:
        """``self`` then ``other``: ``self``'s rules win where both map a name or a path."""
        if not isinstance(other, Rules):
            return NotImplemented
        return Rules(
            self.rules + other.rules,
            params=self.params + other.params,
            replicated=self.replicated | other.replicated,
            unnamed=self.unnamed if self.unnamed is not None else other.unnamed,
            max_replicated_bytes=_min_or_none(self.max_replicated_bytes, other.max_replicated_bytes),
            strict=self.strict or other.strict,
        )

    def replace(self, **changes: Any) -> Rules:
        """A copy with some fields changed, e.g. ``rules.replace(strict=True)``."""
        fields = {
            "rules": self.rules,
            "params": self.params,
            "replicated": self.replicated,
            "unnamed": self.unnamed,
            "max_replicated_bytes": self.max_replicated_bytes,
            "strict": self.strict,
        }
        fields.update(changes)
        return Rules(fields.pop("rules"), **fields)

    def __repr__(self) -> str:
        parts = [repr(list(self.rules))]
        if self.params:
            parts.append(f"params={list(self.params)!r}")
        if self.replicated:
            parts.append(f"replicated={sorted(self.replicated)!r}")
        if self.unnamed is not None:
            parts.append(f"unnamed={self.unnamed!r}")
        if self.max_replicated_bytes is not None:
            parts.append(f"max_replicated_bytes={self.max_replicated_bytes}")
        if self.strict:
            parts.append("strict=True")
        return f"Rules({', '.join(parts)})"

    def __enter__(self) -> Rules:
        push_rules(self)
        return self

    def __exit__(self, *exc: object) -> None:
        pop_rules(self)

    # ------------------------------------------------------------------------------- lookups
    @property
    def logical_names(self) -> frozenset[str]:
        """Every logical name a rule maps or that is declared replicated."""
        return frozenset(name for name, _ in self.rules) | self.replicated

    @property
    def mesh_axes(self) -> frozenset[str]:
        """Every mesh axis any rule names."""
        axes = {a for _, target in self.rules for a in _as_axes(target)}
        return frozenset(axes | set(_as_axes(self.unnamed)))

    def names_for_path(self, path: str) -> LogicalNames | None:
        """The logical names the first matching path rule gives ``path``, or ``None``."""
        index = self.path_rule_for(path)
        return None if index is None else self.params[index][1]

    def path_rule_for(self, path: str) -> int | None:
        """Index of the first path rule whose regex matches ``path``."""
        for i, (pattern, _) in enumerate(self.params):
            if re.search(pattern, path):
                return i
        return None

    def shards_name(self, name: str, mesh_shape: Mapping[str, int]) -> bool:
        """Whether some rule would split ``name`` over a mesh axis with more than one device."""
        return any(mesh_shape.get(a, 1) > 1 for rule_name, target in self.rules if rule_name == name
                   for a in _as_axes(target))

    def to_flax(self) -> tuple[tuple[str, MeshAxes], ...]:
        """The logical rules in Flax's ``logical_axis_rules`` format (for ``nn.with_logical_constraint``)."""
        return self.rules + tuple((name, None) for name in sorted(self.replicated))

    def validate(self, mesh_shape: Mapping[str, int]) -> None:
        """Raise :class:`PlanError` if a rule names a mesh axis that ``mesh_shape`` lacks.

        Args:
          mesh_shape: axis name to size, e.g. ``dict(mesh.shape)``.
        """
        for name, target in self.rules:
            for axis in _as_axes(target):
                if axis not in mesh_shape:
                    raise PlanError(
                        f"rule ({name!r}, {target!r}) names mesh axis {axis!r}, which the mesh "
                        f"{dict(mesh_shape)} does not have",
                        suggestion=f"map {name!r} to one of {list(mesh_shape)} or add an axis "
                        f"{axis!r} to the MeshSpec",
                        owner="Rules", field="rules",
                    )
        for axis in _as_axes(self.unnamed):
            if axis not in mesh_shape:
                raise PlanError(
                    f"Rules(unnamed={self.unnamed!r}) names mesh axis {axis!r}, which the mesh "
                    f"{dict(mesh_shape)} does not have",
                    suggestion=f"use one of {list(mesh_shape)}", owner="Rules", field="unnamed", value=self.unnamed,
                )

    # ---------------------------------------------------------------------------- resolution
    def spec(
        self,
        names: Sequence[str | None],
        shape: Sequence[int],
        mesh_shape: Mapping[str, int],
        *,
        what: str = "array",
    ) -> PartitionSpec:
        """The ``PartitionSpec`` for an array whose dimensions carry logical ``names``.

        Args:
          names: one logical name or ``None`` per leading dimension; fewer names than dimensions
            name the leading ones.
          shape: the array's shape.
          mesh_shape: mesh axis name to size.
          what: how to name the array in errors and warnings (``"parameter 'Dense_0/kernel'"``).

        Returns:
          A ``PartitionSpec`` with one entry per dimension.

        Raises:
          ShardingError: more names than dimensions; in strict mode also an unmapped name or an
            indivisible dimension.

        Example:
          >>> Rules([("batch", "data")]).spec(("batch", None), (16, 4), {"data": 8})
          P('data', None)
        """
        return PartitionSpec(*self.resolve(names, shape, mesh_shape, what=what))

    def resolve(
        self,
        names: Sequence[str | None],
        shape: Sequence[int],
        mesh_shape: Mapping[str, int],
        *,
        what: str = "array",
        mesh_axis_names: frozenset[str] = frozenset(),
    ) -> tuple[str | tuple[str, ...] | None, ...]:
        """Like :meth:`spec`, returning the spec entries as a tuple.

        ``mesh_axis_names`` lists names that are taken as mesh axes when no rule maps them (NNX
        annotations may name mesh axes directly); they are validated against the mesh.
        """
        names = pad_names(names, shape, what)
        used: set[str] = set()
        entries: list[str | tuple[str, ...] | None] = []
        dropped: list[Dropped] = []
        for dim, name in enumerate(names):
            if name is None:
                entries.append(None)
                continue
            if name not in self.logical_names and name in mesh_axis_names:
                axes = _check_mesh_axes(name, dim, shape, mesh_shape, used, what, self.strict, dropped)
            else:
                axes = self._axes_for_name(name, dim, shape, mesh_shape, used, what, dropped)
            used.update(axes)
            entries.append(_spec_entry(axes))
        warn_dropped(dropped, tuple(entries))
        return tuple(entries)

    def _axes_for_name(
        self,
        name: str,
        dim: int,
        shape: Sequence[int],
        mesh_shape: Mapping[str, int],
        used: set[str],
        what: str,
        dropped: list[Dropped],
    ) -> tuple[str, ...]:
        candidates = [target for rule_name, target in self.rules if rule_name == name]
        if not candidates:
            if name not in self.replicated:
                _complain(
                    self.strict,
                    f"{what}: dimension {dim} has logical name {name!r}, which no rule maps",
                    suggestion=f"add ({name!r}, '<mesh axis>') to the rules to shard it, or "
                    f"({name!r}, None) / replicated=[{name!r}] to replicate it on purpose",
                )
            return ()
        for target in candidates:
            if target is None:
                return ()
            axes = tuple(a for a in _as_axes(target) if mesh_shape.get(a, 1) > 1)
            if not axes or used.intersection(axes):
                continue
            return divisible_axes(axes, dim, shape, mesh_shape, what, name, self.strict, dropped)
        return ()


def _min_or_none(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def pad_names(names: Sequence[str | None], shape: Sequence[int], what: str) -> LogicalNames:
    names = tuple(names)
    if len(names) > len(shape):
        raise ShardingError(
            f"{what} has {len(shape)} dimension(s) {tuple(shape)} but {len(names)} logical names "
            f"{names}",
            suggestion="give at most one name per dimension (fewer names name the leading "
            "dimensions)",
        )
    return names + (None,) * (len(shape) - len(names))


@dataclasses.dataclass(frozen=True)
class Dropped:
    """Mesh axes left out of one dimension because they do not divide it."""

    what: str
    dim: int
    name: str
    size: int
    axes: tuple[str, ...]
    sizes: dict[str, int]


def divisible_axes(
    axes: tuple[str, ...],
    dim: int,
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    what: str,
    name: str,
    strict: bool,
    dropped: list[Dropped],
) -> tuple[str, ...]:
    """The prefix-compatible subset of ``axes`` whose sizes divide ``shape[dim]``.

    A dropped axis raises :class:`ShardingError` when ``strict``; otherwise it is noted in
    ``dropped`` so that one warning, once the whole array is laid out, can say where it ended up.
    """
    kept: list[str] = []
    for axis in axes:
        if shape[dim] % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[axis]) == 0:
            kept.append(axis)
    if len(kept) != len(axes):
        note = Dropped(what, dim, name, shape[dim], tuple(a for a in axes if a not in kept),
                       {a: mesh_shape[a] for a in axes})
        if strict:
            raise ShardingError(_dropped_message(note),
                                suggestion=_dropped_suggestion(note) + ", or turn strict off to "
                                "accept a layout without those axes")
        dropped.append(note)
    return tuple(kept)


def warn_dropped(dropped: Sequence[Dropped], entries: tuple[Any, ...]) -> None:
    """One warning per dropped axis, describing the array's final layout."""
    final = "P(" + ", ".join(repr(entry) for entry in entries) + ")"
    for note in dropped:
        if all(entry is None for entry in entries):
            outcome = "the array stays replicated"
        else:
            split = [f"dimension {d} over {e!r}" for d, e in enumerate(entries) if e is not None]
            outcome = f"the array is laid out as {final}: {', '.join(split)}"
        warnings.warn(f"{_dropped_message(note)}; {outcome}. {_dropped_suggestion(note)}",
                      TitanaxWarning, stacklevel=user_stacklevel())


def _dropped_message(note: Dropped) -> str:
    return (f"{note.what}: dimension {note.dim} ({note.name!r}, size {note.size}) does not divide "
            f"over mesh axes {list(note.axes)} (sizes {note.sizes})")


def _dropped_suggestion(note: Dropped) -> str:
    return (f"make dimension {note.dim} a multiple of {math.prod(note.sizes.values())}, or map "
            f"{note.name!r} to a smaller mesh axis")


def _check_mesh_axes(
    axis: str,
    dim: int,
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    used: set[str],
    what: str,
    strict: bool,
    dropped: list[Dropped],
) -> tuple[str, ...]:
    if axis in used:
        raise ShardingError(
            f"{what}: mesh axis {axis!r} is used by two dimensions",
            suggestion="name each mesh axis at most once per array",
        )
    return divisible_axes((axis,), dim, shape, mesh_shape, what, axis, strict, dropped)


def _complain(strict: bool, message: str, *, suggestion: str) -> None:
    if strict:
        raise ShardingError(message, suggestion=suggestion)
    warnings.warn(f"{message}. {suggestion}", TitanaxWarning, stacklevel=user_stacklevel())


def _check_logical_rules(rules: Iterable[tuple[str, MeshAxes]]) -> tuple[tuple[str, MeshAxes], ...]:
    if isinstance(rules, Mapping):
        rules = rules.items()
    checked = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise PlanError(
                f"rule {rule!r} is not a (logical_name, mesh_axes) pair",
                suggestion="write rules as [('batch', 'data'), ('mlp', 'tensor'), ('embed', None)]",
                owner="Rules", field="rules",
            )
        name, target = rule
        axes = _as_axes(target) if target is None or isinstance(target, (str, tuple, list)) else (target,)
        if not all(isinstance(a, str) for a in axes):
            raise PlanError(
                f"rule ({name!r}, {target!r}): mesh axes must be strings",
                suggestion="use an axis name, a tuple of axis names, or None", owner="Rules", field="rules",
            )
        if len(set(axes)) != len(axes):
            raise PlanError(
                f"rule ({name!r}, {target!r}) names the same mesh axis twice",
                suggestion="name each mesh axis once", owner="Rules", field="rules",
            )
        pair = (name, None if target is None else _spec_entry(axes))
        if pair not in checked:  # a repeated pair can never change a resolution
            checked.append(pair)
    return tuple(checked)


def _check_path_rules(
    params: Iterable[tuple[str, Sequence[str | None]]],
) -> tuple[tuple[str, LogicalNames], ...]:
    if isinstance(params, Mapping):
        params = params.items()
    checked = []
    for rule in params:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise PlanError(
                f"path rule {rule!r} is not a (regex, logical_names) pair",
                suggestion=r"write path rules as [(r'Dense_0/kernel$', ('embed', 'mlp'))]",
                owner="Rules", field="params",
            )
        pattern, names = rule
        try:
            re.compile(pattern)
        except re.error as err:
            raise PlanError(
                f"path rule regex {pattern!r} does not compile: {err}",
                suggestion="escape special characters, e.g. r'layers\\.0/kernel$'", owner="Rules", field="params",
            ) from None
        if isinstance(names, str) or names is None:
            names = (names,)
        if not all(n is None or isinstance(n, str) for n in names):
            raise PlanError(
                f"path rule {pattern!r}: logical names {names!r} must be strings or None",
                suggestion="give one logical name (or None) per dimension", owner="Rules", field="params",
            )
        checked.append((pattern, tuple(names)))
    return tuple(checked)
