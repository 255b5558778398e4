"""Compile time of the GPT example's training step against depth: scanned vs unrolled layer stack.

The full training step (value_and_grad of the next-token loss, AdamW update) of
``examples/gpt_small_tp/model.py`` is lowered and compiled under DP 2 x TP 4 on 8 simulated CPU
devices, once with the block stack scanned (``unroll_layers=1``) and once fully unrolled
(``unroll_layers=True``). ``step.lower(state, batch)`` and ``.compile()`` are timed separately
(wall clock; initializing the state is not timed). Every measurement runs in a fresh subprocess
of this script, so no trace, lowering or executable is shared, and the persistent compilation cache
is off. Measurements go in rounds that alternate the order of the cases, so a slow spell of the
machine does not land on one case only; the minimum over rounds is reported. Figures are measured
in this one run.

    python benchmarks/compile_depth.py                          # depths 6 and 24, tiny width
    python benchmarks/compile_depth.py --depths 6 12 24 48 --repeats 3 --unrolled-repeats 1
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
    """One (variant, depth), in this process: seconds to lower and to compile the training step."""
    tx.simulate_cpu_devices(args.devices)

    import dataclasses

    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)

    from examples.gpt_small_tp.model import GPT, TINY
    from examples.gpt_small_tp.steps import train_step

    cfg = dataclasses.replace(TINY, num_layers=args.one, embed_dim=args.embed, num_heads=args.heads,
                              mlp_dim=args.mlp or 4 * args.embed, max_seq_len=max(TINY.max_seq_len, args.seq_len),
                              unroll_layers=VARIANTS[args.variant])
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(args.devices // args.tensor, args.tensor)).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    engine = tx.Engine(mesh=mesh, plan=plan, optimizer=tx.optim.adamw(1e-3))
    state = engine.init(lambda rngs: GPT(cfg, rngs=rngs), rng=0)  # compiles the initializer: not timed
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len + 1), dtype=np.int32)
    batch = tx.data.to_global({"tokens": tokens}, mesh, plan)

    start = time.perf_counter()
    lowered = train_step.lower(state, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"variant": args.variant, "depth": args.one, "params": cfg.param_count(),
            "lower": lowered_at - start, "compile": done - lowered_at}


def run_one(args: argparse.Namespace, variant: str, depth: int, timeout: float | None = None) -> dict:
    """:func:`measure` in a fresh Python process (no cache shared); its last output line is the JSON.
    A process still running after ``timeout`` seconds is stopped (``subprocess.TimeoutExpired``)."""
    command = [sys.executable, os.path.abspath(__file__), "--one", str(depth), "--variant", variant,
               "--devices", str(args.devices), "--tensor", str(args.tensor), "--embed", str(args.embed),
               "--heads", str(args.heads), "--seq-len", str(args.seq_len), "--batch", str(args.batch)]
    command += ["--mlp", str(args.mlp)] if args.mlp else []
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"measuring {variant} at depth {depth} failed (exit {done.returncode})")
    return json.loads(lines[-1])


def argument_parser() -> argparse.ArgumentParser:
    """The command line; ``argument_parser().parse_args([...])`` gives :func:`sweep` its arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=None, help="MLP width (default 4 x embed)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds; each measures every (variant, depth) once, in a fresh process; minimum kept")
    parser.add_argument("--unrolled-repeats", type=int, default=None,
                        help="rounds for the unrolled variant (default --repeats; it is the slow one)")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--tensor", type=int, default=4, help="tensor-parallel axis size (data = devices / tensor)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one
    parser.add_argument("--variant", choices=list(VARIANTS), default="scanned", help=argparse.SUPPRESS)
    return parser


def sweep(args: argparse.Namespace, timeout: float | None = None) -> dict[tuple[str, int], dict]:
    """Every (variant, depth) measured ``--repeats`` times in fresh processes (rounds alternate
    the order); the fastest run of each case, with every run's total in ``each``."""
    cases = [(v, d) for v in args.variants for d in args.depths]
    runs: dict[tuple[str, int], list[dict]] = {case: [] for case in cases}
    unrolled_repeats = args.repeats if args.unrolled_repeats is None else args.unrolled_repeats
    for round_ in range(max(args.repeats, unrolled_repeats)):
        # Alternate the order so slow spells of the machine do not all land on one case.
        for variant, depth in cases if round_ % 2 == 0 else cases[::-1]:
            if round_ >= (unrolled_repeats if variant == "unrolled" else args.repeats):
                continue
            r = run_one(args, variant, depth, timeout)
            runs[(variant, depth)].append(r)
            print(f"  round {round_ + 1}: {variant} {depth} layers: lower {r['lower']:.2f} s, "
                  f"compile {r['compile']:.2f} s", file=sys.stderr, flush=True)

    best: dict[tuple[str, int], dict] = {}
    for case, rs in runs.items():
        fastest = min(rs, key=lambda r: r["lower"] + r["compile"])
        best[case] = {**fastest, "total": fastest["lower"] + fastest["compile"],
                      "each": [r["lower"] + r["compile"] for r in rs]}
    return best


def main() -> None:
    args = argument_parser().parse_args()
    if args.one is not None:
        print(json.dumps(measure(args)), flush=True)
        return
    start = time.perf_counter()
    best = sweep(args)

    print(f"GPT training step (AdamW), embed {args.embed}, {args.heads} heads, mlp {args.mlp or 4 * args.embed}, "
          f"seq {args.seq_len}, global batch {args.batch}; DP {args.devices // args.tensor} x TP {args.tensor} "
          f"on {args.devices} simulated CPU devices")
    print("fresh process per measurement, no persistent compilation cache; the fastest run of each case")
    print(f"{'variant':<9} {'depth':>5} {'params':>8} {'lower s':>8} {'compile s':>9} {'total s':>8}  runs (total s)")
    for (variant, depth), b in best.items():
        print(f"{variant:<9} {depth:>5} {b['params'] / 1e6:>7.2f}M {b['lower']:>8.2f} {b['compile']:>9.2f} "
              f"{b['total']:>8.2f}  {', '.join(f'{t:.2f}' for t in b['each'])}")

    lo, hi = min(args.depths), max(args.depths)
    if lo != hi:
        print()
        for variant in args.variants:
            a, b = best[(variant, lo)], best[(variant, hi)]
            print(f"{variant:<9} {hi} / {lo} layers: lower {b['lower'] / a['lower']:.2f}x, "
                  f"compile {b['compile'] / a['compile']:.2f}x, total {b['total'] / a['total']:.2f}x")
        if "scanned" in args.variants:
            ratio = best[("scanned", hi)]["total"] / best[("scanned", lo)]["total"]
            print(f"scanned: compile time at {hi} layers = {ratio:.2f}x that at {lo} layers (target <= 1.3x)")
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
