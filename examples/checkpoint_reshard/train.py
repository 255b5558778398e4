"""Train under one plan, stop, and continue under another: checkpoints restore onto any layout.

    python examples/checkpoint_reshard/train.py --dir runs/reshard --layout tp2 --steps 10
    python examples/checkpoint_reshard/train.py --dir runs/reshard --layout fsdp --steps 20   # resumes at 11
    python examples/checkpoint_reshard/train.py --dir runs/reshard --layout dp --devices 4 --steps 30
    python examples/checkpoint_reshard/validate.py   # checks such a run against an uninterrupted one

The MNIST-DP CNN on scikit-learn's digits; each step prints ``LOSS <step> <value>`` (repr, so two
runs compare bitwise). The data position is saved with the state, so a resumed run sees exactly the
batches an uninterrupted one would. SIGTERM or Ctrl-C saves the current step and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)

import titanax as tx  # noqa: E402


def layout(name: str) -> tuple[tx.MeshSpec, tx.Plan]:
    import jax  # after tx.simulate_cpu_devices()

    dp, tp, fsdp = tx.DP(axis="data"), tx.TP(axis="tensor"), tx.FSDP(axis="fsdp")
    return {
        "dp": (tx.MeshSpec(axes=("data",)), tx.Plan(data_parallel=dp)),
        "fsdp": (tx.MeshSpec(axes=("fsdp",)), tx.Plan(fsdp=fsdp)),
        "tp2": (tx.MeshSpec(axes=("tensor",), devices=jax.devices()[:2]), tx.Plan(tensor_parallel=tp)),
        "tp4": (tx.MeshSpec(axes=("tensor",), devices=jax.devices()[:4]), tx.Plan(tensor_parallel=tp)),
        "dp_tp": (tx.MeshSpec(axes=("data", "tensor"), shape=(-1, 2)),
                  tx.Plan(data_parallel=dp, tensor_parallel=tp)),
    }[name]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--layout", default="dp")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.0, help="pause per step (to try SIGTERM)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the engine's resume line
    tx.simulate_cpu_devices(args.devices)

    from examples.mnist_dp.data import load_dataset
    from examples.mnist_dp.model import CNN
    from examples.mnist_dp.steps import train_step

    x, y, _, _ = load_dataset(None)
    spec, plan = layout(args.layout)
    checkpoint = tx.io.OrbaxCheckpoint(args.dir, every=args.every, keep=3)
    engine = tx.Engine(mesh=spec.build(), plan=plan, optimizer=tx.optim.sgd(0.05, momentum=0.9),
                       checkpoint=checkpoint, log_every=1)
    state = engine.init(CNN(), example=x[:64])

    def report(step, state, metrics):
        print(f"LOSS {step} {metrics['loss']!r}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)

    loader = tx.data.ArrayLoader({"image": x, "label": y}, batch_size=64, seed=0)
    state = engine.fit(train_step, loader, steps=args.steps, hooks=[report])
    if engine.stopped_by is not None:  # preempted: the step is saved; rerunning resumes it
        return
    print(f"DONE {int(state.step)} {checkpoint.all_steps()}", flush=True)


if __name__ == "__main__":
    main()
