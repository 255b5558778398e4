"""The GPT example under tensor parallelism: parity with one device, the collectives XLA built per
layer, and a checkpoint that moves from TP 2 to TP 4."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import titanax as tx
from examples.gpt_small_tp.model import GPT, TINY, next_token_loss
from titanax.profiling import inspect

BATCH, SEQ = 8, 32
TOLERANCE = 1e-5


def tokens(seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (BATCH, SEQ + 1), 0, 257)


def loss_fn(apply, params, tokens_BT1):
    return next_token_loss(apply(params, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients of the model on one device, no Titanax involved."""
    model = GPT(TINY, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
    return jax.jit(jax.value_and_grad(lambda p, t: loss_fn(apply, p, t)))(params, tokens())


def layout(kind: str) -> tuple[tx.MeshSpec, tx.Plan]:
    tp = lambda **kw: tx.TP(axis="tensor", **kw)
    dp = tx.DP(axis="data")
    return {
        "tp2": (tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)), tx.Plan(data_parallel=dp, tensor_parallel=tp())),
        "tp4": (tx.MeshSpec(axes=("tensor",), shape=(4,), devices=jax.devices()[:4]), tx.Plan(tensor_parallel=tp())),
        "tp8": (tx.MeshSpec(axes=("tensor",)), tx.Plan(tensor_parallel=tp())),
        "dp2_tp4": (tx.MeshSpec(axes=("data", "tensor"), shape=(2, 4)), tx.Plan(data_parallel=dp, tensor_parallel=tp())),
        "fsdp2_tp4": (tx.MeshSpec(axes=("fsdp", "tensor"), shape=(2, 4)),
                      tx.Plan(fsdp=tx.FSDP(axis="fsdp"), tensor_parallel=tp())),
        "sp_tp4": (tx.MeshSpec(axes=("data", "tensor"), shape=(2, 4)),
                   tx.Plan(data_parallel=dp, tensor_parallel=tp(sequence_parallel=True))),
    }[kind]


def sharded(kind: str, cfg=TINY) -> tx.ShardedModel:
    spec, plan = layout(kind)
    return tx.shard(lambda: GPT(cfg, rngs=nnx.Rngs(0)), dataclasses.replace(plan, strict=True), spec.build())


@pytest.mark.parametrize("kind", ["tp2", "tp4", "tp8", "dp2_tp4", "fsdp2_tp4", "sp_tp4"])
def test_loss_and_gradients_match_one_device(kind, reference):
    ref_loss, ref_grads = reference
    sm = sharded(kind)
    batch = sm.shard_batch(tokens())
    loss, grads = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(sm.apply, p, t)))(sm.params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat_ref)
    for (path, want), got in zip(flat_ref, flat):
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE, err_msg=jax.tree_util.keystr(path))
    # Every matrix of the stack is split over the tensor axis: nothing large is replicated.
    for leaf in sm.layout:
        if leaf.path.endswith("kernel"):
            assert "tensor" in str(leaf.spec), (leaf.path, leaf.spec)


def forward_collectives(kind: str, layers: int) -> dict[str, tuple[int, int]]:
    """Collectives of the compiled forward pass with the layer stack unrolled."""
    sm = sharded(kind, dataclasses.replace(TINY, num_layers=layers, unroll_layers=True))
    compiled = jax.jit(sm.apply).lower(sm.params, sm.shard_batch(tokens()[:, :-1])).compile()
    return {k: (v.count, v.bytes) for k, v in inspect(compiled).collectives.items()}


def per_layer(kind: str) -> dict[str, tuple[int, int]]:
    three, two = forward_collectives(kind, 3), forward_collectives(kind, 2)
    return {k: (three[k][0] - two[k][0], three[k][1] - two[k][1]) for k in three
            if three[k] != two[k]}


def test_tensor_parallel_forward_has_two_all_reduces_per_layer():
    # DP 2 x TP 4: each device holds 4 sequences of 32 positions x 64 wide, in float32.
    activation = (BATCH // 2) * SEQ * TINY.embed_dim * 4
    assert per_layer("dp2_tp4") == {"all-reduce": (2, 2 * activation)}


def test_sequence_parallel_forward_has_two_gather_scatter_pairs_per_layer():
    activation = (BATCH // 2) * SEQ * TINY.embed_dim * 4
    layer = per_layer("sp_tp4")
    # Before each column-parallel matmul the sequence is gathered: [B, T, D] per device.
    assert layer.pop("all-gather") == (2, 2 * activation)
    # After each row-parallel matmul the partial sums are reduced into sequence shards. XLA's GPU and
    # TPU pipelines emit a reduce-scatter; its CPU pipeline has no reduce-scatter rewrite and emits
    # the same reduction as an all-reduce whose result each device slices.
    if "reduce-scatter" in layer:
        assert layer.pop("reduce-scatter") == (2, 2 * activation // 4)
    else:
        assert layer.pop("all-reduce") == (2, 2 * activation)
    assert layer == {}, f"unexpected collectives per layer: {layer}"


def test_checkpoint_written_under_tp2_continues_under_tp4(tmp_path):
    data = np.asarray(jax.random.randint(jax.random.key(3), (4 * BATCH, SEQ + 1), 0, 257), np.int32)

    @tx.step_fn
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(state.apply, p, batch["tokens"]))(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss}

    def engine(kind: str, checkpoint: tx.io.OrbaxCheckpoint | None) -> tx.Engine:
        spec, plan = layout(kind)
        eng = tx.Engine(mesh=spec.build(), plan=plan, optimizer=tx.optim.adamw(1e-2), log_every=1,
                        checkpoint=checkpoint)
        eng.init(lambda rngs: GPT(TINY, rngs=rngs), rng=0)
        return eng

    def losses_of(eng: tx.Engine, steps: int) -> dict[int, float]:
        seen: dict[int, float] = {}
        loader = tx.data.ArrayLoader({"tokens": data}, batch_size=BATCH, seed=0)
        eng.fit(train_step, loader, steps=steps, hooks=[lambda step, state, m: seen.__setitem__(step, m["loss"])])
        return seen

    # One uninterrupted TP 2 run that also checkpoints step 2; its step 3 is the reference.
    directory = tmp_path / "ckpt"
    uninterrupted = losses_of(engine("tp2", tx.io.OrbaxCheckpoint(directory, every=2, async_save=False)), 3)
    shutil.rmtree(directory / "3")  # as if the run had stopped after step 2
    tp4 = engine("dp2_tp4", tx.io.OrbaxCheckpoint(directory, every=100, async_save=False))
    continued = losses_of(tp4, 3)  # restores step 2 (and the data position), then trains step 3
    assert list(continued) == [3], continued
    kernel = tp4.state.params["blocks"]["layer"]["mlp"]["up"]["kernel"]
    assert kernel.get_value().sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert kernel.get_value().sharding.mesh.shape["tensor"] == 4
    assert abs(continued[3] - uninterrupted[3]) <= TOLERANCE, (continued, uninterrupted)
