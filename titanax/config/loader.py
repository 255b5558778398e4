"""Reading a run configuration: YAML + ``--set`` overrides, checked against the schema.

Why OmegaConf: its structured configs already give what a run file needs — a dataclass schema
checked key by key and type by type, ``${oc.env:VAR,default}`` environment substitution,
``${other.key}`` interpolation and dotted overrides — and it is what Hydra users already write.
pydantic validates as well but brings no YAML, interpolation or override syntax. Titanax adds only
the messages: every OmegaConf error becomes one ``ConfigError`` that names the file and the key,
says what was expected and suggests the closest valid key.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

import yaml
from omegaconf import OmegaConf, read_write
from omegaconf import errors as oc_errors

from titanax.config.imports import describe_type
from titanax.config.keys import yaml_keys
from titanax.config.schema import PlanConfig, RunConfig, key_hint, keys_under
from titanax.exceptions import ConfigError, TitanaxError

__all__ = ["from_dict", "load", "load_values"]


def load(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, merge and validate a run configuration.

    Args:
      path: a YAML file (``None``: the overrides alone, on top of the defaults).
      overrides: ``section.key=value`` assignments applied in order on top of the file (values are
        YAML: ``train.steps=20``, ``mesh.shape=[2,4]``, ``checkpoint.dir=null``).

    Returns:
      The validated :class:`RunConfig`.

    Raises:
      ConfigError: the file is missing or not YAML, an override is not ``key=value``, a key is
        unknown (the closest valid key is suggested), a value has the wrong type, a required value
        or an environment variable is missing, or a value fails validation.

    Example:
      >>> cfg = load("examples/configs/mnist_dp.yaml", ["train.steps=20"])   # doctest: +SKIP
    """
    where = str(path) if path is not None else "the command line"
    layers = [] if path is None else [_read(str(path))]
    layers.append(_overrides(overrides))
    return _merge(layers, where, overrides)


