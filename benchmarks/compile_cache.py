"""Compile time of the GPT training step, cold and from JAX's persistent compilation cache.

Two fresh processes, one after the other, each with 8 simulated CPU devices and
``titanax.runtime.enable_compile_cache`` on the same (initially empty) directory, lower and compile
the same training step of ``examples/gpt_small_tp`` (DP 2 x TP 4, AdamW). Each prints the
``CompileRecord`` of that compile (``titanax.exec.compilation.compile_clock``: trace, lower and XLA
seconds, persistent-cache hits and misses) and its wall time: the first compiles and writes the
cache, the second loads the executable from it. A fresh process is needed because JAX's in-memory
caches would otherwise serve the second compile without asking the disk.

    python benchmarks/compile_cache.py
    python benchmarks/compile_cache.py --layers 8 --cache-dir /tmp/cache   # an empty directory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import titanax as tx  # noqa: E402


def compile_once(cache_dir: str, layers: int, batch: int, seq_len: int) -> dict:
    """In this (fresh) process: the step's compile with the persistent cache in ``cache_dir``."""
    tx.simulate_cpu_devices(8)

    import dataclasses

    import numpy as np
    from flax import nnx

    from examples.gpt_small_tp.model import GPT, TINY
    from examples.gpt_small_tp.steps import train_step
    from titanax.exec.compilation import compile_clock

    tx.runtime.enable_compile_cache(cache_dir)
    cfg = dataclasses.replace(TINY, num_layers=layers, max_seq_len=max(TINY.max_seq_len, seq_len))
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(2, 4)).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    sm = tx.shard(lambda: GPT(cfg, rngs=nnx.Rngs(0)), plan, mesh)
    state = tx.create_train_state(sm, tx.optim.adamw(1e-3))  # initializers: cached too, not timed
    tokens = np.zeros((batch, seq_len + 1), np.int32)
    batch_ = tx.data.to_global({"tokens": tokens}, mesh, plan)
    start = time.perf_counter()
    with compile_clock() as record:
        train_step.lower(state, batch_).compile()
    wall = time.perf_counter() - start
    return {**dataclasses.asdict(record), "seconds": record.seconds, "wall_s": wall}


def measure(layers: int = 2, batch: int = 16, seq_len: int = 64, cache_dir: str | None = None,
            timeout: float | None = None) -> dict:
    """``{"cold": ..., "warm": ...}``: :func:`compile_once` in two fresh processes sharing the cache
    directory (a new temporary one unless ``cache_dir`` is given), each with its process's wall time."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="titanax-compile-cache-") as tmp:
        directory = cache_dir or tmp
        env = {**os.environ}
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        for name in ("cold", "warm"):
            command = [sys.executable, os.path.abspath(__file__), "--child", directory, "--layers", str(layers),
                       "--batch", str(batch), "--seq-len", str(seq_len)]
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                sys.stderr.write(done.stdout + done.stderr[-3000:])
                raise RuntimeError(f"the {name} compile process failed (exit {done.returncode})")
            out[name] = {**json.loads(lines[-1]), "process_s": time.perf_counter() - start}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="an empty directory (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one compile
    args = parser.parse_args()
    if args.child:
        print(json.dumps(compile_once(args.child, args.layers, args.batch, args.seq_len)), flush=True)
        return
    result = measure(args.layers, args.batch, args.seq_len, args.cache_dir)
    for name, r in result.items():
        print(f"{name}: {r['seconds']:.2f} s (trace {r['trace_seconds']:.2f}, lower {r['lower_seconds']:.2f}, "
              f"XLA {r['backend_seconds']:.2f}); persistent cache {r['cache_hits']} hit(s), "
              f"{r['cache_misses']} miss(es); process {r['process_s']:.1f} s")


if __name__ == "__main__":
    main()
