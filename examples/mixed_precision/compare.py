"""Compare the mixed-precision runs with the float32 one, from their metrics CSVs.

    titanax run examples/mixed_precision/fp32.yaml --cpu-devices 8
    titanax run examples/mixed_precision/bf16.yaml --cpu-devices 8
    titanax run examples/mixed_precision/fp16.yaml --cpu-devices 8
    python examples/mixed_precision/compare.py

prints each run's final held-out loss beside float32's and the float16 run's loss-scale
trajectory, and checks:

- the final held-out loss of bf16 and fp16 is within ``--tolerance`` (relative) of fp32's;
- fp16 skipped at least one step, its scale halved at every skipped step and doubled again later;
- a skipped step left the parameters as they were: the held-out loss after it equals, to the bit,
  the one after the step before (the runs evaluate after every step; step 1 has no step before it
  in the CSV).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

RUNS = ("fp32", "bf16", "fp16")
TOLERANCE = 0.01
"""Relative difference allowed between a run's final held-out loss and float32's."""


def read_metrics(path: str) -> dict[int, dict[str, float]]:
    """Step -> metrics of a ``logging.csv`` file (a repeated step keeps its last row)."""
    with open(path, newline="") as f:
        return {int(row["step"]): {k: float(v) for k, v in row.items() if k != "step" and v != ""}
                for row in csv.DictReader(f)}


def skipped(rows: dict[int, dict[str, float]]) -> list[int]:
    """The steps whose update was skipped (``skipped_steps`` went up at them)."""
    before, out = 0.0, []
    for step in sorted(rows):
        count = rows[step].get("skipped_steps", before)
        if count > before:
            out.append(step)
        before = count
    return out


def trajectory(rows: dict[int, dict[str, float]]) -> list[tuple[int, float, bool]]:
    """``(step, scale after it, whether it was skipped)`` at every step where the scale changed."""
    skips, out, scale = set(skipped(rows)), [], None
    for step in sorted(rows):
        if rows[step]["loss_scale"] != scale:
            scale = rows[step]["loss_scale"]
            out.append((step, scale, step in skips))
    return out


def check(runs: dict[str, dict[int, dict[str, float]]], tolerance: float = TOLERANCE) -> list[str]:
    """What is wrong with the runs (empty: all good)."""
    problems = []
    final = {name: rows[max(rows)]["eval/loss"] for name, rows in runs.items()}
    for name in ("bf16", "fp16"):
        diff = abs(final[name] - final["fp32"]) / final["fp32"]
        if diff > tolerance:
            problems.append(f"{name}: final held-out loss {final[name]:.4f} is {diff:.2%} from fp32's "
                            f"{final['fp32']:.4f} (tolerance {tolerance:.0%})")
    fp16 = runs["fp16"]
    skips = skipped(fp16)
    if not skips:
        problems.append("fp16: no step was skipped (raise precision.initial_scale to see an overflow)")
    steps = sorted(fp16)
    for step in skips:
        before = fp16[step - 1]["loss_scale"] if step > steps[0] else None
        if before is not None and fp16[step]["loss_scale"] != max(before / 2, 1.0):
            problems.append(f"fp16: step {step} was skipped but the scale went {before:g} -> "
                            f"{fp16[step]['loss_scale']:g}, not halved")
        if step > steps[0] and fp16[step]["eval/loss"] != fp16[step - 1]["eval/loss"]:
            problems.append(f"fp16: step {step} was skipped but the held-out loss moved "
                            f"{fp16[step - 1]['eval/loss']!r} -> {fp16[step]['eval/loss']!r}")
    if skips and not any(fp16[s]["loss_scale"] > fp16[s - 1]["loss_scale"] for s in steps[1:] if s > skips[0]):
        problems.append("fp16: the scale never grew after an overflow (lower precision.growth_interval)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.path.join("runs", "mixed_precision"),
                        help="holds fp32/metrics.csv, bf16/metrics.csv, fp16/metrics.csv")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    runs = {name: read_metrics(os.path.join(args.dir, name, "metrics.csv")) for name in RUNS}
    fp32 = runs["fp32"][max(runs["fp32"])]["eval/loss"]
    for name, rows in runs.items():
        last = max(rows)
        loss = rows[last]["eval/loss"]
        print(f"{name}: held-out loss after step {last} {loss:.4f} ({(loss - fp32) / fp32:+.2%} vs fp32), "
              f"{len(skipped(rows))} step(s) skipped")
    print("fp16 loss scale: " + ", ".join(f"step {s} {scale:g}" + (" (skipped)" if skip else "")
                                          for s, scale, skip in trajectory(runs["fp16"])))
    problems = check(runs, args.tolerance)
    for problem in problems:
        print("FAILED: " + problem)
    if not problems:
        print(f"OK: bf16 and fp16 within {args.tolerance:.0%} of fp32; the held-out loss did not move "
              "at a skipped step")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
