"""Compile time of the GPT example's training step against depth: scanned vs unrolled layer stack.

The full training step (value_and_grad of the next-token loss, AdamW update) of
``examples/gpt_small_tp/model.py`` is lowered and compiled under DP 2 x TP 4 on 8 simulated CPU
devices, once with the block stack scanned (``unroll_layers=1``) and once fully unrolled
(``unroll_layers=True``). ``step.lower(state, batch)`` and ``.compile()`` are timed separately
(wall clock). Every (variant, depth) runs in a fresh subprocess of this script, so nothing is
shared between them; inside it, each repeat clears JAX's in-memory caches and builds a new step,
and the minimum over repeats is reported. The persistent compilation cache is off. Figures are
measured in this one run.

    python benchmarks/compile_depth.py                          # depths 6 and 24, tiny width
    python benchmarks/compile_depth.py --depths 6 12 24 --repeats 3
    python benchmarks/compile_depth.py --embed 128 --heads 8 --variants scanned
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import titanax as tx  # noqa: E402

VARIANTS = {"scanned": 1, "unrolled": True}  # GPTConfig.unroll_layers


def measure(args: argparse.Namespace) -> dict:
    """One (variant, depth), in this process: the minimum lower and compile seconds over repeats."""
    tx.simulate_cpu_devices(args.devices)

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)

    from examples.gpt_small_tp.model import GPT, TINY, next_token_loss

    cfg = dataclasses.replace(TINY, num_layers=args.one, embed_dim=args.embed, num_heads=args.heads,
                              mlp_dim=args.mlp or 4 * args.embed, max_seq_len=max(TINY.max_seq_len, args.seq_len),
                              unroll_layers=VARIANTS[args.variant])
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(args.devices // args.tensor, args.tensor)).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    engine = tx.Engine(mesh=mesh, plan=plan, optimizer=tx.optim.adamw(1e-3))
    state = engine.init(lambda rngs: GPT(cfg, rngs=rngs), rng=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
    batch = tx.data.to_global({"tokens": tokens}, mesh, plan)

    def make_step() -> tx.StepFunction:
        def loss_of(params, state: tx.TrainState, batch: dict) -> jax.Array:
            tokens_BT1 = batch["tokens"].astype(jnp.int32)
            return next_token_loss(state.apply(params, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])

        @tx.step_fn
        def train_step(state: tx.TrainState, batch: dict):
            loss, grads = jax.value_and_grad(loss_of)(state.params, state, batch)
            return state.apply_gradients(grads=grads), {"loss": loss}

        return train_step

    lowers, compiles = [], []
    for _ in range(args.repeats):
        jax.clear_caches()  # no traced, lowered or compiled program survives from the last repeat
        step = make_step()  # a new function: a new jit, nothing to reuse
        start = time.perf_counter()
        lowered = step.lower(state, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        lowers.append(lowered_at - start)
        compiles.append(done - lowered_at)
    return {"variant": args.variant, "depth": args.one, "params": cfg.param_count(),
            "lower": min(lowers), "compile": min(compiles), "lowers": lowers, "compiles": compiles}


def run_one(args: argparse.Namespace, variant: str, depth: int, repeats: int) -> dict:
    """:func:`measure` in a fresh Python process; its last output line is the JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--one", str(depth), "--variant", variant,
               "--repeats", str(repeats), "--devices", str(args.devices), "--tensor", str(args.tensor),
               "--embed", str(args.embed), "--heads", str(args.heads), "--seq-len", str(args.seq_len),
               "--batch", str(args.batch)] + (["--mlp", str(args.mlp)] if args.mlp else [])
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"measuring {variant} at depth {depth} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 x embed)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per (variant, depth); minimum kept")
    parser.add_argument("--unrolled-repeats", type=int, default=1,
                        help="repeats for the unrolled variant above --unrolled-repeats-from layers (it is slow)")
    parser.add_argument("--unrolled-repeats-from", type=int, default=13)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--tensor", type=int, default=4, help="tensor-parallel axis size (data = devices / tensor)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one depth
    parser.add_argument("--variant", choices=list(VARIANTS), default="scanned", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one is not None:
        print(json.dumps(measure(args)), flush=True)
        return

    start = time.perf_counter()
    print(f"GPT train step (AdamW), embed {args.embed}, {args.heads} heads, mlp {args.mlp or 4 * args.embed}, "
          f"seq {args.seq_len}, global batch {args.batch}; DP {args.devices // args.tensor} x TP {args.tensor} "
          f"on {args.devices} simulated CPU devices; fresh process per row, min over repeats")
    print(f"{'variant':<9} {'depth':>5} {'params':>8} {'lower s':>8} {'compile s':>9} {'total s':>8}  repeats (lower+compile)")
    results: dict[str, dict[int, dict]] = {}
    for variant in args.variants:
        for depth in args.depths:
            slow = variant == "unrolled" and depth >= args.unrolled_repeats_from
            repeats = min(args.repeats, args.unrolled_repeats) if slow else args.repeats
            r = run_one(args, variant, depth, repeats)
            r["total"] = r["lower"] + r["compile"]
            results.setdefault(variant, {})[depth] = r
            each = ", ".join(f"{a + b:.2f}" for a, b in zip(r["lowers"], r["compiles"]))
            print(f"{variant:<9} {depth:>5} {r['params'] / 1e6:>7.2f}M {r['lower']:>8.2f} {r['compile']:>9.2f} "
                  f"{r['total']:>8.2f}  {each}", flush=True)

    lo, hi = min(args.depths), max(args.depths)
    if lo != hi:
        print()
        for variant, rows in results.items():
            a, b = rows[lo], rows[hi]
            print(f"{variant:<9} {hi}/{lo} layers: lower {b['lower'] / a['lower']:.2f}x, "
                  f"compile {b['compile'] / a['compile']:.2f}x, total {b['total'] / a['total']:.2f}x")
        if "scanned" in results:
            ratio = results["scanned"][hi]["total"] / results["scanned"][lo]["total"]
            print(f"scanned: compile time at {hi} layers = {ratio:.2f}x that at {lo} layers (target <= 1.3x)")
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
