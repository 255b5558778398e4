"""The report of one compiled program: per-device memory, cost and collectives, as a value.

Example:
  >>> stats = CompiledStats(argument_bytes=2048, flops=4e6, xla_flops=1e6)
  >>> stats.allocated_bytes, stats.flops
  (2048, 4000000.0)
"""

from __future__ import annotations

import dataclasses
import html
import types
from collections.abc import Mapping
from typing import Any

from titanax.exceptions import TitanaxError
from titanax.profiling.collectives import COLLECTIVE_KINDS, CollectiveStats
from titanax.units import human_bytes, human_count

__all__ = ["CompiledStats"]


def _normalize_kind(kind: str) -> str:
    if not isinstance(kind, str):
        raise TitanaxError(
            f"collective kind must be a string, got {type(kind).__name__}",
            suggestion=f"use one of {', '.join(COLLECTIVE_KINDS)}",
        )
    key = kind.strip().lower().replace("_", "-")
    if key not in COLLECTIVE_KINDS:
        raise TitanaxError(
            f"unknown collective kind {kind!r}",
            suggestion=f"use one of {', '.join(COLLECTIVE_KINDS)} (HLO opcode names)",
        )
    return key


@dataclasses.dataclass(frozen=True)
class CompiledStats:
    """Per-device memory, cost and collectives of one compiled program.

    Memory fields come from ``memory_analysis()`` and are ``None`` when the backend reports
    nothing. Cost and collectives are **per run of the program (one step), per device, with a loop
    body counted once per trip**: a scanned 80-layer stack's FLOPs and per-layer all-gathers count
    80 times, as in the same stack unrolled. ``flops``, ``bytes_accessed`` and
    ``transcendentals`` start from XLA's cost model (``cost_analysis()``), which visits a
    ``while``/``scan`` body once, and add what the loops' remaining trips cost, computed from the
    HLO text by Titanax's restatement of that same cost model (:mod:`titanax.profiling.walk`); the
    ``xla_*`` fields keep XLA's own figures. Where XLA does not know a loop's trip count, its body
    counts once and :attr:`unknown_trip_loops` says how many such loops there are (every per-run
    figure is then a lower bound: "at least"). A ``conditional`` counts its heaviest branch, so
    with :attr:`conditionals` above 0 the figures are upper bounds for the branches that run (a
    pipeline's idle ticks count as busy).

    Attributes:
      argument_bytes: input buffers on one device (donated inputs included).
      output_bytes: output buffers on one device.
      alias_bytes: bytes of outputs that reuse (alias) a donated input's buffer.
      temp_bytes: scratch buffers XLA allocates for the program on one device.
      generated_code_bytes: size of the generated code (0 on CPU).
      reported_peak_bytes: the backend's own peak estimate (``peak_memory_in_bytes``, from
        heap simulation of live buffers), or ``None`` where the backend gives none (or 0).
      flops: floating-point operations per device per run, loop bodies once per trip.
      bytes_accessed: bytes read and written per device per run, loop bodies once per trip.
      transcendentals: transcendental operations (exp, log, ...) per device per run.
      collectives: kind -> :class:`CollectiveStats` for every kind in :data:`COLLECTIVE_KINDS`
        (``count``/``bytes`` per step, loops counted per trip; ``static_count``/``static_bytes``
        once per op in the text); empty when the backend gave no HLO text.
      unknown_trip_loops: ``while`` loops whose trip count is unknown; each was counted as if
        it ran once, so when this is above 0 every per-run figure is a lower bound.
      module_name: the HLO module's name (e.g. ``"jit_train_step"``), if known.
      num_partitions: devices the program was partitioned over (1 when not SPMD).
      xla_flops: FLOPs per device as ``cost_analysis()`` reports them (a loop body once).
      xla_bytes_accessed: bytes accessed as ``cost_analysis()`` reports them (a loop body once).
      xla_transcendentals: transcendentals as ``cost_analysis()`` reports them.
      conditionals: ``conditional`` instructions (``lax.cond``/``switch``), each counted at its
        heaviest branch.

    Example:
      >>> stats = inspect(jax.jit(f).lower(x).compile())  # doctest: +SKIP
      >>> print(stats)                                      # doctest: +SKIP
      >>> stats.count("all-reduce"), stats.bytes("all-gather")  # doctest: +SKIP
      >>> stats.flops / stats.xla_flops  # about the layer count, for a scanned stack  # doctest: +SKIP
    """

    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    reported_peak_bytes: int | None = None
    flops: float | None = None
    bytes_accessed: float | None = None
    transcendentals: float | None = None
    collectives: Mapping[str, CollectiveStats] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}), hash=False
    )
    module_name: str | None = None
    num_partitions: int = 1
    unknown_trip_loops: int = 0
    xla_flops: float | None = None
    xla_bytes_accessed: float | None = None
    xla_transcendentals: float | None = None
    conditionals: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.collectives, types.MappingProxyType):
            object.__setattr__(self, "collectives", types.MappingProxyType(dict(self.collectives)))

    def count(self, kind: str) -> int:
        """Number of collectives of one kind that one run (step) executes, loops counted per trip.

        Args:
          kind: an HLO opcode from :data:`COLLECTIVE_KINDS`, e.g. ``"all-reduce"``
            (``"all_reduce"`` is accepted too).

        Returns:
          The count (0 when the program has none, or when no HLO text was available).

        Raises:
          TitanaxError: for an unknown kind.

        Example:
          >>> CompiledStats(collectives={"all-reduce": CollectiveStats(2, 64)}).count("all_reduce")
          2
        """
        stats = self.collectives.get(_normalize_kind(kind))
        return stats.count if stats is not None else 0

    def bytes(self, kind: str) -> int:
        """Per-device result bytes of the collectives of one kind over one run (step), loops
        counted per trip.

        Args:
          kind: an HLO opcode from :data:`COLLECTIVE_KINDS`, e.g. ``"all-gather"``.

        Returns:
          The summed result bytes (0 when the program has none).

        Raises:
          TitanaxError: for an unknown kind.

        Example:
          >>> CompiledStats(collectives={"all-gather": CollectiveStats(1, 512)}).bytes("all-gather")
          512
        """
        stats = self.collectives.get(_normalize_kind(kind))
        return stats.bytes if stats is not None else 0

    @property
    def total_collective_bytes(self) -> int:
        """Bytes the collectives of one run of the program (one step) produce on one device, all
        kinds together: each op's result size, a loop body's ops once per trip. A lower bound when
        :attr:`unknown_trip_loops` is above 0."""
        return sum(s.bytes for s in self.collectives.values())

    @property
    def total_collective_count(self) -> int:
        """Collectives one run of the program (one step) executes, all kinds together, a loop
        body's ops once per trip. A lower bound when :attr:`unknown_trip_loops` is above 0."""
        return sum(s.count for s in self.collectives.values())

    @property
    def allocated_bytes(self) -> int | None:
        """``argument + output - alias + temp``: every buffer the program holds on one device.

        An upper bound on live memory (it assumes all arguments, outputs and the whole temp
        allocation coexist), ``None`` if the backend reports no memory analysis.
        """
        parts = (self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes)
        if all(p is None for p in parts):
            return None
        arg, out, alias, temp = (p or 0 for p in parts)
        return arg + out - alias + temp

    @property
    def peak_bytes(self) -> int | None:
        """Peak memory per device: the backend's figure if it reports one, else the sum.

        Uses ``memory_analysis().peak_memory_in_bytes`` (XLA's heap simulation of which buffers
        are live at once) when the backend reports a positive value; otherwise falls back to
        :attr:`allocated_bytes` (``argument + output - alias + temp``). :attr:`peak_source` says
        which one was used. On CPU the reported peak can be well below ``argument + temp``
        because buffers in the temp allocation are not all live at once.
        """
        if self.reported_peak_bytes:
            return self.reported_peak_bytes
        return self.allocated_bytes

    @property
    def peak_source(self) -> str:
        """Where :attr:`peak_bytes` comes from: ``"reported"``, ``"sum"`` or ``"unavailable"``."""
        if self.reported_peak_bytes:
            return "reported"
        return "sum" if self.allocated_bytes is not None else "unavailable"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """A notebook cell's last expression (text consoles): the table, not the dataclass."""
        printer.text(self.describe())

    def _repr_html_(self) -> str:
        """A notebook cell's last expression: the table, preformatted."""
        from titanax.html import fragment

        return fragment(f"<pre>{html.escape(self.describe())}</pre>")

    def describe(self) -> str:
        """A readable multi-line table of memory, cost and collectives, per device.

        Returns:
          The table as a string (bytes in KiB/MiB/GiB, FLOPs with SI prefixes).

        Example:
          >>> print(CompiledStats(argument_bytes=2048, flops=4e6).describe())  # doctest: +SKIP
        """
        title = "Compiled program"
        if self.module_name:
            title += f" {self.module_name}"
        parts = f"{self.num_partitions} device{'s' if self.num_partitions != 1 else ''}"
        lines = [f"{title} (per device; partitioned over {parts})"]

        def fmt_bytes(v: float | None) -> str:
            return "n/a" if v is None else human_bytes(v)

        lines.append("  memory")
        mem_rows = [
            ("arguments", self.argument_bytes),
            ("outputs", self.output_bytes),
            ("aliased (donated)", self.alias_bytes),
            ("temporaries", self.temp_bytes),
            ("generated code", self.generated_code_bytes),
            ("args+out-alias+temp", self.allocated_bytes),
        ]
        for label, value in mem_rows:
            lines.append(f"    {label:<22}{fmt_bytes(value):>14}")
        source = {"reported": "reported by XLA", "sum": "args+out-alias+temp",
                  "unavailable": "not reported"}[self.peak_source]
        lines.append(f"    {'peak':<22}{fmt_bytes(self.peak_bytes):>14}  ({source})")

        lines.append("  cost per step (XLA's cost model; a loop body counted once per trip)")
        lines.extend(self._bounds())
        rows = [("flops", self.flops, self.xla_flops, lambda v: human_count(v, "FLOP")),
                ("bytes accessed", self.bytes_accessed, self.xla_bytes_accessed, fmt_bytes),
                ("transcendentals", self.transcendentals, self.xla_transcendentals, human_count)]
        for label, value, xla, fmt in rows:
            if label == "transcendentals" and not value:
                continue
            text = "n/a" if value is None else fmt(value)
            # XLA's own figure visits each loop body once: shown where the loops change it
            note = f"  (XLA counts {fmt(xla)}: loop bodies once)" if xla is not None and value != xla else ""
            lines.append(f"    {label:<22}{text:>14}{note}")

        if not self.collectives:
            lines.append("  collectives: unavailable (backend gave no HLO text)")
        else:
            lines.append("  collectives per step (a loop body counted once per trip)")
            lines.extend(self._bounds())
            present = [(k, s) for k, s in self.collectives.items() if s.count or s.static_count]
            if not present:
                lines.append("    none")
            else:
                lines.append(f"    {'kind':<22}{'count':>8}{'bytes/device':>14}{'ops in HLO':>12}")
            for kind, s in present:
                lines.append(f"    {kind:<22}{s.count:>8}{human_bytes(s.bytes):>14}"
                             f"{s.static_count:>12}")
            if len(present) > 1:
                ops = sum(s.static_count for s in self.collectives.values())
                lines.append(f"    {'total':<22}{self.total_collective_count:>8}"
                             f"{human_bytes(self.total_collective_bytes):>14}{ops:>12}")
        return "\n".join(lines)

    def _bounds(self) -> list[str]:
        """Why the per-step figures may be lower or upper bounds, one line each."""
        lines = []
        if self.unknown_trip_loops:
            n = self.unknown_trip_loops
            lines.append(f"    at least: {n} loop{'s' if n != 1 else ''} of unknown trip count "
                         f"{'were' if n != 1 else 'was'} counted once")
        if self.conditionals:
            n = self.conditionals
            lines.append(f"    at most: {n} conditional{'s' if n != 1 else ''} counted at "
                         f"{'their' if n != 1 else 'its'} heaviest branch")
        return lines

    def __str__(self) -> str:
        return self.describe()
