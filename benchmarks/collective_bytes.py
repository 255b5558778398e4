"""Collective bytes and memory per device of the GPT training step, against the arithmetic.

The training step of ``examples/gpt_small_tp`` (value_and_grad of the next-token loss, AdamW) at
tiny width is compiled from an abstract state (nothing allocated) on 8 simulated CPU devices under
four plans: DP 8, FSDP 8, DP 2 x TP 4, and DP 2 x TP 4 with sequence parallelism. The model's
``max_seq_len`` is the sequence length, so every parameter gets a gradient.

* **Collectives**: each collective of the compiled step, loop-aware (``collectives_by_axis``, which
  counts a scanned layer's collectives once per layer), converted to the bytes one device sends
  under a ring algorithm over its group (``tx.planner.ring_bytes``), against the analytic minimum:
  DP all-reduces every gradient once; FSDP follows ZeRO-3 (each parameter split over the axis is
  all-gathered for the forward and again for the backward, its gradient reduce-scattered; an
  unsplit one all-reduced); TP all-reduces the ``[B/dp, T, D]`` activations ``4 L + 2`` times per
  step (two per block forward and two backward, the vocabulary-split embedding's output forward and
  the tied head's input gradient backward) and, over ``data``, each device's gradient shard; SP
  does the same as reduce-scatter + all-gather pairs (the same bytes) and all-reduces over the
  tensor axis the gradients of the parameters not split over it (norms, biases, positions: their
  gradients come from sequence shards). The loss's few scalars per token are left out.
* **Memory**: parameters + AdamW moments per device from the layout table
  (``3 x Layout.bytes_per_device()``), against the abstract state's shards and the compiled step's
  argument bytes less this device's batch.

    python benchmarks/collective_bytes.py
    python benchmarks/collective_bytes.py --plans DP FSDP --layers 4 --batch 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import titanax as tx  # noqa: E402

# name -> (mesh axes, mesh shape, plan); 8 devices each.
PLANS = {
    "DP": (("data",), (8,), lambda: tx.Plan(data_parallel=tx.DP(axis="data"))),
    "FSDP": (("fsdp",), (8,), lambda: tx.Plan(fsdp=tx.FSDP(axis="fsdp"))),
    "TP": (("data", "tensor"), (2, 4),
           lambda: tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))),
    "SP": (("data", "tensor"), (2, 4),
           lambda: tx.Plan(data_parallel=tx.DP(axis="data"),
                           tensor_parallel=tx.TP(axis="tensor", sequence_parallel=True))),
}


def _spec_axes(sharding) -> set[str]:
    axes = set()
    for entry in sharding.spec:
        if entry is not None:
            axes.update((entry,) if isinstance(entry, str) else entry)
    return axes


def minimum_moved(name: str, layout, mesh, cfg, batch: int, seq_len: int) -> dict[str, float]:
    """The analytic minimum bytes one device sends per step, by mesh axis (see the module's doc)."""
    from titanax.planner import ring_bytes

    sizes = dict(mesh.shape)
    grad_axis = "fsdp" if "fsdp" in sizes else "data"
    n, t = sizes[grad_axis], sizes.get("tensor", 1)
    out = {grad_axis: 0.0}
    for e in layout:
        if not e.is_param:
            continue
        axes = _spec_axes(e.sharding)
        local = e.nbytes / (t if "tensor" in axes else 1)  # this device's gradient, before the batch axis
        if grad_axis in axes:  # ZeRO-3: gathered for the forward and for the backward, reduce-scattered
            out[grad_axis] += 2 * ring_bytes("all-gather", local, n) + ring_bytes("reduce-scatter", local / n, n)
        else:
            out[grad_axis] += ring_bytes("all-reduce", local, n)
    if t > 1:
        activation = batch // sizes.get("data", 1) * seq_len * cfg.embed_dim * 4  # float32 [B/dp, T, D]
        out["tensor"] = (4 * cfg.num_layers + 2) * ring_bytes("all-reduce", activation, t)
        if name == "SP":
            out["tensor"] += sum(ring_bytes("all-reduce", e.nbytes, t) for e in layout
                                 if e.is_param and "tensor" not in _spec_axes(e.sharding))
    return out


def measure(name: str, layers: int = 2, batch: int = 16, seq_len: int = 64) -> dict:
    """Compiles the step under plan ``name`` (a key of :data:`PLANS`) and reads its figures."""
    import dataclasses
    import math

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from examples.gpt_small_tp.model import GPT, TINY
    from examples.gpt_small_tp.steps import train_step
    from titanax.parallel.layout import bytes_per_device
    from titanax.planner import ring_bytes

    axes, shape, make_plan = PLANS[name]
    cfg = dataclasses.replace(TINY, num_layers=layers, max_seq_len=seq_len)
    mesh = tx.MeshSpec(axes=axes, shape=shape, devices=jax.devices()[:math.prod(shape)]).build()
    plan = make_plan()
    started = time.perf_counter()
    sm = tx.shard(lambda: GPT(cfg, rngs=nnx.Rngs(0)), plan, mesh, abstract=True)
    state = tx.create_train_state(sm, tx.optim.adamw(1e-3))
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
    compiled = train_step.lower(state, {"tokens": tokens}).compile()
    compile_s = time.perf_counter() - started
    stats = tx.profiling.inspect(compiled)
    by_axis = tx.profiling.collectives_by_axis(compiled, mesh)

    measured: dict[str, float] = {}
    result_bytes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for group, kinds in by_axis.items():
        for kind, c in kinds.items():
            if not c.count:
                continue
            label = "+".join(group) or "none"
            key = f"{kind} ({label})"
            counts[key], result_bytes[key] = c.count, c.bytes
            measured[label] = measured.get(label, 0.0) + ring_bytes(kind, c.bytes, math.prod(mesh.shape[a] for a in group))
    minimum = minimum_moved(name, sm.layout, mesh, cfg, batch, seq_len)
    # XLA:CPU writes a reduce-scatter as an all-reduce whose result each device slices; what the
    # FSDP step would send with reduce-scatters (as GPU and TPU compilers emit them):
    as_scatter = None
    if "fsdp" in mesh.shape:
        n, reduced = mesh.shape["fsdp"], by_axis.get(("fsdp",), {}).get("all-reduce")
        if reduced is not None:
            as_scatter = (sum(measured.values()) - ring_bytes("all-reduce", reduced.bytes, n)
                          + ring_bytes("reduce-scatter", reduced.bytes / n, n))

    batch_ways = math.prod(mesh.shape[a] for a in tx.parallel.batch.batch_axes(plan.resolved_rules(), mesh.shape))
    batch_bytes = tokens.size * 4 // batch_ways
    arithmetic = 3 * sm.layout.bytes_per_device()  # float32 parameters and AdamW's two moments
    abstract = bytes_per_device((state.params, state.opt_state))
    compiled_state = stats.argument_bytes - batch_bytes
    return {
        "plan": name, "mesh": dict(mesh.shape), "layers": layers, "global_batch": batch, "seq_len": seq_len,
        "params": cfg.param_count(), "compile_s": compile_s,
        "collective_counts": counts, "collective_result_bytes": result_bytes,
        "moved_bytes": measured, "minimum_moved_bytes": minimum,
        "moved_total": sum(measured.values()), "minimum_total": sum(minimum.values()),
        "collective_ratio": sum(measured.values()) / sum(minimum.values()),
        "ratio_with_reduce_scatter": None if as_scatter is None else as_scatter / sum(minimum.values()),
        "param_bytes": sm.layout.total_bytes(), "token_embedding_bytes": sm.layout["wte/embedding"].nbytes,
        "memory": {"arithmetic_bytes": arithmetic, "abstract_state_bytes": abstract,
                   "compiled_state_bytes": compiled_state, "temp_bytes": stats.temp_bytes,
                   "abstract_ratio": abstract / arithmetic, "compiled_ratio": compiled_state / arithmetic},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    tx.simulate_cpu_devices(8)
    kib = 1024
    print(f"GPT tiny training step (AdamW), {args.layers} layers, global batch {args.batch}, seq {args.seq_len}, "
          "8 simulated CPU devices; bytes per device per step")
    print(f"{'plan':<5} {'sent (ring) KiB':>15} {'minimum KiB':>11} {'ratio':>6}   {'state KiB':>9} "
          f"{'arithmetic KiB':>14} {'ratio':>6}   collectives (count, result KiB)")
    for name in args.plans:
        r = measure(name, args.layers, args.batch, args.seq_len)
        m = r["memory"]
        ops = ", ".join(f"{k} {c} x, {r['collective_result_bytes'][k] / kib:.0f}"
                        for k, c in r["collective_counts"].items())
        print(f"{name:<5} {r['moved_total'] / kib:>15.1f} {r['minimum_total'] / kib:>11.1f} "
              f"{r['collective_ratio']:>6.3f}   {m['compiled_state_bytes'] / kib:>9.1f} "
              f"{m['arithmetic_bytes'] / kib:>14.1f} {m['compiled_ratio']:>6.3f}   {ops}")


if __name__ == "__main__":
    main()
