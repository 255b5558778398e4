"""Small Flax models for the tests: the same MLP and transformer in Linen and NNX, annotated with
logical names or left plain (laid out by path rules). No model names a mesh axis."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import titanax as tx

EMBED, MLP_DIM, HEADS, KV, VOCAB, SEQ, LAYERS = 32, 64, 8, 8, 64, 8, 2


def logical(init, *names):
    return nn.with_logical_partitioning(init, names)


# ------------------------------------------------------------------------------------ Linen
class LinenMLP(nn.Module):
    """Column-parallel then row-parallel under TP: x_BD -> h_BF -> y_BD."""

    hidden: int = MLP_DIM
    annotate: bool = True

    @nn.compact
    def __call__(self, x_BD):
        def ann(init, *names):
            return logical(init, *names) if self.annotate else init

        h_BF = nn.Dense(self.hidden, kernel_init=ann(nn.initializers.lecun_normal(), "embed", "mlp"),
                        bias_init=ann(nn.initializers.normal(0.1), "mlp"))(x_BD)
        h_BF = tx.constrain(jax.nn.gelu(h_BF), ("batch", "mlp"))
        return nn.Dense(x_BD.shape[-1], kernel_init=ann(nn.initializers.lecun_normal(), "mlp", "embed"),
                        bias_init=ann(nn.initializers.normal(0.1), "embed"))(h_BF)


LINEN_MLP_PATH_RULES = [
    (r"Dense_0/kernel$", ("embed", "mlp")),
    (r"Dense_0/bias$", ("mlp",)),
    (r"Dense_1/kernel$", ("mlp", "embed")),
    (r"Dense_1/bias$", ("embed",)),
]


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x_BTD, _):
        ln = lambda name: nn.LayerNorm(name=name, scale_init=logical(nn.initializers.ones, "embed"),
                                       bias_init=logical(nn.initializers.zeros, "embed"))
        h_BTD = ln("ln_attn")(x_BTD)
        qkv = [nn.DenseGeneral((HEADS, KV), name=n,
                               kernel_init=logical(nn.initializers.lecun_normal(), "embed", "heads", "kv"),
                               bias_init=logical(nn.initializers.zeros, "heads", "kv"))(h_BTD)
               for n in ("query", "key", "value")]
        q_BTHK, k_BTHK, v_BTHK = (tx.constrain(t, ("batch", "seq", "heads", "kv")) for t in qkv)
        a_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
        x_BTD = x_BTD + nn.DenseGeneral(EMBED, axis=(-2, -1), name="out",
                                        kernel_init=logical(nn.initializers.lecun_normal(), "heads", "kv", "embed"),
                                        bias_init=logical(nn.initializers.zeros, "embed"))(a_BTHK)
        x_BTD = tx.constrain(x_BTD, ("batch", "seq", "embed"))
        h_BTD = ln("ln_mlp")(x_BTD)
        h_BTF = jax.nn.gelu(nn.Dense(MLP_DIM, name="up", kernel_init=logical(nn.initializers.lecun_normal(), "embed", "mlp"),
                                     bias_init=logical(nn.initializers.zeros, "mlp"))(h_BTD))
        h_BTF = tx.constrain(h_BTF, ("batch", "seq", "mlp"))
        x_BTD = x_BTD + nn.Dense(EMBED, name="down", kernel_init=logical(nn.initializers.lecun_normal(), "mlp", "embed"),
                                 bias_init=logical(nn.initializers.zeros, "embed"))(h_BTF)
        return x_BTD, None


class LinenTransformer(nn.Module):
    """A decoder-only transformer; its blocks are one ``nn.scan``-stacked module over ``layers``."""

    @nn.compact
    def __call__(self, tokens_BT):
        embed = nn.Embed(VOCAB, EMBED, name="embed", embedding_init=logical(nn.initializers.normal(1.0), "vocab", "embed"))
        x_BTD = embed(tokens_BT)
        blocks = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=LAYERS, metadata_params={nn.PARTITION_NAME: "layers"})
        x_BTD, _ = blocks(name="blocks")(x_BTD, None)
        x_BTD = nn.LayerNorm(name="ln_f", scale_init=logical(nn.initializers.ones, "embed"),
                             bias_init=logical(nn.initializers.zeros, "embed"))(x_BTD)
        return nn.Dense(VOCAB, name="head", use_bias=False,
                        kernel_init=logical(nn.initializers.lecun_normal(), "embed", "vocab"))(x_BTD)


class LinenBatchNormNet(nn.Module):
    """Non-parameter state (batch_stats) and an extra call argument."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(MLP_DIM)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(EMBED)(jax.nn.relu(x))


