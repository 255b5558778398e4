"""What XLA actually built: memory, cost and collectives read from a compiled program.

Everything here is read from the compiled executable, never estimated from the Python program:

* memory from ``Compiled.memory_analysis()`` (XLA's buffer assignment),
* FLOPs and bytes accessed from ``Compiled.cost_analysis()`` (XLA's HLO cost model),
* collectives by parsing the optimized, SPMD-partitioned HLO text (``Compiled.as_text()``).

All figures are **per device**: after SPMD partitioning every device runs the same program on its
shard, and that one program is what XLA reports on.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from titanax.profiling import inspect
  >>> compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 4)), jnp.ones((4, 2))).compile()
  >>> stats = inspect(compiled)
  >>> stats.argument_bytes
  160
  >>> stats.count("all-reduce")
  0
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from typing import Any

import jax

from titanax.exceptions import TitanaxError
from titanax.profiling.units import human_bytes, human_count

__all__ = [
    "COLLECTIVE_KINDS",
    "CollectiveStats",
    "CompiledStats",
    "count_collectives",
    "inspect",
    "shape_bytes",
]

#: The HLO collective opcodes Titanax counts, in the order tables show them.
COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "collective-broadcast",
    "ragged-all-to-all",
)

# Bits per element of every HLO primitive type that can hold data. Sub-byte types (s4, f4e2m1fn,
# ...) are packed, so an array's size is rounded up to whole bytes.
_ELEMENT_BITS: dict[str, int] = {
    "pred": 8,
    "s1": 1, "u1": 1, "s2": 2, "u2": 2, "s4": 4, "u4": 4,
    "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
    "f4e2m1fn": 4,
    "f8e3m4": 8, "f8e4m3": 8, "f8e4m3fn": 8, "f8e4m3fnuz": 8, "f8e4m3b11fnuz": 8,
    "f8e5m2": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8,
    "bf16": 16, "f16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128,
    "token": 0, "opaque": 0,
}

# `<element type>[<dims>]`; dims may be dynamic (`<=8`) or unknown (`?`).
_ARRAY = re.compile(r"(?<![\w.])([a-z][a-z0-9]*)\[([^\]]*)\]")
# Start of an instruction: `[ROOT] [%]name = `; the result shape and opcode are parsed after it.
_INSTR_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?[A-Za-z_][\w.\-]*\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
_KIND_ALTERNATION = "|".join(sorted(COLLECTIVE_KINDS, key=len, reverse=True))
_OPCODE_PARTS = re.compile(rf"^(?P<kind>{_KIND_ALTERNATION})(?P<suffix>-start|-done)?$")
_MODULE_HEADER = re.compile(r"^\s*HloModule\s+([^\s,]+)(?P<rest>.*)$", re.M)
_NUM_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")


@dataclasses.dataclass(frozen=True)
class CollectiveStats:
    """How many collectives of one kind a program runs, and how much data they produce.

    Attributes:
      count: number of collective instructions of this kind in the HLO text (an async
        ``-start``/``-done`` pair counts once).
      bytes: sum of their result sizes on one device (tuple results summed).

    Example:
      >>> CollectiveStats(count=2, bytes=4096)
      CollectiveStats(count=2, bytes=4096)
    """

    count: int = 0
    bytes: int = 0

    def __add__(self, other: CollectiveStats) -> CollectiveStats:
        if not isinstance(other, CollectiveStats):
            return NotImplemented
        return CollectiveStats(self.count + other.count, self.bytes + other.bytes)


def shape_bytes(shape: str) -> int:
    """Size in bytes of an HLO shape string, tuples summed.

    Layouts (``{1,0}``, ``{1,0:T(8,128)}``), tuple nesting and ``/*index=N*/`` comments are
    ignored; dynamic dimensions (``<=8``) count at their bound; unknown dimensions (``?``) and
    ``token[]`` count as 0. Unknown element types count as 0 bytes.

    Args:
      shape: e.g. ``"f32[8,16]{1,0}"`` or ``"(bf16[4]{0}, f32[])"``.

    Returns:
      The total number of bytes.

    Example:
      >>> shape_bytes("(bf16[4,4]{1,0}, f32[])")
      36
    """
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = _ELEMENT_BITS.get(dtype)
        if bits is None:
            continue
        elements = 1
        for dim in dims.split(","):
            dim = dim.strip().lstrip("<=")
            if not dim:
                continue
            if not dim.isdigit():  # `?`: unbounded dynamic dimension
                elements = 0
                break
            elements *= int(dim)
        total += (elements * bits + 7) // 8
    return total


def _split_shape(text: str, pos: int) -> int:
    """Returns the index just past the result shape that starts at ``text[pos]``."""
    depth = 0
    i = pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0 and ch == ")" and text[pos] == "(":
                return i + 1
        elif ch.isspace() and depth == 0:
            return i
        i += 1
    return n


def _parse_collective(line: str) -> tuple[str, str | None, int] | None:
    """Parses one HLO line; returns (kind, suffix, result bytes) for a collective, else None."""
    head = _INSTR_HEAD.match(line)
    if head is None:
        return None
    start = head.end()
    end = _split_shape(line, start)
    op = _OPCODE.match(line, end)
    if op is None:
        return None
    parts = _OPCODE_PARTS.match(op.group(1))
    if parts is None:
        return None
    return parts["kind"], parts["suffix"], shape_bytes(line[start:end])


def count_collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    """Counts the collectives in HLO text and the bytes each kind produces per device.

    Reads the text of an optimized (SPMD-partitioned) module, e.g. ``Compiled.as_text()``. Every
    instruction whose opcode is one of :data:`COLLECTIVE_KINDS` counts once, wherever it appears:
    in the entry computation, a fusion, a ``while``/``scan`` body or an async wrapper computation.
    An op inside a loop body is therefore counted **once per appearance in the text, not once per
    trip**. Async pairs (``all-gather-start``/``all-gather-done``) count once, at the ``-done``,
    whose result is the collective's output; generic ``async-start``/``async-done`` wrappers are
    not counted themselves, the collective inside the wrapped computation is.

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
      CollectiveStats(count=1, bytes=4096)
    """
    if not isinstance(hlo_text, str):
        raise TitanaxError(
            f"count_collectives expects HLO text (str), got {type(hlo_text).__name__}",
            suggestion="pass compiled.as_text(), or use titanax.profiling.inspect(compiled)",
        )
    counts = {kind: 0 for kind in COLLECTIVE_KINDS}
    sizes = {kind: 0 for kind in COLLECTIVE_KINDS}
    for line in hlo_text.splitlines():
        if "all-" not in line and "collective-" not in line and "reduce-scatter" not in line:
            continue  # cheap filter: most lines of a large module are not collectives
        parsed = _parse_collective(line)
        if parsed is None:
            continue
        kind, suffix, nbytes = parsed
        if suffix == "-start":
            continue
        counts[kind] += 1
        sizes[kind] += nbytes
    return {kind: CollectiveStats(counts[kind], sizes[kind]) for kind in COLLECTIVE_KINDS}


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
    nothing. ``flops`` and ``bytes_accessed`` come from ``cost_analysis()`` and are XLA's estimate
    for the per-device program; **XLA's cost model counts a while/scan loop body once, not once
    per trip**, so a ``lax.scan`` over N layers reports about one layer's FLOPs. Collective
    counts follow :func:`count_collectives` (an op in a loop body also counts once).

    Attributes:
      argument_bytes: input buffers on one device (donated inputs included).
      output_bytes: output buffers on one device.
      alias_bytes: bytes of outputs that reuse (alias) a donated input's buffer.
      temp_bytes: scratch buffers XLA allocates for the program on one device.
      generated_code_bytes: size of the generated code (0 on CPU).
      reported_peak_bytes: the backend's own peak estimate (``peak_memory_in_bytes``, from
        heap simulation of live buffers), or ``None`` where the backend gives none (or 0).
      flops: floating-point operations per device, as XLA's cost model counts them.
      bytes_accessed: bytes read and written per device, as XLA's cost model counts them.
      transcendentals: transcendental operations per device (exp, log, ...), if reported.
      collectives: kind -> :class:`CollectiveStats` for every kind in :data:`COLLECTIVE_KINDS`;
        empty when the backend gave no HLO text.
      module_name: the HLO module's name (e.g. ``"jit_train_step"``), if known.
      num_partitions: devices the program was partitioned over (1 when not SPMD).

    Example:
      >>> stats = inspect(jax.jit(f).lower(x).compile())  # doctest: +SKIP
      >>> print(stats)                                      # doctest: +SKIP
      >>> stats.count("all-reduce"), stats.bytes("all-gather")  # doctest: +SKIP
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

    def __post_init__(self) -> None:
        if not isinstance(self.collectives, types.MappingProxyType):
            object.__setattr__(self, "collectives", types.MappingProxyType(dict(self.collectives)))

    def count(self, kind: str) -> int:
        """Number of collectives of one kind.

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
        """Per-device result bytes of all collectives of one kind.

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
        """Per-device result bytes of every collective in the program, all kinds together."""
        return sum(s.bytes for s in self.collectives.values())

    @property
    def total_collective_count(self) -> int:
        """Number of collectives in the program, all kinds together."""
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

        lines.append("  cost (XLA estimate; loop bodies counted once)")
        flops = "n/a" if self.flops is None else human_count(self.flops, "FLOP")
        lines.append(f"    {'flops':<22}{flops:>14}")
        lines.append(f"    {'bytes accessed':<22}{fmt_bytes(self.bytes_accessed):>14}")
        if self.transcendentals:
            lines.append(f"    {'transcendentals':<22}{human_count(self.transcendentals):>14}")

        if not self.collectives:
            lines.append("  collectives: unavailable (backend gave no HLO text)")
        else:
            lines.append(f"  {'collectives':<24}{'count':>6}{'bytes/device':>14}")
            present = [(k, s) for k, s in self.collectives.items() if s.count]
            if not present:
                lines.append("    none")
            for kind, s in present:
                lines.append(f"    {kind:<22}{s.count:>6}{human_bytes(s.bytes):>14}")
            if len(present) > 1:
                lines.append(f"    {'total':<22}{self.total_collective_count:>6}"
                             f"{human_bytes(self.total_collective_bytes):>14}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _as_list(value: Any) -> Any:
    """memory_analysis()/cost_analysis() return one object, a list of them (one per
    executable, summed by the callers), or None."""
    if isinstance(value, (list, tuple)):
        items = [v for v in value if v is not None]
        return items or None
    return None if value is None else [value]


def _memory_fields(memory: Any) -> dict[str, int | None]:
    names = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
        "reported_peak_bytes": "peak_memory_in_bytes",
    }
    items = _as_list(memory)
    out: dict[str, int | None] = {field: None for field in names}
    if not items:
        return out
    for field, attr in names.items():
        values = [getattr(m, attr, None) for m in items]
        values = [int(v) for v in values if isinstance(v, (int, float)) and v >= 0]
        if values:
            out[field] = sum(values)
    if not out["reported_peak_bytes"]:
        out["reported_peak_bytes"] = None
    return out


def _cost_fields(cost: Any) -> dict[str, float | None]:
    """Accepts cost_analysis() output: a dict, a list of dicts (older JAX), or None."""
    keys = {"flops": "flops", "bytes_accessed": "bytes accessed",
            "transcendentals": "transcendentals"}
    items = [c for c in (_as_list(cost) or []) if isinstance(c, Mapping)]
    out: dict[str, float | None] = {field: None for field in keys}
    for field, key in keys.items():
        values = [c.get(key) for c in items]
        values = [float(v) for v in values
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v) and v >= 0]
        if values:
            out[field] = sum(values)
    return out


def _header_fields(hlo_text: str | None) -> dict[str, Any]:
    if not hlo_text:
        return {"module_name": None, "num_partitions": 1}
    match = _MODULE_HEADER.search(hlo_text[:20000])
    if match is None:
        return {"module_name": None, "num_partitions": 1}
    parts = _NUM_PARTITIONS.search(match["rest"])
    return {"module_name": match.group(1), "num_partitions": int(parts.group(1)) if parts else 1}


def _stats_from(memory: Any, cost: Any, hlo_text: str | None) -> CompiledStats:
    """Builds CompiledStats from raw memory_analysis / cost_analysis / HLO text (any may be None)."""
    collectives: Mapping[str, CollectiveStats] = (
        count_collectives(hlo_text) if isinstance(hlo_text, str) and hlo_text else {}
    )
    return CompiledStats(
        **_memory_fields(memory),
        **_cost_fields(cost),
        collectives=collectives,
        **_header_fields(hlo_text),
    )


def _call_optional(fn: Any) -> Any:
    """Calls an introspection method; backends that cannot answer give None, not an error."""
    try:
        return fn()
    except (NotImplementedError, RuntimeError):  # jax.errors.JaxRuntimeError is a RuntimeError
        return None


def _resolve(obj: Any) -> jax.stages.Compiled:
    if isinstance(obj, jax.stages.Compiled):
        return obj
    if isinstance(obj, jax.stages.Lowered):
        return obj.compile()
    if isinstance(obj, jax.stages.Traced):
        hint = "call .lower().compile() on it first: jax.jit(f).trace(*args).lower().compile()"
    elif callable(obj) and hasattr(obj, "lower"):
        hint = "lower and compile the jitted function first: jax.jit(f).lower(*args).compile()"
    else:
        hint = "pass jax.jit(f).lower(*args).compile() (or the Lowered from .lower(*args))"
    raise TitanaxError(
        f"inspect expects a jax.stages.Compiled or jax.stages.Lowered, got {type(obj).__name__}",
        suggestion=hint,
    )


def inspect(compiled: jax.stages.Compiled | jax.stages.Lowered) -> CompiledStats:
    """Reads per-device memory, FLOPs and collectives from a compiled JAX program.

    Args:
      compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(*args).compile()``), or a
        ``jax.stages.Lowered``, which is compiled here. Abstract arguments
        (``jax.ShapeDtypeStruct`` with ``sharding=``) are enough: nothing is run.

    Returns:
      A :class:`CompiledStats`. Fields the backend cannot report are ``None`` (memory, cost) or
      an empty ``collectives`` mapping (no HLO text).

    Raises:
      TitanaxError: if ``compiled`` is neither a ``Compiled`` nor a ``Lowered``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> stats = inspect(jax.jit(jnp.sin).lower(jnp.ones((4,))))
      >>> stats.argument_bytes, stats.count("all-gather")
      (16, 0)
      >>> print(stats)  # doctest: +SKIP
    """
    exe = _resolve(compiled)
    memory = _call_optional(exe.memory_analysis)
    cost = _call_optional(exe.cost_analysis)
    text = _call_optional(exe.as_text)
    return _stats_from(memory, cost, text if isinstance(text, str) else None)

