"""The run configuration of the GPT example, read from YAML (``examples/configs/gpt_*.yaml``).

Each section is a frozen dataclass; an unknown key or a value of the wrong kind is a
``TitanaxError`` naming the key. ``--set section.key=value`` overrides a value from the command
line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

import titanax as tx

PLAN_PARTS = {"data_parallel": tx.DP, "fsdp": tx.FSDP, "tensor_parallel": tx.TP, "pipeline_parallel": tx.PP}


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where tokens come from and how they are batched."""

    paths: tuple[str, ...] | None = None
    """Text files or folders; ``None`` reads the Python standard library's ``.py`` files."""
    tokenizer: str | None = None
    """``None``/``"bytes"`` for bytes, or a ``tokenizer.json``, a folder with ``vocab.json`` and
    ``merges.txt``, or a ``.tiktoken`` file."""
    max_bytes: int | None = None
    """Read at most this many bytes of text (``None``: all of it)."""
    seq_len: int = 64
    """Tokens per training sequence."""
    batch_size: int = 32
    """Sequences per global batch."""
    eval_batches: int = 8
    """Held-out batches per evaluation."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 30
    """Steps of linear warmup from 0."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    clip_norm: float | None = 1.0
    """Global gradient-norm clipping (``None``: off)."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunConfig:
    """A whole training run of the GPT example."""

    model: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"config": "tiny"})
    """``config``: a preset name (``tiny``, ``small``); other keys override ``GPTConfig`` fields."""
    mesh: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"axes": ["data"]})
    """``tx.MeshSpec`` arguments: ``axes`` and optional ``shape``."""
    plan: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"data_parallel": {"axis": "data"}})
    """Plan parts (``data_parallel``, ``fsdp``, ``tensor_parallel``, ``pipeline_parallel``), each with its
    arguments."""
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    steps: int = 300
    """Optimizer steps to train."""
    log_every: int = 25
    """Steps between logged metrics."""
    eval_every: int = 50
    """Steps between held-out evaluations (a multiple of ``log_every``)."""
    seed: int = 0
    """Seed of the initialization and the data order."""
    compute_dtype: str = "float32"
    """``float32`` or ``bfloat16`` compute (parameters stay float32)."""
    cpu_devices: int | None = 8
    """Simulated CPU devices (``None``/0: use the real devices)."""
    checkpoint_dir: str | None = None
    """Write Orbax checkpoints here (and resume from them)."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    csv: str | None = None
    """Also write metrics to this CSV file."""

    def build_mesh(self) -> Any:
        return tx.MeshSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.mesh.items()}).build()

    def build_plan(self) -> tx.Plan:
        parts = {}
        for name, args in self.plan.items():
            if name not in PLAN_PARTS:
                raise _unknown("plan", name, PLAN_PARTS)
            parts[name] = PLAN_PARTS[name](**(args or {}))
        return tx.Plan(**parts)


def _unknown(section: str, key: str, valid: Sequence[str] | Mapping[str, Any]) -> tx.TitanaxError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"did you mean {section}.{close[0]}?" if close else f"valid keys: {', '.join(valid)}"
    return tx.TitanaxError(f"unknown config key {section}.{key}", suggestion=hint)


def _check_type(where: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(where, value, option)
            except tx.TitanaxError as error:
                errors.append(error)
        raise tx.TitanaxError(f"{where}={value!r} has the wrong type (expected {hint})",
                              suggestion=f"write {where} as {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise tx.TitanaxError(f"{where}={value!r} has the wrong type (expected {getattr(hint, '__name__', hint)})",
                          suggestion=f"write {where} as {getattr(hint, '__name__', hint)}")


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(section, key, sorted(fields))
        where = f"{section}.{key}" if section else key
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise tx.TitanaxError(f"{where} must be a mapping", suggestion=f"write {where}: {{key: value}}")
            kwargs[key] = _build(hints[key], value, where)
        else:
            kwargs[key] = _check_type(where, value, hints[key])
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep:
        raise tx.TitanaxError(f"--set {assignment!r} is not key=value", suggestion="e.g. --set optimizer.lr=1e-3")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(text)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run configuration.

    Args:
      path: a YAML file (``None``: all defaults).
      overrides: ``section.key=value`` assignments applied on top (values parsed as YAML).

    Returns:
      The validated :class:`RunConfig`.

    Raises:
      TitanaxError: the file is missing or not YAML, or a key or value is invalid.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except OSError as error:
            raise tx.TitanaxError(f"cannot read config {path}: {error.strerror}",
                                  suggestion="pass a file from examples/configs/") from None
        except yaml.YAMLError as error:
            raise tx.TitanaxError(f"{path} is not valid YAML: {error}",
                                  suggestion="check the indentation around the line shown") from None
    for assignment in overrides:
        _apply_override(raw, assignment)
    return _build(RunConfig, raw, "")
