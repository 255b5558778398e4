"""HLO module text read into its structure: computations, their instructions, what each one calls.

The text of an optimized module (``Compiled.as_text()``) or of a lowered one
(``Lowered.as_text(dialect="hlo")``) is parsed once into plain objects: an :class:`HloModule`
holds :class:`Computation` objects by name, each holding its :class:`Instruction` objects in
order, each knowing its result shape, opcode, operand names, attributes and the computations it
calls (``calls=``, ``body=``, ``branch_computations=``, ...). Nothing here knows what an
instruction costs (see :mod:`titanax.profiling.op_cost`) or how often it runs (see
:mod:`titanax.profiling.walk`).

Example:
  >>> module = parse_hlo('''HloModule m
  ... ENTRY %main (p: f32[8]) -> f32[8] {
  ...   %p = f32[8]{0} parameter(0)
  ...   ROOT %n = f32[8]{0} negate(%p)
  ... }''')
  >>> [(i.name, i.opcode, i.operands) for i in module.computations["main"].instructions]
  [('p', 'parameter', ()), ('n', 'negate', ('p',))]
  >>> shape_bytes("(bf16[4,4]{1,0}, f32[])")
  36
"""

from __future__ import annotations

import functools
import math
import re

__all__ = ["Computation", "HloModule", "Instruction", "array_leaves", "parse_hlo", "shape_bytes"]

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
_INSTR_HEAD = re.compile(r"^\s*(ROOT\s+)?%?([A-Za-z_][\w.\-]*)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")
# Most instructions in one match: head, an array result shape (no spaces in it), opcode.
_ARRAY_INSTRUCTION = re.compile(r"\s*(ROOT\s+)?%?([A-Za-z_][\w.\-]*)\s*=\s*([^\s(]\S*)\s+([a-z][a-z0-9\-]*)\(")
_OPERAND_NAME = re.compile(r"[^\s,%]+")
_PARENS = re.compile(r"[()]")
_COMMENT = re.compile(r"/\*.*?\*/")
_MODULE_HEADER = re.compile(r"^\s*HloModule\s+([^\s,]+)(?P<rest>.*)$", re.MULTILINE)
_NUM_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
# Computation header: `[ENTRY] [%]name (params) -> shape {` (optimized text) or `name {` (lowered).
_COMPUTATION_HEAD = re.compile(r"^(ENTRY\s+)?%?([^\s({]+)")
_CALLEE_ATTRS: tuple[str, ...] = (
    "calls", "to_apply", "body", "condition", "branch_computations", "true_computation",
    "false_computation", "called_computations", "select", "scatter",
)
_CALLEE_NAME = re.compile(r"%?([\w.\-]+)")
_CALLEE_HINT = re.compile("|".join(key + "=" for key in _CALLEE_ATTRS))
# Opcodes whose parenthesised text is a literal or an index, not operand names.
_LITERAL_OPCODES = frozenset({"constant", "parameter"})