# -------------------------------------------------------------------------------------- NNX
def _p(init, *names, annotate=True):
    return nnx.with_partitioning(init, names) if annotate else init


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, *, dim: int = EMBED, hidden: int = MLP_DIM, annotate: bool = True):
        lecun = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(dim, hidden, rngs=rngs, kernel_init=_p(lecun, "embed", "mlp", annotate=annotate),
                             bias_init=_p(nnx.initializers.normal(0.1), "mlp", annotate=annotate))
        self.down = nnx.Linear(hidden, dim, rngs=rngs, kernel_init=_p(lecun, "mlp", "embed", annotate=annotate),
                               bias_init=_p(nnx.initializers.normal(0.1), "embed", annotate=annotate))

    def __call__(self, x_BD):
        h_BF = tx.constrain(jax.nn.gelu(self.up(x_BD)), ("batch", "mlp"))
        return self.down(h_BF)


NNX_MLP_PATH_RULES = [
    (r"up/kernel$", ("embed", "mlp")),
    (r"up/bias$", ("mlp",)),
    (r"down/kernel$", ("mlp", "embed")),
    (r"down/bias$", ("embed",)),
]


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, annotate: bool = True):
        a = annotate
        lecun = nnx.initializers.lecun_normal()
        ones, zeros = nnx.initializers.ones_init(), nnx.initializers.zeros_init()
        self.ln_attn = nnx.LayerNorm(EMBED, rngs=rngs, scale_init=_p(ones, "embed", annotate=a),
                                     bias_init=_p(zeros, "embed", annotate=a))
        self.query, self.key, self.value = (
            nnx.LinearGeneral(EMBED, (HEADS, KV), rngs=rngs, kernel_init=_p(lecun, "embed", "heads", "kv", annotate=a),
                              bias_init=_p(zeros, "heads", "kv", annotate=a))
            for _ in range(3))
        self.out = nnx.LinearGeneral((HEADS, KV), EMBED, axis=(-2, -1), rngs=rngs,
                                     kernel_init=_p(lecun, "heads", "kv", "embed", annotate=a),
                                     bias_init=_p(zeros, "embed", annotate=a))
        self.ln_mlp = nnx.LayerNorm(EMBED, rngs=rngs, scale_init=_p(ones, "embed", annotate=a),
                                    bias_init=_p(zeros, "embed", annotate=a))
        self.mlp = NNXMLP(rngs, annotate=a)

    def __call__(self, x_BTD):
        h_BTD = self.ln_attn(x_BTD)
        q_BTHK, k_BTHK, v_BTHK = (tx.constrain(f(h_BTD), ("batch", "seq", "heads", "kv"))
                                  for f in (self.query, self.key, self.value))
        a_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
        x_BTD = tx.constrain(x_BTD + self.out(a_BTHK), ("batch", "seq", "embed"))
        return x_BTD + self.mlp(self.ln_mlp(x_BTD))


class NNXTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, annotate: bool = True):
        a = annotate
        self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs,
                               embedding_init=_p(nnx.initializers.normal(1.0), "vocab", "embed", annotate=a))
        self.blocks = nnx.List([NNXBlock(rngs, annotate=a) for _ in range(LAYERS)])
        self.ln_f = nnx.LayerNorm(EMBED, rngs=rngs, scale_init=_p(nnx.initializers.ones_init(), "embed", annotate=a),
                                  bias_init=_p(nnx.initializers.zeros_init(), "embed", annotate=a))
        self.head = nnx.Linear(EMBED, VOCAB, use_bias=False, rngs=rngs,
                               kernel_init=_p(nnx.initializers.lecun_normal(), "embed", "vocab", annotate=a))

    def __call__(self, tokens_BT):
        x_BTD = self.embed(tokens_BT)
        for block in self.blocks:
            x_BTD = block(x_BTD)
        return self.head(self.ln_f(x_BTD))


NNX_TRANSFORMER_PATH_RULES = [
    (r"embed/embedding$", ("vocab", "embed")),
    (r"(query|key|value)/kernel$", ("embed", "heads", "kv")),
    (r"(query|key|value)/bias$", ("heads", "kv")),
    (r"out/kernel$", ("heads", "kv", "embed")),
    (r"up/kernel$", ("embed", "mlp")),
    (r"up/bias$", ("mlp",)),
    (r"down/kernel$", ("mlp", "embed")),
    (r"head/kernel$", ("embed", "vocab")),
    (r"(ln_\w+|out|down)/(scale|bias)$", ("embed",)),
]


class NNXBatchNormNet(nnx.Module):
    """Non-parameter state (batch statistics, dropout RNG) and an extra call argument."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(EMBED, MLP_DIM, rngs=rngs)
        self.bn = nnx.BatchNorm(MLP_DIM, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.down = nnx.Linear(MLP_DIM, EMBED, rngs=rngs)

    def __call__(self, x, *, train: bool = False):
        h = self.bn(self.up(x), use_running_average=not train)
        return self.down(self.drop(jax.nn.relu(h), deterministic=not train))


def token_batch(batch: int = 16, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, SEQ), 0, VOCAB)


def float_batch(batch: int = 16, dim: int = EMBED, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, dim), jnp.float32)


@tx.step_fn
def regression_step(state, batch):
    """Mean squared error of ``model(batch["x"])`` against ``batch["y"]``, one update."""
    def loss(params):
        return jnp.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), {"loss": value}
