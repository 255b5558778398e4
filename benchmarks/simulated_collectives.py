"""How often simulated CPU devices deadlock in a collective, by the size of XLA's thread pools.

Each trial is a fresh process with 8 simulated devices that runs the tiny GPT's training gradient
(``tx.value_and_grad`` of the next-token loss) under a 1F1B pipeline x DP x TP plan
(``pipe 2 x data 2 x tensor 2``) ``--steps`` times. That step overlaps stage-to-stage permutes with
tensor-parallel all-reduces, so several collectives per device wait at once; with XLA's CPU
thread pools at their default size (the larger of the core count and the device count) the waiting
participants can hold every thread, and XLA aborts at its termination timeout (set short here).
``PJRT_NPROC`` sizes the pools; ``tx.simulate_cpu_devices`` sets it to 8 per device
(titanax/runtime/simulate.py).

    python benchmarks/simulated_collectives.py                        # pools of 8, 12, 16, 64; 4 trials each
    python benchmarks/simulated_collectives.py --threads 8 64 --trials 6 --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trial(steps: int) -> None:
    """Subprocess entry: compile and run the step ``steps`` times; prints the seconds per step."""
    sys.path.insert(0, ROOT)
    import jax
    from flax import nnx

    import titanax as tx
    from examples.gpt_small_tp.model import GPT, TINY, next_token_loss

    tx.simulate_cpu_devices(8)  # keeps the PJRT_NPROC and XLA_FLAGS this process was given
    plan = tx.Plan(pipeline_parallel=tx.PP(axis="pipe", stages=2, microbatches=2, schedule="1f1b"),
                   data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))
    mesh = tx.MeshSpec(axes=("pipe", "data", "tensor"), shape=(2, 2, 2)).build()
    sm = tx.shard(lambda: GPT(dataclasses.replace(TINY, num_layers=8), rngs=nnx.Rngs(0)), plan, mesh)
    step = jax.jit(tx.value_and_grad(
        lambda p, t_BT1: next_token_loss(sm.apply(p, t_BT1[:, :-1]), t_BT1[:, 1:])))
    batch = sm.shard_batch(jax.random.randint(jax.random.key(1), (8, 17), 0, 257))
    float(step(sm.params, batch)[0])  # compile
    start = time.perf_counter()
    for _ in range(steps):
        float(step(sm.params, batch)[0])
    print(f"seconds/step {(time.perf_counter() - start) / steps:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[8, 12, 16, 64], help="PJRT_NPROC values")
    parser.add_argument("--trials", type=int, default=4, help="fresh processes per value")
    parser.add_argument("--steps", type=int, default=10, help="executions of the step per process")
    parser.add_argument("--timeout", type=int, default=15, help="XLA's collective termination timeout (s)")
    parser.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        return trial(args.steps)
    print(f"1F1B x DP x TP step of the tiny GPT on 8 simulated devices, {os.cpu_count()} cores, "
          f"{args.steps} steps per process")
    print(f"{'PJRT_NPROC':>10}  {'deadlocked':>10}  {'s/step (median)':>15}")
    for threads in args.threads:
        env = {**os.environ, "PJRT_NPROC": str(threads), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_cpu_collective_call_terminate_timeout_seconds={args.timeout} "
                            f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={args.timeout}"}
        deadlocks, times = 0, []
        for _ in range(args.trials):
            result = subprocess.run([sys.executable, __file__, "--trial", "--steps", str(args.steps)],
                                    env=env, capture_output=True, text=True)
            if "Termination timeout" in result.stderr:
                deadlocks += 1
            elif result.returncode:
                sys.exit(f"a trial failed for another reason:\n{result.stderr[-3000:]}")
            else:
                times.append(float(result.stdout.split()[-1]))
        median = f"{sorted(times)[len(times) // 2]:.4f}" if times else "-"
        print(f"{threads:>10}  {f'{deadlocks} of {args.trials}':>10}  {median:>15}", flush=True)


if __name__ == "__main__":
    main()
