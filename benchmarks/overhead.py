"""Engine overhead: ``tx.Engine.fit`` against a hand-written ``jax.jit`` loop, same shardings.

Both train the MNIST-DP CNN under data parallelism on simulated CPU devices, from the same
parameters, on the same batches (host NumPy -> global arrays each step), donating their state and
fetching metrics every 10 steps. Rounds alternate between the two so machine noise hits both; the
figure is the ratio of median seconds per step measured in this one run.

    python benchmarks/overhead.py                 # 8 devices, 5 rounds of 100 steps
    python benchmarks/overhead.py --rounds 9 --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import titanax as tx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    tx.simulate_cpu_devices(args.devices)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from examples.mnist_dp.data import load_dataset
    from examples.mnist_dp.model import CNN, cross_entropy
    from examples.mnist_dp.steps import train_step

    x_train, y_train, _, _ = load_dataset(None)
    mesh = tx.MeshSpec(axes=("data",)).build()
    plan = tx.Plan(data_parallel=tx.DP(axis="data"))
    optimizer = tx.optim.adamw(1e-3)
    model = CNN()

    # ---- Titanax
    engine = tx.Engine(mesh=mesh, plan=plan, optimizer=optimizer, log_every=10)
    state = engine.init(model, example=x_train[: args.batch_size])

    loader = tx.data.ArrayLoader({"image": x_train, "label": y_train}, batch_size=args.batch_size, seed=0)

    # ---- hand-written baseline: the same shardings, donation and metric fetches
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(jax.tree.map(np.asarray, state.params), replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)

    def hand_step(params, opt_state, batch):  # the same work as examples/mnist_dp/steps.py
        def loss_fn(p):
            logits = model.apply({"params": p}, batch["image"])
            return cross_entropy(logits, batch["label"]), jnp.mean(jnp.argmax(logits, -1) == batch["label"])

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}

    hand_step = jax.jit(hand_step, in_shardings=(replicated, replicated, batch_sharding),
                        out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
    hand_loader = tx.data.ArrayLoader({"image": x_train, "label": y_train}, batch_size=args.batch_size, seed=0)

    def run_hand(n: int) -> float:
        nonlocal params, opt_state
        pending = []
        start = time.perf_counter()
        for i in range(n):
            host = next(hand_loader)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in host.items()}
            params, opt_state, loss = hand_step(params, opt_state, batch)
            pending.append(loss)
            if (i + 1) % 10 == 0:
                jax.device_get(pending)
                pending = []
        jax.block_until_ready(params)
        return (time.perf_counter() - start) / n

    def run_engine(n: int) -> float:
        nonlocal state
        target = int(state.step) + n
        start = time.perf_counter()
        state = engine.fit(train_step, loader, steps=target, state=state)
        jax.block_until_ready(state.params)
        return (time.perf_counter() - start) / n

    run_hand(10), run_engine(10)  # compile both
    hand, titanax = [], []
    for _ in range(args.rounds):
        hand.append(run_hand(args.steps))
        titanax.append(run_engine(args.steps))
    h, t = statistics.median(hand), statistics.median(titanax)
    print(f"devices {args.devices}, global batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps")
    print(f"hand-written jax.jit loop: {h * 1e3:.2f} ms/step (rounds: {', '.join(f'{x * 1e3:.2f}' for x in hand)})")
    print(f"tx.Engine.fit:             {t * 1e3:.2f} ms/step (rounds: {', '.join(f'{x * 1e3:.2f}' for x in titanax)})")
    print(f"ratio engine / hand-written: {t / h:.3f}")


if __name__ == "__main__":
    main()
