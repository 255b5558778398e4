"""What one HLO instruction costs where it stands: FLOPs, transcendentals and bytes accessed, and
which collective it is.

The rules restate XLA's own cost model (``HloCostAnalysis``), so that a computation's figures
here agree with what ``Compiled.cost_analysis()`` reports for it: an elementwise op costs one
FLOP per output element (a transcendental one, ``exp``/``tanh``/..., one transcendental instead),
a ``dot`` two per multiply-add, a ``reduce`` its combiner's cost once per combined element; an
instruction reads its operands and writes its result, except where XLA knows better (a slice reads
only what it keeps, a ``get-tuple-element`` or ``bitcast`` touches nothing, a fusion reads each
operand once at its boundary and nothing in between). A ``custom-call`` is an unknown (0), except
the cuBLAS matmuls and cuDNN convolutions that dots and convolutions become on GPUs, which cost
what XLA's GPU cost model charges for them: the dot's or convolution's FLOPs.

Nothing here knows how often an instruction runs; :mod:`titanax.profiling.walk` multiplies.

Example:
  >>> from titanax.profiling.hlo import parse_hlo
  >>> m = parse_hlo('''
  ... %a = f32[8,4]{1,0} parameter(0)
  ... %b = f32[4,2]{1,0} parameter(1)
  ... %d = f32[8,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}''')
  >>> instruction_cost(m.outside.instructions[-1], m.outside, m)
  (128, 0, 224)
"""

from __future__ import annotations

import functools
import math
import re

from titanax.profiling.hlo import (
    Computation,
    HloModule,
    Instruction,
    array_leaves,
    shape_bytes,
)

__all__ = ["COLLECTIVE_KINDS", "collective_kind", "cost_size", "fusion_bytes", "instruction_cost"]

COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
    "collective-broadcast",
    "ragged-all-to-all",
)
"""The HLO collective opcodes Titanax counts, in the order tables show them."""

_KIND_ALTERNATION = "|".join(sorted(COLLECTIVE_KINDS, key=len, reverse=True))
_OPCODE_PARTS = re.compile(rf"^(?P<kind>{_KIND_ALTERNATION})(?P<suffix>-start|-done)?$")

_TRANSCENDENTAL = frozenset({
    "erf", "exponential", "log", "logistic", "power", "sqrt", "cbrt", "rsqrt", "tanh", "sine",
    "cosine", "exponential-minus-one", "log-plus-one", "atan2", "tan",
})
_ELEMENTWISE = _TRANSCENDENTAL | frozenset({
    "abs", "add", "and", "bitcast-convert", "ceil", "clamp", "clz", "compare", "complex", "convert", "divide",
    "floor", "imag", "is-finite", "maximum", "minimum", "multiply", "negate", "not", "or",
    "popcnt", "real", "reduce-precision", "remainder", "round-nearest-afz", "round-nearest-even",
    "select", "shift-left", "shift-right-arithmetic", "shift-right-logical", "sign",
    "stochastic-convert", "subtract", "xor",
})
# Pointers, not data: XLA charges no memory traffic for these.
_FREE = frozenset({"parameter", "constant", "get-tuple-element", "bitcast", "after-all",
                   "add-dependency", "domain"})
# Their cost is their called computations', added by the walk.
_CALLERS = frozenset({"while", "conditional", "call", "async-start"})
_POINTER_BYTES = 8
_DIMS = re.compile(r"\d+")
_WINDOW_FIELD = re.compile(r"(\w+)=([\w_\-]+)")
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]')


def collective_kind(opcode: str) -> tuple[str, str | None] | None:
    """``(kind, suffix)`` for a collective opcode (``"all-gather-start"`` -> ``("all-gather",
    "-start")``), else None.

    Example:
      >>> collective_kind("all-reduce"), collective_kind("add")
      (('all-reduce', None), None)
    """
    parts = _OPCODE_PARTS.match(opcode)
    return None if parts is None else (parts["kind"], parts["suffix"])


def _first_elements(shape: str) -> int:
    """Elements of an array shape, or of a tuple's first array."""
    leaves = array_leaves(shape)
    return math.prod(leaves[0][1]) if leaves else 0


def _tuple_arity(shape: str) -> int:
    depth, arity = 0, 1
    for ch in shape.strip()[1:-1]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            arity += 1
    return arity


@functools.lru_cache(maxsize=1 << 14)
def cost_size(shape: str) -> int:
    """Bytes XLA's cost model charges for touching a value of this shape: an array's size; for a
    tuple only its table of pointers (8 bytes an element), since its elements are not copied.

    Example:
      >>> cost_size("f32[4]{0}"), cost_size("(f32[1024]{0}, s32[])")
      (16, 16)
    """
    if shape.lstrip().startswith("("):
        return _POINTER_BYTES * _tuple_arity(shape)
    return shape_bytes(shape)


