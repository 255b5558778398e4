"""Collectives by the mesh axes they cross: how much one step sends along each axis of the mesh.

A collective's cost depends on where its devices sit: a group inside one node talks over fast
links, a group that spans nodes over the network. Which mesh axes a group spans is read off the
compiled program's replica groups (``source_target_pairs`` for a collective-permute), mapped to
mesh coordinates through the program's device assignment, and counted by the same walk as
:func:`titanax.profiling.inspect` (:mod:`titanax.profiling.walk`), so loops count once per trip and
the per-axis figures add up to ``inspect``'s per-kind ones exactly.

XLA prints replica groups in three forms, all read here: a list of lists
(``{{0,2,4,6},{1,3,5,7}}``), an iota (``[2,4]<=[4,2]T(1,0)``: ``arange(8)`` reshaped to ``[4,2]``,
transposed, one group per row of ``[2,4]``), and mesh axes (``mesh['data'=2,'fsdp'=2] {'data'}``,
the groups along the named axes of a mesh of device-assignment positions; its names are XLA's,
not necessarily the mesh's).

Example:
  >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  >>> text = ("%ar = f32[8]{0} all-reduce(%p), channel_id=1, replica_groups={{0,2,4,6},{1,3,5,7}}, "
  ...         "use_global_device_ids=true, to_apply=%add")
  >>> collectives_by_axis(text, mesh)[("data",)]["all-reduce"]
  CollectiveStats(count=1, bytes=32, static_count=1, static_bytes=32)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from titanax.exceptions import TitanaxError
from titanax.profiling.collectives import COLLECTIVE_KINDS, CollectiveStats
from titanax.profiling.hlo import Computation, Instruction, parse_hlo
from titanax.profiling.op_cost import collective_kind
from titanax.profiling.walk import program_totals

__all__ = ["collectives_by_axis"]

#: Mesh axis names, in the mesh's order.
Axes = tuple[str, ...]

_IOTA = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH = re.compile(r"(maximal_)?mesh\[([^\]]*)\](?:,\s*device_ids=\(((?:[^()]|\([^()]*\))*)\))?"
                   r"(?:\s*\{([^}]*)\})?")
_AXIS_REF = re.compile(r"^\s*'?([^':]+?)'?\s*(?::\((\d+)\)(\d+))?\s*$")
_GROUP = re.compile(r"\{([\d,\s]*)\}")
# A mesh's `device_ids=(...)` as an iota: `[2,4]T(1,0)` is arange(8) shaped [2, 4], transposed.
_DEVICE_IOTA = re.compile(r"^\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*$")
_HEADER = re.compile(r"^\s*HloModule\s.*$", re.MULTILINE)
_REPLICA_COUNT = re.compile(r"\breplica_count=(\d+)")
# The kinds whose use_global_device_ids flag XLA always reads, true or false; for the others a
# channel_id alone makes the groups partition ids.
_GLOBAL_ID_KINDS = frozenset({"all-reduce", "all-gather", "reduce-scatter"})
# Groups of logical device ids (positions in the device assignment); None: all devices, one group.
_Groups = list[np.ndarray] | None


def _raw_attr(inst: Instruction, key: str) -> str | None:
    """The text after ``key=`` up to the end of the attributes, or None: the iota and mesh forms
    hold ``", "`` (``mesh[...], device_ids=(...)``), so ``Instruction.attr`` would cut them."""
    text = inst.attributes
    pos = text.find(", " + key + "=")
    meta = text.find(", metadata=")
    if pos < 0 or 0 <= meta < pos:
        return None
    return text[pos + len(key) + 3:]


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text)]


def _iota(groups_shape: list[int], reshape: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    return ids.transpose(perm).reshape(groups_shape) if perm else ids.reshape(groups_shape)


def _mesh_groups(match: re.Match[str]) -> np.ndarray:
    """The groups of the mesh-axes form: the mesh's ids grouped along the named (sub-)axes."""
    maximal, axes_text, ids_text, refs_text = match.groups()
    if maximal:  # one device: `maximal_mesh[device_id=3]`
        return np.array([_ints(axes_text)[-1:]])
    names, sizes = [], []
    for item in axes_text.split(","):
        name, _, size = item.rpartition("=")
        names.append(name.strip().strip("'\""))
        sizes.append(int(size))
    total = math.prod(sizes)
    if ids_text is None:
        ids = np.arange(total)
    elif (iota := _IOTA.search(ids_text)) is not None:
        ids = _iota([total], _ints(iota[2]), _ints(iota[3]) if iota[3] else None)
    elif (iota := _DEVICE_IOTA.match(ids_text)) is not None:
        ids = _iota([total], _ints(iota[1]), _ints(iota[2]) if iota[2] else None)
    else:
        ids = np.array(_ints(ids_text))
    # Split each mesh dimension into the pieces its sub-axes name, major first: a sub-axis
    # `a:(pre)size` of an axis of n is piece `size` of `[pre, size, n / (pre * size)]`.
    refs: dict[int, list[tuple[int, int]]] = {}
    for ref in (r for r in (refs_text or "").split(",") if r.strip()):
        parsed = _AXIS_REF.match(ref)
        if parsed is None or parsed[1] not in names:
            raise TitanaxError(f"cannot read the mesh axis {ref!r} of replica groups {match[0]!r}")
        dim = names.index(parsed[1])
        pre, size = (int(parsed[2]), int(parsed[3])) if parsed[2] else (1, sizes[dim])
        refs.setdefault(dim, []).append((pre, size))
    pieces: list[int] = []
    grouped: list[int] = []
    for dim, n in enumerate(sizes):
        done = 1
        for pre, size in sorted(refs.get(dim, [])):
            if pre != done:
                pieces.append(pre // done)
                done = pre
            grouped.append(len(pieces))
            pieces.append(size)
            done *= size
        if done != n:
            pieces.append(n // done)
    rest = [i for i in range(len(pieces)) if i not in grouped]
    per_group = math.prod(pieces[i] for i in grouped)
    return ids.reshape(pieces).transpose(rest + grouped).reshape(-1, per_group)


def _groups_text(inst: Instruction) -> str:
    """An instruction's ``replica_groups`` as written, ``""`` when absent or empty."""
    raw = _raw_attr(inst, "replica_groups")
    if raw is None or raw.startswith("{}"):
        return ""
    if raw.startswith("{"):
        return inst.attr("replica_groups") or ""
    found = _IOTA.match(raw) or _MESH.match(raw)
    if found is None:
        raise TitanaxError(f"cannot read replica_groups={raw[:80]!r} of %{inst.name}",
                           suggestion="pass the text of an optimized module (Compiled.as_text())")
    return found[0]


def _parse_groups(text: str) -> _Groups:
    """The groups of a ``replica_groups`` value, as written (replica, partition or global ids,
    by the op's mode); None when empty, which XLA reads as one group of every participant."""
    if not text:
        return None
    if text.startswith("{"):
        return [np.array(_ints(g), dtype=np.int64) for g in _GROUP.findall(text[1:-1])]
    if (iota := _IOTA.fullmatch(text)) is not None:
        return list(_iota(_ints(iota[1]), _ints(iota[2]), _ints(iota[3]) if iota[3] else None))
    return list(_mesh_groups(_MESH.fullmatch(text)))


def _logical_groups(inst: Instruction, kind: str, replicas: int, partitions: int) -> list[np.ndarray]:
    """The op's groups as logical device ids (replica * partitions + partition), following XLA's
    group modes: cross-replica without ``channel_id``, cross-partition with one, flattened
    (global ids) with ``use_global_device_ids=true``, cross-replica-and-partition with it false."""
    has_channel = inst.attr("channel_id") is not None
    if kind == "collective-permute":
        pairs = np.array(_ints(inst.attr("source_target_pairs") or ""), dtype=np.int64).reshape(-1, 2)
        if has_channel:  # partition ids, the same pairs in every replica
            return [pair + r * partitions for r in range(replicas) for pair in pairs]
        return [pair * partitions + p for p in range(partitions) for pair in pairs]
    groups = _parse_groups(_groups_text(inst))
    if not has_channel:
        mode = "replica"
    elif kind not in _GLOBAL_ID_KINDS:
        mode = "partition"
    else:
        mode = "flattened" if inst.attr("use_global_device_ids") == "true" else "replica+partition"
    if mode == "flattened":
        return groups if groups is not None else [np.arange(replicas * partitions)]
    if mode == "partition":
        groups = groups if groups is not None else [np.arange(partitions)]
        return [g + r * partitions for r in range(replicas) for g in groups]
    groups = groups if groups is not None else [np.arange(replicas)]
    if mode == "replica":
        return [g * partitions + p for p in range(partitions) for g in groups]
    return [(g[:, None] * partitions + np.arange(partitions)).ravel() for g in groups]


def _async_start(done: Instruction, comp: Computation, kind: str) -> Instruction | None:
    """The ``-start`` a ``-done`` completes: its groups are printed there, not on the ``-done``."""
    inst: Instruction | None = done
    for _ in range(8):  # through a get-tuple-element or bitcast or two, never far
        if inst is None or not inst.operands:
            return None
        inst = comp.by_name.get(inst.operands[0])
        if inst is not None and inst.opcode == kind + "-start":
            return inst
    return None


def _axis_key(coords: np.ndarray, names: Axes, replicas: int,
              partitions: int) -> Callable[[Instruction, Computation], Axes]:
    """The walk's group function: the mesh axes along which members of the op's groups differ."""
    cache: dict[Any, Axes] = {}

    def spanned(groups: list[np.ndarray]) -> Axes:
        differ = np.zeros(len(names), dtype=bool)
        for group in groups:
            if group.size and (group.min() < 0 or group.max() >= len(coords)):
                raise TitanaxError(
                    f"replica groups name device {int(group.max())}, but the program runs on "
                    f"{len(coords)} devices", suggestion="pass the mesh the program was compiled for")
            at = coords[group]
            differ |= (at != at[:1]).any(axis=0)
        return tuple(name for name, d in zip(names, differ) if d)

    def key(inst: Instruction, comp: Computation) -> Axes:
        kind = collective_kind(inst.opcode)[0]  # the walk calls this for collectives only
        source = inst
        if inst.opcode.endswith("-done"):
            source = _async_start(inst, comp, kind)
            if source is None:  # no -start to read: assume the widest group, the slowest
                return spanned([np.arange(len(coords))])
        # what decides the groups, so that each distinct one is worked out once
        permute = kind == "collective-permute"
        cache_key = (permute, kind in _GLOBAL_ID_KINDS, source.attr("channel_id") is not None,
                     source.attr("use_global_device_ids"),
                     source.attr("source_target_pairs") if permute else _groups_text(source))
        if cache_key not in cache:
            cache[cache_key] = spanned(_logical_groups(source, kind, replicas, partitions))
        return cache[cache_key]

    return key


def _device_order(compiled: jax.stages.Compiled | None, mesh: jax.sharding.Mesh, n: int) -> list[int]:
    """Device ids by logical id: the executable's device assignment, else that of the program's
    shardings, else the mesh's own order (what ``jit`` uses for shardings on that mesh)."""
    if compiled is not None:
        try:
            devices = list(compiled.runtime_executable().local_devices())
        except (AttributeError, NotImplementedError, RuntimeError):
            devices = []
        if len(devices) == n:  # all addressable: a single process
            return [d.id for d in devices]
        for sharding in jax.tree.leaves((compiled.input_shardings, compiled.output_shardings)):
            used = getattr(sharding, "mesh", None)  # an AbstractMesh has no devices to read
            if isinstance(used, jax.sharding.Mesh) and used.devices.size == n:
                return [d.id for d in used.devices.flat]
    if mesh.devices.size != n:
        raise TitanaxError(
            f"the program runs on {n} devices, the mesh has {mesh.devices.size}",
            suggestion="pass the mesh the program was compiled for", field="mesh",
            value=dict(zip(mesh.axis_names, mesh.devices.shape)))
    return [d.id for d in mesh.devices.flat]


def _mesh_coords(order: list[int], mesh: jax.sharding.Mesh) -> np.ndarray:
    """Mesh coordinates of each logical device: row ``i`` for the device at position ``i``."""
    position = {d.id: index for index, d in np.ndenumerate(mesh.devices)}
    missing = [i for i in order if i not in position]
    if missing and len(order) > 1:
        raise TitanaxError(
            f"the program runs on devices {missing} that are not in the mesh",
            suggestion="pass the mesh the program was compiled for", field="mesh")
    return np.array([position.get(i, (0,) * mesh.devices.ndim) for i in order], dtype=np.int64)


def collectives_by_axis(compiled: jax.stages.Compiled | jax.stages.Lowered | str,
                        mesh: jax.sharding.Mesh) -> dict[Axes, dict[str, CollectiveStats]]:
    """Collectives of one run of a program (one step), per device, by the mesh axes they span.

    Each collective instruction (all-reduce, all-gather, reduce-scatter, all-to-all,
    collective-permute, collective-broadcast, ragged-all-to-all; an async ``-start``/``-done``
    pair once) is attributed to the tuple of mesh axes, in mesh order, along which the devices of
    its groups differ (their union over the op's groups): on a ``(data=2, fsdp=2, tensor=2)``
    mesh a gradient all-reduce over ``data`` goes under ``("data",)``, an all-gather over
    ``data`` and ``fsdp`` together under ``("data", "fsdp")``. Groups of one device (a
    cross-replica op in an SPMD program, a permute that keeps every shard where it is) go under
    ``()``. A collective-permute's groups are its source-target pairs. A ``-done`` whose
    ``-start`` cannot be found counts as spanning every device.

    Group ids are logical device ids (positions in the program's device assignment), the
    partition ids of an SPMD program; they are mapped to devices through the executable's device
    assignment for a compiled program, and through ``mesh.devices`` in order for HLO text (the
    assignment ``jit`` uses for shardings on that mesh), then to mesh coordinates by device id,
    so a mesh built from permuted devices is read right.

    Counts and bytes are those of :func:`titanax.profiling.inspect`: per run, a loop body once
    per trip, a conditional at its heaviest branch, bytes the result size on one device; for
    each kind, the sum over the axes tuples is ``inspect(...).collectives[kind]`` exactly
    (``static_count``/``static_bytes`` included).

    Args:
      compiled: a ``jax.stages.Compiled``, a ``jax.stages.Lowered`` (compiled here), or the text
        of an optimized HLO module (``Compiled.as_text()``).
      mesh: the ``jax.sharding.Mesh`` the program was compiled for.

    Returns:
      ``axes -> kind -> CollectiveStats``: one entry per axes tuple that some collective spans,
      ordered by the axes' positions in the mesh (``()`` first); each holds every kind of
      :data:`COLLECTIVE_KINDS`, zero where none. Empty for a program without collectives.

    Raises:
      TitanaxError: for an argument of another type, a mesh without devices, replica groups that
        cannot be read, or a program on other devices than the mesh's.

    Example:
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
      >>> rows = jax.sharding.NamedSharding(mesh, P("data", "tensor"))
      >>> f = jax.jit(lambda x: x.sum(0), in_shardings=rows)  # a sum over the data shards
      >>> compiled = f.lower(jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=rows)).compile()
      >>> by_axis = tx.profiling.collectives_by_axis(compiled, mesh)
      >>> list(by_axis), by_axis[("data",)]["all-reduce"].count
      ([('data',)], 1)
    """
    if isinstance(compiled, jax.stages.Lowered):
        compiled = compiled.compile()
    if isinstance(compiled, str):
        text, program = compiled, None
    elif isinstance(compiled, jax.stages.Compiled):
        text, program = compiled.as_text(), compiled
    else:
        raise TitanaxError(
            f"collectives_by_axis expects a jax.stages.Compiled, a jax.stages.Lowered or HLO text, "
            f"got {type(compiled).__name__}",
            suggestion="pass jax.jit(f).lower(*args).compile()", field="compiled")
    devices = None if isinstance(mesh, jax.sharding.AbstractMesh) else getattr(mesh, "devices", None)
    if not isinstance(devices, np.ndarray) or not hasattr(mesh, "axis_names"):
        raise TitanaxError(
            f"collectives_by_axis needs a jax.sharding.Mesh with devices, got {type(mesh).__name__}",
            suggestion="pass the concrete mesh (an AbstractMesh has no device ids)", field="mesh")
    if not isinstance(text, str):
        raise TitanaxError("the compiled program gave no HLO text to read",
                           suggestion="pass Compiled.as_text() from a backend that has it")
    module = parse_hlo(text)
    header = _HEADER.search(text[:20000])
    replicas = partitions = 1
    if module.name is None:  # a fragment: assume the mesh's devices, in order
        partitions = devices.size
    else:
        count = _REPLICA_COUNT.search(header[0]) if header else None
        replicas, partitions = (int(count[1]) if count else 1), module.num_partitions
    n = replicas * partitions
    order = [0] if n == 1 else _device_order(program, mesh, n)
    names = tuple(str(name) for name in mesh.axis_names)
    coords = _mesh_coords(order, mesh)
    totals = program_totals(module, costs=False,
                            group=_axis_key(coords, names, replicas, partitions))
    position = {name: i for i, name in enumerate(names)}
    out: dict[Axes, dict[str, CollectiveStats]] = {}
    for axes in sorted({axes for _, axes in totals.groups}, key=lambda a: [position[x] for x in a]):
        out[axes] = {kind: CollectiveStats() for kind in COLLECTIVE_KINDS}
    for (kind, axes), (count, nbytes, static_count, static_bytes) in totals.groups.items():
        out[axes][kind] = CollectiveStats(count, nbytes, static_count, static_bytes)
    return out
