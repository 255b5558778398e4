"""Collectives of an HLO program: how many of each kind one run executes, and how many bytes.

Example:
  >>> stats = count_collectives(
  ...     "%ag = f32[16,64]{1,0} all-gather(%p), dimensions={0}, replica_groups={{0,1,2,3}}")
  >>> stats["all-gather"]
  CollectiveStats(count=1, bytes=4096, static_count=1, static_bytes=4096)
"""

from __future__ import annotations

import dataclasses

from titanax.exceptions import TitanaxError
from titanax.profiling.hlo import parse_hlo
from titanax.profiling.op_cost import COLLECTIVE_KINDS
from titanax.profiling.walk import COUNTS, KIND_BYTES, ProgramTotals, program_totals

__all__ = ["COLLECTIVE_KINDS", "CollectiveStats", "collective_stats", "count_collectives"]


@dataclasses.dataclass(frozen=True)
class CollectiveStats:
    """How many collectives of one kind a program runs, and how much data they produce.

    ``count`` and ``bytes`` are **per execution of the program** (one training step, for a step
    function): an op inside a ``while`` loop (a ``lax.scan`` / ``fori_loop``) counts once per
    trip, nested loops multiply, so a scanned 80-layer stack's per-layer all-gather counts 80
    times. ``static_count`` and ``static_bytes`` count each op once per appearance in the HLO
    text, wherever it sits. The two agree for a program without loops. See
    :func:`count_collectives` for how loops of unknown length and conditionals are counted.

    Attributes:
      count: collectives of this kind executed per run of the program on one device (an async
        ``-start``/``-done`` pair counts once).
      bytes: sum of their result sizes on one device over one run (tuple results summed).
      static_count: collective instructions of this kind in the HLO text (each once); defaults
        to ``count``.
      static_bytes: sum of those instructions' result sizes, each once; defaults to ``bytes``.

    Example:
      >>> CollectiveStats(count=2, bytes=4096)
      CollectiveStats(count=2, bytes=4096, static_count=2, static_bytes=4096)
      >>> CollectiveStats(count=80, bytes=80 * 512, static_count=1, static_bytes=512).bytes
      40960
    """

    count: int = 0
    bytes: int = 0
    static_count: int = None  # type: ignore[assignment]  # None -> count
    static_bytes: int = None  # type: ignore[assignment]  # None -> bytes

    def __post_init__(self) -> None:
        if self.static_count is None:
            object.__setattr__(self, "static_count", self.count)
        if self.static_bytes is None:
            object.__setattr__(self, "static_bytes", self.bytes)

    def __add__(self, other: CollectiveStats) -> CollectiveStats:
        if not isinstance(other, CollectiveStats):
            return NotImplemented
        return CollectiveStats(self.count + other.count, self.bytes + other.bytes,
                               self.static_count + other.static_count,
                               self.static_bytes + other.static_bytes)


def collective_stats(totals: ProgramTotals) -> dict[str, CollectiveStats]:
    """One :class:`CollectiveStats` per kind in :data:`COLLECTIVE_KINDS`, read from the totals of
    a program (:func:`titanax.profiling.walk.program_totals`).

    Args:
      totals: the program's totals.

    Returns:
      kind -> stats, every kind present, in the order of :data:`COLLECTIVE_KINDS`.
    """
    run, static = totals.per_run, totals.static
    return {kind: CollectiveStats(run[COUNTS + i], run[KIND_BYTES + i], static[COUNTS + i],
                                  static[KIND_BYTES + i])
            for i, kind in enumerate(COLLECTIVE_KINDS)}


def _count(hlo_text: str) -> tuple[dict[str, CollectiveStats], int]:
    """count_collectives plus the number of while loops of unknown trip count."""
    if not isinstance(hlo_text, str):
        raise TitanaxError(
            f"count_collectives expects HLO text (str), got {type(hlo_text).__name__}",
            suggestion="pass compiled.as_text(), or use titanax.profiling.inspect(compiled)",
        )
    totals = program_totals(parse_hlo(hlo_text), costs=False)
    return collective_stats(totals), totals.unknown_trip_loops


def count_collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    """Counts the collectives one run of an HLO program executes, and the bytes each kind produces
    per device.

    Reads the text of an optimized (SPMD-partitioned) module, e.g. ``Compiled.as_text()``: every
    instruction whose opcode is one of :data:`COLLECTIVE_KINDS`, in the entry computation, a
    fusion, a ``while`` body or an async wrapper computation. ``count``/``bytes`` are per
    **execution** of the program (one step of a step function), found by weighting each
    computation by how many times one run executes it (:mod:`titanax.profiling.walk`):

    * a ``while`` body (``lax.scan``, ``fori_loop``) runs once per trip, as XLA's while-loop
      analysis wrote it in the loop's ``backend_config`` (``"known_trip_count":{"n":"80"}``), or
      as read off a counted loop's constant start, step and bound; its condition runs trips + 1
      times; nested loops multiply;
    * a ``while`` whose trip count is unknown (a ``lax.while_loop`` on data) counts its body and
      condition **once**, so the figures are then lower bounds;
      :attr:`CompiledStats.unknown_trip_loops` counts such loops;
    * a ``conditional`` counts its heaviest branch (most bytes, then most ops) once: an upper
      bound for the branch actually taken;
    * fusions, ``call``, ``custom-call`` and async wrappers (``async-start ... calls=``) run
      their computation once per call; reduction combiners (``to_apply=``) hold no collectives.

    ``static_count``/``static_bytes`` count each instruction once per appearance in the text
    instead. Async pairs (``all-gather-start``/``all-gather-done``) count once, at the ``-done``,
    whose result is the collective's output; generic ``async-start``/``async-done`` wrappers are
    not counted themselves, the collective inside the wrapped computation is. Computations that
    nothing calls in a recognised way, and lines outside any computation (a fragment of a
    module), count once. Linear in the text's size.

    Bytes are the result shape's size on one device (all tuple elements summed): for all-gather
    the gathered array, for reduce-scatter the scattered shard, for all-reduce the reduced array.

    Args:
      hlo_text: HLO module text, or any lines of it.

    Returns:
      A dict with one :class:`CollectiveStats` per kind in :data:`COLLECTIVE_KINDS` (zero for
      kinds that do not occur), in that order.

    Raises:
      TitanaxError: if ``hlo_text`` is not a string.

    Example:
      >>> stats = count_collectives(
      ...     "%ag = f32[16,64]{1,0} all-gather(%p), dimensions={0}, replica_groups={{0,1,2,3}}")
      >>> stats["all-gather"]
      CollectiveStats(count=1, bytes=4096, static_count=1, static_bytes=4096)
    """
    return _count(hlo_text)[0]
