"""A training process for the checkpoint tests: MNIST-DP CNN on the digits, one layout, with
checkpoints; prints ``LOSS <step> <value>`` per step (repr, so runs compare bitwise).

    python checkpoint_worker.py --dir D --layout tp2 --steps 10 [--devices 8] [--every 5]
    python checkpoint_worker.py --dir D --big-save      # for the SIGKILL-during-save test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import titanax as tx  # noqa: E402


def layout(name: str) -> tuple[tx.MeshSpec, tx.Plan]:
    import jax

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
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (signal tests)")
    parser.add_argument("--big-save", action="store_true")
    args = parser.parse_args()
    tx.simulate_cpu_devices(args.devices)

    import jax
    import jax.numpy as jnp

    if args.big_save:
        return big_save(args.dir)

    from examples.mnist_dp.data import load_dataset
    from examples.mnist_dp.model import CNN, cross_entropy

    x, y, _, _ = load_dataset(None)
    spec, plan = layout(args.layout)
    checkpoint = tx.io.OrbaxCheckpoint(args.dir, every=args.every, keep=3)
    engine = tx.Engine(mesh=spec.build(), plan=plan, optimizer=tx.optim.sgd(0.05, momentum=0.9),
                       checkpoint=checkpoint, log_every=1)
    state = engine.init(CNN(), example=x[:64])

    @tx.step_fn
    def train_step(state, batch):
        def loss_fn(params):
            return cross_entropy(state.apply(params, batch["image"]), batch["label"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss}

    def report(step, state, metrics):
        print(f"LOSS {step} {metrics['loss']!r}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)

    loader = tx.data.ArrayLoader({"image": x, "label": y}, batch_size=64, seed=0)
    state = engine.fit(train_step, loader, steps=args.steps, hooks=[report])
    print(f"DONE {int(state.step)} {checkpoint.all_steps()}", flush=True)
    del jnp


def big_save(directory: str) -> None:
    """Save step 1 of a ~256 MB state and wait; start step 2 asynchronously and report, so the
    test can kill the process while step 2 is being written."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    mesh = tx.MeshSpec(axes=("data",)).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"))
    sm = tx.shard(nn.Dense(8192), plan, mesh, example=jnp.ones((8, 8192)))
    state = tx.create_train_state(sm, tx.optim.sgd(0.1))
    checkpoint = tx.io.OrbaxCheckpoint(directory, every=1, keep=5)
    start = time.perf_counter()
    checkpoint.save(1, state)
    returned = time.perf_counter() - start
    checkpoint.wait()
    print(f"SAVED 1 returned {returned:.4f} written {time.perf_counter() - start:.4f}", flush=True)
    state = state.replace(step=state.step + 1)
    start = time.perf_counter()
    checkpoint.save(2, state)
    print(f"SAVING 2 returned {time.perf_counter() - start:.4f}", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    main()
