"""A GPT-2 style decoder-only transformer in Flax NNX, free of parallelism.

Parameters and activations carry logical names only (``batch seq embed mlp heads kv vocab
layers``); a plan's rules decide the mesh axes. The repeated block is one ``tx.nn.LayerStack``
scanned over ``layers``. Inside attention and the MLP the sequence dimension is left unnamed
(``None``) so that sequence parallelism (``TP(sequence_parallel=True)``: ``seq`` split over the
tensor axis) applies to the residual stream only, where heads and hidden width are not split.

Shapes in names: B batch, T sequence, D embed, H heads, K per-head width, F MLP width, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import titanax as tx


@dataclasses.dataclass(kw_only=True, frozen=True)
class GPTConfig:
    """The shape of a GPT model."""

    vocab_size: int = 264
    """Token ids the embedding holds, at least the tokenizer's vocabulary; padded so it divides
    over the tensor axis (the default fits the 257 byte-level ids and splits over up to 8)."""

    max_seq_len: int = 256
    """Positions the learned position embedding holds."""

    num_layers: int = 2
    """Transformer blocks in the stack."""

    num_heads: int = 8
    """Attention heads per block (the tensor axis must divide it)."""

    embed_dim: int = 64
    """Residual stream width D; must divide by ``num_heads``."""

    mlp_dim: int = 256
    """MLP hidden width F (4 D in GPT-2)."""

    attention: str | None = None
    """``jax.nn.dot_product_attention`` implementation: ``None`` lets JAX pick (the fused cuDNN
    kernel on a GPU when it applies), or ``"xla"`` / ``"cudnn"``."""

    unroll_layers: int | bool = 1
    """Blocks per iteration of the layer scan; ``True`` unrolls the stack (compile time then grows
    with depth)."""

    remat: str = "none"
    """What each block keeps for the backward pass (``tx.nn.LayerStack(remat=)``): ``none`` keeps
    every intermediate; ``full`` keeps only the block's input and recomputes the block (least
    memory, about a third more compute); ``save_dots``, ``save_dots_no_batch`` keep matmul outputs;
    ``offload`` keeps the projections' outputs in host memory (GPU/TPU)."""

    def __post_init__(self) -> None:
        for field in ("vocab_size", "max_seq_len", "num_layers", "num_heads", "embed_dim", "mlp_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise tx.TitanaxError(f"GPTConfig({field}={value!r}) must be a positive integer",
                                      suggestion=f"see CONFIGS for working shapes, e.g. {field}={getattr(TINY, field)}")
        if self.embed_dim % self.num_heads:
            raise tx.TitanaxError(
                f"GPTConfig(embed_dim={self.embed_dim}) does not divide into num_heads={self.num_heads}",
                suggestion="choose embed_dim a multiple of num_heads (GPT-2 small: 768 and 12)")
        if self.attention not in (None, "xla", "cudnn"):
            raise tx.TitanaxError(f"GPTConfig(attention={self.attention!r}) is not an implementation",
                                  suggestion="use None (JAX picks), 'xla' or 'cudnn'")
        if not isinstance(self.remat, str) or self.remat not in tx.nn.REMAT_POLICIES:
            raise tx.TitanaxError(f"GPTConfig(remat={self.remat!r}) is not a remat policy",
                                  suggestion=f"use one of {', '.join(tx.nn.REMAT_POLICIES)}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def param_count(self) -> int:
        """Parameters of the model (the output head shares the token embedding)."""
        d, f, layers = self.embed_dim, self.mlp_dim, self.num_layers
        block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return self.vocab_size * d + self.max_seq_len * d + layers * block + 2 * d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, causal-aware: ``6 N + 6 L T D``.

        ``N`` counts the parameters used in matmuls (all but the position embedding; the tied token
        embedding is the output head's matmul). ``6 N`` is forward plus backward of those matmuls;
        attention's ``QK^T`` and ``AV`` cost ``12 L T D`` per token for full attention, halved for
        a causal mask, as the upper triangle is never needed.
        """
        n = self.param_count() - self.max_seq_len * self.embed_dim
        return 6.0 * n + 6.0 * self.num_layers * seq_len * self.embed_dim


TINY = GPTConfig()
SMALL = GPTConfig(vocab_size=50304, max_seq_len=1024, num_layers=12, num_heads=12, embed_dim=768,
                  mlp_dim=3072)
"""GPT-2 small's shape (124M parameters with the GPT-2 vocabulary, padded to 50304)."""
CONFIGS: dict[str, GPTConfig] = {"tiny": TINY, "small": SMALL}


def _init(init, *names):
    # Names only: Flax would otherwise place each variable on a mesh it requires at construction;
    # here the model builds anywhere and Titanax lays it out.
    return nnx.with_partitioning(init, names, eager_sharding=False)


_normal = nnx.initializers.normal(0.02)
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, scale_init=_init(_ones, "embed"),
                         bias_init=_init(_zeros, "embed"))


class Attention(nnx.Module):
    """Causal multi-head self-attention: column-parallel Q/K/V over heads, row-parallel output."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs) -> None:
        d, h, k = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 L).
        out_init = nnx.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5)
        self.qkv = nnx.LinearGeneral(d, (3, h, k), rngs=rngs, kernel_init=_init(_normal, "embed", None, "heads", "kv"),
                                     bias_init=_init(_zeros, None, "heads", "kv"))
        self.out = nnx.LinearGeneral((h, k), d, axis=(-2, -1), rngs=rngs,
                                     kernel_init=_init(out_init, "heads", "kv", "embed"),
                                     bias_init=_init(_zeros, "embed"))
        self.implementation = cfg.attention

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        qkv_BT3HK = tx.constrain(self.qkv(x_BTD), ("batch", None, None, "heads", "kv"))
        q_BTHK, k_BTHK, v_BTHK = (qkv_BT3HK[:, :, i] for i in range(3))
        a_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True,
                                              implementation=self.implementation)
        a_BTHK = tx.constrain(a_BTHK, ("batch", None, "heads", "kv"))
        return self.out(a_BTHK)


class MLP(nnx.Module):
    """GELU MLP: column-parallel up projection, row-parallel down projection."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs) -> None:
        out_init = nnx.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5)
        self.up = nnx.Linear(cfg.embed_dim, cfg.mlp_dim, rngs=rngs, kernel_init=_init(_normal, "embed", "mlp"),
                             bias_init=_init(_zeros, "mlp"))
        self.down = nnx.Linear(cfg.mlp_dim, cfg.embed_dim, rngs=rngs, kernel_init=_init(out_init, "mlp", "embed"),
                               bias_init=_init(_zeros, "embed"))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        h_BTF = tx.constrain(jax.nn.gelu(self.up(x_BTD)), ("batch", None, "mlp"))
        return self.down(h_BTF)


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.ln_attn = _layer_norm(cfg.embed_dim, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_mlp = _layer_norm(cfg.embed_dim, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = tx.constrain(x_BTD + self.attn(self.ln_attn(x_BTD)), ("batch", "seq", "embed"))
        return tx.constrain(x_BTD + self.mlp(self.ln_mlp(x_BTD)), ("batch", "seq", "embed"))


class GPT(nnx.Module):
    """Token and position embeddings, a stack of blocks, a final norm and a tied output head.

    Example:
      >>> model = GPT(TINY, rngs=nnx.Rngs(0))               # doctest: +SKIP
      >>> logits_BTV = model(tokens_BT)
    """

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs, embedding_init=_init(_normal, "vocab", "embed"))
        self.wpe = nnx.Embed(cfg.max_seq_len, cfg.embed_dim, rngs=rngs,
                             embedding_init=_init(nnx.initializers.normal(0.01), None, "embed"))
        self.blocks = tx.nn.LayerStack(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs=rngs,
                                       unroll=cfg.unroll_layers, remat=cfg.remat)
        self.ln_f = _layer_norm(cfg.embed_dim, rngs)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        seq_len = tokens_BT.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise tx.TitanaxError(f"a sequence of {seq_len} tokens is longer than max_seq_len={self.cfg.max_seq_len}",
                                  suggestion="train with shorter windows or a config with a larger max_seq_len")
        x_BTD = self.wte(tokens_BT) + self.wpe.embedding[:seq_len][None]
        x_BTD = tx.constrain(x_BTD, ("batch", "seq", "embed"))
        x_BTD = self.blocks(x_BTD)
        x_BTD = self.ln_f(x_BTD)
        # The head gathers the sequence (under sequence parallelism) and splits the vocabulary.
        return tx.constrain(self.wte.attend(tx.constrain(x_BTD, ("batch", None, "embed"))),
                            ("batch", None, "vocab"))


def gpt(preset: str = "tiny", *, rngs: nnx.Rngs, vocab_size: int | None = None, max_seq_len: int | None = None,
        num_layers: int | None = None, num_heads: int | None = None, embed_dim: int | None = None,
        mlp_dim: int | None = None, attention: str | None = None, unroll_layers: int | bool | None = None,
        remat: str | None = None) -> GPT:
    """The run-config model factory (``model: {factory: examples.gpt_small_tp.model:gpt, args: ...}``).

    Every ``GPTConfig`` field is a named argument, so a misspelled ``model.args`` key fails when the
    configuration is checked (``titanax run``, ``titanax describe``), before anything is built.

    Args:
      preset: a key of :data:`CONFIGS` (``tiny``, ``small``).
      rngs: the initialization keys (Titanax passes them).
      vocab_size, max_seq_len, num_layers, num_heads, embed_dim, mlp_dim, attention, unroll_layers, remat:
        ``GPTConfig`` fields to change (``None``: the preset's value), e.g. ``num_layers=4`` or
        ``remat="full"``.

    Returns:
      The model.
    """
    if preset not in CONFIGS:
        raise tx.TitanaxError(f"model preset {preset!r} is unknown", suggestion=f"use one of {list(CONFIGS)}")
    given = {"vocab_size": vocab_size, "max_seq_len": max_seq_len, "num_layers": num_layers, "num_heads": num_heads,
             "embed_dim": embed_dim, "mlp_dim": mlp_dim, "attention": attention, "unroll_layers": unroll_layers,
             "remat": remat}
    return GPT(dataclasses.replace(CONFIGS[preset], **{k: v for k, v in given.items() if v is not None}), rngs=rngs)


def next_token_loss(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting each target token, in float32.

    Written with a one-hot mask rather than a gather of the target logits: with the vocabulary
    split over the tensor axis, a gather inside a pipeline stage (where the 1f1b schedule computes
    the loss) trips XLA's SPMD partitioner (jax 0.10); the mask is the same math, elementwise.
    """
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
    return -jnp.mean(jnp.sum(logp_BTV * jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32), -1))
