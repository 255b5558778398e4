"""Engine overhead: ``tx.Engine.fit`` against a hand-written ``jax.jit`` loop, same shardings.

Two models, each under data parallelism on simulated CPU devices: the MNIST-DP CNN (Flax Linen) and
the tiny GPT of ``examples/gpt_small_tp`` (Flax NNX). For each, both loops train from the same
parameters on the same batches (host NumPy -> global arrays each step), donating their state and
fetching metrics every 10 steps. Rounds alternate between the two so machine noise hits both; the
figure is the ratio of median seconds per step measured in this one run.

    python benchmarks/overhead.py                 # 8 devices, both models, 5 rounds of 100 steps
    python benchmarks/overhead.py --models cnn --rounds 9 --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import titanax as tx  # noqa: E402

METRIC_EVERY = 10  # both loops fetch their metrics every 10 steps (the Engine's log_every)


def _data_mesh(devices: int | None):
    import jax

    n = devices or jax.device_count()
    return tx.MeshSpec(axes=("data",), shape=(n,), devices=jax.devices()[:n]).build()


def _hand_loop(step, params, opt_state, loader, batch_sharding) -> Callable[[int], float]:
    """``run(n)``: ``n`` steps of the jitted ``step`` fed from ``loader``; seconds per step."""
    import jax

    carry = [params, opt_state]

    def run(n: int) -> float:
        pending = []
        start = time.perf_counter()
        for i in range(n):
            host = next(loader)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in host.items()}
            carry[0], carry[1], metrics = step(carry[0], carry[1], batch)
            pending.append(metrics)
            if (i + 1) % METRIC_EVERY == 0:
                jax.device_get(pending)
                pending = []
        jax.block_until_ready(carry[0])
        return (time.perf_counter() - start) / n

    return run


def _engine_loop(engine, step, state, loader) -> Callable[[int], float]:
    import jax

    carry = [state]

    def run(n: int) -> float:
        target = int(carry[0].step) + n
        start = time.perf_counter()
        carry[0] = engine.fit(step, loader, steps=target, state=carry[0])
        jax.block_until_ready(carry[0].params)
        return (time.perf_counter() - start) / n

    return run


def compare(run_hand: Callable[[int], float], run_engine: Callable[[int], float], rounds: int, steps: int,
            deadline: float | None = None) -> dict:
    """Compiles both (10 steps each), then alternates ``rounds`` rounds of ``steps`` steps; stops
    starting rounds after ``deadline`` (``time.perf_counter()``), one round at least."""
    run_hand(METRIC_EVERY), run_engine(METRIC_EVERY)
    hand, engine = [], []
    for _ in range(rounds):
        if hand and deadline is not None and time.perf_counter() > deadline:
            break
        hand.append(run_hand(steps))
        engine.append(run_engine(steps))
    h, t = statistics.median(hand), statistics.median(engine)
    return {"rounds": len(hand), "steps": steps, "hand_ms": [x * 1e3 for x in hand],
            "engine_ms": [x * 1e3 for x in engine], "hand_median_ms": h * 1e3, "engine_median_ms": t * 1e3,
            "ratio": t / h}


def linen_cnn(devices: int | None = None, rounds: int = 5, steps: int = 100, batch_size: int = 128,
              deadline: float | None = None) -> dict:
    """The MNIST-DP CNN (Linen), DP over the first ``devices`` devices (all by default)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from examples.mnist_dp.data import load_dataset
    from examples.mnist_dp.model import CNN, cross_entropy
    from examples.mnist_dp.steps import train_step

    x_train, y_train, _, _ = load_dataset(None)
    mesh = _data_mesh(devices)
    plan = tx.Plan(data_parallel=tx.DP(axis="data"))
    optimizer = tx.optim.adamw(1e-3)
    model = CNN()

    engine = tx.Engine(mesh=mesh, plan=plan, optimizer=optimizer, log_every=METRIC_EVERY)
    state = engine.init(model, example=x_train[:batch_size])
    data = {"image": x_train, "label": y_train}

    # the hand-written baseline: the same shardings, donation and metric fetches
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
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
    result = compare(
        _hand_loop(hand_step, params, opt_state, tx.data.ArrayLoader(data, batch_size=batch_size, seed=0),
                   batch_sharding),
        _engine_loop(engine, train_step, state, tx.data.ArrayLoader(data, batch_size=batch_size, seed=0)),
        rounds, steps, deadline)
    return {"model": "MNIST CNN (Linen)", "devices": mesh.size, "global_batch": batch_size, **result}


def nnx_gpt(devices: int | None = None, rounds: int = 5, steps: int = 50, batch_size: int = 32, seq_len: int = 64,
            layers: int | None = None, deadline: float | None = None) -> dict:
    """The tiny GPT of ``examples/gpt_small_tp`` (NNX), DP over the first ``devices`` devices."""
    import dataclasses

    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from examples.gpt_small_tp.model import GPT, TINY, next_token_loss
    from examples.gpt_small_tp.steps import train_step

    cfg = dataclasses.replace(TINY, num_layers=layers or TINY.num_layers)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (64 * batch_size, seq_len + 1), dtype=np.int32)
    data = {"tokens": tokens}
    mesh = _data_mesh(devices)
    optimizer = tx.optim.adamw(1e-3)
    engine = tx.Engine(mesh=mesh, plan=tx.Plan(data_parallel=tx.DP(axis="data")), optimizer=optimizer,
                       log_every=METRIC_EVERY)
    state = engine.init(lambda rngs: GPT(cfg, rngs=rngs), rng=0)

    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, _, rest = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    params = jax.device_put(jax.tree.map(np.asarray, state.params), replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)

    def hand_step(params, opt_state, batch):  # the same work as examples/gpt_small_tp/steps.py
        def loss_fn(p):
            t_BT1 = batch["tokens"]
            return next_token_loss(nnx.merge(graphdef, p, rest)(t_BT1[:, :-1]), t_BT1[:, 1:])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss}

    hand_step = jax.jit(hand_step, in_shardings=(replicated, replicated, batch_sharding),
                        out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
    result = compare(
        _hand_loop(hand_step, params, opt_state, tx.data.ArrayLoader(data, batch_size=batch_size, seed=0),
                   batch_sharding),
        _engine_loop(engine, train_step, state, tx.data.ArrayLoader(data, batch_size=batch_size, seed=0)),
        rounds, steps, deadline)
    return {"model": f"GPT tiny (NNX, {cfg.num_layers} layers, seq {seq_len})", "devices": mesh.size,
            "global_batch": batch_size, **result}


MODELS = {"cnn": linen_cnn, "gpt": nnx_gpt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 128 CNN, 32 GPT)")
    args = parser.parse_args()
    tx.simulate_cpu_devices(args.devices)

    for name in args.models:
        kwargs = {"batch_size": args.batch_size} if args.batch_size else {}
        r = MODELS[name](rounds=args.rounds, steps=args.steps, **kwargs)
        print(f"{r['model']}: devices {r['devices']}, global batch {r['global_batch']}, "
              f"{r['rounds']} rounds x {r['steps']} steps")
        print(f"  hand-written jax.jit loop: {r['hand_median_ms']:.2f} ms/step "
              f"(rounds: {', '.join(f'{x:.2f}' for x in r['hand_ms'])})")
        print(f"  tx.Engine.fit:             {r['engine_median_ms']:.2f} ms/step "
              f"(rounds: {', '.join(f'{x:.2f}' for x in r['engine_ms'])})")
        print(f"  ratio engine / hand-written: {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
