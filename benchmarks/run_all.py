"""Every benchmark but the autoplan ranking, at reduced sizes, in one command (< 10 minutes on 2 cores).

Runs seven sections on 8 simulated CPU devices, each through the measuring functions of the
benchmark scripts beside this one, each with small sizes and a time cap, and writes what this run
measured to ``benchmarks/results.json`` and, as tables, to ``benchmarks/results.md``:

1. Engine overhead, Linen CNN and NNX GPT (``overhead.py``)
2. collective bytes against the analytic minimum, DP / FSDP / TP / SP (``collective_bytes.py``)
3. memory per device against the arithmetic (the same compiled programs)
4. compile time against depth (``compile_depth.py``, fresh processes)
5. pipeline schedules (``pipeline.py``, reduced)
6. DP and TP scaling on simulated devices (``scaling.py``)
7. compile-cache hits (``compile_cache.py``, two fresh processes)

    python benchmarks/run_all.py
    python benchmarks/run_all.py --only overhead scaling --out /tmp/bench   # some sections, elsewhere

A section that fails or runs past its cap is reported as such; the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import benchmarks.collective_bytes  # noqa: E402
import benchmarks.compile_cache  # noqa: E402
import benchmarks.compile_depth  # noqa: E402
import benchmarks.overhead  # noqa: E402
import benchmarks.pipeline  # noqa: E402
import benchmarks.scaling  # noqa: E402
import titanax as tx  # noqa: E402

DEVICES = 8
KIB, MIB = 1 << 10, 1 << 20


# ---------------------------------------------------------------------------------------- sections
# Each takes ``deadline`` (time.perf_counter() after which it starts no more timing rounds) and its
# sizes as keywords (run_all's defaults; the smoke test passes smaller ones), and returns a
# JSON-able dict with a one-line ``method``.


def overhead(deadline=None, rounds=5, steps=30, models=("cnn", "gpt")) -> dict:
    bench = benchmarks.overhead
    rows = []
    for name in models:
        rows.append(bench.MODELS[name](rounds=rounds, steps=steps, deadline=deadline))
        _log(f"{rows[-1]['model']}: ratio {rows[-1]['ratio']:.3f}")
    return {"method": "`tx.Engine.fit` against a hand-written `jax.jit` loop with the same shardings, donation and "
                      "metric fetches (every 10 steps), data parallel over the 8 devices, from the same parameters "
                      "on the same batches; rounds alternate between the two; ratio of the median ms/step "
                      "(`benchmarks/overhead.py`).", "rows": rows}


def collectives(deadline=None, plans=("DP", "FSDP", "TP", "SP"), layers=2, batch=16, seq_len=64) -> dict:
    bench = benchmarks.collective_bytes
    rows = []
    for name in plans:
        rows.append(bench.measure(name, layers, batch, seq_len))
        _log(f"{name}: collectives {rows[-1]['collective_ratio']:.3f} x minimum, compiled in "
             f"{rows[-1]['compile_s']:.1f} s")
    return {"method": "the training step of GPT tiny (AdamW) compiled from an abstract state; each collective, "
                      "loop-aware (`tx.profiling.collectives_by_axis`: a loop body's ops once per trip), as the bytes "
                      "one device sends in a ring algorithm (`tx.planner.ring_bytes`), over the analytic minimum "
                      "(`benchmarks/collective_bytes.py`).", "rows": rows}


def compile_depth(deadline=None, depths=(2, 8), variants=("scanned", "unrolled"), repeats=2,
                  unrolled_repeats=1) -> dict:
    bench = benchmarks.compile_depth
    argv = ["--depths", *map(str, depths), "--variants", *variants, "--repeats", str(repeats),
            "--unrolled-repeats", str(unrolled_repeats)]
    args = bench.argument_parser().parse_args(argv)
    timeout = None if deadline is None else max(60.0, deadline - time.perf_counter())
    best = bench.sweep(args, timeout=timeout)
    rows = [{**b, "variant": v, "depth": d} for (v, d), b in best.items()]
    return {"method": f"the GPT training step (embed {args.embed}, AdamW) under DP {args.devices // args.tensor} x "
                      f"TP {args.tensor}: `lower` and `compile` timed in a fresh process per case, persistent cache "
                      f"off, layer stack scanned ({repeats} runs) vs unrolled ({unrolled_repeats}), the fastest kept "
                      "(`benchmarks/compile_depth.py`).", "rows": rows}


def pipeline(deadline=None, stages=4, layers=8, microbatches=8, batch=32, rounds=3, steps=1,
             schedules=(("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zbh1", 1))) -> dict:
    bench = benchmarks.pipeline
    argv = ["--stages", str(stages), "--layers", str(layers), "--microbatches", str(microbatches),
            "--batch", str(batch), "--rounds", str(rounds), "--steps", str(steps)]
    args = bench.argument_parser().parse_args(argv)
    parts, rows = bench.measure(args, [(s, v, False, "none") for s, v in schedules], deadline=deadline)
    keep = ("schedule", "v", "m", "stash", "remat", "ticks", "bubble", "formula", "flops", "overhead", "temp",
            "collectives", "compile_s", "times", "time", "relative")
    return {"method": f"`benchmarks/pipeline.py` reduced: the gradient step of GPT tiny ({layers} layers, seq "
                      f"{args.seq_len}, global batch {batch}) in {stages} stages on {stages} devices, m = "
                      f"{microbatches}, each schedule at its defaults; executed FLOPs from the schedule table x the "
                      "one-device program's FLOPs, bubble from the table, temp memory and permutes (loop-aware) from "
                      "the compiled program, step time the median of rounds relative to gpipe's.",
            "one_device_gflop": parts["G"] / 1e9, "rows": [{k: r[k] for k in keep} for r in rows]}


def scaling(deadline=None, dp=(1, 2, 4, 8), tp=(1, 2, 4), per_device_batch=8, tp_batch=8, steps=3,
            rounds=3) -> dict:
    bench = benchmarks.scaling
    rows = bench.sweep(dp, tp, per_device_batch, tp_batch, deadline=deadline, steps=steps, rounds=rounds,
                       progress=lambda row: _log(bench.describe(row)))
    return {"method": f"GPT tiny training step (AdamW) on meshes over the first n of this process's {DEVICES} "
                      f"simulated devices (one process, no restart per size): DP at {per_device_batch} sequences "
                      f"per device, TP at a global batch of {tp_batch}; median of {rounds} rounds of {steps} "
                      "steps after a warm-up (`benchmarks/scaling.py`).", "rows": rows}


def compile_cache(deadline=None, layers=2) -> dict:
    bench = benchmarks.compile_cache
    timeout = None if deadline is None else max(60.0, (deadline - time.perf_counter()) / 2)
    result = bench.measure(layers=layers, timeout=timeout)
    return {"method": "two fresh processes, one after the other, compile the same GPT training step (DP 2 x TP 4) "
                      "with `titanax.runtime.enable_compile_cache` on one empty directory; each reports its "
                      "`compile_clock()` record (`benchmarks/compile_cache.py`).", **result}


# name -> (title, function, cap in seconds)
SECTIONS = {
    "overhead": ("Engine overhead", overhead, 100),
    "collectives": ("Collective bytes against the analytic minimum", collectives, 120),
    "compile_depth": ("Compile time against depth", compile_depth, 150),
    "pipeline": ("Pipeline schedules", pipeline, 150),
    "scaling": ("DP and TP scaling on simulated devices", scaling, 120),
    "compile_cache": ("Compile cache: cold against a persistent-cache hit", compile_cache, 90),
}

_STARTED = time.perf_counter()


def _log(text: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:5.0f} s]   {text}", flush=True)


def run_section(name: str, **sizes) -> dict:
    """One section, timed and capped; a failure is recorded, not raised."""
    title, function, cap = SECTIONS[name]
    print(f"[{time.perf_counter() - _STARTED:5.0f} s] {title} (cap {cap} s)", flush=True)
    start = time.perf_counter()
    try:
        out = function(deadline=start + cap, **sizes)
    except Exception as error:  # noqa: BLE001 - reported in the results, the other sections still run
        traceback.print_exc()
        out = {"error": f"{type(error).__name__}: {error}"[:2000]}
    out["seconds"] = time.perf_counter() - start
    out["cap_s"] = cap
    return out


# ---------------------------------------------------------------------------------------- results


def machine() -> dict:
    import flax
    import jax
    import optax

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "titanax": tx.__version__, "commit": commit.stdout.strip() or None,
            "simulated_devices": jax.device_count(), "load_average_at_start": os.getloadavg()}


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _overhead_md(r: dict) -> list[str]:
    return _table(["model", "devices", "global batch", "rounds x steps", "hand-written ms/step", "Engine ms/step",
                   "Engine / hand-written"],
                  [[x["model"], x["devices"], x["global_batch"], f"{x['rounds']} x {x['steps']}",
                    f"{x['hand_median_ms']:.2f}", f"{x['engine_median_ms']:.2f}", f"**{x['ratio']:.3f}**"]
                   for x in r["rows"]])


def _mesh(m: dict) -> str:
    return " x ".join(f"{k} {v}" for k, v in m.items())


def _collectives_md(r: dict) -> list[str]:
    rows = r["rows"]
    out = _table(["plan", "mesh", "collectives per step (count x, result KiB)", "sent per device KiB",
                  "analytic minimum KiB", "sent / minimum"],
                 [[x["plan"], _mesh(x["mesh"]),
                   "; ".join(f"{k}: {c} x, {x['collective_result_bytes'][k] / KIB:.0f}"
                             for k, c in x["collective_counts"].items()),
                   f"{x['moved_total'] / KIB:.1f}", f"{x['minimum_total'] / KIB:.1f}",
                   f"**{x['collective_ratio']:.3f}**"] for x in rows])
    x = rows[0]
    out += ["", f"GPT tiny, {x['layers']} layers, {x['params'] / 1e6:.2f} M parameters "
                f"({x['param_bytes'] / KIB:.1f} KiB), global batch {x['global_batch']}, seq {x['seq_len']} "
                "(the model's `max_seq_len`, so every parameter gets a gradient). Analytic minimum, bytes one device "
                "sends per step: DP one ring all-reduce of every gradient; FSDP ZeRO-3 (each parameter split over the "
                "axis all-gathered for the forward and again for the backward, its gradient reduce-scattered); TP "
                "`4 L + 2` all-reduces of the `[B/dp, T, D]` activations over `tensor` (two per block forward, two "
                "backward, the vocabulary-split embedding's output, the tied head's input gradient) plus each "
                "device's gradient shard all-reduced over `data`; SP the same as reduce-scatter + all-gather pairs "
                "(equal bytes) plus an all-reduce over `tensor` of the gradients of parameters not split over it "
                "(their gradients come from sequence shards). The loss's few scalars per token are left out."]
    by = {x["plan"]: x for x in rows}
    notes = []
    if "DP" in by:
        d = by["DP"]
        reduced = sum(b for k, b in d["collective_result_bytes"].items() if k.startswith("all-reduce"))
        notes.append(f"- DP: the all-reduces carry {reduced / KIB:.1f} KiB for {d['param_bytes'] / KIB:.1f} KiB of "
                     f"parameters, {(reduced - d['param_bytes']) / KIB:.1f} KiB more; the token embedding is "
                     f"{d['token_embedding_bytes'] / KIB:.1f} KiB: its gradient, from the lookup and from the tied "
                     "head, is all-reduced as two arrays before they are added.")
    if "FSDP" in by and by["FSDP"].get("ratio_with_reduce_scatter"):
        f = by["FSDP"]
        notes.append(f"- FSDP: XLA:CPU writes each gradient reduce-scatter as an all-reduce whose result every "
                     f"device slices; counting those all-reduces as the reduce-scatters GPU and TPU compilers emit, "
                     f"the ratio would be {f['ratio_with_reduce_scatter']:.3f}.")
    if "SP" in by:
        s = by["SP"]
        gathers = s["collective_counts"].get("all-gather (tensor)", 0)
        reduces = s["collective_counts"].get("all-reduce (tensor)", 0)
        notes.append(f"- SP: the same CPU rewrite turns its reduce-scatters into all-reduces (an all-reduce sends "
                     f"twice a reduce-scatter's bytes; the step has {reduces} all-reduces over `tensor`), and XLA "
                     f"gathers {gathers} times over `tensor` where the minimum has `4 L + 2` = "
                     f"{4 * s['layers'] + 2}.")
    return out + ([""] + notes if notes else [])


def _memory_md(r: dict) -> list[str]:
    out = _table(["plan", "mesh", "arithmetic (3 x params per device) KiB", "abstract state KiB",
                  "compiled arguments less batch KiB", "compiled / arithmetic", "XLA temporaries KiB"],
                 [[x["plan"], _mesh(x["mesh"]), f"{x['memory']['arithmetic_bytes'] / KIB:.1f}",
                   f"{x['memory']['abstract_state_bytes'] / KIB:.1f}", f"{x['memory']['compiled_state_bytes'] / KIB:.1f}",
                   f"**{x['memory']['compiled_ratio']:.4f}**", f"{x['memory']['temp_bytes'] / KIB:.0f}"]
                  for x in r["rows"]])
    return out + ["", "Arithmetic: the layout table's bytes per device (`Layout.bytes_per_device()`: each array over "
                      "the devices it is split across) times 3 (float32 parameters and AdamW's two moments); the "
                      "compiled figure also holds the step counters and the RNG key (a few bytes)."]


def _depth_md(r: dict) -> list[str]:
    rows = sorted(r["rows"], key=lambda x: (x["variant"], x["depth"]))
    out = _table(["variant", "depth", "parameters", "lower s", "compile s", "total s"],
                 [[x["variant"], x["depth"], f"{x['params'] / 1e6:.2f} M", f"{x['lower']:.2f}", f"{x['compile']:.2f}",
                   f"{x['total']:.2f}"] for x in rows])
    lines = []
    for variant in dict.fromkeys(x["variant"] for x in rows):
        v = [x for x in rows if x["variant"] == variant]
        if len(v) >= 2:
            lines.append(f"- {variant}: {v[-1]['depth']} layers take {v[-1]['total'] / v[0]['total']:.2f}x the "
                         f"compile time of {v[0]['depth']}.")
    return out + ([""] + lines if lines else [])


def _pipeline_md(r: dict) -> list[str]:
    out = _table(["schedule", "v", "m", "stash", "ticks", "bubble", "formula (p-1)/(vm+p-1)", "GFLOP/device",
                  "FLOP overhead", "temp MiB", "permutes/step", "compile s", "ms/step", "time / gpipe"],
                 [[x["schedule"], x["v"], x["m"], x["stash"], x["ticks"], f"{x['bubble']:.1%}", f"{x['formula']:.1%}",
                   f"{x['flops'] / 1e9:.3f}", f"{x['overhead']:.1%}", f"{x['temp'] / MIB:.2f}",
                   x["collectives"].get("collective-permute", (0, 0))[0], f"{x['compile_s']:.1f}",
                   f"{x['time'] * 1e3:.1f}", f"{x['relative']:.2f}x"] for x in r["rows"]])
    return out + ["", f"One-device step: {r['one_device_gflop']:.3f} GFLOP. FLOP overhead: the busiest device's "
                      "executed FLOPs over the one-device step / p. The full table (remat and recompute variants, "
                      "PASS/FAIL targets) is `python benchmarks/pipeline.py`; see docs/pipeline.md."]


def _scaling_md(r: dict) -> list[str]:
    rows = r["rows"]
    out = []
    for kind in ("dp", "tp"):
        mine = [x for x in rows if x["kind"] == kind]
        if not mine:
            continue
        base = mine[0]
        out += [f"**{kind.upper()}**", ""] + _table(
            ["devices", "global batch", "ms/step", "examples/s", "tokens/s", "examples/s vs 1st row", "compile s"],
            [[x["devices"], x["global_batch"], f"{x['step_ms']:.1f}", f"{x['examples_per_s']:.0f}",
              f"{x['tokens_per_s']:.0f}", f"{x['examples_per_s'] / base['examples_per_s']:.2f}x",
              f"{x['compile_s']:.1f}"] for x in mine]) + [""]
    return out + ["The simulated devices share this machine's cores: n devices do n devices' work on the same "
                  "cores, so these figures measure the cost of partitioning and collectives, not a speed-up."]


def _cache_md(r: dict) -> list[str]:
    rows = [[name, f"{x['seconds']:.2f}", f"{x['trace_seconds']:.2f}", f"{x['lower_seconds']:.2f}",
             f"{x['backend_seconds']:.2f}", x["cache_hits"], x["cache_misses"], f"{x['process_s']:.1f}"]
            for name, x in ((n, r[n]) for n in ("cold", "warm"))]
    out = _table(["process", "compile s", "trace s", "lower s", "XLA s (or cache load)", "cache hits",
                  "cache misses", "process wall s"], rows)
    return out + ["", f"The cached compile takes {r['warm']['seconds'] / r['cold']['seconds']:.2f}x the cold one's "
                      f"time ({r['warm']['backend_seconds'] / r['cold']['backend_seconds']:.3f}x for XLA's part); "
                      "tracing and lowering still run."]


RENDER = {"overhead": _overhead_md, "collectives": _collectives_md, "memory": _memory_md,
          "compile_depth": _depth_md, "pipeline": _pipeline_md, "scaling": _scaling_md,
          "compile_cache": _cache_md}
ORDER = ("overhead", "collectives", "memory", "compile_depth", "pipeline", "scaling", "compile_cache")
TITLES = {"memory": "Memory per device against the arithmetic", **{k: v[0] for k, v in SECTIONS.items()}}
MEMORY_METHOD = ("parameters + AdamW moments per device by arithmetic from the layout table, against the abstract "
                 "state's shards and the compiled step's argument bytes less this device's batch (the programs "
                 "of the previous section).")


def markdown(results: dict) -> str:
    m = results["machine"]
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    end = ", ".join(f"{x:.1f}" for x in m.get("load_average_at_end", ()))
    busy = max(m["load_average_at_start"]) > m["cpu_count"]
    lines = ["# Titanax benchmarks", "",
             f"Measured by `python benchmarks/run_all.py` on {m['date']}: {m['cpu_count']} CPU cores "
             f"({m['platform']}), Python {m['python']}, jax {m['jax']}, flax {m['flax']}, optax {m['optax']}, "
             f"titanax {m['titanax']} (commit {m['commit']}), {m['simulated_devices']} simulated CPU devices. "
             f"Every figure below comes from this one run (`results.json` holds them all); the whole run took "
             f"{results['wall_s']:.0f} s. Load average (1, 5, 15 minutes) at the start {load}, at the end "
             f"{end or '-'}" + (": above the core count, other processes shared the cores, so timings are "
                                "noisy; compare the rows of one table, not runs." if busy else "."), ""]
    for i, key in enumerate(k for k in ORDER if k in results["sections"]):
        r = results["sections"][key]
        lines += [f"## {i + 1}. {TITLES[key]}", ""]
        if "error" in r:
            lines += [f"Not measured: {r['error']}", ""]
            continue
        lines += [f"Method: {r['method']}", ""] + RENDER[key](r) + [""]
        if "seconds" in r:
            lines += [f"Section time {r['seconds']:.0f} s (cap {r['cap_s']} s).", ""]
    lines += ["## Not run here", "",
              "- `python benchmarks/autoplan.py` (about 10 minutes): calibrates the roofline constants on this "
              "machine, compiles and times every candidate plan of GPT tiny on 8 simulated devices, and reports "
              "the Spearman rank correlation between `tx.autoplan`'s estimated and the measured step times.",
              "- `python benchmarks/simulated_collectives.py`: how often simulated devices deadlock in a collective "
              "by the size of XLA's CPU thread pools (fresh processes per trial).",
              "- The full forms of the sections above: `overhead.py`, `collective_bytes.py`, `compile_depth.py`, "
              "`pipeline.py`, `scaling.py`, `compile_cache.py` (each `--help`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", default=HERE, help="directory for results.json and results.md")
    args = parser.parse_args()
    tx.simulate_cpu_devices(DEVICES)
    results = {"machine": machine(), "sections": {}}
    print(f"{results['machine']['cpu_count']} cores, jax {results['machine']['jax']}, "
          f"{results['machine']['simulated_devices']} simulated devices, load average "
          f"{results['machine']['load_average_at_start']}", flush=True)
    for name in args.only:
        results["sections"][name] = run_section(name)
        if name == "collectives" and "rows" in results["sections"][name]:
            results["sections"]["memory"] = {"method": MEMORY_METHOD, "rows": results["sections"][name]["rows"]}
    results["wall_s"] = time.perf_counter() - _STARTED
    results["machine"]["load_average_at_end"] = os.getloadavg()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results))
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.json in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
