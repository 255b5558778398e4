"""Pipeline order of the layer stack under ``PP(repeats>1)``: each device holds exactly its chunks,
and checkpoints hold natural order, so they restore across plans bit-exactly.

No step runs through the pipeline here: only shard, create state, save and restore.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import titanax as tx
from titanax.parallel.layer_order import LayerOrder
from titanax.parallel.layout import path_string

LAYERS, P, V = 12, 2, 3  # layers, stages, repeats: chunks of 12 / (2 * 3) = 2 layers (p != v:
# the conversion is then not its own inverse)
KERNEL = "blocks/layer/up/kernel"


def _init(init, *names):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class Block(nnx.Module):
    """A residual MLP block (small, so that building the model compiles fast)."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        normal = nnx.initializers.normal(0.5)
        self.up = nnx.Linear(8, 16, rngs=rngs, kernel_init=_init(normal, "embed", "mlp"),
                             bias_init=_init(normal, "mlp"))
        self.down = nnx.Linear(16, 8, rngs=rngs, kernel_init=_init(normal, "mlp", "embed"),
                               use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(x)))


class Tiny(nnx.Module):
    """An embedding, a tx.nn.LayerStack of blocks (the pipelined part) and a head."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(16, 8, rngs=rngs, embedding_init=_init(nnx.initializers.normal(), "vocab", "embed"))
        self.blocks = tx.nn.LayerStack(lambda r: Block(rngs=r), LAYERS, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.embed.attend(self.blocks(self.embed(tokens)))


def factory() -> Tiny:
    return Tiny(rngs=nnx.Rngs(0))


def flat(tree) -> dict[str, np.ndarray]:
    return {path_string(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shardings(tree) -> list:
    return [x.sharding for x in jax.tree.leaves(tree)]


def assert_trees_equal(got, want) -> None:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


def touched(state: tx.TrainState) -> tx.TrainState:
    """One optimizer update with the parameters as gradients: Adam's moments then differ per layer
    (no model call, so no pipeline)."""
    return jax.jit(lambda s: s.apply_gradients(grads=s.params))(state)


@pytest.fixture(scope="module")
def built():
    devices = jax.devices()[:2]
    pp_plan = tx.Plan(pipeline_parallel=tx.PP(stages=P, microbatches=2, repeats=V, schedule="circular"))
    pp = tx.shard(factory, pp_plan, tx.MeshSpec(axes=("pipe",), devices=devices).build())
    flat_model = tx.shard(factory, tx.Plan(fsdp=tx.FSDP(axis="fsdp")),
                          tx.MeshSpec(axes=("fsdp",), devices=devices).build())
    optimizer = tx.optim.adamw(1e-2)
    return {"pp": pp, "flat": flat_model, "optimizer": optimizer,
            "pp_state": touched(tx.create_train_state(pp, optimizer)),
            "flat_state": tx.create_train_state(flat_model, optimizer)}


def test_permutation_follows_the_definition():
    order = LayerOrder(num_layers=12, stages=2, repeats=3, paths=("w",))
    lc = 2
    want = [(r * 2 + s) * lc + k for s in range(2) for r in range(3) for k in range(lc)]
    assert order.permutation.tolist() == want
    assert not order.is_identity and LayerOrder(8, 4, 1, ("w",)).is_identity
    assert hash(order) == hash(LayerOrder(12, 2, 3, ("w",)))
    x = {"w": np.arange(12 * 3).reshape(12, 3), "b": np.arange(12)}
    stored, _ = order.to_pipeline(x)
    np.testing.assert_array_equal(stored["w"], x["w"][order.permutation])
    np.testing.assert_array_equal(stored["b"], x["b"])  # not a stack path
    np.testing.assert_array_equal(order.to_natural(stored)[0]["w"], x["w"])


def test_stack_is_stored_in_pipeline_order_with_each_device_holding_its_chunks(built):
    pp, flat_model = built["pp"], built["flat"]
    order = pp.layer_order
    assert order == LayerOrder(LAYERS, P, V, order.paths) and KERNEL in order.paths
    assert flat_model.layer_order is None and "embed/embedding" not in order.paths
    stored, natural = flat(pp.params), flat(flat_model.params)
    for path in natural:
        want = natural[path][order.permutation] if path in order.paths else natural[path]
        np.testing.assert_array_equal(stored[path], want, err_msg=path)
    assert_trees_equal(pp.natural_params(), flat_model.params)

    kernel = jax.tree_util.tree_flatten_with_path(pp.params)[0]
    kernel = next(x for p, x in kernel if path_string(p) == KERNEL)
    lc = LAYERS // (P * V)
    mesh_devices = list(pp.mesh.devices.flat)
    for shard in kernel.addressable_shards:
        stage = mesh_devices.index(shard.device)
        chunks = [r * P + stage for r in range(V)]  # the chunks stage s runs, in order
        layers = [c * lc + k for c in chunks for k in range(lc)]
        np.testing.assert_array_equal(np.asarray(shard.data), natural[KERNEL][layers])


def test_checkpoint_holds_natural_order_and_restores_across_plans(built, tmp_path):
    pp_state, flat_state, optimizer = built["pp_state"], built["flat_state"], built["optimizer"]
    order = pp_state.layer_order
    assert order is built["pp"].layer_order
    want_params, want_opt = order.to_natural(pp_state.params, pp_state.opt_state, optimizer)
    # The same update on the model without PP gives the natural order independently.
    reference = touched(flat_state)
    assert_trees_equal(want_params, reference.params)
    assert_trees_equal(want_opt, reference.opt_state)
    mu = flat(pp_state.opt_state)
    assert any(path.endswith(KERNEL) and np.any(value) for path, value in mu.items())

    checkpoint = tx.io.OrbaxCheckpoint(tmp_path / "ckpt", async_save=False)
    checkpoint.save(1, pp_state)
    restored, _ = checkpoint.restore(flat_state)  # circular PP -> FSDP
    assert restored.layer_order is None
    assert_trees_equal(restored.params, reference.params)
    assert_trees_equal(restored.opt_state, reference.opt_state)
    assert shardings(restored.params) == shardings(flat_state.params)
    assert shardings(restored.opt_state) == shardings(flat_state.opt_state)

    checkpoint.save(2, restored)
    back, _ = checkpoint.restore(built["pp_state"], step=2)  # FSDP -> circular PP
    assert back.layer_order is order
    assert_trees_equal(back.params, pp_state.params)
    assert_trees_equal(back.opt_state, pp_state.opt_state)
    assert shardings(back.params) == shardings(pp_state.params)
    assert shardings(back.opt_state) == shardings(pp_state.opt_state)
    checkpoint.close()
