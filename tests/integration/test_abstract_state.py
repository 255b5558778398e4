"""Abstract state end to end: a model, its train state and its step laid out and lowered without
allocating them; every sharding from the plan's layout; initialization without temporaries."""

import resource

import jax
import models
import numpy as np
import optax
import pytest
from flax import nnx

import titanax as tx
from examples.gpt_small_tp.model import gpt
from titanax.parallel.flax_nnx import _call_factory
from titanax.parallel.tracing import tracing_context

PLAN = tx.Plan(fsdp=tx.FSDP(axis="fsdp"), tensor_parallel=tx.TP(axis="tensor"))


@pytest.fixture(scope="module")
def mesh():
    return tx.MeshSpec(axes=("fsdp", "tensor"), shape=(4, 2)).build()


def tiny(rngs):
    return gpt("tiny", rngs=rngs, num_layers=2)


def same_layout(a, b):
    return (a.shape == b.shape and a.dtype == b.dtype
            and a.sharding.is_equivalent_to(b.sharding, len(a.shape)))


def test_abstract_state_is_the_real_state_leaf_for_leaf(mesh):
    abstract = tx.create_train_state(tx.shard(tiny, PLAN, mesh, abstract=True), tx.optim.adamw(1e-3))
    real = tx.create_train_state(tx.shard(tiny, PLAN, mesh), tx.optim.adamw(1e-3))
    abstract_leaves, real_leaves = jax.tree.leaves(abstract), jax.tree.leaves(real)
    paths = lambda state: [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]  # noqa: E731
    assert paths(abstract) == paths(real)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in abstract_leaves)
    assert all(isinstance(x, jax.Array) for x in real_leaves)
    assert all(same_layout(a, b) for a, b in zip(abstract_leaves, real_leaves))


def test_a_model_far_larger_than_this_machine_is_described_without_allocating_it(mesh):
    # 4.9 G parameters: 59 GiB of float32 parameters and AdamW moments, more than this machine has.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sm = tx.shard(lambda rngs: gpt("tiny", rngs=rngs, num_layers=24, embed_dim=4096, mlp_dim=16384,
                                   num_heads=32, vocab_size=32000, max_seq_len=2048), PLAN, mesh, abstract=True)
    state = tx.create_train_state(sm, tx.optim.adamw(1e-3))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    assert n > 4.8e9
    per_device = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                     for x in jax.tree.leaves((state.params, state.opt_state)))
    assert per_device == pytest.approx(12 * n / 8, rel=0.02)  # every array split 8 ways
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 1 << 20, f"resident memory grew by {grown_kib / 2**20:.1f} GiB"
    with pytest.raises(tx.ShardingError, match="sharded abstract"):
        sm(np.zeros((8, 16), np.int32))


_LOWERED: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, fun_name="", **__: _LOWERED.append(fun_name)
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration" else None)