def _operand_shape(comp: Computation, name: str) -> str:
    inst = comp.by_name.get(name)
    return inst.shape if inst is not None else ""


def _dims_attr(inst: Instruction, key: str) -> list[int]:
    value = inst.attr(key)
    return [int(d) for d in _DIMS.findall(value)] if value else []


def _window_sizes(inst: Instruction) -> list[int]:
    window = inst.attr("window") or ""
    fields = dict(_WINDOW_FIELD.findall(window))
    return [int(d) for d in fields.get("size", "").split("x") if d.isdigit()]


def _dot_flops(inst: Instruction, comp: Computation) -> int:
    lhs = array_leaves(_operand_shape(comp, inst.operands[0])) if inst.operands else ()
    width = 1
    if lhs:
        dims = lhs[0][1]
        for d in _dims_attr(inst, "lhs_contracting_dims"):
            width *= dims[d] if d < len(dims) else 1
    return 2 * _first_elements(inst.shape) * width


def _valid_positions(inp: int, out: int, kernel: int, stride: int, pad_lo: int, base: int,
                     rhs_dil: int) -> int:
    """Kernel-output pairs of one spatial dimension that read a real (not padded or dilated)
    input element; XLA's convolution FLOPs count only those."""
    count = 0
    for k in range(kernel):
        offset = k * rhs_dil - pad_lo
        if base == 1:  # 0 <= o*stride + offset < inp, 0 <= o < out
            lo = max(0, -(offset // stride))
            hi = min(out - 1, (inp - 1 - offset) // stride)
            count += max(0, hi - lo + 1)
            continue
        for o in range(out):
            undilated = o * stride + offset
            if undilated % base == 0 and 0 <= undilated // base < inp:
                count += 1
    return count


def _convolution_flops(inst: Instruction, comp: Computation) -> int:
    labels = (inst.attr("dim_labels") or "").split("->")
    if len(labels) != 2 or "_" not in labels[0] or len(inst.operands) < 2:
        return 0
    lhs_l, rhs_l = labels[0].split("_")
    out_l = labels[1]
    lhs_leaves = array_leaves(_operand_shape(comp, inst.operands[0]))
    rhs_leaves = array_leaves(_operand_shape(comp, inst.operands[1]))
    out_leaves = array_leaves(inst.shape)
    if not (lhs_leaves and rhs_leaves and out_leaves):
        return 0
    lhs, rhs, out = lhs_leaves[0][1], rhs_leaves[0][1], out_leaves[0][1]
    if not (len(lhs) == len(lhs_l) and len(rhs) == len(rhs_l) and len(out) == len(out_l)):
        return 0
    fields = dict(_WINDOW_FIELD.findall(inst.attr("window") or ""))

    def per_dim(key: str, n: int, default: int) -> list[int]:
        values = [int(v) for v in fields.get(key, "").split("x") if v.lstrip("-").isdigit()]
        return values if len(values) == n else [default] * n

    spatial = [c for c in lhs_l if c.isdigit()]
    n = len(spatial)
    strides, base, rhs_dil = per_dim("stride", n, 1), per_dim("lhs_dilate", n, 1), per_dim("rhs_dilate", n, 1)
    pads = [p.split("_") for p in fields.get("pad", "").split("x")] if "pad" in fields else []
    pad_lo = [int(p[0]) for p in pads] if len(pads) == n else [0] * n
    positions = 1
    for i, c in enumerate(spatial):
        positions *= _valid_positions(lhs[lhs_l.index(c)], out[out_l.index(c)], rhs[rhs_l.index(c)],
                                      strides[i], pad_lo[i], base[i], rhs_dil[i])
    groups = int(inst.attr("feature_group_count") or 1)
    batch_groups = int(inst.attr("batch_group_count") or 1)
    fma = (lhs[lhs_l.index("f")] // groups) * out[out_l.index("f")] * (lhs[lhs_l.index("b")] // batch_groups)
    return 2 * fma * positions


def _applied(module: HloModule, name: str | None) -> tuple[int, int]:
    """FLOPs and transcendentals of one application of a combiner (``to_apply=%add``)."""
    comp = module.computations.get(name) if name else None
    flops = trans = 0
    if comp is not None:
        for inst in comp.instructions:
            if inst.opcode in _ELEMENTWISE:
                count = _first_elements(inst.shape)
                if inst.opcode in _TRANSCENDENTAL:
                    trans += count
                else:
                    flops += count
    return flops, trans


def _callee(inst: Instruction, key: str) -> str | None:
    names = inst.callees.get(key)
    return names[0] if names else None


def instruction_cost(inst: Instruction, comp: Computation, module: HloModule) -> tuple[int, int, int]:
    """``(flops, transcendentals, bytes accessed)`` of one run of one instruction, not counting
    the computations it calls (a fusion's body, a loop's body), which the walk adds.

    Args:
      inst: the instruction.
      comp: the computation holding it (its table gives the operands' shapes).
      module: the module (for combiners such as ``to_apply=%add``, and fused computations).

    Returns:
      The three figures, as XLA's cost model counts them for this instruction.
    """
    op = inst.opcode
    if op in _FREE or op in _CALLERS:
        return 0, 0, 0
    if op == "custom-call":
        return _custom_call_cost(inst, comp)
    if op == "fusion":
        return 0, 0, fusion_bytes(inst, comp, module)
    shapes = [_operand_shape(comp, name) for name in inst.operands]
    nbytes = cost_size(inst.shape) + sum(cost_size(s) for s in shapes)
    flops = trans = 0
    if op in _ELEMENTWISE:
        count = _first_elements(inst.shape)
        if op in _TRANSCENDENTAL:
            trans = count
        else:
            flops = count
    elif op == "dot":
        flops = _dot_flops(inst, comp)
    elif op == "convolution":
        flops = _convolution_flops(inst, comp)
    elif op in ("reduce", "reduce-window", "map", "scatter", "select-and-scatter"):
        flops, trans, nbytes = _applied_cost(inst, comp, module, shapes, nbytes)
    elif op in ("all-reduce", "all-reduce-start"):
        flops = sum(math.prod(dims) for _, dims in array_leaves(inst.shape))
        nbytes = shape_bytes(inst.shape) + sum(cost_size(s) for s in shapes)
    elif op == "sort" and shapes:
        n = _first_elements(shapes[0])
        flops = n * math.ceil(math.log2(n)) if n > 1 else 0
    elif op == "fft" and shapes:
        logs = 1
        for length in _dims_attr(inst, "fft_length"):
            logs *= int(math.log2(length)) if length > 0 else 0
        flops = 2 * 4 * logs * _first_elements(shapes[0])
    elif op == "rng":
        trans = _first_elements(inst.shape)
    elif op == "rng-bit-generator":
        trans = sum(math.prod(dims) for _, dims in array_leaves(inst.shape))
    elif op == "triangular-solve" and len(shapes) == 2:
        a = array_leaves(shapes[0])
        flops = 2 * (a[0][1][-1] if a and a[0][1] else 0) * _first_elements(shapes[1])
        nbytes = cost_size(inst.shape) + cost_size(shapes[0]) // 2 + cost_size(shapes[1])
    elif op == "cholesky" and shapes:
        a = array_leaves(shapes[0])
        flops = ((a[0][1][-1] if a and a[0][1] else 0) * _first_elements(shapes[0])) // 3
        nbytes = cost_size(shapes[0])
    elif op in ("slice", "gather", "dynamic-slice"):
        # only the part kept is read, plus the indices
        nbytes = 2 * cost_size(inst.shape) + (cost_size(shapes[1]) if op != "slice" and len(shapes) > 1 else 0)
    elif op == "dynamic-update-slice" and len(shapes) >= 3:
        nbytes = 2 * cost_size(shapes[1]) + cost_size(shapes[2])  # the rest stays in place
    elif op == "tuple":
        nbytes = cost_size(inst.shape)
    return flops, trans, nbytes


def _custom_call_cost(inst: Instruction, comp: Computation) -> tuple[int, int, int]:
    """A library call XLA's GPU cost model knows (a cuBLAS/hipBLAS matmul, a cuDNN convolution:
    what dots and convolutions become on GPUs) costs what the op it replaces does; any other
    custom call is opaque: 0."""
    target = inst.attr("custom_call_target") or ""
    if "$gemm" in target or "$matmul" in target:
        config = inst.attr("backend_config") or ""
        match = _GEMM_CONTRACTING.search(config)
        lhs = array_leaves(_operand_shape(comp, inst.operands[0])) if inst.operands else ()
        width = 1
        if match and lhs:
            for d in (int(d) for d in _DIMS.findall(match.group(1))):
                width *= lhs[0][1][d] if d < len(lhs[0][1]) else 1
        flops = 2 * _first_elements(inst.shape) * width
    elif "$conv" in target:
        flops = _convolution_flops(inst, comp)
    else:
        return 0, 0, 0
    nbytes = cost_size(inst.shape) + sum(cost_size(_operand_shape(comp, n)) for n in inst.operands)
    return flops, 0, nbytes


def _applied_cost(inst: Instruction, comp: Computation, module: HloModule, shapes: list[str],
                  nbytes: int) -> tuple[int, int, int]:
    """Ops that apply a combiner computation many times: its cost times the applications."""
    op = inst.opcode
    if op == "select-and-scatter":
        source = _first_elements(shapes[1]) if len(shapes) > 1 else 0
        window = math.prod(_window_sizes(inst))
        sel_f, sel_t = _applied(module, _callee(inst, "select"))
        sct_f, sct_t = _applied(module, _callee(inst, "scatter"))
        extra = source * (window - 1)
        return sel_f * extra + sct_f * source, sel_t * extra + sct_t * source, nbytes
    flops, trans = _applied(module, _callee(inst, "to_apply"))
    if op == "reduce":
        count = (_first_elements(shapes[0]) if shapes else 0) - _first_elements(inst.shape)
    elif op == "reduce-window":
        count = (math.prod(_window_sizes(inst)) - 1) * _first_elements(inst.shape)
    elif op == "map":
        count = _first_elements(inst.shape)
    else:  # scatter(operands..., indices, updates...): reads and writes only where it updates
        n = (len(shapes) - 1) // 2
        updates = shapes[n + 1:]
        count = _first_elements(updates[0]) if updates else 0
        nbytes = 3 * sum(cost_size(s) for s in updates) + (cost_size(shapes[n]) if n < len(shapes) else 0)
    return flops * count, trans * count, nbytes


def _users(comp: Computation) -> dict[str, list[Instruction]]:
    users: dict[str, list[Instruction]] = {}
    for inst in comp.instructions:
        for name in dict.fromkeys(inst.operands):  # a user counts once, however many operands
            users.setdefault(name, []).append(inst)
    return users


def _parameter_read_bytes(param: Instruction, users: dict[str, list[Instruction]],
                          module: HloModule, depth: int = 0) -> int:
    """Bytes a fusion reads of one of its parameters: a sliced parameter only the slices, a
    parameter updated in place (operand 0 of a dynamic-update-slice) nothing, else once."""
    size, seen_plain = 0, False
    whole = cost_size(param.shape)
    for user in users.get(param.name, ()):
        op = user.opcode
        if op == "slice":
            size += cost_size(user.shape)
        elif op == "dynamic-slice":
            if user.operands and user.operands[0] == param.name:
                size += cost_size(user.shape)
            elif not seen_plain:
                seen_plain, size = True, size + whole
        elif op == "dynamic-update-slice":
            if (not user.operands or user.operands[0] != param.name) and not seen_plain:
                seen_plain, size = True, size + whole
        elif op in ("broadcast", "reshape"):
            size += whole
        elif op == "fusion" and depth < 8:
            nested = module.computations.get((user.callees.get("calls") or [""])[0])
            if nested is None:
                size += whole
                continue
            nested_users = _users(nested)
            for i, name in enumerate(user.operands):
                if name == param.name and i in nested.parameters:
                    size += _parameter_read_bytes(nested.parameters[i], nested_users, module, depth + 1)
        elif op == "get-tuple-element" and param.shape.lstrip().startswith("("):
            size += _parameter_read_bytes(user, users, module, depth + 1)
        elif not seen_plain:  # other readers share one read
            seen_plain, size = True, size + whole
    return size


def fusion_bytes(inst: Instruction, comp: Computation, module: HloModule) -> int:
    """Bytes a fusion instruction moves: what it reads of each operand and what it writes.

    Intermediate values stay in registers or caches, so only the boundary counts: each output
    array once (a root updating a buffer in place writes only the update), each parameter as
    :func:`_parameter_read_bytes` says, and constants of more than one element once.
    """
    fused = module.computations.get((inst.callees.get("calls") or [""])[0])
    if fused is None:
        return cost_size(inst.shape) + sum(cost_size(_operand_shape(comp, n)) for n in inst.operands)
    root = fused.root
    nbytes = 0
    if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
        nbytes += cost_size(_operand_shape(fused, root.operands[1]))
    elif root is not None and root.opcode == "tuple":
        for name in root.operands:
            element = fused.by_name.get(name)
            if element is not None and element.opcode == "dynamic-update-slice" and len(element.operands) > 1:
                nbytes += cost_size(_operand_shape(fused, element.operands[1]))
            elif element is not None:
                nbytes += shape_bytes(element.shape)
    else:
        nbytes += shape_bytes(inst.shape)
    users = _users(fused)
    for param in fused.parameters.values():
        nbytes += _parameter_read_bytes(param, users, module)
    for fused_inst in fused.instructions:
        if fused_inst.opcode == "constant" and _first_elements(fused_inst.shape) > 1:
            nbytes += shape_bytes(fused_inst.shape)
    return nbytes
