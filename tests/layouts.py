"""The layouts the parity and golden tests run: a mesh and a plan each, on 8 fake CPU devices."""

from __future__ import annotations

import jax

import titanax as tx


def layout(name: str, extra_rules: tx.Rules | None = None) -> tuple[jax.sharding.Mesh, tx.Plan]:
    """``(mesh, plan)`` for one of :data:`LAYOUTS`; ``extra_rules`` carries path rules."""
    devices = jax.devices()
    meshes = {
        "dp8": tx.MeshSpec(axes=("data",)),
        "fsdp8": tx.MeshSpec(axes=("fsdp",)),
        "tp2": tx.MeshSpec(axes=("tensor",), devices=devices[:2]),
        "tp4": tx.MeshSpec(axes=("tensor",), devices=devices[:4]),
        "dp4_tp2": tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)),
        "fsdp4_tp2": tx.MeshSpec(axes=("fsdp", "tensor"), shape=(4, 2)),
    }
    dp = tx.DP(axis="data") if "dp" in name.replace("fsdp", "") else None
    fsdp = tx.FSDP(axis="fsdp") if "fsdp" in name else None
    tp = tx.TP(axis="tensor") if "tp" in name else None
    plan = tx.Plan(data_parallel=dp, fsdp=fsdp, tensor_parallel=tp, rules=extra_rules, strict=True)
    return meshes[name].build(), plan


LAYOUTS = ("dp8", "fsdp8", "tp2", "tp4", "dp4_tp2", "fsdp4_tp2")
