"""From a :class:`RunConfig` to a training run: what ``titanax run`` and ``titanax describe`` share.

:func:`prepare` builds every part (mesh, plan, engine, model factory, data source, step functions)
and checks the combination before anything is compiled; :func:`train` runs it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from titanax.config.imports import (
    OWNER,
    call_signature,
    check_arguments,
    import_object,
    qualified_name,
)
from titanax.config.keys import keyed
from titanax.config.run_dir import RunDirectory, config_values
from titanax.config.schema import RunConfig
from titanax.data.source import DataSource
from titanax.exceptions import ConfigError

__all__ = ["Prepared", "build_model", "build_source", "prepare", "train"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class Prepared:
    """Every part of a run, built and checked, nothing compiled yet."""

    config: RunConfig
    """The configuration the parts come from."""
    engine: Any
    """The ``tx.Engine`` (mesh, plan, optimizer, precision, checkpoint, loggers)."""
    model: Any
    """What ``engine.init`` takes: a Linen module, or an NNX factory ``rngs -> module``."""
    model_example: Any
    """Linen only: the input ``module.init`` is traced with (``None`` for NNX)."""
    source: DataSource
    """The data."""
    step: Any
    """The training step: a ``tx.step_fn`` (a plain function named by ``train.step`` is wrapped)."""
    eval_step: Callable[..., Any] | None
    """The evaluation step, if configured."""
    eval_summary: Callable[..., Any] | None
    """Extra metrics from the averaged evaluation metrics, if configured."""

    def init(self) -> Any:
        """The sharded ``tx.TrainState`` (also ``engine.state``)."""
        return self.engine.init(self.model, example=self.model_example, rng=self.config.train.seed)


def _takes(factory: Any, name: str) -> bool:
    signature = call_signature(factory)
    return signature is not None and name in signature.parameters


def build_model(cfg: RunConfig, example: Any, rules: Any, mesh: Any) -> tuple[Any, Any]:
    """What ``Engine.init`` takes (an NNX factory ``rngs -> module``, or a built module) and the
    example input a Linen module is initialized with."""
    from titanax.parallel.tracing import tracing_context

    factory = import_object(cfg.model.factory, "model.factory")
    if not callable(factory):
        raise ConfigError(f"model.factory={cfg.model.factory!r} is not callable",
                          suggestion="name a Flax module class or a function that returns a module",
                          owner=OWNER, field="model.factory", value=cfg.model.factory)
    args = dict(cfg.model.args)
    if _takes(factory, "rngs"):  # NNX: Engine.init builds it directly sharded
        check_arguments(factory, args, "model.args", supplied=("rngs",))
        _no_input(cfg)
        return (lambda rngs: factory(**args, rngs=rngs)), None
    check_arguments(factory, args, "model.args")
    with tracing_context(rules, mesh):  # as Titanax calls all model code (NNX's eager sharding off)
        module = factory(**args)
    import flax.linen as nn
    from flax import nnx

    if isinstance(module, nnx.Module):
        _no_input(cfg)
        return module, None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.factory={cfg.model.factory!r} returned {type(module).__name__}, not a Flax module",
                          suggestion="return a flax.linen.Module, or take `rngs` and return an nnx.Module",
                          owner=OWNER, field="model.factory", value=cfg.model.factory)
    key = cfg.model.input
    if key is None:
        return module, example
    if not isinstance(example, Mapping) or key not in example:
        keys = list(example) if isinstance(example, Mapping) else []
        raise ConfigError(f"model.input={key!r} is not a key of the data's batches",
                          suggestion=f"use one of {keys}" if keys else "drop model.input: the batch is not a mapping",
                          owner=OWNER, field="model.input", value=key)
    return module, example[key]


def _no_input(cfg: RunConfig) -> None:
    """``model.input`` picks the batch a Linen module is initialized with; an NNX model is built
    without one, so a value there would be silently ignored."""
    if cfg.model.input is not None:
        raise ConfigError(f"model.input={cfg.model.input!r} is set but model.factory={cfg.model.factory!r} "
                          "builds an NNX model, which is created without an example batch",
                          suggestion="drop model.input (it is for Linen modules only)",
                          owner=OWNER, field="model.input", value=cfg.model.input)


def build_source(cfg: RunConfig) -> DataSource:
    """The ``DataSource`` ``data.factory(**data.args, batch_size=, seed=)`` returns, checked."""
    factory = import_object(cfg.data.factory, "data.factory")
    for reserved in ("batch_size", "seed"):
        if reserved in cfg.data.args:
            where = "data.batch_size" if reserved == "batch_size" else "train.seed"
            raise ConfigError(f"data.args.{reserved} is set by Titanax", suggestion=f"set {where} instead",
                              owner=OWNER, field=f"data.args.{reserved}", value=cfg.data.args[reserved])
    if not (_takes(factory, "batch_size") and _takes(factory, "seed")):
        raise ConfigError(f"data.factory {qualified_name(factory)} does not take batch_size and seed",
                          suggestion="define it as def factory(..., *, batch_size: int, seed: int) -> tx.data.DataSource",
                          owner=OWNER, field="data.factory", value=cfg.data.factory)
    check_arguments(factory, cfg.data.args, "data.args", supplied=("batch_size", "seed"))
    source = factory(**cfg.data.args, batch_size=cfg.data.batch_size, seed=cfg.train.seed)
    if not isinstance(source, DataSource):
        raise ConfigError(f"data.factory {qualified_name(factory)} returned {type(source).__name__}, not tx.data.DataSource",
                          suggestion="return tx.data.DataSource(train=..., example=..., eval=...)",
                          owner=OWNER, field="data.factory", value=cfg.data.factory)
    return source


def _check_vocabulary(model: Any, source: DataSource, rules: Any, mesh: Any) -> None:
    """The token ids of ``source`` fit every parameter axis an NNX ``model`` (or factory) names
    ``vocab``: the embedding's rows, the output head's columns. A factory is traced abstractly as
    ``tx.shard`` traces it, under the plan's rules and mesh with Flax's eager sharding off (an eager
    ``nnx.with_partitioning`` would otherwise need a mesh set by ``jax.set_mesh``)."""
    from flax import nnx

    from titanax.parallel.annotations import tree_leaves
    from titanax.parallel.tracing import tracing_context

    if source.vocab_size is None:
        return
    if not isinstance(model, nnx.Module):
        if not (callable(model) and _takes(model, "rngs")):
            return  # a Linen module: its parameters exist only once initialized
        with tracing_context(rules, mesh):
            model = nnx.eval_shape(lambda: model(rngs=nnx.Rngs(0)))
    for leaf in tree_leaves(nnx.state(model, nnx.Param)):
        for size, name in zip(leaf.shape, leaf.names or ()):
            if name == "vocab" and size < source.vocab_size:
                raise ConfigError(
                    f"the data's token ids go up to {source.vocab_size - 1} but the model's {leaf.path} "
                    f"{list(leaf.shape)} has {size} entries on its 'vocab' axis",
                    suggestion=f"give the model a vocabulary of at least {source.vocab_size} "
                    "(e.g. model.args.vocab_size), or use a smaller tokenizer; JAX would not fail but "
                    "silently clamp every larger id", owner=OWNER, field="model.args")


def _step(path: str | None, key: str) -> Any:
    if path is None:
        return None
    fn = import_object(path, key)
    if not callable(fn):
        raise ConfigError(f"{key}={path!r} is not callable", suggestion="name a function (state, batch) -> ...",
                          owner=OWNER, field=key, value=path)
    return fn


def _check_batch(cfg: RunConfig, mesh: Any, plan: Any) -> None:
    import jax

    ways = math.prod(mesh.shape[a] for a in plan.batch_axes)
    pp = plan.pipeline_parallel
    dp = plan.data_parallel
    per_step = ways * (pp.microbatches if pp else 1) * (dp.accumulate_steps if dp else 1)
    size = cfg.data.batch_size
    if size % per_step:
        parts = [f"{ways} batch shards ({' x '.join(plan.batch_axes) or 'none'})"]
        if pp:
            parts.append(f"{pp.microbatches} pipeline microbatches")
        if dp and dp.accumulate_steps > 1:
            parts.append(f"{dp.accumulate_steps} accumulation steps")
        lower = size - size % per_step
        raise ConfigError(f"data.batch_size={size} does not divide into {' x '.join(parts)} = {per_step}",
                          suggestion=f"use a multiple of {per_step}, e.g. data.batch_size={lower or per_step}",
                          owner=OWNER, field="data.batch_size", value=size)
    processes = jax.process_count()
    if size % processes:
        raise ConfigError(f"data.batch_size={size} does not divide over {processes} processes",
                          suggestion=f"use a multiple of {processes}", owner=OWNER, field="data.batch_size",
                          value=size)


def prepare(cfg: RunConfig, *, loggers: bool = True, checkpoint: bool = True,
            source: DataSource | None = None) -> Prepared:
    """Build and check every part of a run without compiling or training.

    Args:
      cfg: the run configuration.
      loggers: build ``cfg.logging``'s loggers (``titanax describe`` needs none).
      checkpoint: build ``cfg.checkpoint`` (``titanax describe`` never writes one).
      source: the data source :func:`build_source` built for this ``cfg.data`` already (a plan
        search builds it once for all its candidates); ``None`` builds it.

    Returns:
      The :class:`Prepared` parts.

    Raises:
      TitanaxError: any part cannot be built (``ConfigError`` for the configuration itself,
        ``MeshError`` / ``PlanError`` for a mesh or plan that does not fit the devices); its message
        starts with the YAML keys its ``owner`` and ``field`` stand for
        (:func:`titanax.config.keys.with_keys`).
    """
    from titanax.exec.engine import Engine

    if cfg.train.compile_cache:
        from titanax.runtime import enable_compile_cache

        with keyed("train"):
            enable_compile_cache(cfg.train.compile_cache)
    with keyed("mesh"):
        mesh = cfg.mesh.spec().build()
    with keyed("plan"):
        plan = cfg.plan.build()
    with keyed("plan"):  # a second block: the plan's own errors are keyed once, not twice
        plan.validate(mesh)
    with keyed("precision"):
        precision = cfg.precision.build()
    _check_batch(cfg, mesh, plan)
    from titanax.exec.step import StepFunction, step_fn

    step = _step(cfg.train.step, "train.step")
    if not isinstance(step, StepFunction):  # a plain (state, batch) function, as Engine.fit takes it
        step = step_fn(step)
    eval_step = _step(cfg.train.eval_step, "train.eval_step")
    eval_summary = _step(cfg.train.eval_summary, "train.eval_summary")
    source = source if source is not None else build_source(cfg)
    if eval_step is not None and source.eval is None:  # `run` would skip every evaluation silently
        raise ConfigError(f"train.eval_step={cfg.train.eval_step!r} is set but data.factory={cfg.data.factory!r} "
                          "returned a DataSource without eval data",
                          suggestion="return tx.data.DataSource(..., eval=held_out_batches) from the data "
                          "factory, or drop train.eval_step", owner=OWNER, field="train.eval_step")
    rules = plan.resolved_rules()
    model, example = build_model(cfg, source.example, rules, mesh)
    _check_vocabulary(model, source, rules, mesh)
    with keyed("optimizer"):
        optimizer = cfg.optimizer.build(cfg.train.steps)
    with keyed("checkpoint"):
        checkpointer = cfg.checkpoint.build() if checkpoint else None
    with keyed("logging"):
        built_loggers = cfg.logging.build(run_config=config_values(cfg)) if loggers else ()
    with keyed():
        engine = Engine(
            mesh=mesh, plan=plan, optimizer=optimizer,
            precision=precision, checkpoint=checkpointer,
            loggers=built_loggers, log_every=cfg.logging.every,
            flops_per_example=cfg.logging.flops_per_example, tokens_per_example=source.tokens_per_example,
            peak_flops=cfg.logging.peak_flops, on_nonfinite=cfg.train.on_nonfinite,
            profile_steps=cfg.logging.profile_steps, profile_dir=cfg.logging.profile_dir or "profile")
    return Prepared(config=cfg, engine=engine, model=model, model_example=example, source=source, step=step,
                    eval_step=eval_step, eval_summary=eval_summary)


def train(cfg: RunConfig, *, echo: Callable[[str], None] = print,
          run_directory: RunDirectory | None = None) -> dict[str, float]:
    """Train the run a configuration describes (``titanax run``).

    Args:
      cfg: the run configuration.
      echo: where process 0's summary lines go.
      run_directory: write this run directory (:func:`~titanax.config.resolve_run_directory`; its
        configuration replaces ``cfg``) once the run is built.

    Returns:
      ``step`` (the last one), the final evaluation metrics (``eval/...``) when ``train.eval_step``
      is set, and those before training (``first/eval/...``) with ``train.eval_at_start``.
    """
    import jax

    cfg = run_directory.config if run_directory is not None else cfg
    try:
        run = prepare(cfg)
    except BaseException:
        if run_directory is not None:
            run_directory.discard()  # reserved when chosen: a run that fails to build leaves no empty folder
        raise
    say = echo if jax.process_index() == 0 else (lambda _line: None)
    if run_directory is not None:
        run_directory.create()
        say(run_directory.describe())
    engine = run.engine
    state = run.init()
    if run.source.description:
        say(run.source.description)
    say(f"mesh {', '.join(f'{a}={n}' for a, n in engine.mesh.shape.items())} over {jax.device_count()} "
        f"devices in {jax.process_count()} process{'es' if jax.process_count() > 1 else ''}; plan: "
        + "; ".join(" ".join(line.split()) for line in engine.plan.describe().splitlines()[1:]))
    has_eval = run.eval_step is not None and run.source.eval is not None
    result: dict[str, float] = {}
    if has_eval and cfg.train.eval_at_start and int(jax.device_get(state.step)) == 0:
        first = engine.evaluate(run.eval_step, state, run.source.eval, summary=run.eval_summary)
        result.update({f"first/{k}": v for k, v in first.items()})
        say(f"held-out before training: {_metrics_line(first)}")
    state = engine.fit(run.step, run.source.train_batches(), steps=cfg.train.steps,
                       eval_step=run.eval_step if has_eval else None,
                       eval_data=run.source.eval if has_eval else None,
                       eval_every=cfg.train.eval_every, eval_summary=run.eval_summary)
    result["step"] = float(jax.device_get(state.step))
    if engine.stopped_by is not None:  # preempted: the step is saved; no time for evaluation
        return result
    if has_eval:
        final = engine.evaluate(run.eval_step, state, run.source.eval, summary=run.eval_summary)
        result.update(final)
        say(f"held-out after step {int(result['step'])}: {_metrics_line(final)}")
    return result


def _metrics_line(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(metrics.items()))
