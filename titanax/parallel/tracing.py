"""Running model code the way Titanax traces it.

Every call of a sharded model's code (``tx.shard``'s forward, ``sm.apply``, ``state.apply`` inside
a step) goes through :func:`call_model`, which

* enters the :func:`tracing_context` (``tx.constrain`` resolves against the plan's rules and mesh,
  NNX's eager sharding is off);
* binds pmap-style collective axis names (``BatchNorm(axis_name="batch")``, as flax's ImageNet
  ResNet writes it) that GSPMD code has no mesh axis for: under ``jax.jit`` the arrays a model
  sees are the *global* batch, so a batch mean is already the mean over every data-parallel
  device and the model's ``pmean`` over that name must be the identity — exactly what a
  ``jax.vmap`` of size 1 with that ``axis_name`` computes;
* records which mesh axes the model's activation constraints used, and whether the model called
  Flax's own ``nn.with_logical_constraint`` (which resolves against Flax's global rules and mesh,
  neither of which Titanax sets, so it would constrain nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh

from titanax.exceptions import ShardingError
from titanax.parallel.context import constraint_record, sharding_context
from titanax.parallel.rules import Rules

__all__ = ["CallRecord", "call_model", "has_explicit_axes", "mesh_context", "tracing_context"]

T = TypeVar("T")

_UNBOUND_AXIS = re.compile(r"unbound axis name:? ['\"]?([^\s'\".,]+)")


def has_explicit_axes(mesh: Mesh) -> bool:
    """Whether any axis of ``mesh`` is ``AxisType.Explicit``."""
    return any(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types)


def mesh_context(mesh: Mesh) -> contextlib.AbstractContextManager[Any]:
    """The mesh in context for a mesh with Explicit axes, else nothing: a model written in
    explicit-sharding style (``out_sharding=P("fsdp", None)``) resolves its axis names against the
    mesh in context while it is traced. Outside a trace that is ``jax.set_mesh(mesh)`` (eager code,
    such as making a PRNG key, needs the concrete mesh); inside ``jax.jit``, where JAX refuses
    ``set_mesh``, the mesh's abstract mesh."""
    if not has_explicit_axes(mesh):
        return contextlib.nullcontext()
    try:
        return jax.set_mesh(mesh)
    except ValueError:  # inside jax.jit
        return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


@contextlib.contextmanager
def tracing_context(rules: Rules, mesh: Mesh) -> Iterator[None]:
    """What model code sees while Titanax traces it on ``mesh``.

    ``tx.constrain`` resolves against ``rules`` and ``mesh``. NNX's eager sharding is off because
    Titanax, not Flax, places every variable. Flax's own logical rules are never entered, nor
    ``jax.set_mesh`` for an Auto mesh: with both active, Linen's boxed initializers constrain
    parameters mid-construction (``DenseGeneral`` under ``nn.scan`` then fails on its flattened
    kernel). A mesh with Explicit axes is set (:func:`mesh_context`): explicit-style model code
    names mesh axes in ``out_sharding=`` and needs it.
    """
    with sharding_context(rules, mesh), nnx.use_eager_sharding(False), mesh_context(mesh):
        yield


@dataclasses.dataclass
class CallRecord:
    """What one traced call of model code did, for the checks that need the traced program."""

    constrained_axes: set[str] = dataclasses.field(default_factory=set)
    """Mesh axes that ``tx.constrain`` split an activation over."""
    flax_constraints: int = 0
    """Calls of Flax's ``nn.with_logical_constraint`` (resolved by no rules: they constrain nothing)."""


class _FlaxRulesProbe(tuple):
    """Stands in for Flax's (unset) logical axis rules while model code runs.

    ``nn.with_logical_constraint`` first asks whether any rules are set and returns its input
    unchanged when none are; the probe counts that question and answers "none", so the model runs
    exactly as it would without it.
    """

    def __new__(cls, record: CallRecord) -> _FlaxRulesProbe:
        probe = super().__new__(cls, ())
        probe.record = record
        return probe

    def __bool__(self) -> bool:
        self.record.flax_constraints += 1
        return False


def call_model(fn: Callable[[], T], *, rules: Rules, mesh: Mesh,
               axis_names: set[str]) -> tuple[T, CallRecord]:
    """Run ``fn`` (model code, traced or eager) in Titanax's tracing context.

    Args:
      fn: the call, e.g. ``lambda: module.apply(variables, x)``; it must be pure (return every
        result) because it may run inside ``jax.vmap``.
      rules: the rules ``tx.constrain`` resolves against.
      mesh: the mesh.
      axis_names: pmap-style axis names already found in this model; names the call turns out to
        need are added, so later calls bind them up front.

    Returns:
      ``(fn's result, CallRecord)``.

    Raises:
      ShardingError: a pmap-style axis name inside a manual-mode (``shard_map``) step, where the
        name must be the mesh's data axis.
    """
    record = CallRecord()
    probe = _FlaxRulesProbe(record) if not flax_spmd.get_logical_axis_rules() else None
    while True:
        try:
            with tracing_context(rules, mesh), constraint_record(record.constrained_axes), \
                    (flax_spmd.logical_axis_rules(probe) if probe is not None else contextlib.nullcontext()):
                return _bind_axis_names(fn, sorted(axis_names))(), record
        except NameError as err:
            name = _unbound_axis_name(err)
            if name is None or name in axis_names:
                raise
            _refuse_in_manual_mode(name, err)
            axis_names.add(name)
            record = CallRecord()
            if probe is not None:
                probe.record = record
        except AssertionError as err:
            # Inside shard_map JAX reports an unknown collective axis as a bare AssertionError.
            name = _axis_name_in_traceback(err)
            if name is None:
                raise
            _refuse_in_manual_mode(name, err)
            raise


def _unbound_axis_name(err: NameError) -> str | None:
    match = _UNBOUND_AXIS.search(str(err))
    return match.group(1) if match else None


def _axis_name_in_traceback(err: BaseException) -> str | None:
    """The ``axis_name`` a failing collective was called with, read from the model frame that
    called it (JAX's bare AssertionError does not say)."""
    tb = err.__traceback__
    name = None
    while tb is not None:
        value = tb.tb_frame.f_locals.get("axis_name")
        if isinstance(value, str):
            name = value
        tb = tb.tb_next
    return name


def _refuse_in_manual_mode(name: str, err: BaseException) -> None:
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if manual and name not in manual:
        raise ShardingError(
            f"the model reduces over axis name {name!r} (pmap-style, e.g. BatchNorm(axis_name="
            f"{name!r})) inside a manual-mode step, whose mesh axes are {manual}: each device holds "
            "only its block of the batch there, so the statistics must be reduced over the mesh's "
            "data axis",
            suggestion=f"name the data axis in the model (axis_name={manual[0]!r}), or drop "
            "manual=True: under GSPMD a batch mean already covers every device and any axis name works",
        ) from err


def _bind_axis_names(fn: Callable[[], T], names: list[str]) -> Callable[[], T]:
    """``fn`` with each name bound as a ``jax.vmap`` axis of size 1 (a collective over it is the
    identity); outputs come back without the added axis."""
    for name in names:
        def bound(inner: Callable[[], Any] = fn, name: str = name) -> Any:
            out = jax.vmap(inner, in_axes=(), axis_size=1, axis_name=name)()
            return jax.tree.map(lambda leaf: leaf[0], out)

        fn = bound
    return fn
