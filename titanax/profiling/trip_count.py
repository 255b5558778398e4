"""How many times a ``while`` loop's body runs: the trip count XLA proved, or one read off the loop.

XLA's while-loop analysis writes the trip count it proved into the loop's ``backend_config``
(``"known_trip_count":{"n":"80"}``, on CPU and GPU); a ``lax.scan`` or ``fori_loop`` with static
bounds always gets one in optimized HLO. Where it is missing (lowered, not yet optimized text, or
a loop XLA left unannotated) the count is derived from the loop itself when it has the shape of a
counted loop: the condition compares one element of the loop state against a constant, the state
starts that element at a constant, and the body adds a constant to it (each possibly behind a
``copy``/``convert`` or wrapped in a one-op fusion). Anything else (a ``lax.while_loop`` on data)
has no known count: None.

Example:
  >>> from titanax.profiling.hlo import parse_hlo
  >>> m = parse_hlo('%w = (s32[]) while(%t), condition=%c, body=%b, backend_config={"known_trip_count":{"n":"12"}}')
  >>> trip_count(m.outside.instructions[0], m.outside, m)
  12
"""

from __future__ import annotations

import re

from titanax.profiling.hlo import Computation, HloModule, Instruction

__all__ = ["trip_count"]

_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_INT = re.compile(r"^\s*(-?\d+)\s*$")
# Value-preserving ops that may stand between a loop counter and its use.
_PASS_THROUGH = frozenset({"copy", "convert", "bitcast", "reshape"})
_FLIPPED = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "EQ": "EQ", "NE": "NE"}

# A term of a counted loop: an int (a constant) or ("counter", k) for element k of the state.
_Term = int | tuple[str, int] | None


def _term(comp: Computation, name: str, outer: tuple[Computation, Instruction] | None = None,
          depth: int = 0) -> _Term:
    """What one operand is: a constant, element k of the loop state (``get-tuple-element`` of
    the computation's parameter), or unknown. Inside a fusion, parameters stand for the fusion's
    operands in ``outer``."""
    inst = comp.by_name.get(name)
    while inst is not None and inst.opcode in _PASS_THROUGH and inst.operands and depth < 16:
        inst, depth = comp.by_name.get(inst.operands[0]), depth + 1
    if inst is None:
        return None
    if inst.opcode == "constant":
        match = _INT.match(inst.literal)
        return int(match.group(1)) if match else None
    if inst.opcode == "parameter" and outer is not None:
        caller, fusion = outer
        number = int(inst.literal) if inst.literal.strip().isdigit() else -1
        if 0 <= number < len(fusion.operands):
            return _term(caller, fusion.operands[number], None, depth + 1)
        return None
    if inst.opcode == "get-tuple-element" and inst.operands and outer is None:
        source = comp.by_name.get(inst.operands[0])
        index = inst.attr("index")
        if source is not None and source.opcode == "parameter" and index and index.isdigit():
            return ("counter", int(index))
    return None


def _binary(comp: Computation, inst: Instruction, module: HloModule) -> tuple[str, str | None, list[_Term]]:
    """``(opcode, direction, terms)`` of an instruction, looking into a one-op fusion."""
    if inst.opcode == "fusion":
        fused = module.computations.get((inst.callees.get("calls") or [""])[0])
        root = fused.root if fused is not None else None
        if root is None:
            return "fusion", None, []
        return root.opcode, root.attr("direction"), [_term(fused, o, (comp, inst)) for o in root.operands]
    return inst.opcode, inst.attr("direction"), [_term(comp, o) for o in inst.operands]


def _element(comp: Computation, name: str, index: int) -> Instruction | None:
    """Element ``index`` of the tuple built by instruction ``name`` (through copies)."""
    inst = comp.by_name.get(name)
    while inst is not None and inst.opcode == "copy" and inst.operands:
        inst = comp.by_name.get(inst.operands[0])
    if inst is None or inst.opcode != "tuple" or index >= len(inst.operands):
        return None
    return comp.by_name.get(inst.operands[index])


