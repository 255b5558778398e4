"""Check that stopping and resuming on another layout changes nothing: runs train.py three times.

1. ``--layout SOURCE`` for the first half of the steps (checkpoint saved),
2. ``--layout TARGET`` (optionally on fewer devices) resuming to the end from that checkpoint,
3. ``--layout SOURCE`` uninterrupted from scratch to the end,

and compares the losses of the resumed half: bitwise when the layout is unchanged, within
``--tolerance`` otherwise.

    python examples/checkpoint_reshard/validate.py                          # tp2 -> fsdp, 10 + 10 steps
    python examples/checkpoint_reshard/validate.py --source fsdp --target dp_tp
    python examples/checkpoint_reshard/validate.py --source dp --target dp --target-devices 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def run(*args: str) -> dict[int, float]:
    result = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"train.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return {int(line.split()[1]): float(line.split()[2])
            for line in result.stdout.splitlines() if line.startswith("LOSS ")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="tp2")
    parser.add_argument("--target", default="fsdp")
    parser.add_argument("--target-devices", default="8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    half = args.steps // 2
    with tempfile.TemporaryDirectory() as scratch:
        resumed_dir, reference_dir = os.path.join(scratch, "resumed"), os.path.join(scratch, "reference")
        run("--dir", resumed_dir, "--layout", args.source, "--steps", str(half), "--every", str(half))
        resumed = run("--dir", resumed_dir, "--layout", args.target, "--devices", args.target_devices,
                      "--steps", str(args.steps), "--every", str(half))
        reference = run("--dir", reference_dir, "--layout", args.source, "--steps", str(args.steps),
                        "--every", str(args.steps))
    steps = list(range(half + 1, args.steps + 1))
    if sorted(resumed) != steps:
        sys.exit(f"the resumed run trained steps {sorted(resumed)}, expected {steps}")
    worst = max(abs(resumed[s] - reference[s]) for s in steps)
    same_layout = args.source == args.target and args.target_devices == "8"
    print(f"{args.source} (8 devices) -> {args.target} ({args.target_devices} devices): steps "
          f"{steps[0]}-{steps[-1]}, max |loss difference| = {worst:.3e}")
    ok = worst == 0.0 if same_layout else worst <= args.tolerance
    if not ok:
        sys.exit(f"FAILED: difference {worst} exceeds {'0 (bitwise)' if same_layout else args.tolerance}")
    print("OK: the resumed run matches the uninterrupted one" + (" bitwise" if same_layout else ""))


if __name__ == "__main__":
    main()
