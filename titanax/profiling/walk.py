"""One run of an HLO program, added up: each computation's cost and collectives times the number of
times it runs.

Every computation gets a vector, ``[flops, transcendentals, bytes accessed, collective counts per
kind..., collective bytes per kind...]``: its own instructions' (:mod:`titanax.profiling.op_cost`)
plus what its calls add, evaluated callees first:

* a fusion adds its fused computation's FLOPs and collectives; its bytes are the fusion's own,
  measured at its boundary (what is fused never touches memory);
* a ``call`` or ``async-start`` adds everything its computation does, once;
* a ``while`` adds its body once per trip and its condition once per trip plus once (the test
  that ends the loop), with the trip count of :func:`titanax.profiling.trip_count.trip_count`;
  nested loops multiply. A loop of unknown trip count adds body and condition once and is
  counted in :attr:`ProgramTotals.unknown_trip_loops` (the figures are then lower bounds);
* a ``conditional`` runs one branch, unknown until run time, so it adds the most any branch
  could: for cost, the largest FLOPs, transcendentals and bytes over its branches (property by
  property, as XLA's cost model does); for collectives, the branch that moves the most bytes
  (then the most ops), so that counts and bytes describe one branch that can run. An upper
  bound, counted in :attr:`ProgramTotals.conditionals`. A pipeline slot's conditional says in its
  op name how often its busy branch runs (:func:`titanax.parallel.busy.busy_share`, from the
  schedule table); it adds each branch weighted by its share, which is what the average device of
  the pipeline executes (:attr:`ProgramTotals.weighted_conditionals`);
* a combiner (``to_apply=`` of a reduce, an all-reduce) or a ``custom-call``'s computations add
  only collectives: the instruction itself already charges its combiner per application, and
  XLA does not look into custom calls.

The walk also returns the same figures counted the way XLA's cost model counts them, every loop
body and condition once (:attr:`ProgramTotals.once`), so a caller can correct XLA's own numbers by
exactly the work it leaves out. The program's roots are the computations nothing calls: the
ENTRY, any computation whose caller is not recognised, and lines outside any computation.

Given a ``group`` function, the walk also splits every collective's count and bytes by the key
that function gives the instruction (:attr:`ProgramTotals.groups`; the mesh axes a collective
spans, for :func:`titanax.profiling.axes.collectives_by_axis`). The keyed figures travel through
the same walk as extra entries of the vectors, so per kind they add up to the totals exactly,
loops, fusions and conditionals included (a conditional's branch is chosen by the per-kind
entries alone).

Example:
  >>> from titanax.profiling.hlo import parse_hlo
  >>> totals = program_totals(parse_hlo(
  ...     '%w = (s32[]) while(%t), condition=%c, body=%b, backend_config={"known_trip_count":{"n":"3"}}'))
  >>> totals.unknown_trip_loops, totals.conditionals
  (0, 0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from fractions import Fraction

from titanax.parallel.busy import busy_share
from titanax.profiling.hlo import Computation, HloModule, Instruction, shape_bytes
from titanax.profiling.op_cost import (
    COLLECTIVE_KINDS,
    collective_kind,
    instruction_cost,
)
from titanax.profiling.trip_count import trip_count

__all__ = ["BYTES", "COUNTS", "FLOPS", "KIND_BYTES", "TRANSCENDENTALS", "WIDTH", "GroupKey",
           "ProgramTotals", "program_totals"]

_NKINDS = len(COLLECTIVE_KINDS)
#: Positions in a totals vector.
FLOPS, TRANSCENDENTALS, BYTES = 0, 1, 2
#: Collective counts per kind start here, in the order of ``COLLECTIVE_KINDS``; bytes follow.
COUNTS = 3
KIND_BYTES = COUNTS + _NKINDS
WIDTH = COUNTS + 2 * _NKINDS
_KIND_INDEX = {kind: i for i, kind in enumerate(COLLECTIVE_KINDS)}
_COST = range(FLOPS, COUNTS)

#: ``group(instruction, computation)``: a key to split a collective's figures by.
GroupKey = Callable[[Instruction, Computation], Hashable]


@dataclasses.dataclass(frozen=True)
class ProgramTotals:
    """Cost and collectives of one run of an HLO program, on one device.

    Attributes:
      per_run: the totals vector (see the module's docstring for its layout) of one run: loop
        bodies once per trip, conditionals at their heaviest branch (a pipeline slot's by its
        busy share).
      once: the same counted as XLA's cost model counts it: every loop body and condition once.
      static: collective counts and bytes counting each instruction once per appearance in the
        text, wherever it sits (cost entries 0).
      unknown_trip_loops: ``while`` instructions whose trip count is unknown (each counted as if
        it ran once, so ``per_run`` is a lower bound when this is above 0).
      conditionals: ``conditional`` instructions, each counted at its heaviest branch.
      weighted_conditionals: ``conditional`` instructions of a pipeline slot, each branch counted
        by the share of runs the schedule gives it (per-run figures can then be fractional; they
        are rounded to whole numbers at the end).
      groups: ``(kind, key) -> (count, bytes, static_count, static_bytes)`` for the key the walk's
        ``group`` function gave each collective (empty without one); per kind, the groups add up
        to ``per_run`` and ``static``.
    """

    per_run: tuple[int, ...]
    once: tuple[int, ...]
    static: tuple[int, ...]
    unknown_trip_loops: int = 0
    conditionals: int = 0
    groups: dict[tuple[str, Hashable], tuple[int, int, int, int]] = dataclasses.field(
        default_factory=dict)
    weighted_conditionals: int = 0


# One call edge: (kind, callee names, trip count or busy share). Kinds: "fusion", "call",
# "combiner", "while" (callees: body then condition; a trip count), "conditional" (callees: the
# branches, a false/true pair in that order; the true branch's busy share, if the op name has one).
_Edge = tuple[str, list[str], int | Fraction | None]


def _own_and_edges(comp: Computation, module: HloModule, costs: bool, static: list[int],
                   group: GroupKey | None = None, slots: dict[tuple[str, Hashable], int] | None = None,
                   keyed: list[tuple[int, int]] | None = None) -> tuple[list[int], list[_Edge]]:
    """The computation's own figures and its calls; with ``group``, each collective's slot (in
    ``slots``, numbered as first seen) and bytes are appended to ``keyed``."""
    own = [0] * WIDTH
    edges: list[_Edge] = []
    for inst in comp.instructions:
        op = inst.opcode
        kind = collective_kind(op)
        if kind is not None and kind[1] != "-start":  # an async pair counts once, at its -done
            i = _KIND_INDEX[kind[0]]
            nbytes = shape_bytes(inst.shape)
            own[COUNTS + i] += 1
            own[KIND_BYTES + i] += nbytes
            static[COUNTS + i] += 1
            static[KIND_BYTES + i] += nbytes
            if group is not None:
                slot = slots.setdefault((kind[0], group(inst, comp)), len(slots))
                keyed.append((slot, nbytes))
        if costs:
            flops, trans, nbytes = instruction_cost(inst, comp, module)
            own[FLOPS] += flops
            own[TRANSCENDENTALS] += trans
            own[BYTES] += nbytes
        callees = inst.callees
        if not callees or op in ("async-done", "async-update"):
            continue  # an async wrapper's computation runs once, counted at its async-start
        if "body" in callees:
            edges.append(("while", [callees["body"][0], (callees.get("condition") or [""])[0]],
                          trip_count(inst, comp, module)))
        elif "branch_computations" in callees or "true_computation" in callees:
            branches = (callees.get("branch_computations")  # lax.cond: index 0 false, 1 true
                        or callees.get("false_computation", []) + callees.get("true_computation", []))
            edges.append(("conditional", branches, busy_share(inst.op_name) if len(branches) == 2 else None))
        elif op == "fusion":
            edges.append(("fusion", callees.get("calls", []), None))
        elif op in ("call", "async-start"):
            edges.append(("call", [n for names in callees.values() for n in names], None))
        else:
            edges.append(("combiner", [n for names in callees.values() for n in names], None))
    return own, edges


def _add(acc: list[int], vec: list[int], factor: int, indices: range | list[int]) -> None:
    if factor:
        for i in indices:
            if vec[i]:
                acc[i] += factor * vec[i]


def _heaviest(vecs: list[list[int]], width: int) -> list[int]:
    """Cost entries: the largest over the branches; collective entries: the heaviest branch's."""
    out = [0] * width
    if not vecs:
        return out
    for i in _COST:
        out[i] = max(v[i] for v in vecs)
    # chosen by the per-kind entries only, so that grouped walks pick the branch ungrouped ones do
    heaviest = max(vecs, key=lambda v: (sum(v[KIND_BYTES:WIDTH]), sum(v[COUNTS:KIND_BYTES])))
    for i in range(COUNTS, width):
        out[i] = heaviest[i]
    return out


def program_totals(module: HloModule, *, costs: bool = True,
                   group: GroupKey | None = None) -> ProgramTotals:
    """Adds up one run of a parsed HLO program: cost and collectives, loops per trip.

    Args:
      module: the parsed module (:func:`titanax.profiling.hlo.parse_hlo`).
      costs: also cost every instruction (FLOPs, transcendentals, bytes accessed); ``False``
        counts collectives only, which is quicker on large modules.
      group: ``group(instruction, computation) -> key``, called once per collective instruction
        (at the ``-done`` of an async pair) to split the collectives by key
        (:attr:`ProgramTotals.groups`); None splits nothing.

    Returns:
      A :class:`ProgramTotals`. Linear in the size of the module: each computation is evaluated
      once, callees first, by an iterative walk (no recursion limit on deep call chains).

    Example:
      >>> from titanax.profiling.hlo import parse_hlo
      >>> program_totals(parse_hlo("%n = f32[8]{0} negate(%p)")).per_run[FLOPS]
      8
    """
    static = [0] * WIDTH
    comps = {"": module.outside, **module.computations}
    slots: dict[tuple[str, Hashable], int] = {}
    keyed: dict[str, list[tuple[int, int]]] = {name: [] for name in comps}
    parts = {name: _own_and_edges(comp, module, costs, static, group, slots, keyed[name])
             for name, comp in comps.items()}
    # Each (kind, key) slot holds a count and bytes after the fixed entries.
    width = WIDTH + 2 * len(slots)
    if slots:
        static.extend([0] * (width - WIDTH))
        for name, (own, _) in parts.items():
            own.extend([0] * (width - WIDTH))
            for slot, nbytes in keyed[name]:
                for vec in (own, static):
                    vec[WIDTH + 2 * slot] += 1
                    vec[WIDTH + 2 * slot + 1] += nbytes
    everything = range(width)
    indices = {"fusion": [i for i in everything if i != BYTES], "call": everything,
               "combiner": range(COUNTS, width)}
    called = {callee for _, edges in parts.values() for _, names, _ in edges for callee in names}
    done: dict[str, tuple[list[int], list[int]]] = {}
    visiting: set[str] = set()
    unknown, conditionals, weighted = 0, 0, 0

    def finish(name: str) -> tuple[list[int], list[int]]:
        nonlocal unknown, conditionals, weighted
        own, edges = parts[name]
        run, once = list(own), list(own)
        for kind, names, trips in edges:
            got = [done[n] for n in names if n in done]
            if kind == "while":
                body = done.get(names[0])
                cond = done.get(names[1]) if len(names) > 1 else None
                if trips is None:
                    unknown += 1
                for vecs, runs in ((body, 1 if trips is None else trips),
                                   (cond, 1 if trips is None else trips + 1)):
                    if vecs is not None:
                        _add(run, vecs[0], runs, everything)
                        _add(once, vecs[1], 1, everything)
            elif kind == "conditional":
                if trips is not None and len(got) == 2:
                    weighted += 1
                    _add(run, got[0][0], 1 - trips, everything)
                    _add(run, got[1][0], trips, everything)
                else:
                    conditionals += 1
                    _add(run, _heaviest([g[0] for g in got], width), 1, everything)
                _add(once, _heaviest([g[1] for g in got], width), 1, everything)
            else:
                for run_vec, once_vec in got:
                    _add(run, run_vec, 1, indices[kind])
                    _add(once, once_vec, 1, indices[kind])
        return run, once

    per_run, once = [0] * width, [0] * width
    for root in parts:
        if root in called:
            continue
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            name, ready = stack.pop()
            if ready:
                done[name] = finish(name)
                visiting.discard(name)
                continue
            if name in done or name in visiting or name not in parts:
                continue  # evaluated already, a call cycle (malformed text), or not in the text
            if not parts[name][1]:
                done[name] = (parts[name][0], parts[name][0])
                continue
            visiting.add(name)
            stack.append((name, True))
            stack.extend((callee, False) for _, names, _ in parts[name][1] for callee in names
                         if callee not in done)
        if root in done:
            _add(per_run, done[root][0], 1, everything)
            _add(once, done[root][1], 1, everything)
    if weighted:
        per_run = [round(x) for x in per_run]
    groups = {key: (per_run[WIDTH + 2 * slot], per_run[WIDTH + 2 * slot + 1],
                    static[WIDTH + 2 * slot], static[WIDTH + 2 * slot + 1])
              for key, slot in slots.items()}
    return ProgramTotals(tuple(per_run[:WIDTH]), tuple(once[:WIDTH]), tuple(static[:WIDTH]),
                         unknown, conditionals, groups, weighted_conditionals=weighted)
