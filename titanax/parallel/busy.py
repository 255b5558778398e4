"""How often a pipeline slot's ``lax.cond`` takes its busy branch, written into the program.

A pipeline stage computes under ``lax.cond`` only on the ticks its schedule marks busy. A static
count of the compiled program cannot know which branch runs, so it would charge the busy branch on
every tick (an upper bound: 1.7x the FLOPs a 1F1B step executes at 2 stages and 4 microbatches).
The schedule table knows exactly: the slot is busy on ``busy`` of its ``total`` (tick, stage)
cells. :func:`busy_scope` names the conditional after that share, so the share travels with the
program into its HLO (as the conditional's ``op_name``) and :func:`busy_share` reads it back there:
the per-run count (:mod:`titanax.profiling.walk`) then weights the busy branch by the share and the
idle branch by the rest, which is what the average device executes.

Example:
  >>> with busy_scope("forward", 8, 10):
  ...     pass
  >>> busy_share("jit(step)/shard_map/while/body/forward_busy_8_of_10/cond")
  Fraction(4, 5)
"""

from __future__ import annotations

import re
from fractions import Fraction

import jax

__all__ = ["busy_scope", "busy_share"]

# The tag must be the scope right around the conditional: a conditional inside the branch (the
# model's own) carries the tag further up its op name and is not weighted twice.
_TAG = re.compile(r"_busy_(\d+)_of_(\d+)/cond$")


def busy_scope(slot: str, busy: int, total: int) -> jax.named_scope:
    """A named scope for a slot's ``lax.cond`` that records its busy share.

    Args:
      slot: what the slot computes (``"forward"``, ``"backward"``, ...): the scope reads
        ``<slot>_busy_<busy>_of_<total>`` in profiles.
      busy: (tick, stage) cells on which the ``True`` branch runs.
      total: all (tick, stage) cells of the loop.

    Returns:
      The ``jax.named_scope`` to enter around exactly one ``lax.cond``.
    """
    if not 0 <= busy <= total or total <= 0:
        raise ValueError(f"busy_scope({slot!r}, {busy}, {total}): need 0 <= busy <= total and total > 0")
    return jax.named_scope(f"{slot}_busy_{int(busy)}_of_{int(total)}")


def busy_share(op_name: str | None) -> Fraction | None:
    """The share of runs on which a conditional takes its ``True`` branch, from its ``op_name``
    (``None`` for conditionals not made under :func:`busy_scope`)."""
    if not op_name:
        return None
    match = _TAG.search(op_name)
    if match is None:
        return None
    return Fraction(int(match.group(1)), int(match.group(2)))
