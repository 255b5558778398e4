"""Step time and throughput of the GPT training step as the data-parallel or tensor-parallel axis grows.

The tiny GPT of ``examples/gpt_small_tp`` (AdamW) trains on meshes over the first ``n`` of the
process's simulated CPU devices (one process; each mesh a subset of its devices): DP over ``n``
devices at a fixed batch per device (the global batch grows with ``n``), and TP over ``n`` devices
at a fixed global batch. Each configuration is compiled, warmed up, then timed over rounds of a few
steps (the median round is kept). **Simulated devices share this machine's cores**: ``n`` devices
do ``n`` devices' work on the same cores, so these figures measure the cost of partitioning and of
the collectives, not a speed-up.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --dp 1 2 4 8 --tp 1 2 4 8 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import titanax as tx  # noqa: E402


def step_time(kind: str, n: int, global_batch: int, seq_len: int = 64, layers: int = 2, steps: int = 5,
              rounds: int = 3, deadline: float | None = None) -> dict:
    """Seconds per training step under DP (``kind="dp"``) or DP 1 x TP (``"tp"``) over ``n`` devices.

    Timing rounds stop after ``deadline`` (``time.perf_counter()``), one round at least.
    """
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from examples.gpt_small_tp.model import GPT, TINY
    from examples.gpt_small_tp.steps import train_step

    cfg = dataclasses.replace(TINY, num_layers=layers, max_seq_len=max(TINY.max_seq_len, seq_len))
    if kind == "dp":
        mesh = tx.MeshSpec(axes=("data",), shape=(n,), devices=jax.devices()[:n]).build()
        plan = tx.Plan(data_parallel=tx.DP(axis="data"))
    else:
        mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(1, n), devices=jax.devices()[:n]).build()
        plan = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    sm = tx.shard(lambda: GPT(cfg, rngs=nnx.Rngs(0)), plan, mesh)
    state = tx.create_train_state(sm, tx.optim.adamw(1e-3))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (global_batch, seq_len + 1), dtype=np.int32)
    batch = tx.data.to_global({"tokens": tokens}, mesh, plan)

    started = time.perf_counter()
    state, metrics = train_step(state, batch)  # compiles
    float(metrics["loss"])
    compile_s = time.perf_counter() - started
    state, metrics = train_step(state, batch)  # one more warm-up step
    float(metrics["loss"])
    times = []
    for _ in range(rounds):
        if times and deadline is not None and time.perf_counter() > deadline:
            break
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, batch)
        float(metrics["loss"])
        times.append((time.perf_counter() - start) / steps)
    seconds = statistics.median(times)
    return {"kind": kind, "devices": n, "global_batch": global_batch, "seq_len": seq_len, "layers": layers,
            "compile_s": compile_s, "rounds_ms": [t * 1e3 for t in times], "step_ms": seconds * 1e3,
            "examples_per_s": global_batch / seconds, "tokens_per_s": global_batch * seq_len / seconds}


def sweep(dp=(1, 2, 4, 8), tp=(1, 2, 4), per_device_batch: int = 4, tp_batch: int = 16, deadline: float | None = None,
          progress=None, **kwargs) -> list[dict]:
    """DP over each size in ``dp`` at ``per_device_batch`` sequences per device, then TP over each size
    in ``tp`` at a global batch of ``tp_batch`` (TP 1 is DP 1 at that batch: measured once if equal)."""
    rows = []
    for n in dp:
        rows.append(step_time("dp", n, per_device_batch * n, deadline=deadline, **kwargs))
        if progress:
            progress(rows[-1])
    for n in tp:
        if n == 1 and 1 in dp and per_device_batch == tp_batch:
            rows.append({**rows[list(dp).index(1)], "kind": "tp"})
        else:
            rows.append(step_time("tp", n, tp_batch, deadline=deadline, **kwargs))
        if progress:
            progress(rows[-1])
    return rows


def describe(row: dict) -> str:
    return (f"{row['kind'].upper()} {row['devices']}: global batch {row['global_batch']}, "
            f"{row['step_ms']:.1f} ms/step, {row['examples_per_s']:.0f} examples/s "
            f"(compile {row['compile_s']:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--per-device-batch", type=int, default=4, help="DP: sequences per device")
    parser.add_argument("--tp-batch", type=int, default=16, help="TP: global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (median kept)")
    args = parser.parse_args()
    tx.simulate_cpu_devices(max(args.dp + args.tp))
    print(f"GPT tiny, {args.layers} layers, seq {args.seq_len}, {os.cpu_count()} cores shared by every device")
    sweep(args.dp, args.tp, args.per_device_batch, args.tp_batch, seq_len=args.seq_len, layers=args.layers,
          steps=args.steps, rounds=args.rounds, progress=lambda row: print(describe(row), flush=True))


if __name__ == "__main__":
    main()
