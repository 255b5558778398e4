"""Which YAML key an error is about, read from its structured fields, never from its text.

Every ``TitanaxError`` a run configuration can trigger carries ``owner`` (the class or section that
holds the bad value) and ``field``. :func:`yaml_keys` maps them to the keys of the run file:

* an owner the schema mirrors or defines is the section it lives in (``DP`` and
  ``DataParallelConfig`` are ``plan.data_parallel``, ``Precision`` is ``precision``, ``RunConfig``
  the top level), and its field the key of the same name in that section;
* :data:`OWNERS` places the owners the schema does not mirror (``MeshSpec`` is ``mesh``, a
  ``tx.optim`` factory's arguments are ``optimizer.args``);
* :data:`RENAMED` lists the fields whose key has another name or lives elsewhere
  (``OrbaxCheckpoint``'s ``directory`` is ``checkpoint.dir``; a schedule's ``total_steps`` is
  ``train.steps``, from :data:`~titanax.config.schema.SCHEDULE_KEYS`).

A field the schema has no key for names its section (``MeshSpec``'s ``devices`` is ``mesh``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

from titanax.config.imports import strip_optional
from titanax.config.mirror import domain_of
from titanax.config.schema import SCHEDULE_KEYS, RunConfig, key_hint
from titanax.exceptions import TitanaxError

__all__ = ["OWNERS", "RENAMED", "sections", "yaml_keys", "with_keys", "keyed"]

OWNERS: dict[str, str] = {
    "MeshSpec": "mesh",
    "Rules": "plan",
    "optimizer": "optimizer.args",
    "schedule": "optimizer",
    "OrbaxCheckpoint": "checkpoint",
    "Basic": "logging",
    "CSV": "logging.csv",
    "TensorBoard": "logging.tensorboard",
}
"""Owners the schema does not mirror -> the section that configures them."""

RENAMED: dict[tuple[str, str], str] = {
    ("optimizer", "learning_rate"): "optimizer.lr",
    **{("schedule", name): key for name, key in SCHEDULE_KEYS.items()},
    ("Rules", "rules"): "plan.rules",
    ("Rules", "params"): "plan.param_rules",
    ("OrbaxCheckpoint", "directory"): "checkpoint.dir",
    ("CSV", "path"): "logging.csv",
    ("TensorBoard", "logdir"): "logging.tensorboard",
    ("Basic", "progress"): "logging.progress",
    ("Engine", "log_every"): "logging.every",
    ("Engine", "flops_per_example"): "logging.flops_per_example",
    ("Engine", "peak_flops"): "logging.peak_flops",
    ("Engine", "on_nonfinite"): "train.on_nonfinite",
}
"""``(owner, field)`` whose YAML key is not ``<owner's section>.<field>``."""

_FREE = ("optimizer.args", "model.args", "data.args")
"""Sections that are free mappings: any name under them is a key."""


@functools.cache
def _config_sections() -> dict[type, str]:
    """Every configuration class of the schema -> its section (``RunConfig`` is ``""``)."""
    found: dict[type, str] = {}

    def walk(cls: type, path: str) -> None:
        found[cls] = path
        for field in dataclasses.fields(cls):
            key = f"{path}.{field.name}" if path else field.name
            hint = strip_optional(key_hint(key))
            if dataclasses.is_dataclass(hint):
                walk(hint, key)

    walk(RunConfig, "")
    return found


@functools.cache
def sections() -> dict[str, str]:
    """Owner -> section: every configuration class of the schema and every class one mirrors
    (``PlanConfig`` and ``Plan`` are ``plan``, ``RunConfig`` is ``""``), and :data:`OWNERS`."""
    found = dict(OWNERS)
    for cls, path in _config_sections().items():
        found[cls.__name__] = path
        domain = domain_of(cls)
        if domain is not None:
            found[domain.__name__] = path
    return found


def _key(owner: str, field: str) -> tuple[str | None, bool]:
    """The key of ``owner``'s ``field``, and whether it is the field's own (not its section)."""
    if (owner, field) in RENAMED:
        return RENAMED[owner, field], True
    section = sections().get(owner)
    if section is None:
        return None, False
    key = f"{section}.{field}" if section else field
    if section in _FREE or key.startswith(tuple(f"{free}." for free in _FREE)) or key_hint(key) is not None:
        return key, True
    return section or None, False


def yaml_keys(error: TitanaxError) -> tuple[tuple[str, Any], ...]:
    """The YAML keys (with the values) an error's ``owner`` and ``field`` stand for.

    Args:
      error: any Titanax error.

    Returns:
      ``(key, value)`` per field (``value`` is ``None`` when the error gave none), each key once;
      ``()`` when the owner is unknown or absent. A field without a key of its own gives its
      section, without the value (``("MeshSpec", "devices")`` -> ``mesh``).

    Example:
      >>> from titanax.exceptions import PlanError
      >>> yaml_keys(PlanError("...", owner="DP", field="axis", value="batch"))
      (('plan.data_parallel.axis', 'batch'),)
    """
    if error.owner is None:
        return ()
    if error.field is None:
        section = sections().get(error.owner)
        return ((section, None),) if section else ()
    out: dict[str, Any] = {}
    for field, value in error.fields:
        key, own = _key(error.owner, field)
        if key is not None and key not in out:
            out[key] = value if own else None
    return tuple(out.items())


def _shown(value: Any) -> str:
    """A value as the configuration writes it: tuples as lists, the rest as Python's repr."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, tuple) else v

    return repr(plain(value))


def _speaks_yaml(error: TitanaxError) -> bool:
    """Whether the configuration raised ``error`` about its own keys (its text names them)."""
    return any(error.owner == cls.__name__ for cls in _config_sections())


def with_keys(error: TitanaxError, section: str | None = None) -> TitanaxError:
    """``error``, its message led by the YAML keys it is about: ``plan.data_parallel.axis='batch':
    DP(axis='batch') names an axis ...``.

    Args:
      error: an error raised while building or checking what a configuration describes.
      section: the section being built, named when the error's fields name no key.

    Returns:
      A new error of the same class and fields (or ``error`` itself when it already speaks YAML,
      or names no key and no ``section`` is given). Apply it once: a second pass would lead with
      the keys twice.
    """
    if _speaks_yaml(error):
        return error
    keys = yaml_keys(error)
    if keys:
        lead = ", ".join(key if value is None else f"{key}={_shown(value)}" for key, value in keys)
    elif section:
        lead = section
    else:
        return error
    return error.replace(message=f"{lead}: {error.message}")


@contextlib.contextmanager
def keyed(section: str | None = None) -> Iterator[None]:
    """Re-raise a ``TitanaxError`` from the block with the YAML keys it is about (:func:`with_keys`).

    Args:
      section: the section the block builds, named when an error's fields name no key.

    Example:
      >>> from titanax.exceptions import PlanError
      >>> try:
      ...     with keyed("plan"):
      ...         raise PlanError("DP(axis='batch') names an axis the mesh lacks", owner="DP", field="axis",
      ...                         value="batch")
      ... except PlanError as error:
      ...     print(error.message)
      plan.data_parallel.axis='batch': DP(axis='batch') names an axis the mesh lacks
    """
    try:
        yield
    except TitanaxError as error:
        keyed_error = with_keys(error, section)
        if keyed_error is error:
            raise
        raise keyed_error from error
