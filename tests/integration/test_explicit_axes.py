"""A model written in JAX's explicit-sharding style — its activations annotated with
``out_sharding=P(...)`` over mesh axes, as flax's Gemma example writes them — trains as written on
a mesh with Explicit axes: FSDP 4 x TP 2 through ``tx.Engine`` matches one device, and its
checkpoint resumes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import titanax as tx

VOCAB, EMBED, HEADS, HEAD_DIM, MLP, LAYERS, SEQ, BATCH = 64, 32, 4, 8, 64, 2, 8, 16
init = nnx.initializers.normal(0.02)


def param(rngs, shape, names):
    """A weight annotated with logical names; the plan's rules map them to mesh axes."""
    return nnx.Param(init(rngs.params(), shape), out_sharding=names)


class RMSNorm(nnx.Module):
    def __init__(self, rngs):
        self.scale = nnx.Param(jnp.zeros((EMBED,)), out_sharding=("embed",))

    def __call__(self, x_BTD):
        normed = x_BTD * jax.lax.rsqrt(jnp.mean(x_BTD**2, axis=-1, keepdims=True) + 1e-6)
        return normed * (1 + self.scale[...])


class Block(nnx.Module):
    """Gemma's layout: pre-norm attention and gated MLP, every einsum's output sharding written out."""

    def __init__(self, rngs):
        self.attn_norm, self.mlp_norm = RMSNorm(rngs), RMSNorm(rngs)
        self.q_DHK = param(rngs, (EMBED, HEADS, HEAD_DIM), ("embed", "heads", None))
        self.kv_CDHK = param(rngs, (2, EMBED, HEADS, HEAD_DIM), (None, "embed", "heads", None))
        self.out_HKD = param(rngs, (HEADS, HEAD_DIM, EMBED), ("heads", None, "embed"))
        self.gate_CDF = param(rngs, (2, EMBED, MLP), (None, "embed", "mlp"))
        self.down_FD = param(rngs, (MLP, EMBED), ("mlp", "embed"))

    def __call__(self, x_BTD):
        h_BTD = self.attn_norm(x_BTD)
        q_BTHK = jnp.einsum("btd,dhk->bthk", h_BTD, self.q_DHK[...], out_sharding=P("fsdp", None, "tensor", None))
        k_BSHK, v_BSHK = (jnp.einsum("btd,dhk->bthk", h_BTD, w, out_sharding=P("fsdp", None, "tensor", None))
                          for w in self.kv_CDHK[...])
        logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                                 out_sharding=P("fsdp", "tensor", None, None)) / np.sqrt(HEAD_DIM)
        causal_TS = jnp.tril(jnp.ones((SEQ, SEQ), bool))
        probs_BHTS = jax.nn.softmax(jnp.where(causal_TS, logits_BHTS, -1e9), axis=-1)
        mixed_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK, out_sharding=P("fsdp", None, "tensor", None))
        x_BTD = x_BTD + jnp.einsum("bthk,hkd->btd", mixed_BTHK, self.out_HKD[...],
                                   out_sharding=P("fsdp", None, None))
        h_BTD = self.mlp_norm(x_BTD)
        gate_BTF, up_BTF = (jnp.einsum("btd,df->btf", h_BTD, w, out_sharding=P("fsdp", None, "tensor"))
                            for w in self.gate_CDF[...])
        return x_BTD + jnp.einsum("btf,fd->btd", jax.nn.gelu(gate_BTF) * up_BTF, self.down_FD[...],
                                  out_sharding=P("fsdp", None, None))


class Gemmalike(nnx.Module):
    def __init__(self, rngs):
        self.embedding_VD = param(rngs, (VOCAB, EMBED), ("vocab", "embed"))
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.final_norm = RMSNorm(rngs)

    def __call__(self, tokens_BT):
        x_BTD = self.embedding_VD[...].at[tokens_BT].get(out_sharding=P("fsdp", None, None))
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return jnp.einsum("btd,vd->btv", self.final_norm(x_BTD), self.embedding_VD[...],
                          out_sharding=P("fsdp", None, "tensor"))


PLAN = tx.Plan(fsdp=tx.FSDP(axis="fsdp"), tensor_parallel=tx.TP(axis="tensor"))


@tx.step_fn
def train_step(state, batch):
    def loss_fn(params):
        logits_BTV = state.apply(params, batch["tokens"][:, :-1])
        targets_BTV = jax.sharding.reshard(jax.nn.one_hot(batch["tokens"][:, 1:], VOCAB), P("fsdp", None, "tensor"))
        log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
        return -jnp.mean(jnp.sum(log_probs_BTV * targets_BTV, axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}


def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=(BATCH * 10, SEQ + 1), dtype=np.int32)


def train(mesh, steps=10, checkpoint=None):
    engine = tx.Engine(mesh=mesh, plan=PLAN, optimizer=tx.optim.adamw(3e-3), checkpoint=checkpoint, log_every=5)
    engine.init(Gemmalike)
    state = engine.fit(train_step, tx.data.ArrayLoader({"tokens": tokens()}, batch_size=BATCH, seed=0), steps=steps)
    return engine, state


def explicit_mesh(shape, devices):
    return tx.MeshSpec(axes=("fsdp", "tensor"), shape=shape, devices=devices, axis_types="explicit").build()


@pytest.fixture(scope="module")
def one_device():
    _, state = train(explicit_mesh((1, 1), jax.devices()[:1]))
    return jax.device_get(state.params)


def test_explicit_style_model_trains_under_fsdp_tp_as_on_one_device(one_device):
    mesh = explicit_mesh((4, 2), None)
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
    engine, state = train(mesh)
    kernel = state.params["blocks"][0]["q_DHK"]
    assert kernel.sharding.spec == P("fsdp", "tensor", None)  # laid out by the plan's rules
    assert jax.typeof(kernel[...]).sharding.spec == P("fsdp", "tensor", None)  # and in its type
    got = jax.device_get(state.params)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                         got, one_device))
    assert max(diffs) < 1e-5, max(diffs)


def test_explicit_mesh_checkpoint_resumes_on_another_explicit_mesh(one_device, tmp_path):
    first = tx.io.OrbaxCheckpoint(tmp_path, every=5)
    train(explicit_mesh((4, 2), None), steps=5, checkpoint=first)
    first.close()
    second = tx.io.OrbaxCheckpoint(tmp_path, every=5)  # resumed at step 5 on FSDP 2 x TP 2
    engine, state = train(explicit_mesh((2, 2), jax.devices()[:4]), steps=10, checkpoint=second)
    second.close()
    assert int(state.step) == 10
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                         jax.device_get(state.params), one_device))
    assert max(diffs) < 1e-5, max(diffs)


def test_meshspec_axis_types():
    spec = tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2), axis_types=("auto", "explicit"))
    mesh = spec.build()
    assert mesh.axis_types == (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit)
    assert tx.MeshSpec(axes=("data",)).build().axis_types == (jax.sharding.AxisType.Auto,)
    with pytest.raises(tx.MeshError, match="is not 'auto' or 'explicit'") as info:
        tx.MeshSpec(axes=("data",), axis_types="manual")
    assert info.value.field == "axis_types"
    with pytest.raises(tx.MeshError, match="gives 3 type"):
        tx.MeshSpec(axes=("data", "tensor"), axis_types=("auto", "auto", "explicit"))
