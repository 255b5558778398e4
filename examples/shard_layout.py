"""Lay one plain Flax model out on 8 simulated CPU devices under four plans and print, per
parameter, its layout and its cost per device; check each sharded forward against one device.

    python examples/shard_layout.py            # 8 fake CPU devices
    python examples/shard_layout.py --devices 4

The model file is free of parallelism: it only names the meaning of each dimension.
"""

from __future__ import annotations

import argparse

import titanax as tx


def build_model():
    import flax.linen as nn
    import jax

    def named(init, *names):
        return nn.with_logical_partitioning(init, names)

    class Classifier(nn.Module):
        """An MLP over flattened 8x8 images: 64 -> 512 -> 512 -> 16 (10 classes, padded)."""

        hidden: int = 512
        classes: int = 16

        @nn.compact
        def __call__(self, x_BI):
            h_BD = nn.Dense(self.hidden, kernel_init=named(nn.initializers.lecun_normal(), None, "embed"),
                            bias_init=named(nn.initializers.zeros, "embed"), name="stem")(x_BI)
            h_BF = nn.Dense(self.hidden, kernel_init=named(nn.initializers.lecun_normal(), "embed", "mlp"),
                            bias_init=named(nn.initializers.zeros, "mlp"), name="up")(jax.nn.gelu(h_BD))
            h_BF = tx.constrain(jax.nn.gelu(h_BF), ("batch", "mlp"))
            h_BD = h_BD + nn.Dense(self.hidden, kernel_init=named(nn.initializers.lecun_normal(), "mlp", "embed"),
                                   bias_init=named(nn.initializers.zeros, "embed"), name="down")(h_BF)
            return nn.Dense(self.classes, kernel_init=named(nn.initializers.lecun_normal(), "embed", None),
                            name="head")(h_BD)

    return Classifier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    tx.simulate_cpu_devices(args.devices)

    import jax
    import numpy as np

    model = build_model()
    x = jax.random.normal(jax.random.key(0), (args.batch, 64))
    reference = None
    n = args.devices
    plans = {
        f"data parallel {n}": (tx.MeshSpec(axes=("data",)), tx.Plan(data_parallel=tx.DP(axis="data"))),
        f"FSDP {n}": (tx.MeshSpec(axes=("fsdp",)), tx.Plan(fsdp=tx.FSDP(axis="fsdp"))),
        f"DP {n // 2} x TP 2": (tx.MeshSpec(axes=("data", "tensor"), shape=(-1, 2)),
                                tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))),
        f"FSDP {n // 2} x TP 2": (tx.MeshSpec(axes=("fsdp", "tensor"), shape=(-1, 2)),
                                  tx.Plan(fsdp=tx.FSDP(axis="fsdp"), tensor_parallel=tx.TP(axis="tensor"))),
    }
    for title, (spec, plan) in plans.items():
        mesh = spec.build()
        sm = tx.shard(model, plan, mesh, example=x, rng=0)
        print(f"=== {title}\n{sm.describe()}")
        out = np.asarray(sm(x))
        if reference is None:  # the same parameters, on one device, without Titanax
            params = jax.device_put(jax.tree.map(np.asarray, sm.params), jax.devices()[0])
            reference = np.asarray(jax.jit(model.apply)({"params": params}, x))
        error = float(np.max(np.abs(out - reference)))
        stats = tx.profiling.inspect(sm.lower(x).compile())
        collectives = ", ".join(f"{k} x{v.count}" for k, v in stats.collectives.items() if v.count) or "none"
        print(f"forward vs one device: max |diff| = {error:.2e}; compiled forward: "
              f"{stats.argument_bytes} argument bytes/device, collectives: {collectives}\n")
        assert error < 1e-5, f"{title}: sharded forward differs from one device by {error}"
    print("all layouts match the single-device forward")


if __name__ == "__main__":
    main()
