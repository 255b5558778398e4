"""Train a small CNN on handwritten digits, data parallel over 8 simulated CPU devices.

    python examples/mnist_dp/train.py                      # scikit-learn's digits, DP over 8 devices
    python examples/mnist_dp/train.py --data-dir ~/mnist   # the real MNIST IDX files
    python examples/mnist_dp/train.py --manual             # explicit pmean of gradients (shard_map)
    python examples/mnist_dp/train.py --plan fsdp          # or dp_tp: DP 4 x TP 2

The model file (model.py) knows nothing of devices; the plan below decides the layout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import titanax as tx  # noqa: E402


def plans(devices: int) -> dict[str, tuple[tx.MeshSpec, tx.Plan]]:
    return {
        "dp": (tx.MeshSpec(axes=("data",)), tx.Plan(data_parallel=tx.DP(axis="data"))),
        "fsdp": (tx.MeshSpec(axes=("fsdp",)), tx.Plan(fsdp=tx.FSDP(axis="fsdp"))),
        "dp_tp": (tx.MeshSpec(axes=("data", "tensor"), shape=(-1, 2)),
                  tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8)")
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    parser.add_argument("--plan", choices=("dp", "fsdp", "dp_tp"), default="dp")
    parser.add_argument("--manual", action="store_true", help="explicit collectives under shard_map")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--csv", default=None, help="also write metrics to this CSV file")
    args = parser.parse_args(argv)
    if args.devices:
        tx.simulate_cpu_devices(args.devices)

    import jax

    from examples.mnist_dp.data import load_dataset
    from examples.mnist_dp.model import CNN
    from examples.mnist_dp.steps import eval_step, loss_and_accuracy
    from examples.mnist_dp.steps import train_step as gspmd_train_step

    x_train, y_train, x_test, y_test = load_dataset(args.data_dir)
    spec, plan = plans(args.devices)[args.plan]
    if args.manual and args.plan != "dp":
        parser.error("--manual goes with --plan dp (the step writes its own data-parallel collectives)")
    mesh = spec.build()
    loggers = [tx.logging.Basic()] + ([tx.logging.CSV(args.csv)] if args.csv else [])
    engine = tx.Engine(mesh=mesh, plan=plan, loggers=loggers, log_every=args.log_every,
                       optimizer=tx.optim.adamw(tx.optim.warmup_cosine(args.lr, warmup_steps=args.steps // 10,
                                                                       total_steps=args.steps),
                                                weight_decay=1e-4))
    state = engine.init(CNN(), example=x_train[: args.batch_size], rng=0)
    print(f"{len(x_train)} training / {len(x_test)} held-out images {x_train.shape[1:]}; "
          f"{spec.describe(mesh).splitlines()[1]}")

    if args.manual:
        @tx.step_fn(manual=True)
        def train_step(state, batch):  # this device's slice of the batch
            (loss, accuracy), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(
                state.params, state, batch)
            grads = tx.collectives.pmean(grads, "data")
            metrics = tx.collectives.pmean({"loss": loss, "accuracy": accuracy}, "data")
            return state.apply_gradients(grads=grads), metrics
    else:
        train_step = gspmd_train_step  # the global batch; XLA inserts the all-reduce

    data = tx.data.ArrayLoader({"image": x_train, "label": y_train}, batch_size=args.batch_size, seed=0)
    usable = len(x_test) - len(x_test) % args.devices  # every eval batch divides over the devices
    eval_batches = [{"image": x_test[i:i + 1000], "label": y_test[i:i + 1000]}
                    for i in range(0, usable, 1000)]
    eval_batches[-1] = {k: v[: len(v) - len(v) % args.devices] for k, v in eval_batches[-1].items()}
    state = engine.fit(train_step, data, steps=args.steps, eval_step=eval_step, eval_data=eval_batches,
                       eval_every=max(args.steps // 2, 1))
    final = engine.evaluate(eval_step, state, eval_batches)
    print(f"held-out accuracy {final['eval/accuracy']:.4f} (loss {final['eval/loss']:.4f}) after "
          f"{int(state.step)} steps")
    return final


if __name__ == "__main__":
    main()
