"""Save step 1 of a large state, then start saving step 2 asynchronously and report: the SIGKILL
test kills this process mid-write. (Training runs use examples/checkpoint_reshard/train.py.)

    python checkpoint_save_worker.py --dir D
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import titanax as tx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    tx.simulate_cpu_devices(8)
    big_save(args.dir)


def big_state():
    """A ~64 MB TrainState (one Dense(4096) layer, SGD) under DP 8: its write takes long enough
    (seconds) for the test to kill the process in the middle of it."""
    import flax.linen as nn
    import jax.numpy as jnp

    mesh = tx.MeshSpec(axes=("data",)).build()
    sm = tx.shard(nn.Dense(4096), tx.Plan(data_parallel=tx.DP(axis="data")), mesh, example=jnp.ones((8, 4096)))
    return tx.create_train_state(sm, tx.optim.sgd(0.1))


def big_save(directory: str) -> None:
    """Save step 1 of a ~64 MB state and wait; start step 2 asynchronously and report, so the
    test can kill the process while step 2 is being written."""
    state = big_state()
    state = state.replace(step=state.step + 1)  # checkpoint step 1 holds a state at step 1
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
