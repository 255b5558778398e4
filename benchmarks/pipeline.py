"""Pipeline schedules on the GPT example: executed FLOPs, bubble, temp memory, collectives, step time.

The training gradient (``tx.value_and_grad`` of the next-token loss; no optimizer update) of
``examples/gpt_small_tp/model.py`` at tiny width (embed 64, 8 heads, MLP 256, vocabulary 264, 8
layers) runs with its layer stack split into ``p`` pipeline stages on ``p`` simulated CPU devices,
for each schedule; the explicit ones (1f1b, interleaved, zbh1) also with ``remat="save_dots"``
(what their forward slot stashes: each layer's matmul outputs) and 1f1b/interleaved recomputing
the stage (``PP(recompute=True)``); gpipe also with ``remat="save_dots"``, for comparison. The **global batch is fixed** (64 sequences of 32 tokens)
and cut into ``m`` microbatches. Every figure comes from this one run:

* **executed FLOPs per device**: a slot computes only when the table marks it busy (idle slots
  run under ``lax.cond`` and cost nothing), so the busiest stage executes, per step, its busy
  slots times each slot's FLOPs. Slot FLOPs come from the one-device programs compiled here
  with every layer unrolled (each layer's FLOPs then XLA's own count; ``tx.profiling.inspect``
  of the compiled pipeline counts every tick's ``lax.cond`` at its busy branch, an upper bound
  that includes the bubble, so the table is the measure here): ``S_f`` the stack's
  forward, ``S`` its forward and backward, ``R`` the rest (embedding, head, loss, both ways). A
  forward slot is ``S_f / (v p m)``, a backward (B + W) slot ``(S - S_f) / (v p m)`` plus ``S_f / (v p m)``
  when it recomputes; the head and loss run per microbatch on the last stage (``R``); gpipe and
  circular run the head replicated on every device (``R`` each). Overhead is the busiest
  device's FLOPs over the one-device step / ``p``; the recompute share is reported apart.
* **bubble**: the table's lockstep idle share (``Schedule.bubble_fraction``), and the textbook
  formula ``(p - 1) / (v m + p - 1)``.
* **temp memory** per device (``memory_analysis()``) and **collectives per step** (loop-aware:
  each op times its loop's trip count) of the compiled program one trains with.
* **step time**: medians over rounds that alternate the order of the rows, after a warm-up,
  relative to gpipe's in the same run. The ``p`` simulated devices share the machine's cores, so
  compare rows with each other, not with accelerators.

    python benchmarks/pipeline.py                       # p = 4, m = 16, every schedule
    python benchmarks/pipeline.py --microbatches 4 16 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import titanax as tx  # noqa: E402

# (schedule, repeats, recompute, remat): every schedule at its defaults, and for gpipe and the
# explicit ones also with remat="save_dots" (each layer keeps its matmuls' outputs and recomputes
# the elementwise rest: what the explicit schedules then stash) and PP(recompute=True).
ROWS = (("gpipe", 1, False, "none"), ("gpipe", 1, False, "save_dots"), ("circular", 2, False, "none"),
        ("1f1b", 1, False, "none"), ("1f1b", 1, False, "save_dots"), ("1f1b", 1, True, "none"),
        ("interleaved", 2, False, "none"), ("interleaved", 2, False, "save_dots"), ("interleaved", 2, True, "none"),
        ("zbh1", 1, False, "none"), ("zbh1", 1, False, "save_dots"))


def config(args: argparse.Namespace, unrolled: bool = False, layers: int | None = None):
    from examples.gpt_small_tp.model import TINY

    return dataclasses.replace(TINY, num_layers=layers or args.layers, embed_dim=args.embed, num_heads=args.heads,
                               mlp_dim=args.mlp, max_seq_len=max(TINY.max_seq_len, args.seq_len),
                               unroll_layers=True if unrolled else 1)


def one_device_flops(args: argparse.Namespace, tokens) -> dict[str, float]:
    """``S``, ``S_f`` and ``R`` from the one-device programs at ``L`` and ``L / 2`` layers."""
    import jax
    from flax import nnx

    from examples.gpt_small_tp.model import GPT, next_token_loss

    flops = {}
    for layers in (args.layers, args.layers // 2):
        # shapes only (nothing initialized): FLOPs are read from the compiled program
        model = nnx.eval_shape(lambda: GPT(config(args, unrolled=True, layers=layers), rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p, t: next_token_loss(nnx.merge(graphdef, p)(t[:, :-1]), t[:, 1:])  # noqa: E731
        for grad in (True, False):
            fn = jax.value_and_grad(loss) if grad else loss
            flops[(layers, grad)] = tx.profiling.inspect(jax.jit(fn).lower(params, tokens).compile()).flops
    half = args.layers - args.layers // 2
    S = (flops[(args.layers, True)] - flops[(args.layers // 2, True)]) / half * args.layers
    S_f = (flops[(args.layers, False)] - flops[(args.layers // 2, False)]) / half * args.layers
    return {"S": S, "S_f": S_f, "R": flops[(args.layers, True)] - S, "G": flops[(args.layers, True)]}


def executed(row: dict, parts: dict[str, float], p: int) -> tuple[float, float]:
    """``(FLOPs of the busiest device, of which recompute)`` per step from the table."""
    table, m, v = row["table"], row["m"], row["v"]
    S, S_f, R = parts["S"], parts["S_f"], parts["R"]
    per_fwd, per_bwd = S_f / (v * p * m), (S - S_f) / (v * p * m)
    busiest, recomputed = 0.0, 0.0
    for s in range(p):
        forwards = int((table.forward_mb[:, s] >= 0).sum())
        backwards = int((table.backward_mb[:, s] >= 0).sum())
        redo = backwards * per_fwd if row["recompute"] else 0.0
        # gpipe/circular: the head runs outside the pipeline on every device; otherwise per
        # microbatch on the last stage (the embedding, a gather, is part of R everywhere: small).
        rest = R if table.autodiff or s == p - 1 else 0.0
        total = forwards * per_fwd + backwards * per_bwd + redo + rest
        if total > busiest:
            busiest, recomputed = total, redo
    return busiest, recomputed


def build(args: argparse.Namespace, row: dict, tokens):
    import jax
    from flax import nnx

    from examples.gpt_small_tp.model import GPT, next_token_loss

    p = args.stages
    mesh = tx.MeshSpec(axes=("pipe",), shape=(p,), devices=jax.devices()[:p]).build()
    pp = tx.PP(axis="pipe", stages=p, microbatches=row["m"], repeats=row["v"], schedule=row["schedule"],
               recompute=row["recompute"], remat=row["remat"])
    sm = tx.shard(GPT(config(args), rngs=nnx.Rngs(0)), tx.Plan(pipeline_parallel=pp), mesh)
    step = jax.jit(tx.value_and_grad(lambda q, t: next_token_loss(sm.apply(q, t[:, :-1]), t[:, 1:])))
    batch = sm.shard_batch(tokens)
    start = time.perf_counter()
    compiled = step.lower(sm.params, batch).compile()
    return compiled, sm.params, batch, time.perf_counter() - start


def argument_parser() -> argparse.ArgumentParser:
    """The command line; ``argument_parser().parse_args([...])`` gives :func:`measure` its arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages p (= devices)")
    parser.add_argument("--microbatches", type=int, nargs="+", default=None, help="m (default 4p)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64, help="global batch in sequences (fixed; m varies)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (median kept)")
    parser.add_argument("--steps", type=int, default=2, help="steps per row per timing round")
    return parser


def measure(args: argparse.Namespace, rows=ROWS, deadline: float | None = None) -> tuple[dict, list[dict]]:
    """Compiles, inspects and times each row of ``rows`` (``(schedule, repeats, recompute, remat)``,
    gpipe at ``remat="none"`` among them: the time reference) for each ``m``, on the first ``p``
    devices. Timing rounds stop after ``deadline`` (``time.perf_counter()``), one round at least.

    Returns:
      ``(parts, rows)``: the one-device FLOPs (``S``, ``S_f``, ``R``, ``G``) and one dict per row
      with its schedule table, figures and step times (the compiled programs are dropped).
    """
    import jax
    import numpy as np

    p = args.stages
    started = time.perf_counter()
    tokens = np.random.default_rng(0).integers(0, config(args).vocab_size, (args.batch, args.seq_len + 1),
                                               dtype=np.int32)
    parts = one_device_flops(args, tokens)
    ideal = parts["G"] / p
    measured = []
    for m in args.microbatches or [4 * p]:
        for schedule, v, recompute, remat in rows:
            row = {"schedule": schedule, "v": v, "m": m, "recompute": recompute, "remat": remat}
            row["table"] = tx.PP(stages=p, microbatches=m, repeats=v, schedule=schedule).schedule_table()
            row["compiled"], row["params"], row["batch"], row["compile_s"] = build(args, row, tokens)
            stats = tx.profiling.inspect(row["compiled"])
            row["temp"] = stats.temp_bytes
            row["collectives"] = {k: (c.count, c.bytes) for k, c in stats.collectives.items() if c.count}
            row["flops"], row["recomputed"] = executed(row, parts, p)
            measured.append(row)
            print(f"  [{time.perf_counter() - started:4.0f} s] {schedule} v={v} m={m}"
                  f"{' recompute' if recompute else ''} remat={remat}: compiled in {row['compile_s']:.1f} s",
                  file=sys.stderr, flush=True)
    for row in measured:
        jax.block_until_ready(row["compiled"](row["params"], row["batch"]))
        row["times"] = []
    for round_ in range(args.rounds):
        if round_ and deadline is not None and time.perf_counter() > deadline:
            break
        for row in measured if round_ % 2 == 0 else measured[::-1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                out = row["compiled"](row["params"], row["batch"])
            jax.block_until_ready(out)
            row["times"].append((time.perf_counter() - t0) / args.steps)
    gpipe_time = {r["m"]: statistics.median(r["times"]) for r in measured
                  if r["schedule"] == "gpipe" and r["remat"] == "none"}
    for r in measured:
        del r["compiled"], r["params"], r["batch"]
        r["time"] = statistics.median(r["times"])
        r["overhead"] = r["flops"] / ideal - 1
        r["relative"] = r["time"] / gpipe_time[r["m"]]
        r["stash"] = "-" if r["table"].autodiff else ("recompute" if r["recompute"] else "residuals")
        r["bubble"] = r["table"].bubble_fraction
        r["formula"] = (p - 1) / (r["v"] * r["m"] + p - 1)
        r["ticks"] = r["table"].ticks
    return parts, measured


def print_table(args: argparse.Namespace, parts: dict, rows: list[dict]) -> None:
    p, ideal, mib = args.stages, parts["G"] / args.stages, 1 << 20
    print(f"GPT gradient step, {args.layers} layers, embed {args.embed}, {args.heads} heads, mlp {args.mlp}, "
          f"seq {args.seq_len}, global batch {args.batch}; p = {p} stages on {p} simulated CPU devices")
    print(f"one-device step {parts['G'] / 1e9:.3f} GFLOP (stack {parts['S'] / parts['G']:.1%}, rest "
          f"{parts['R'] / parts['G']:.1%}); ideal per device {ideal / 1e9:.3f} GFLOP")
    print()
    print(f"{'schedule':<11} {'m':>3} {'v':>2} {'stash':>9} {'remat':>9} {'ticks':>5} {'bubble':>6} {'formula':>7} "
          f"{'GFLOP/dev':>9} {'overhd':>7} {'recomp':>6} {'temp MiB':>8} {'permutes':>8} {'other collectives':>18} "
          f"{'ms':>7} {'/gpipe':>6}")
    for r in rows:
        permutes = r["collectives"].get("collective-permute", (0, 0))[0]
        other = sum(c for k, (c, _) in r["collectives"].items() if k != "collective-permute")
        print(f"{r['schedule']:<11} {r['m']:>3} {r['v']:>2} {r['stash']:>9} {r['remat']:>9} {r['ticks']:>5} "
              f"{r['bubble']:>6.1%} {r['formula']:>7.1%} {r['flops'] / 1e9:>9.3f} {r['overhead']:>7.1%} "
              f"{r['recomputed'] / ideal:>6.1%} {r['temp'] / mib:>8.2f} {permutes:>8} {other:>18} "
              f"{r['time'] * 1e3:>7.1f} {r['relative']:>5.2f}x")
    print()
    print("bubble: the table's lockstep idle share of slot time; formula (p-1)/(v m+p-1); overhd: the busiest "
          "device's executed FLOPs over the one-device step / p (recomp: of which recomputed forwards); "
          "permutes / other collectives: per step, loop-aware")


def print_checks(args: argparse.Namespace, parts: dict, rows: list[dict]) -> None:
    """PASS/FAIL for each target, on the full set of :data:`ROWS`."""
    p, ideal, mib = args.stages, parts["G"] / args.stages, 1 << 20
    for m in args.microbatches or [4 * p]:
        by = {(r["schedule"], r["recompute"], r["remat"]): r for r in rows if r["m"] == m}
        for name in ("1f1b", "interleaved"):
            for recompute, remat in ((False, "none"), (False, "save_dots"), (True, "none")):
                r = by[(name, recompute, remat)]
                within = r["overhead"] - r["recomputed"] / ideal <= r["formula"] + 0.10
                print(f"{'PASS' if within else 'FAIL'}: {name} ({'recompute' if recompute else 'residuals'}, "
                      f"remat {remat}) m={m} "
                      f"executed overhead {r['overhead']:.1%} (recompute {r['recomputed'] / ideal:.1%}) vs formula "
                      f"{r['formula']:.1%} + 10 points; step time {r['relative']:.2f}x gpipe")
        gpipe, one = by[("gpipe", False, "none")], by[("1f1b", False, "none")]
        print(f"{'PASS' if one['temp'] < gpipe['temp'] else 'FAIL'}: 1f1b temp {one['temp'] / mib:.2f} MiB < gpipe "
              f"{gpipe['temp'] / mib:.2f} MiB at m={m}")
        zb = by[("zbh1", False, "none")]
        print(f"{'PASS' if zb['bubble'] <= one['bubble'] / 2 else 'FAIL'}: zbh1 bubble "
              f"{zb['bubble']:.1%} <= half of 1f1b's {one['bubble']:.1%}")
        zb_time = zb["time"] / one["time"]
        print(f"{'PASS' if zb_time <= 1 else 'FAIL'}: zbh1 step time {zb_time:.2f}x 1f1b's (both at their defaults)")
        for name, limit in (("1f1b", 0.55), ("interleaved", 0.45)):
            for key in ((name, False, "none"), (name, False, "save_dots"), (name, True, "none")):
                r = by[key]
                print(f"{'PASS' if r['relative'] <= limit else 'FAIL'}: {name} ({'recompute' if key[1] else 'residuals'}, "
                      f"remat {key[2]}) step time {r['relative']:.2f}x gpipe's at its defaults, target <= {limit} "
                      f"({r['relative'] / by[('gpipe', False, 'save_dots')]['relative']:.2f}x gpipe with remat save_dots)")
        for name in ("circular", "interleaved"):
            r = by[(name, False, "none")]
            bad = {k: c for k, (c, _) in r["collectives"].items() if k in ("all-to-all", "all-gather")}
            print(f"{'PASS' if not bad else 'FAIL'}: {name} v={r['v']} all-to-all / all-gather per step: {bad or 'none'}")


def main() -> None:
    args = argument_parser().parse_args()
    started = time.perf_counter()
    tx.simulate_cpu_devices(args.stages)
    parts, rows = measure(args)
    print_table(args, parts, rows)
    print()
    print_checks(args, parts, rows)
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
