"""The lines ``tx.Engine.fit`` logs on ``titanax.engine`` around the steps: what is trained where
before the first step, what compiling and the first step cost, and what the run did at the end.
Process 0 only (the caller checks)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from titanax.logging import ThroughputMeter
from titanax.parallel.layout import bytes_per_device
from titanax.units import human_bytes, human_count

__all__ = ["report_end", "report_first_step", "report_plan"]

_log = logging.getLogger("titanax.engine")


def report_plan(step: Any, state: Any, mesh: Mesh, start: int, steps: int) -> None:
    """One line before the first step: what is trained where, and that the step compiles first."""
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    compiling = "; compiling the step first" if step.compile_watch.compiles == 0 else ""
    _log.info("training %s parameters on %d device%s from step %d to %d (state %s per device)%s",
              human_count(count), mesh.size, "" if mesh.size == 1 else "s", start, steps,
              human_bytes(bytes_per_device(state)), compiling)


def report_first_step(step: Any, state: Any, mesh: Mesh, compiles_before: int, first_s: float) -> None:
    """One line at the first step: what compiling cost, what the first step took, memory."""
    from titanax.profiling import memory_watermark

    watch = step.compile_watch
    compiled = (f"compiled in {watch.records[-1].describe()}" if watch.compiles > compiles_before
                else "already compiled")
    peak, source = memory_watermark(mesh.devices.flat)
    if peak is not None:
        memory = f"peak device memory {human_bytes(peak)} ({source})"
    else:  # XLA:CPU keeps no statistics; a second compile for its memory analysis costs as much as the first
        memory = (f"state {human_bytes(bytes_per_device(state))} per device (the backend reports no "
                  "peak memory; `titanax describe` shows the compiled peak)")
    _log.info("step %r %s; first step %.2f s; %s", watch.name, compiled, first_s, memory)


def report_end(start: int, end: int, seconds: float, meter: ThroughputMeter) -> None:
    """One line at the end: steps, wall time, examples and tokens trained on."""
    done = end - start
    if done <= 0:
        return
    amount = f"{human_count(done * meter.examples_per_step)} examples"
    if meter.tokens_per_step is not None:
        amount = f"{human_count(done * meter.tokens_per_step)} tokens ({amount})"
    _log.info("trained steps %d-%d in %s: %s, %.3g steps/s overall (compile and evaluation included)",
              start + 1, end, timedelta(seconds=round(seconds)), amount, done / seconds)