def _count(direction: str, start: int, step: int, bound: int) -> int | None:
    """Trips of ``for (i = start; i <direction> bound; i += step)``; None if it never ends."""
    if direction in ("LT", "LE"):
        if step <= 0:
            return None if start < bound or (direction == "LE" and start == bound) else 0
        last = bound - 1 if direction == "LT" else bound
        return max(0, (last - start) // step + 1)
    if direction in ("GT", "GE"):
        if step >= 0:
            return None if start > bound or (direction == "GE" and start == bound) else 0
        last = bound + 1 if direction == "GT" else bound
        return max(0, (start - last) // -step + 1)
    if direction == "NE" and step != 0 and (bound - start) % step == 0 and (bound - start) // step >= 0:
        return (bound - start) // step
    return None


def _derived(inst: Instruction, caller: Computation, module: HloModule) -> int | None:
    cond = module.computations.get((inst.callees.get("condition") or [""])[0])
    body = module.computations.get((inst.callees.get("body") or [""])[0])
    if cond is None or body is None or cond.root is None or body.root is None or not inst.operands:
        return None
    op, direction, terms = _binary(cond, cond.root, module)
    if op != "compare" or direction not in _FLIPPED or len(terms) != 2:
        return None
    if isinstance(terms[0], tuple) and isinstance(terms[1], int):
        (_, k), bound = terms[0], terms[1]
    elif isinstance(terms[1], tuple) and isinstance(terms[0], int):
        (_, k), bound, direction = terms[1], terms[0], _FLIPPED[direction]
    else:
        return None
    init = _element(caller, inst.operands[0], k)
    start = _term(caller, init.name) if init is not None else None
    update = body.root.operands[k] if body.root.opcode == "tuple" and k < len(body.root.operands) else None
    update_inst = body.by_name.get(update) if update else None
    if not isinstance(start, int) or update_inst is None:
        return None
    op, _, terms = _binary(body, update_inst, module)
    if op not in ("add", "subtract") or len(terms) != 2 or ("counter", k) not in terms:
        return None
    other = terms[1] if terms[0] == ("counter", k) else terms[0]
    if not isinstance(other, int) or (op == "subtract" and terms[0] != ("counter", k)):
        return None
    return _count(direction, start, other if op == "add" else -other, bound)


def trip_count(inst: Instruction, caller: Computation, module: HloModule) -> int | None:
    """How many times one run of a ``while`` instruction runs its body.

    Args:
      inst: the ``while`` instruction.
      caller: the computation holding it (where the loop's initial state is built).
      module: the module (for the loop's body and condition).

    Returns:
      The trip count XLA recorded (``known_trip_count``), else one derived from a counted loop's
      constant start, step and bound, else None.

    Example:
      >>> from titanax.profiling.hlo import parse_hlo
      >>> m = parse_hlo('''HloModule m
      ... cond {
      ...   p = (s32[]) parameter(0)
      ...   i = s32[] get-tuple-element(p), index=0
      ...   n = s32[] constant(10)
      ...   ROOT lt = pred[] compare(i, n), direction=LT
      ... }
      ... body {
      ...   p = (s32[]) parameter(0)
      ...   i = s32[] get-tuple-element(p), index=0
      ...   two = s32[] constant(2)
      ...   next = s32[] add(i, two)
      ...   ROOT t = (s32[]) tuple(next)
      ... }
      ... ENTRY main {
      ...   zero = s32[] constant(0)
      ...   init = (s32[]) tuple(zero)
      ...   ROOT w = (s32[]) while(init), condition=cond, body=body
      ... }''')
      >>> trip_count(m.computations["main"].root, m.computations["main"], m)
      5
    """
    known = _KNOWN_TRIP_COUNT.search(inst.attributes)
    if known is not None:
        return int(known.group(1))
    return _derived(inst, caller, module)
