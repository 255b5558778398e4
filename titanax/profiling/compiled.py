"""What XLA actually built: memory, cost and collectives read from a compiled program.

Everything here is read from the compiled executable, never estimated from the Python program:

* memory from ``Compiled.memory_analysis()`` (XLA's buffer assignment),
* FLOPs and bytes accessed from ``Compiled.cost_analysis()`` (XLA's HLO cost model),
* collectives by parsing the optimized, SPMD-partitioned HLO text (``Compiled.as_text()``):
  counts and bytes per run of the program (one step), a loop body counted once per trip.

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
_MODULE_HEADER = re.compile(r"^\s*HloModule\s+([^\s,]+)(?P<rest>.*)$", re.MULTILINE)
_NUM_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")


# Computation header: `[ENTRY] [%]name (params) -> shape {` (optimized text) or `name {` (lowered).
_COMPUTATION_HEAD = re.compile(r"^(ENTRY\s+)?%?([^\s({]+)")
# Attributes naming called computations: `calls=%f`, `body=%b`, `branch_computations={%a, %b}`, ...
_CALLEE_ATTRS: tuple[str, ...] = (
    "calls", "to_apply", "body", "condition", "branch_computations", "true_computation",
    "false_computation", "called_computations",
)
_CALLEE_VALUE = re.compile(r"\{[^}]*\}|%?[\w.\-]+")
_CALLEE_NAME = re.compile(r"%?([\w.\-]+)")
# XLA's while-loop analysis writes the trip count it proved into the while's backend_config:
# `backend_config={..."known_trip_count":{"n":"80"}}` (CPU and GPU).
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_KIND_INDEX = {kind: i for i, kind in enumerate(COLLECTIVE_KINDS)}
_NKINDS = len(COLLECTIVE_KINDS)


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


def _instruction(line: str) -> tuple[int, int, str] | None:
    """Parses the head of one HLO instruction line: (shape start, shape end, opcode), else None."""
    head = _INSTR_HEAD.match(line)
    if head is None:
        return None
    start = head.end()
    end = _split_shape(line, start)
    op = _OPCODE.match(line, end)
    if op is None:
        return None
    return start, end, op.group(1)


def _parse_collective(line: str) -> tuple[str, str | None, int] | None:
    """Parses one HLO line; returns (kind, suffix, result bytes) for a collective, else None."""
    inst = _instruction(line)
    if inst is None:
        return None
    start, end, opcode = inst
    parts = _OPCODE_PARTS.match(opcode)
    if parts is None:
        return None
    return parts["kind"], parts["suffix"], shape_bytes(line[start:end])


class _Computation:
    """One HLO computation: its own collectives and the computations it calls.

    A large module holds tens of thousands of computations, mostly fusions that call nothing:
    those share one empty tuple instead of allocating lists (see :meth:`edges`)."""

    __slots__ = ("branches", "callees", "calls", "loops", "own")

    def __init__(self) -> None:
        # counts then bytes per kind, executed once per run of this computation; None if none
        self.own: list[int] | None = None
        # run once per run of this computation (fusion, call, custom-call, async wrapper)
        self.calls: list[str] = _NO_CALLS  # type: ignore[assignment]
        # (body, condition, trip count or None) per while
        self.loops: list[tuple[str | None, str | None, int | None]] = _NO_CALLS  # type: ignore[assignment]
        # one list of branches per conditional: exactly one of them runs
        self.branches: list[list[str]] = _NO_CALLS  # type: ignore[assignment]
        self.callees: list[str] = _NO_CALLS  # type: ignore[assignment]  # every name above

    def edges(self) -> _Computation:
        """Gives this computation lists of its own, before its first call edge is added."""
        if self.callees is _NO_CALLS:
            self.calls, self.loops, self.branches, self.callees = [], [], [], []
        return self


_NO_CALLS: tuple[()] = ()


def _callees(line: str) -> dict[str, list[str]]:
    """Attribute -> called computation names, for one instruction line."""
    out: dict[str, list[str]] = {}
    for attr in _CALLEE_ATTRS:  # str.find per attribute: far faster than one regex alternation
        pos = line.find(attr + "=")
        while pos > 0 and line[pos - 1] not in " ,":  # part of a longer word: look further
            pos = line.find(attr + "=", pos + 1)
        if pos <= 0:
            continue
        value = _CALLEE_VALUE.match(line, pos + len(attr) + 1)
        if value is None:
            continue
        text = value.group(0)
        out[attr] = _CALLEE_NAME.findall(text[1:-1]) if text[0] == "{" else [text.lstrip("%")]
    return out


def _add_scaled(acc: list[int], vec: list[int], factor: int) -> None:
    for i, v in enumerate(vec):
        if v:
            acc[i] += factor * v


def _weight(vec: list[int] | None) -> tuple[int, int]:
    """Order of conditional branches: bytes, then count."""
    if vec is None:
        return (0, 0)
    return (sum(vec[_NKINDS:]), sum(vec[:_NKINDS]))


def _parse_module(hlo_text: str) -> tuple[dict[str, _Computation], list[int]]:
    """One pass over the lines: computations with their own collectives and call edges, plus the
    per-appearance totals (counts then bytes per kind)."""
    outside = _Computation()  # lines outside any computation (a fragment of a module)
    comps: dict[str, _Computation] = {"": outside}
    static = [0] * (2 * _NKINDS)
    current = outside
    for line in hlo_text.splitlines():
        if not line:
            continue
        if line[0] not in " \t":  # computation headers and closing braces are not indented
            if line[0] == "}" and not line[1:].strip():
                current = outside
                continue
            if line.endswith("{"):
                head = _COMPUTATION_HEAD.match(line)
                if head is not None and head.group(2) != "HloModule":
                    name = head.group(2)
                    current = comps.get(name) or comps.setdefault(name, _Computation())
                    continue
        if "all-" in line or "collective-" in line or "reduce-scatter" in line:
            parsed = _parse_collective(line)
            if parsed is not None and parsed[1] != "-start":
                kind, _, nbytes = parsed
                i = _KIND_INDEX[kind]
                static[i] += 1
                static[_NKINDS + i] += nbytes
                if current.own is None:
                    current.own = [0] * (2 * _NKINDS)
                current.own[i] += 1
                current.own[_NKINDS + i] += nbytes
        if "calls=" in line or "body=" in line or "to_apply=" in line or "_computation" in line:
            callees = _callees(line)
            if not callees:
                continue
            current.edges()
            if "body" in callees:  # only a while has body= (and condition=)
                trips = _TRIP_COUNT.search(line)
                body, cond = callees.get("body", [None])[0], callees.get("condition", [None])[0]
                current.loops.append((body, cond, int(trips.group(1)) if trips else None))
                current.callees.extend(n for n in (body, cond) if n is not None)
            elif "branch_computations" in callees or "true_computation" in callees:
                branch = (callees.get("branch_computations")
                          or callees.get("true_computation", []) + callees.get("false_computation", []))
                current.branches.append(branch)
                current.callees.extend(branch)
            elif "async-done(" in line or "async-update(" in line:
                continue  # the wrapped computation runs once, counted at its async-start
            else:
                for names in callees.values():
                    current.calls.extend(names)
                    current.callees.extend(names)
    return comps, static


def _execution_totals(comps: dict[str, _Computation]) -> tuple[list[int], int]:
    """Collectives per run of the program (counts then bytes per kind), and the number of while
    loops of unknown trip count whose body or condition holds a collective.

    Computations are evaluated callees first (an iterative depth-first walk, each computation
    once, so the work is linear in the number of call edges). The program's roots are the
    computations nothing calls: the ENTRY, plus any computation whose caller this parser does
    not recognise (counted once, as before), plus lines outside any computation.
    """
    called: set[str] = set()
    for comp in comps.values():
        if comp.callees:
            called.update(comp.callees)
    totals: dict[str, list[int] | None] = {}
    visiting: set[str] = set()
    unknown_loops = 0

    def finish(comp: _Computation) -> list[int] | None:
        nonlocal unknown_loops
        acc = list(comp.own) if comp.own is not None else [0] * (2 * _NKINDS)
        found = comp.own is not None
        for name in comp.calls:
            vec = totals.get(name)
            if vec is not None:
                _add_scaled(acc, vec, 1)
                found = True
        for body, cond, trips in comp.loops:
            body_vec = totals.get(body) if body is not None else None
            cond_vec = totals.get(cond) if cond is not None else None
            if trips is None and any((body_vec or [0])[:_NKINDS] + (cond_vec or [0])[:_NKINDS]):
                unknown_loops += 1
            # The condition runs once more than the body; an unknown loop counts each once.
            if body_vec is not None:
                _add_scaled(acc, body_vec, 1 if trips is None else trips)
                found = True
            if cond_vec is not None:
                _add_scaled(acc, cond_vec, 1 if trips is None else trips + 1)
                found = True
        for branch in comp.branches:
            heaviest = max((totals.get(name) for name in branch), key=_weight, default=None)
            if heaviest is not None:
                _add_scaled(acc, heaviest, 1)
                found = True
        return acc if found else None

    result = [0] * (2 * _NKINDS)
    for root, comp in comps.items():
        if root in called:
            continue
        if not comp.callees:  # most computations: a fusion or a combiner nothing else hangs on
            if comp.own is not None:
                _add_scaled(result, comp.own, 1)
            continue
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            name, done = stack.pop()
            if done:
                totals[name] = finish(comps[name])
                visiting.discard(name)
                continue
            if name in totals or name in visiting:
                continue  # evaluated already, or a call cycle (malformed text)
            comp = comps.get(name)
            if comp is None:
                continue  # named but not in the text
            if not comp.callees:
                totals[name] = comp.own
                continue
            visiting.add(name)
            stack.append((name, True))
            stack.extend((callee, False) for callee in comp.callees if callee not in totals)
        vec = totals.get(root)
        if vec is not None:
            _add_scaled(result, vec, 1)
    return result, unknown_loops


def _count(hlo_text: str) -> tuple[dict[str, CollectiveStats], int]:
    """count_collectives plus the number of while loops of unknown trip count holding collectives."""
    if not isinstance(hlo_text, str):
        raise TitanaxError(
            f"count_collectives expects HLO text (str), got {type(hlo_text).__name__}",
            suggestion="pass compiled.as_text(), or use titanax.profiling.inspect(compiled)",
        )
    comps, static = _parse_module(hlo_text)
    per_run, unknown_loops = _execution_totals(comps)
    stats = {
        kind: CollectiveStats(per_run[i], per_run[_NKINDS + i], static[i], static[_NKINDS + i])
        for i, kind in enumerate(COLLECTIVE_KINDS)
    }
    return stats, unknown_loops


def count_collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    """Counts the collectives one run of an HLO program executes, and the bytes each kind produces
    per device.

    Reads the text of an optimized (SPMD-partitioned) module, e.g. ``Compiled.as_text()``: every
    instruction whose opcode is one of :data:`COLLECTIVE_KINDS`, in the entry computation, a
    fusion, a ``while`` body or an async wrapper computation. ``count``/``bytes`` are per
    **execution** of the program (one step of a step function), found by weighting each
    computation by how many times one run executes it:

    * a ``while`` body (``lax.scan``, ``fori_loop``) runs once per trip, as XLA's while-loop
      analysis wrote it in the loop's ``backend_config`` (``"known_trip_count":{"n":"80"}``);
      its condition runs trips + 1 times; nested loops multiply;
    * a ``while`` whose trip count XLA does not know (a ``lax.while_loop`` on data, or lowered,
      not yet optimized, text) counts its body and condition **once**, so the figures are then
      lower bounds; :attr:`CompiledStats.unknown_trip_loops` counts such loops;
    * a ``conditional`` counts its heaviest branch (most bytes, then most ops) once: an upper
      bound for the branch actually taken;
    * fusions, ``call``, ``custom-call`` and async wrappers (``async-start ... calls=``) run
      their computation once per call; reduction combiners (``to_apply=``) hold no collectives.

    ``static_count``/``static_bytes`` count each instruction once per appearance in the text
    instead, as this function did before it knew about loops. Async pairs
    (``all-gather-start``/``all-gather-done``) count once, at the ``-done``, whose result is the
    collective's output; generic ``async-start``/``async-done`` wrappers are not counted
    themselves, the collective inside the wrapped computation is. Computations that nothing
    calls in a recognised way, and lines outside any computation (a fragment of a module), count
    once. One pass over the lines, then a walk over the call graph: linear in the text's size.

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
    per trip**, so a ``lax.scan`` over N layers reports about one layer's FLOPs. Collectives,
    read from the HLO text by :func:`count_collectives`, are the other way round: counts and
    bytes are **per run of the program (one step), per device, with a loop body counted once per
    trip**, so a scanned 80-layer stack's per-layer all-gather counts 80 times. Where XLA does
    not know a loop's trip count, its body counts once and :attr:`unknown_trip_loops` says how
    many such loops there are (the collective figures are then lower bounds: "at least").

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
      collectives: kind -> :class:`CollectiveStats` for every kind in :data:`COLLECTIVE_KINDS`
        (``count``/``bytes`` per step, loops counted per trip; ``static_count``/``static_bytes``
        once per op in the text); empty when the backend gave no HLO text.
      unknown_trip_loops: ``while`` loops whose trip count XLA does not know and whose body or
        condition holds a collective; each was counted as if it ran once, so when this is
        above 0 the collective counts and bytes are lower bounds.
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
    unknown_trip_loops: int = 0

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
            lines.append("  collectives per step (a loop body counted once per trip)")
            if self.unknown_trip_loops:
                n = self.unknown_trip_loops
                lines.append(f"    at least: {n} loop{'s' if n != 1 else ''} of unknown trip count "
                             f"{'were' if n != 1 else 'was'} counted once")
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
    collectives: Mapping[str, CollectiveStats] = {}
    unknown_loops = 0
    if isinstance(hlo_text, str) and hlo_text:
        collectives, unknown_loops = _count(hlo_text)
    return CompiledStats(
        **_memory_fields(memory),
        **_cost_fields(cost),
        collectives=collectives,
        unknown_trip_loops=unknown_loops,
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

