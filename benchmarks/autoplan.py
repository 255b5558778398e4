"""How well ``tx.autoplan``'s estimate ranks plans: GPT tiny on 8 simulated CPU devices.

Calibrates the roofline constants on this machine (``tx.planner.calibrate``), compiles every
candidate plan, runs each that fits for a few steps, and compares the estimated ranking with the
measured one (Spearman's rank correlation), and the chosen plan's measured step time with the
fastest measured.

    python benchmarks/autoplan.py [--steps 6] [--rounds 4] [--schedules 1f1b] [--json out.json]

The 8 simulated devices share this machine's cores: a plan that splits the work more evenly or
launches fewer kernels runs faster here, which is what the calibrated constants capture; on
accelerators, use the device presets instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import titanax as tx  # noqa: E402

tx.simulate_cpu_devices(8)

CONFIG = {
    "model": {"factory": "examples.gpt_small_tp.model:gpt", "args": {"preset": "tiny"}},
    "data": {"factory": "examples.gpt_small_tp.data:text_source",
             "args": {"seq_len": 64, "max_bytes": 1_000_000, "eval_batches": 1}, "batch_size": 32},
    "mesh": {"axes": ["data"], "shape": [8]},
    "plan": {"data_parallel": {"axis": "data"}},
    "optimizer": {"name": "adamw", "lr": 3e-3, "args": {"weight_decay": 0.1, "clip_norm": 1.0}},
    "train": {"step": "examples.gpt_small_tp.steps:train_step", "steps": 100},
}


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="timed steps per plan per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds taking the plans in turn")
    parser.add_argument("--schedules", nargs="*", default=["1f1b"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    spec = tx.planner.calibrate()
    print(f"calibrated in {time.perf_counter() - started:.1f} s: {spec}")
    search = tx.autoplan(CONFIG, devices=8, device=spec, time_budget=3600, schedules=args.schedules,
                         microbatch_multiples=(2,), measure_steps=args.steps, measure_rounds=args.rounds,
                         progress=True)
    print(search.table())
    rows = [r for r in search.rows if r.measured_seconds is not None and r.estimate is not None]
    estimated = [r.estimate.total_s for r in rows]
    measured = [r.measured_seconds for r in rows]
    rho = spearman(estimated, measured)
    fastest = min(measured)
    chosen = search.best.measured_seconds
    print(f"\n{len(rows)} plans compiled and measured; Spearman rank correlation estimate vs measured: {rho:.3f}")
    print(f"chosen {search.best.candidate.label}: measured {chosen * 1e3:.2f} ms; fastest measured "
          f"{rows[measured.index(fastest)].candidate.label}: {fastest * 1e3:.2f} ms ({chosen / fastest:.3f}x)")
    print(f"{'PASS' if len(rows) >= 10 else 'FAIL'} at least 10 candidates measured ({len(rows)})")
    print(f"{'PASS' if rho >= 0.8 else 'FAIL'} Spearman >= 0.8 ({rho:.3f})")
    print(f"{'PASS' if chosen <= 1.10 * fastest else 'FAIL'} chosen within 10% of the fastest measured "
          f"({chosen / fastest:.3f}x)")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:  # everything needed to estimate the plans again offline, with other constants
        with open(args.json, "w") as f:
            json.dump({"spearman": rho, "spec": dataclasses.asdict(spec), "rows": [
                {"plan": r.candidate.label, "mesh": r.candidate.mesh_section(),
                 "estimate_s": r.estimate.total_s, "measured_s": r.measured_seconds,
                 "bound": r.estimate.bound, "flops": r.flops, "bytes_accessed": r.bytes_accessed,
                 "collective_bytes": r.collective_bytes,
                 "collectives": [{"axes": list(axes), "kind": kind, "count": c.count, "bytes": c.bytes}
                                 for axes, kinds in r.collectives.items() for kind, c in kinds.items()]}
                for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