@functools.lru_cache(maxsize=1 << 14)
def array_leaves(shape: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The arrays of an HLO shape string, in order: ``(element type, dims)`` per array.

    Dynamic dimensions (``<=8``) count at their bound; an unknown dimension (``?``) counts as 0.

    Args:
      shape: e.g. ``"f32[8,16]{1,0}"`` or ``"(s32[], f32[4]{0})"``.

    Returns:
      One ``(dtype, dims)`` pair per array (a scalar has ``dims == ()``).

    Example:
      >>> array_leaves("(s32[], bf16[<=8,4]{1,0})")
      (('s32', ()), ('bf16', (8, 4)))
    """
    leaves = []
    for dtype, dims_text in _ARRAY.findall(shape):
        dims = []
        for dim in dims_text.split(","):
            dim = dim.strip().lstrip("<=")
            if dim:
                dims.append(int(dim) if dim.isdigit() else 0)
        leaves.append((dtype, tuple(dims)))
    return tuple(leaves)


@functools.lru_cache(maxsize=1 << 14)
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
    for dtype, dims in array_leaves(shape):
        bits = _ELEMENT_BITS.get(dtype)
        if bits:
            total += (math.prod(dims) * bits + 7) // 8
    return total


def _closing(text: str, pos: int) -> int:
    """The index of the parenthesis that closes the one at ``text[pos]`` (or the text's end)."""
    close = text.find(")", pos)
    if close >= 0 and text.find("(", pos + 1, close) < 0:  # nothing nested: the common case
        return close
    depth = 0
    for paren in _PARENS.finditer(text, pos):
        depth += 1 if paren.group() == "(" else -1
        if depth == 0:
            return paren.start()
    return len(text)


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets, braces and parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"')


class Instruction:
    """One HLO instruction: ``[ROOT] %name = shape opcode(operands), attributes``.

    Attributes:
      name: the instruction's name, without ``%``.
      shape: the result shape as written (``"f32[8,16]{1,0}"``, a tuple ``"(s32[], ...)"``).
      opcode: e.g. ``"dot"``, ``"fusion"``, ``"all-gather-start"``.
      operands: operand names, without ``%`` (empty for ``parameter`` and ``constant``).
      literal: the parenthesised text of a ``parameter`` (its number) or ``constant`` (its
        value); empty otherwise.
      attributes: everything after the operand list, as written (``", dimensions={0}, ..."``).
      is_root: whether the line starts with ``ROOT``.
    """

    __slots__ = ("_callees", "attributes", "is_root", "literal", "name", "opcode", "operands", "shape")

    def __init__(self, name: str, shape: str, opcode: str, operands: tuple[str, ...], literal: str,
                 attributes: str, is_root: bool) -> None:
        self.name = name
        self.shape = shape
        self.opcode = opcode
        self.operands = operands
        self.literal = literal
        self.attributes = attributes
        self.is_root = is_root
        self._callees: dict[str, list[str]] | None = None

    def __repr__(self) -> str:
        return f"Instruction({self.name!r}, {self.shape!r}, {self.opcode!r}, {self.operands!r})"

    def attr(self, key: str) -> str | None:
        """The raw value of one attribute (``"{1}"`` for ``lhs_contracting_dims={1}``), or None.

        Only the attributes before ``metadata=`` are searched (XLA prints the instruction's own
        attributes first), so an op name in the metadata cannot pass for an attribute, except for
        ``backend_config``, which XLA prints after the metadata.

        Example:
          >>> parse_hlo("%d = f32[2]{0} dot(%a, %b), lhs_contracting_dims={1}").outside.instructions[0].attr(
          ...     "lhs_contracting_dims")
          '{1}'
        """
        text = self.attributes
        pos = text.find(", " + key + "=")
        if pos < 0:
            return None
        if key != "backend_config":
            meta = text.find(", metadata=")
            if 0 <= meta < pos:
                return None
        start = pos + len(key) + 3
        if start >= len(text):
            return ""
        if text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start:i + 1]
            return text[start:]
        if text[start] == '"':
            end = text.find('"', start + 1)
            return text[start:] if end < 0 else text[start:end + 1]
        end = text.find(", ", start)
        return text[start:] if end < 0 else text[start:end]

    @property
    def op_name(self) -> str | None:
        """The ``op_name`` of the instruction's metadata (the JAX name stack, ``"jit(f)/.../dot"``),
        or None."""
        match = _OP_NAME.search(self.attributes)
        return match.group(1) if match else None

    @property
    def callees(self) -> dict[str, list[str]]:
        """Attribute -> names of the computations it calls (``{"body": ["region_0"], ...}``)."""
        if self._callees is None:
            out: dict[str, list[str]] = {}
            text = self.attributes
            if text and _CALLEE_HINT.search(text):
                for key in _CALLEE_ATTRS:
                    value = self.attr(key)
                    if value:
                        names = value[1:-1] if value[0] == "{" else value
                        out[key] = _CALLEE_NAME.findall(names)
            self._callees = out
        return self._callees


class Computation:
    """One HLO computation: its instructions in order and a table of them by name.

    Attributes:
      name: the computation's name, without ``%`` (``""`` for lines outside any computation).
      is_entry: whether the header starts with ``ENTRY``.
      instructions: the instructions, in the order of the text.
      by_name: instruction name -> instruction.
      parameters: parameter number -> its ``parameter(n)`` instruction.
    """

    __slots__ = ("by_name", "instructions", "is_entry", "name", "parameters")

    def __init__(self, name: str, is_entry: bool = False) -> None:
        self.name = name
        self.is_entry = is_entry
        self.instructions: list[Instruction] = []
        self.by_name: dict[str, Instruction] = {}
        self.parameters: dict[int, Instruction] = {}

    def add(self, inst: Instruction) -> None:
        """Appends one instruction (the parser's use; a later name shadows an earlier one)."""
        self.instructions.append(inst)
        self.by_name[inst.name] = inst
        if inst.opcode == "parameter" and inst.literal.strip().isdigit():
            self.parameters[int(inst.literal)] = inst

    def __repr__(self) -> str:
        return f"Computation({self.name!r}, {len(self.instructions)} instructions)"

    @property
    def root(self) -> Instruction | None:
        """The ``ROOT`` instruction, else the last one, else None."""
        for inst in reversed(self.instructions):
            if inst.is_root:
                return inst
        return self.instructions[-1] if self.instructions else None


class HloModule:
    """A parsed HLO module.

    Attributes:
      name: the module's name (``"jit_train_step"``), or None when the text has no header.
      num_partitions: devices the module was partitioned over (1 when not SPMD).
      computations: name -> :class:`Computation`, in the order of the text.
      entry: the ENTRY computation's name, or None.
      outside: the instructions outside any computation (the text was a fragment of a module).
    """

    __slots__ = ("computations", "entry", "name", "num_partitions", "outside")

    def __init__(self) -> None:
        self.name: str | None = None
        self.num_partitions = 1
        self.computations: dict[str, Computation] = {}
        self.entry: str | None = None
        self.outside = Computation("")


def parse_instruction(line: str) -> Instruction | None:
    """Parses one instruction line, or returns None for any other line.

    Args:
      line: e.g. ``"  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %x)"``; operands may carry their
        shapes (``f32[4]{0} %x``) and names may lack ``%`` (lowered text).

    Returns:
      The :class:`Instruction`, or None when the line is not an instruction.
    """
    head = _ARRAY_INSTRUCTION.match(line)
    if head is not None:
        shape, opcode, open_pos = head.group(3), head.group(4), head.end() - 1
    else:  # a tuple-shaped result, `(s32[], f32[4]{0})`
        head = _INSTR_HEAD.match(line)
        if head is None or not line.startswith("(", head.end()):
            return None
        end = _closing(line, head.end()) + 1
        op = _OPCODE.match(line, end)
        if op is None:
            return None
        shape, opcode, open_pos = line[head.end():end], op.group(1), op.end() - 1
    close = _closing(line, open_pos)
    inner = line[open_pos + 1:close]
    if "/*" in inner:  # `/*index=5*/` before every fifth operand
        inner = _COMMENT.sub("", inner)
    literal = ""
    if opcode in _LITERAL_OPCODES:
        operands: tuple[str, ...] = ()
        literal = inner
    elif "[" in inner:
        # typed operands (`f32[4]{0} %x`): the name is the last word of each operand
        operands = tuple(part.split()[-1].lstrip("%") for part in _split_top_level(inner) if part.strip())
    else:
        operands = tuple(_OPERAND_NAME.findall(inner))
    return Instruction(head.group(2), shape, opcode, operands, literal, line[close + 1:],
                       head.group(1) is not None)


def parse_hlo(hlo_text: str) -> HloModule:
    """Parses HLO module text into computations and instructions, in one pass over its lines.

    Lines that are neither a computation header, a closing brace nor an instruction (the
    ``FileNames``/``StackFrames`` tables of newer XLA, comments) are skipped. Instructions outside
    any computation (a fragment of a module, or single lines) go to :attr:`HloModule.outside`.

    Args:
      hlo_text: HLO module text, or any lines of it.

    Returns:
      The :class:`HloModule`.

    Example:
      >>> m = parse_hlo("%w = (s32[]) while(%t), condition=%c, body=%b")
      >>> m.outside.instructions[0].callees
      {'body': ['b'], 'condition': ['c']}
    """
    module = HloModule()
    header = _MODULE_HEADER.search(hlo_text[:20000])
    if header is not None:
        module.name = header.group(1)
        parts = _NUM_PARTITIONS.search(header["rest"])
        module.num_partitions = int(parts.group(1)) if parts else 1
    comps = module.computations
    current = module.outside
    for line in hlo_text.splitlines():
        if not line:
            continue
        if line[0] not in " \t":  # computation headers and closing braces are not indented
            if line[0] == "}" and not line[1:].strip():
                current = module.outside
                continue
            if line.endswith("{"):
                head = _COMPUTATION_HEAD.match(line)
                if head is not None and head.group(2) != "HloModule":
                    name = head.group(2)
                    current = comps.get(name) or comps.setdefault(name, Computation(name))
                    if head.group(1):
                        current.is_entry = True
                        module.entry = name
                    continue
        if "=" not in line:
            continue
        inst = parse_instruction(line)
        if inst is not None:
            current.add(inst)
    return module