def test_the_step_compiles_once_per_batch_shape_and_layout(mesh):
    state = tx.create_train_state(tx.shard(models.NNXMLP, PLAN, mesh), tx.optim.adamw(1e-3))
    data = np.random.default_rng(0)
    batch = {name: data.normal(size=(16, models.EMBED)).astype(np.float32) for name in ("x", "y")}
    regression_step = tx.step_fn(models.regression_step.fn)  # its own compile cache
    # lowered once per compiled program, named after the user's function
    compiles = lambda: _LOWERED.count(f"jit({regression_step.__name__})")  # noqa: E731
    before = compiles()
    for _ in range(3):
        state, _ = regression_step(state, batch)
    assert compiles() - before == 1
    with pytest.warns(tx.RecompileWarning) as caught:  # a new batch shape
        state, _ = regression_step(state, {k: v[:8] for k, v in batch.items()})
    assert compiles() - before == 2
    assert len(caught) == 1 and f"batch['x']: shape (16, {models.EMBED}) -> (8, {models.EMBED})" in str(caught[0].message)
    state, _ = regression_step(state, batch)  # seen before
    assert compiles() - before == 2
    params = jax.tree.map(lambda x: x, state.params)  # one parameter laid out anew by hand
    params["up"]["kernel"] = jax.device_put(
        params["up"]["kernel"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tensor", "fsdp")))
    with pytest.warns(tx.RecompileWarning, match=r"state.params\['up'\]\['kernel'\].value: sharding P\('fsdp', 'tensor'\) -> P\('tensor', 'fsdp'\)"):
        state, _ = regression_step(state.replace(params=params), batch)
    assert compiles() - before == 3 and regression_step.compile_watch.recompiles == 2
    assert state.params["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def slot_specs(optimizer, mesh):
    sm = tx.shard(tiny, PLAN, mesh, abstract=True)
    state = tx.create_train_state(sm, optimizer)
    params = {tx.parallel.layout.path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    slots = [(tx.parallel.layout.path_string(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    return params, slots


def test_adam_moments_take_their_parameters_layout(mesh):
    params, slots = slot_specs(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), mesh)
    matched = 0
    for path, slot in slots:
        owner = next((p for p in params if path.endswith(p)), None)
        if owner is None:
            assert slot.shape == () and slot.sharding.spec == jax.sharding.PartitionSpec()
            continue
        assert same_layout(slot, params[owner]), path
        matched += 1
    assert matched == 2 * len(params)


def test_factored_adafactor_statistics_keep_the_split_of_the_dimensions_they_keep(mesh):
    params, slots = slot_specs(optax.adafactor(1e-3, min_dim_size_to_factor=8), mesh)
    kernel = params["blocks/layer/mlp/up/kernel"]  # [layers, embed, mlp]: P(None, 'fsdp', 'tensor')
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
    by_path = dict(slots)
    row = next(v for p, v in by_path.items() if p.endswith("v_row/blocks/layer/mlp/up/kernel"))
    col = next(v for p, v in by_path.items() if p.endswith("v_col/blocks/layer/mlp/up/kernel"))
    assert row.shape == kernel.shape[:2] and tuple(row.sharding.spec) == (None, "fsdp")
    assert col.shape == (kernel.shape[0], kernel.shape[2]) and tuple(col.sharding.spec) == (None, "tensor")


def test_masked_optimizer_slots_are_found_by_their_parameter_path(mesh):
    decay = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # noqa: E731
    params, slots = slot_specs(optax.chain(optax.adam(1e-3), optax.masked(optax.add_decayed_weights(0.1), decay)),
                               mesh)
    mu = [(p, s) for p, s in slots if "/mu/" in f"/{p}/"]
    assert len(mu) == len(params)
    for path, slot in mu:
        owner = next(p for p in params if path.endswith(p))
        assert same_layout(slot, params[owner]), path


def init_program(factory, plan, mesh):
    """The compiled program ``tx.shard`` runs to create a model's state directly sharded."""
    rules = plan.resolved_rules()
    sm = tx.shard(factory, plan, mesh, abstract=True)
    shardings = jax.tree.map(lambda x: x.sharding, nnx.state(sm.module))
    with tracing_context(rules, mesh):
        return jax.jit(lambda: nnx.state(_call_factory(factory, 0)), out_shardings=shardings).lower().compile()


def test_initialization_creates_each_shard_without_full_size_temporaries(mesh):
    # 16 stacked layers whose weights are split 8 ways: drawn all at once, each device would hold
    # random bits for the whole stack (many times its share) before keeping its shard.
    factory = lambda rngs: gpt("tiny", rngs=rngs, num_layers=16, embed_dim=256, num_heads=8,  # noqa: E731
                               mlp_dim=1024, vocab_size=512, max_seq_len=64)
    memory = init_program(factory, PLAN, mesh).memory_analysis()
    assert memory.temp_size_in_bytes <= 1.5 * memory.output_size_in_bytes, (
        memory.temp_size_in_bytes, memory.output_size_in_bytes)


def test_the_engine_keeps_one_copy_of_the_parameters_it_created(mesh):
    import gc

    gc.collect()
    before = sum(x.nbytes for x in jax.live_arrays())
    engine = tx.Engine(mesh=mesh, plan=PLAN, optimizer=tx.optim.adamw(1e-3))
    state = engine.init(tiny)
    gc.collect()
    held = sum(x.nbytes for x in jax.live_arrays()) - before
    params = sum(x.nbytes for x in jax.tree.leaves(state.params))
    everything = sum(x.nbytes for x in jax.tree.leaves(state))
    assert everything < held + 1024 and held < everything + 1024  # nothing but the state is alive
    assert 3 * params <= everything < 3 * params + 4096  # params, mu, nu and a few scalars
