"""``titanax describe``: a run's layout, memory and communication, read from its compiled step.

Nothing is trained and no data is read: the model is initialized directly sharded, one batch of
the configured shapes is described abstractly, and the training step is compiled ahead of time.
Parameter and optimizer bytes come from the arrays' shardings; activations and temporaries,
FLOPs and collectives from what XLA compiled (``tx.profiling.inspect``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from titanax.config.run import prepare
from titanax.config.schema import RunConfig

__all__ = ["RunDescription", "describe_run", "bytes_per_device"]


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of the arrays in ``tree`` (the largest shard of each array)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            continue
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(kw_only=True, frozen=True)
class RunDescription:
    """What ``titanax describe`` reports (figures per device unless named otherwise)."""

    mesh: str
    """The mesh: axes, sizes, devices."""
    plan: str
    """``Plan.describe`` (rules, pipeline bubble)."""
    layout: str
    """The per-parameter table: path, shape, logical axes, spec, bytes per device."""
    parameter_count: int
    """Parameters in the model (all devices together)."""
    param_bytes: int
    """Parameter bytes on one device."""
    optimizer_bytes: int
    """Optimizer-state bytes on one device."""
    batch_shapes: dict[str, tuple[int, ...]]
    """The global batch the step is compiled for."""
    stats: Any
    """``tx.profiling.CompiledStats`` of the compiled training step."""
    compile_seconds: float
    """Time to lower and compile the step."""

    def render(self) -> str:
        from titanax.profiling.units import human_bytes, human_count

        s = self.stats
        lines = [self.mesh, "", self.plan, "", "Parameters", self.layout, ""]
        lines.append(f"Memory per device (compiled for batch {self.batch_shapes})")
        lines.append(f"  parameters        {human_bytes(self.param_bytes):>12}   "
                     f"({human_count(self.parameter_count)} parameters in all)")
        lines.append(f"  optimizer state   {human_bytes(self.optimizer_bytes):>12}")
        lines.append(f"  params + optimizer{human_bytes(self.param_bytes + self.optimizer_bytes):>12}")
        if s.temp_bytes is not None:
            lines.append(f"  activations/temp  {human_bytes(s.temp_bytes):>12}   (XLA temporaries of one step)")
        if s.argument_bytes is not None:
            lines.append(f"  XLA buffers       arguments {human_bytes(s.argument_bytes)}, outputs "
                         f"{human_bytes(s.output_bytes or 0)} ({human_bytes(s.alias_bytes or 0)} reusing the "
                         f"arguments), temporaries {human_bytes(s.temp_bytes or 0)}: at most "
                         f"{human_bytes(s.allocated_bytes or 0)} held at once")
        lines.append("")
        lines.append(f"Collectives in the compiled step ({s.total_collective_count}, "
                     f"{human_bytes(s.total_collective_bytes)} per device; a loop body counts once)")
        for kind, c in s.collectives.items():
            if c.count:
                lines.append(f"  {kind:<20} {c.count:>4} op{'s' if c.count > 1 else ' '}  "
                             f"{human_bytes(c.bytes):>12} in all")
        if not s.total_collective_count:
            lines.append("  none")
        if s.flops is not None:
            lines.append(f"FLOPs per step per device {human_count(s.flops)} (XLA cost model)")
        lines.append(f"compiled in {self.compile_seconds:.1f} s; nothing was trained")
        return "\n".join(lines)


def _abstract_batch(example: Any, engine: Any) -> Any:
    from titanax.data import batch_sharding

    def one(x: Any) -> jax.ShapeDtypeStruct:
        shape = tuple(x.shape)
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=batch_sharding(engine.mesh, engine.rules, shape))

    return jax.tree.map(one, example)


def describe_run(cfg: RunConfig) -> RunDescription:
    """Lay out and compile a run's training step without training it.

    Args:
      cfg: the run configuration.

    Returns:
      A :class:`RunDescription` (``.render()`` is what ``titanax describe`` prints).

    Raises:
      TitanaxError: the configuration cannot be built on the current devices.
    """
    from titanax.parallel.shard import shard
    from titanax.profiling import inspect
    from titanax.runtime import describe_mesh

    run = prepare(cfg, loggers=False, checkpoint=False)
    engine = run.engine
    sharded = shard(run.model, engine.plan, engine.mesh, example=run.model_example, rng=cfg.train.seed)
    state = engine.init(sharded)
    batch = _abstract_batch(run.source.example, engine)
    started = time.perf_counter()
    compiled = run.step.lower(state, batch).compile()
    seconds = time.perf_counter() - started
    return RunDescription(
        mesh=describe_mesh(engine.mesh),
        plan=engine.plan.describe(engine.mesh),
        layout=sharded.layout.describe(),
        parameter_count=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
        param_bytes=bytes_per_device(state.params),
        optimizer_bytes=bytes_per_device(state.opt_state),
        batch_shapes={"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
                      for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]},
        stats=inspect(compiled),
        compile_seconds=seconds,
    )

