"""What a compiled program executed, counted from a JAX profiler trace on XLA:CPU.

XLA:CPU traces every thunk it runs under the HLO instruction's name (``all-gather.4``,
``ynn_fusion``, ``wrapped_tanh``), once per device and per run, inside loop bodies once per trip
and inside a conditional only for the branch taken. Multiplying each executed instruction by its
own figures therefore gives the program's FLOPs and collective bytes as run, with no static
reasoning about loops or branches: the ground truth for the loop-aware counts
(:mod:`titanax.profiling.walk`) that the planner's estimate reads.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from titanax.profiling.hlo import HloModule, parse_hlo, shape_bytes
from titanax.profiling.op_cost import collective_kind, instruction_cost


def executed_names(run: Callable[[], Any]) -> collections.Counter:
    """How many times each trace event name occurred while ``run()`` ran (blocked on its result)."""
    with tempfile.TemporaryDirectory() as where:
        jax.profiler.start_trace(where, create_perfetto_trace=True)
        try:
            jax.block_until_ready(run())
        finally:
            jax.profiler.stop_trace()
        trace, = glob.glob(f"{where}/**/perfetto_trace.json.gz", recursive=True)
        events = json.loads(gzip.decompress(pathlib.Path(trace).read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    return collections.Counter(e["name"] for e in events if e.get("ph") == "X" and "name" in e)


def executed_totals(hlo_text: str, names: collections.Counter, devices: int) -> tuple[float, float, int]:
    """``(FLOPs, collective bytes, instructions matched)`` per device, averaged over ``devices``,
    of the instructions of ``hlo_text`` that ``names`` saw execute.

    A fusion executes as one thunk: its FLOPs are those of the computation it fuses. A loop or a
    conditional executes its callees as thunks of their own, which the trace counts.
    """
    module = parse_hlo(hlo_text)
    where = {inst.name: (inst, comp) for comp in module.computations.values() for inst in comp.instructions}
    fused: dict[str, int] = {}

    def fused_flops(name: str, module: HloModule = module) -> int:
        if name not in fused:
            comp = module.computations[name]
            fused[name] = sum(instruction_cost(i, comp, module)[0]
                              + sum(fused_flops(c) for c in i.callees.get("calls", []) if i.opcode == "fusion")
                              for i in comp.instructions)
        return fused[name]

    flops = collective_bytes = matched = 0
    for name, count in names.items():
        if name not in where:
            continue  # host-side events: Python frames, rendezvous, executable launch
        inst, comp = where[name]
        matched += 1
        own = instruction_cost(inst, comp, module)[0]
        if inst.opcode == "fusion":
            own += sum(fused_flops(c) for c in inst.callees.get("calls", []))
        flops += count * own
        kind = collective_kind(inst.opcode)
        if kind is not None and kind[1] != "-start":  # an async pair moves its bytes once
            collective_bytes += count * shape_bytes(inst.shape)
    return flops / devices, collective_bytes / devices, matched


def _zeros_like(state: Any) -> Any:
    """Concrete arrays of ``state``'s shapes, dtypes and shardings, without compiling an init: the
    instructions a program executes do not depend on the values it is given."""
    import numpy as np

    def place(x: Any) -> Any:
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            keys = jax.random.split(jax.random.key(0), max(1, int(np.prod(x.shape)))).reshape(x.shape)
            return jax.device_put(keys, x.sharding)
        return jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)

    return jax.tree.map(place, state)


def small_search(values: dict, devices: int, **options: Any) -> list[dict]:
    """Every candidate of ``autoplan``'s search for ``values`` on ``devices`` devices: the estimate's
    FLOPs and collective bytes per device beside what the same compiled program executed."""
    import titanax as tx
    from titanax.config import from_dict
    from titanax.config.describe import compile_run
    from titanax.config.run import build_source
    from titanax.data import to_global
    from titanax.planner import Candidate, DeviceSpec
    from titanax.planner.search import estimate_compiled, model_facts

    spec = DeviceSpec(name="test", peak_flops_bf16=1e12, peak_flops_fp32=5e11, memory_bytes=2**30,
                      hbm_bandwidth=1e11, intra_node_bandwidth=1e10, inter_node_bandwidth=1e9,
                      devices_per_node=devices, collective_latency=1e-5)
    source = build_source(from_dict(Candidate().apply_to(values)))
    kept, _ = tx.planner.enumerate_candidates(devices, model_facts(values, source), memory_bytes=spec.memory_bytes,
                                              devices_per_node=devices, **options)
    rows = []
    for candidate in kept:
        built = compile_run(from_dict(candidate.apply_to(values)), source=source)
        figures = estimate_compiled(built, spec)
        engine = built.prepared.engine
        state = _zeros_like(built.state)  # the very program the estimate read, run on real arrays
        batch = to_global(next(iter(source.train_batches())), engine.mesh, engine.plan)
        names = executed_names(lambda: built.compiled(state, batch))
        flops, collective_bytes, matched = executed_totals(built.compiled.as_text(), names, engine.mesh.size)
        rows.append(dict(label=candidate.label, estimate_flops=figures["flops"], executed_flops=flops,
                         estimate_collective_bytes=figures["collective_bytes"],
                         executed_collective_bytes=collective_bytes, matched=matched,
                         estimate_s=figures["estimate"].total_s))
    return rows


if __name__ == "__main__":  # python tests/executed.py DEVICES VALUES_JSON: one JSON row per candidate
    import os
    import sys

    import titanax as tx

    sys.path.insert(0, os.getcwd())  # the configuration's factories: examples.<name>.<module>

    devices, values = int(sys.argv[1]), json.loads(sys.argv[2])
    tx.simulate_cpu_devices(devices)  # nothing has run on JAX yet
    assert jax.device_count() == devices, jax.devices()
    for row in small_search(values, devices, microbatch_multiples=(1,)):
        print(json.dumps(row), flush=True)
