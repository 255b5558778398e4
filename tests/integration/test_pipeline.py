"""Pipeline parallelism on the GPT example: every schedule gives the single-device loss and
gradients, bubbles never leak into results, and misconfigurations fail before compiling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import titanax as tx
from examples.gpt_small_tp.model import GPT, TINY, next_token_loss

CFG = dataclasses.replace(TINY, num_layers=8)  # 8 layers split into p * v = 2, 4 or 8 chunks
BATCH, SEQ = 8, 16
TOLERANCE = 1e-5
SCHEDULES = [("gpipe", 1), ("circular", 2), ("1f1b", 1), ("interleaved", 2), ("zbh1", 1)]
# Each schedule's PP x DP x TP case also runs its stage under a different remat policy, composed
# with the layer stack's own per-layer policy (tx.nn.LayerStack(remat=)).
REMAT = {"gpipe": "full", "circular": "save_dots", "1f1b": "save_dots_no_batch", "interleaved": "none", "zbh1": "full"}
# ... and this one recomputes the stage in the backward slot instead of reading stashed residuals.
RECOMPUTE = {"interleaved"}
STACK_REMAT = {"gpipe": "full", "circular": "none", "1f1b": "save_dots", "interleaved": "full", "zbh1": "none"}


def tokens() -> jax.Array:
    return jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, 257)


FALLBACKS_TAKEN: list[str] = []


def loss_fn(apply, params, tokens_BT1):
    return next_token_loss(apply(params, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])


def guarded_loss_fn(apply, params, tokens_BT1):
    """The loss as a cautious user writes it: a fallback around the model call. Titanax cuts the
    loss around the pipelined stack without raising anything through it, so the fallback is
    never taken and changes nothing."""
    try:
        logits_BTV = apply(params, tokens_BT1[:, :-1])
    except Exception as err:  # noqa: BLE001 - the point of the test
        FALLBACKS_TAKEN.append(repr(err))
        logits_BTV = jnp.zeros((*tokens_BT1[:, :-1].shape, CFG.vocab_size))
    return next_token_loss(logits_BTV, tokens_BT1[:, 1:])


@pytest.fixture(scope="module")
def reference():
    model = GPT(CFG, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return jax.jit(jax.value_and_grad(lambda p, t: loss_fn(lambda q, x: nnx.merge(graphdef, q, rest)(x), p, t)))(
        params, tokens())


def layout(kind: str, pp: tx.PP) -> tuple[tx.MeshSpec, tx.Plan]:
    if kind == "pp2":
        return tx.MeshSpec(axes=("pipe",), shape=(2,), devices=jax.devices()[:2]), tx.Plan(pipeline_parallel=pp)
    if kind == "pp4":
        return tx.MeshSpec(axes=("pipe",), shape=(4,), devices=jax.devices()[:4]), tx.Plan(pipeline_parallel=pp)
    return (tx.MeshSpec(axes=("pipe", "data", "tensor"), shape=(2, 2, 2)),
            tx.Plan(pipeline_parallel=pp, data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor")))


# Every schedule at p = 4 and as PP 2 x DP 2 x TP 2, every idle slot fed NaN: the results must not
# change. (Plain p = 2 runs in test_explicit_cut_under_1f1b_matches_one_device; evaluation under 1f1b,
# the stack's plain forward loop, in test_examples.py's pipeline example.)
CASES = []
for schedule, repeats in SCHEDULES:
    CASES.append(("pp4", schedule, 4, 4, repeats, True))
    CASES.append(("pp2_dp2_tp2", schedule, 2, 2, repeats, True))


@pytest.mark.parametrize("kind,schedule,stages,microbatches,repeats,nan_bubbles", CASES,
                         ids=[f"{c[0]}-{c[1]}{'-nan' if c[5] else ''}" for c in CASES])
def test_every_schedule_matches_one_device(kind, schedule, stages, microbatches, repeats, nan_bubbles, reference):
    ref_loss, ref_grads = reference
    pp = tx.PP(axis="pipe", stages=stages, microbatches=microbatches, repeats=repeats, schedule=schedule,
               nan_bubbles=nan_bubbles, remat=REMAT[schedule] if kind == "pp2_dp2_tp2" else "none",
               recompute=kind == "pp2_dp2_tp2" and schedule in RECOMPUTE)
    spec, plan = layout(kind, pp)
    cfg = dataclasses.replace(CFG, remat=STACK_REMAT[schedule] if kind == "pp2_dp2_tp2" else "none")
    sm = tx.shard(lambda: GPT(cfg, rngs=nnx.Rngs(0)), dataclasses.replace(plan, strict=True), spec.build())
    step = jax.jit(tx.value_and_grad(lambda p, t: guarded_loss_fn(sm.apply, p, t)))
    batch = sm.shard_batch(tokens())
    step = step.lower(sm.params, batch).compile()
    loss, grads = step(sm.params, batch)
    if repeats > 1 and kind != "pp2_dp2_tp2":
        # The stack is stored in pipeline order: no step regroups it between the stages.
        collectives = tx.profiling.inspect(step).collectives
        assert collectives["collective-permute"].count > 0
        assert not any(collectives[k].count for k in ("all-to-all", "all-gather") if k in collectives), collectives
    assert np.isfinite(float(loss))
    # Reruns give the same bits. They also repeat the program whose concurrent collectives once
    # starved XLA's CPU thread pools (titanax/runtime/simulate.py): 4 of 6 runs of 10 steps deadlocked.
    for _ in range(3):
        assert float(step(sm.params, batch)[0]) == float(loss)
    assert not FALLBACKS_TAKEN
    assert isinstance(sm.module.blocks, tx.parallel.PipelinedStack)  # the visible transform
    np.testing.assert_allclose(loss, ref_loss, rtol=TOLERANCE, atol=TOLERANCE)
    grads = sm.natural_params(grads)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE, err_msg=jax.tree_util.keystr(path))
    kernel = sm.params["blocks"]["layer"]["mlp"]["up"]["kernel"].get_value()
    assert kernel.sharding.spec[0] == "pipe"  # each stage holds its own layers only


def test_explicit_cut_under_1f1b_matches_one_device(reference):
    spec, plan = layout("pp2", tx.PP(stages=2, microbatches=2, schedule="1f1b"))
    sm = tx.shard(lambda: GPT(CFG, rngs=nnx.Rngs(0)), plan, spec.build())
    batch = sm.shard_batch(tokens())

    # The cut written out: the embedding before the stack, the head and loss after it.
    def before(params, tokens_BT1):
        model = nnx.merge(sm.graphdef, params, sm.model_state)
        return model.wte(tokens_BT1[:, :-1]) + model.wpe.embedding[:SEQ][None]

    def after(params, y_BTD, tokens_BT1):
        model = nnx.merge(sm.graphdef, params, sm.model_state)
        return next_token_loss(model.wte.attend(model.ln_f(y_BTD)), tokens_BT1[:, 1:])

    loss, grads = jax.jit(tx.parallel.pipeline_value_and_grad(before, after, sm))(sm.params, batch)
    np.testing.assert_allclose(loss, reference[0], rtol=TOLERANCE, atol=TOLERANCE)
    for want, got in zip(jax.tree.leaves(reference[1]), jax.tree.leaves(sm.natural_params(grads))):
        np.testing.assert_allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE)


def test_layer_stack_knows_nothing_of_parallelism():
    import ast
    import pathlib

    for path in pathlib.Path(tx.__file__).parent.joinpath("nn").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("titanax.parallel") for n in names), f"{path.name} imports {names}"


def test_plan_describes_the_pipeline():
    spec, plan = layout("pp4", tx.PP(stages=4, microbatches=8, repeats=2, schedule="circular"))
    text = plan.describe(spec.build())
    assert "schedule circular: 4 stages x 8 microbatches x 2 repeat(s)" in text
    assert f"bubble fraction {3 / 19:.1%} = (p-1)/(v*m+p-1)" in text
    assert "peak stashed microbatches per stage 16" in text
    assert "between stages:" in text
    # 2 x 19 forward ticks of activations and cotangents, each [2 rows, 16, 64] fp32 = 8 KiB.
    sized = plan.describe(spec.build(), activation_bytes=2 * SEQ * 64 * 4)
    assert "between stages: 38 microbatch activations per device per step (304.00 KiB)" in sized


def misconfigured(pp_kwargs: dict, *, layers: int = 8, batch: int = BATCH, mesh_pipe: int = 2):
    spec = tx.MeshSpec(axes=("pipe",), shape=(mesh_pipe,), devices=jax.devices()[:mesh_pipe])
    plan = tx.Plan(pipeline_parallel=tx.PP(**pp_kwargs))
    plan.validate(spec.build())
    sm = tx.shard(lambda: GPT(dataclasses.replace(TINY, num_layers=layers), rngs=nnx.Rngs(0)), plan, spec.build())
    jax.eval_shape(lambda p: sm.apply(p, jnp.zeros((batch, SEQ), jnp.int32)), sm.params)


@pytest.mark.parametrize("pp_kwargs,extra,match", [
    (dict(stages=2, microbatches=2), dict(layers=3), "3 layers, which do not split into 2 stages"),
    (dict(stages=2, microbatches=3), dict(batch=8), "a batch of 8 does not split into PP\\(microbatches=3\\)"),
    (dict(stages=4, microbatches=4), dict(mesh_pipe=2), "PP\\(stages=4\\) but mesh axis 'pipe' has 2 devices"),
    (dict(stages=2, microbatches=1), {}, "fewer than stages"),
    (dict(stages=2, microbatches=2, schedule="gpipe", repeats=2), {}, "use schedule='circular'"),
    (dict(stages=2, microbatches=2, remat="everything"), {}, "not a remat policy"),
    (dict(stages=2, microbatches=2, recompute=True), {}, "use PP\\(remat='full'\\)"),
    (dict(stages=2, microbatches=2, schedule="zbh1", recompute=True), {}, "cannot split the backward of zbh1"),
    (dict(stages=2, microbatches=2, schedule="zbh1", repeats=2), {}, "schedule='interleaved'"),
])
def test_pipeline_misconfigurations_are_plan_errors(pp_kwargs, extra, match):
    with pytest.raises(tx.PlanError, match=match):
        misconfigured(pp_kwargs, **extra)


def test_has_aux_or_a_closed_over_batch_under_1f1b_is_refused():
    spec, plan = layout("pp2", tx.PP(stages=2, microbatches=2, schedule="1f1b"))
    sm = tx.shard(lambda: GPT(CFG, rngs=nnx.Rngs(0)), plan, spec.build(), abstract=True)
    fn = tx.value_and_grad(lambda p, t: (loss_fn(sm.apply, p, t), 0.0), has_aux=True)
    with pytest.raises(tx.PlanError, match="has_aux=True"):
        jax.eval_shape(fn, sm.params, tokens())
    batch = tokens()  # a batch the loss closes over cannot be split into microbatches
    closed = tx.value_and_grad(lambda p: loss_fn(sm.apply, p, batch))
    with pytest.raises(tx.PlanError, match="needs the batch as an argument of the loss"):
        jax.eval_shape(closed, sm.params)
