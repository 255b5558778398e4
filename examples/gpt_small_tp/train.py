"""Train a GPT language model on text with data, tensor and fully sharded parallelism.

    python examples/gpt_small_tp/train.py --config examples/configs/gpt_tiny_dp2_tp4.yaml
    python examples/gpt_small_tp/train.py --config examples/configs/gpt_tiny_tp4_sp.yaml --set steps=100
    python examples/gpt_small_tp/train.py --config ... --set data.paths='[my_corpus/]'

By default the corpus is this Python's own standard library, byte-level tokens (no vocabulary to
download). The model file (model.py) names logical axes only; the YAML's mesh and plan decide the
layout. Logged: loss, tokens/s (and MFU with --peak-flops or on a known accelerator), held-out loss
and perplexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import titanax as tx  # noqa: E402
from examples.gpt_small_tp.config import RunConfig, load_config  # noqa: E402


def model_config(run: RunConfig, vocab_size: int) -> Any:
    """The ``GPTConfig`` a run asks for, checked against the tokenizer and sequence length."""
    from examples.gpt_small_tp.model import CONFIGS, GPTConfig

    overrides = dict(run.model)
    preset = overrides.pop("config", "tiny")
    if preset not in CONFIGS:
        raise tx.TitanaxError(f"model.config={preset!r} is not a preset", suggestion=f"use one of {list(CONFIGS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown:
        raise tx.TitanaxError(f"model.{sorted(unknown)[0]} is not a GPTConfig field",
                              suggestion=f"valid: {[f.name for f in dataclasses.fields(GPTConfig)]}")
    cfg = dataclasses.replace(CONFIGS[preset], **overrides)
    if cfg.vocab_size < vocab_size:
        raise tx.TitanaxError(f"the tokenizer has {vocab_size} ids but model.vocab_size={cfg.vocab_size}",
                              suggestion=f"set model.vocab_size to at least {vocab_size} (a multiple of the tensor axis)")
    if run.data.seq_len > cfg.max_seq_len:
        raise tx.TitanaxError(f"data.seq_len={run.data.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}",
                              suggestion="shorten data.seq_len or raise model.max_seq_len")
    return cfg


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a YAML run configuration (examples/configs/gpt_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set steps=100 --set optimizer.lr=1e-3")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="peak FLOP/s of one device, for MFU where the device kind is not known")
    args = parser.parse_args(argv)
    run = load_config(args.config, args.overrides)
    if run.cpu_devices:
        tx.simulate_cpu_devices(run.cpu_devices)

    from examples.gpt_small_tp.data import heldout_batches, load_corpus, train_loader
    from examples.gpt_small_tp.model import GPT
    from examples.gpt_small_tp.steps import eval_step, train_step

    corpus = load_corpus(run.data.paths, tokenizer=run.data.tokenizer, max_bytes=run.data.max_bytes)
    cfg = model_config(run, corpus.tokenizer.vocab_size)
    mesh, plan = run.build_mesh(), run.build_plan()
    seq_len = run.data.seq_len

    opt = run.optimizer
    schedule = tx.optim.warmup_cosine(opt.lr, warmup_steps=opt.warmup_steps, total_steps=run.steps)
    loggers = [tx.logging.Basic()] + ([tx.logging.CSV(run.csv)] if run.csv else [])
    checkpoint = (tx.io.OrbaxCheckpoint(run.checkpoint_dir, every=run.checkpoint_every, keep=2)
                  if run.checkpoint_dir else None)
    engine = tx.Engine(mesh=mesh, plan=plan, loggers=loggers, log_every=run.log_every, checkpoint=checkpoint,
                       optimizer=tx.optim.adamw(schedule, weight_decay=opt.weight_decay, clip_norm=opt.clip_norm),
                       precision=tx.Precision(compute=run.compute_dtype),
                       flops_per_example=cfg.flops_per_token(seq_len) * seq_len, tokens_per_example=seq_len,
                       peak_flops=args.peak_flops)
    state = engine.init(lambda rngs: GPT(cfg, rngs=rngs), rng=run.seed)
    print(corpus.describe())
    print(f"GPT {cfg.num_layers} layers x {cfg.embed_dim} wide, {cfg.param_count() / 1e6:.2f}M parameters, "
          f"{cfg.flops_per_token(seq_len) / 1e6:.1f} MFLOP/token")
    pp = plan.pipeline_parallel
    # One microbatch's [rows, T, D] activation on one device: what a pipeline stage passes on.
    rows = run.data.batch_size // (pp.microbatches if pp else 1)
    for axis in plan.batch_axes:
        rows //= mesh.shape[axis]
    print(plan.describe(mesh, activation_bytes=rows * seq_len * cfg.embed_dim * 4 if pp else None))
    evaluation = heldout_batches(corpus, seq_len, run.data.batch_size, max_batches=run.data.eval_batches)

    def perplexity(metrics: dict[str, float]) -> dict[str, float]:
        return {"perplexity": math.exp(metrics["loss"])}

    first = engine.evaluate(eval_step, state, evaluation, summary=perplexity)
    print(f"step {int(state.step)}: held-out loss {first['eval/loss']:.4f}, perplexity {first['eval/perplexity']:.2f}")
    loader = train_loader(corpus, seq_len, run.data.batch_size, seed=run.seed)
    state = engine.fit(train_step, loader, steps=run.steps, eval_step=eval_step, eval_data=evaluation,
                       eval_every=run.eval_every, eval_summary=perplexity)
    final = engine.evaluate(eval_step, state, evaluation, summary=perplexity)
    drop = 1 - final["eval/perplexity"] / first["eval/perplexity"]
    print(f"step {int(state.step)}: held-out loss {final['eval/loss']:.4f}, perplexity "
          f"{final['eval/perplexity']:.2f} ({drop:.0%} below the first evaluation)")
    return {"first_perplexity": first["eval/perplexity"], **final}


if __name__ == "__main__":
    main()