def load_values(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The file with the overrides applied, as a plain mapping, after :func:`load` validated it:
    the form to derive variants of a run from (``titanax plan`` swaps its mesh and plan).

    Raises:
      ConfigError: as :func:`load`.
    """
    load(path, overrides)
    merged = OmegaConf.merge(_read(str(path)), _overrides(overrides))
    return OmegaConf.to_container(merged, resolve=True)


def from_dict(values: dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Like :func:`load`, from a mapping already in memory (a notebook, a test)."""
    return _merge([OmegaConf.create(values), _overrides(overrides)], "the given mapping", overrides)


# ------------------------------------------------------------------------------------- reading
class _DuplicateKey(Exception):
    """``(key, first line, second line)``."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key written twice in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key == "<<" or not isinstance(key, (str, int, float, bool)):
                continue  # YAML merge keys, and keys YAML itself will reject
            if key in seen:
                raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}",
                          suggestion="check the path; example configs are in examples/configs/") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as duplicate:
        key, first, again = duplicate.args
        raise ConfigError(f"{path} line {again}: {key!r} is written a second time at the same level "
                          f"(first on line {first}); YAML would silently keep only the second",
                          suggestion=f"merge the two {key!r} entries into one") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and start is not None and (mark is None or start.line != mark.line):
            # an unclosed quote or bracket is found where the file ends; say where it opened
            problem += f" ({context} that starts on line {start.line + 1}, column {start.column + 1})"
        raise ConfigError(f"{path}{line} is not valid YAML: {problem}",
                          suggestion="check the indentation and the brackets around that line "
                          "(keys and values are separated by ': ')") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, not a mapping of sections",
                          suggestion="start the file with sections such as 'model:', 'data:', 'train:'")
    return OmegaConf.create(raw)


def _overrides(assignments: Sequence[str]) -> Any:
    for assignment in assignments:
        key, sep, _ = assignment.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"--set {assignment!r} is not key=value",
                              suggestion="write a dotted key and a YAML value, e.g. --set optimizer.lr=1e-3")
    layer = OmegaConf.create()
    for assignment in assignments:  # one at a time, to name the one that is not YAML
        try:
            layer = OmegaConf.merge(layer, OmegaConf.from_dotlist([assignment]))
        except (oc_errors.OmegaConfBaseException, yaml.YAMLError) as error:
            problem = getattr(error, "problem", None) or _first_line(error)
            raise ConfigError(f"--set {assignment!r} cannot be parsed: {problem}",
                              suggestion="the value is YAML: close the brackets and quotes, and quote values "
                              "with spaces: --set 'data.args.paths=[a, b]'") from None
    return layer


# ------------------------------------------------------------------------------------- merging
def _merge(layers: list[Any], where: str, overrides: Sequence[str] = ()) -> RunConfig:
    """``layers`` (the file, then the ``--set`` overrides) merged over the schema's defaults."""
    schema = _schema(layers[:-1])
    try:
        merged = OmegaConf.merge(schema, *layers)
        return OmegaConf.to_object(merged)
    except TitanaxError as error:  # a section's own __post_init__ check, naming its key
        keys = {key for key, _ in yaml_keys(error)}
        named = [a for a in overrides if a.partition("=")[0].strip() in keys]
        where = f"--set {named[-1]}" if named else where
        raise error.replace(message=f"{where}: {error.message}") from None
    except (oc_errors.OmegaConfBaseException, TypeError) as error:  # TypeError: a list where a mapping goes
        raise _translate(error, layers, where, overrides) from None


def _schema(files: list[Any]) -> Any:
    """The defaults. The default plan (data parallel over ``data``) stands for a missing plan
    section only: a file that writes ``plan:`` gets exactly the parts it names, not those plus a
    ``data_parallel`` it never asked for (``--set plan...`` still adds to the default)."""
    schema = OmegaConf.structured(RunConfig)
    if any("plan" in layer for layer in files):
        with read_write(schema):
            schema.plan = PlanConfig()
    return schema


def _translate(error: Exception, layers: list[Any], where: str, overrides: Sequence[str] = ()) -> ConfigError:
    key = getattr(error, "full_key", None) or _locate(layers)
    if key and len(layers) > 1 and _value_at(layers[-1:], key) is not _ABSENT:
        # the culprit came from the command line, not from the file
        where = "--set " + next((a for a in overrides if a.partition("=")[0].strip() == key), key)
    if isinstance(error, oc_errors.ConfigKeyError) and key:
        return _unknown_key(key, where)
    if isinstance(error, oc_errors.MissingMandatoryValue) and key:
        return ConfigError(f"{where}: {key} is required but not set",
                           suggestion=f"add {key} to the file or pass --set {key}=...")
    if isinstance(error, oc_errors.InterpolationResolutionError):
        message = _first_line(error)
        variable = message.split("'")[1] if "Environment variable" in message else None
        if variable:
            return ConfigError(f"{where}: {key} reads environment variable {variable}, which is not set",
                               suggestion=f"export {variable}=..., or give a default: "
                               f"${{oc.env:{variable},<default>}}")
        return ConfigError(f"{where}: {key} cannot be resolved: {message}",
                           suggestion="check the ${...} reference: it must name an existing key")
    if key:
        expected = describe_type(key_hint(key))
        value = _value_at(layers, key)
        shown = f"={value!r}" if value is not _ABSENT else ""
        return ConfigError(f"{where}: {key}{shown} has the wrong type: expected {expected}",
                           suggestion=f"write {key} as {expected}")
    return ConfigError(f"{where}: {_first_line(error)}",
                       suggestion="compare the file with examples/configs/ and docs/cli.md")


def _unknown_key(key: str, where: str) -> ConfigError:
    *parents, leaf = key.split(".")
    section = ".".join(parents)
    fields = keys_under(section)
    if fields is None:
        return ConfigError(f"{where}: {key} is not a configuration key", suggestion="see docs/cli.md")
    close = difflib.get_close_matches(leaf, fields, n=1, cutoff=0.5)
    prefix = f"{section}." if section else ""
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return ConfigError(f"{where}: unknown key {key}",
                       suggestion=f"{hint}valid keys{' of ' + section if section else ''}: {', '.join(fields)}")


def _locate(layers: list[Any]) -> str | None:
    """The top-level key whose merge fails, for OmegaConf errors that carry no key."""
    schema = OmegaConf.structured(RunConfig)
    for layer in layers:
        for name in OmegaConf.to_container(layer, resolve=False) or {}:
            try:
                OmegaConf.merge(schema, {name: layer[name]})
            except (oc_errors.OmegaConfBaseException, TypeError) as error:
                inner = getattr(error, "full_key", None)
                if inner:
                    return inner
                return _deepest_failure(schema, layer, name)
    return None


def _deepest_failure(schema: Any, layer: Any, name: str) -> str:
    value = layer[name]
    if OmegaConf.is_dict(value):
        for sub in value:
            try:
                OmegaConf.merge(schema, {name: {sub: value[sub]}})
            except (oc_errors.OmegaConfBaseException, TypeError):
                return f"{name}.{sub}"
    return name


# -------------------------------------------------------------------------------- schema walk
_ABSENT = object()


def _value_at(layers: list[Any], key: str) -> Any:
    found = _ABSENT
    for layer in layers:
        node = OmegaConf.to_container(layer, resolve=False)
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                node = _ABSENT
                break
        if node is not _ABSENT:
            found = node
    return found


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
