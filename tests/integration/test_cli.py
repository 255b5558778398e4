"""The ``titanax`` command line: misconfigurations end in one paragraph and exit status 2, help
pages list every option, and ``titanax describe`` reports the memory the hand arithmetic predicts.

Most cases run the real CLI in this process (typer's ``CliRunner``): every error here is raised
before anything is compiled, and this process already has the 8 CPU devices ``--cpu-devices 8``
asks for. A few run ``python -m titanax.cli`` in a fresh process to check the real exit status and
that no traceback escapes (and that ``--debug`` shows one).
"""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import pytest
import typer
import yaml
from flax import nnx
from typer.testing import CliRunner

import titanax as tx
from titanax.cli import EXIT_CONFIG_ERROR, app

REPO = pathlib.Path(__file__).resolve().parents[2]

# A whole, valid run (the MNIST example's modules); each case below breaks one thing in it.
BASE: dict[str, Any] = {
    "model": {"factory": "examples.mnist_dp.model:CNN", "input": "image"},
    "data": {"factory": "examples.mnist_dp.data:digits_source", "args": {"data_dir": None}, "batch_size": 64},
    "mesh": {"axes": ["data"]},
    "plan": {"data_parallel": {"axis": "data"}},
    "optimizer": {"name": "adamw", "lr": 1e-3, "args": {"weight_decay": 1e-4}},
    "train": {"step": "examples.mnist_dp.steps:train_step", "steps": 2},
    "logging": {"every": 1},
}


def with_(key: str, value: Any) -> Callable[[dict], None]:
    """A mutation setting dotted ``key`` to ``value`` (sections created as needed)."""
    def mutate(cfg: dict) -> None:
        *parents, leaf = key.split(".")
        for part in parents:
            cfg = cfg.setdefault(part, {})
        cfg[leaf] = value
    return mutate


def without(key: str) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        *parents, leaf = key.split(".")
        for part in parents:
            cfg = cfg[part]
        del cfg[leaf]
    return mutate


def sections(**values: Any) -> Callable[[dict], None]:
    """A mutation replacing whole sections."""
    return lambda cfg: cfg.update(copy.deepcopy(values))


TP_MESH = {"axes": ["data", "tensor"], "shape": [4, 2]}
TP_PLAN = {"data_parallel": {"axis": "data"}, "tensor_parallel": {"axis": "tensor"}}


# An NNX model annotated as Flax's docs write it: nnx.with_partitioning, eager by default under
# Flax 0.12 (building it outside a mesh fails unless eager sharding is off). Configs name it by
# this module's import path (already imported, whatever name pytest gave it).
class EagerTokenModel(nnx.Module):
    def __init__(self, vocab: int = 300, width: int = 16, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, width, rngs=rngs, embedding_init=nnx.with_partitioning(
            nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.head = nnx.Linear(width, vocab, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed", "vocab")))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return self.head(self.embed(tokens_BT))


def eager_token_model(vocab: int = 300, *, rngs: nnx.Rngs) -> EagerTokenModel:
    return EagerTokenModel(vocab, rngs=rngs)


def built_token_model(vocab: int = 300) -> EagerTokenModel:
    """A factory without ``rngs`` that builds the module itself (on one device)."""
    return EagerTokenModel(vocab, rngs=nnx.Rngs(0))


def byte_tokens(*, vocab_size: int | None = 257, batch_size: int, seed: int) -> tx.data.DataSource:
    """Byte ids (0..256), declared as such unless ``vocab_size`` is None; no held-out data."""
    tokens_BT = np.random.default_rng(seed).integers(0, 257, size=(batch_size, 9)).astype(np.int32)
    return tx.data.DataSource(train=lambda: [{"tokens": tokens_BT}], example={"tokens": tokens_BT},
                              vocab_size=vocab_size)


@tx.step_fn
def token_step(state, batch):
    def loss(params):
        logits_BTV = state.apply(params, batch["tokens"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["tokens"][:, 1:]).mean()

    value, grads = jax.value_and_grad(loss)(state.params)
    return state.apply_gradients(grads=grads), {"loss": value}


def tokens_run(model: str = "EagerTokenModel", data_args: dict | None = None, **model_keys: Any) -> Callable[[dict], None]:
    """A mutation making the run the NNX token model (``model``, this module's) on byte tokens."""
    return sections(model={"factory": f"{__name__}:{model}", **model_keys},
                    data={"factory": f"{__name__}:byte_tokens", "args": data_args or {}, "batch_size": 8},
                    train={"step": f"{__name__}:token_step", "steps": 1})


# id -> (the file: a mutation of BASE or raw YAML text, extra CLI arguments, what stderr must name)
CASES: dict[str, tuple[Callable[[dict], None] | str | None, tuple[str, ...], tuple[str, ...]]] = {
    "yaml-syntax": ("model:\n  factory: [examples.mnist_dp.model:CNN\ndata: {}\n", (),
                    ("is not valid YAML", "line 3")),
    "duplicate-key": ("model:\n  factory: examples.mnist_dp.model:CNN\ntrain:\n  step: a:b\ntrain:\n  steps: 3\n", (),
                      ("line 5: 'train' is written a second time", "first on line 3")),
    "unclosed-quote": ("model:\n  factory: \"examples.mnist_dp.model:CNN\ntrain:\n  steps: 3\n\n\n", (),
                       ("is not valid YAML", "starts on line 2")),
    "unknown-top-level-key": (with_("optimiser", {"name": "adamw"}), (),
                              ("unknown key optimiser", "did you mean optimizer?")),
    "unknown-nested-key": (with_("optimizer.lrr", 1e-3), (),
                           ("unknown key optimizer.lrr", "did you mean optimizer.lr?")),
    "string-for-int": (with_("train.steps", "many"), (), ("train.steps='many'", "expected an integer")),
    "string-for-float": (with_("optimizer.lr", "fast"), (), ("optimizer.lr='fast'", "expected a number")),
    "scalar-for-list": (with_("mesh.axes", "data"), (), ("mesh.axes='data'", "expected a list of strings")),
    "list-for-mapping": (with_("model.args", [1, 2]), (), ("model.args=[1, 2]", "a mapping of names to values")),
    "axis-not-in-mesh": (with_("plan.data_parallel.axis", "batch"), (),
                         ("plan.data_parallel.axis='batch'", "names an axis the mesh", "use one of ['data']")),
    "mesh-larger-than-devices": (sections(mesh={"axes": ["data", "tensor"], "shape": [4, 4]}, plan=TP_PLAN), (),
                                 ("mesh.shape=[4, 4]", "needs 16 devices but 8 are available",
                                  "simulate 16 devices on the CPU with --cpu-devices 16")),
    "mesh-not-dividing-devices": (sections(mesh={"axes": ["data", "tensor"], "shape": [-1, 3]}, plan=TP_PLAN), (),
                                  ("mesh.shape=[-1, 3]", "cannot split 8 devices", "--cpu-devices 9")),
    "mesh-shape-length": (with_("mesh.shape", [2, 4]), (), ("mesh.shape [2, 4] has 2 entries for 1 axes",)),
    "axis-unused-by-plan": (sections(mesh=TP_MESH, plan={"data_parallel": {"axis": "data"}}), (),
                            ("mesh.axes=['data', 'tensor']", "mesh axis 'tensor'", "data_parallel=tx.DP(axis='tensor')")),
    "two-parts-one-axis": (with_("plan.fsdp", {"axis": "data"}), (),
                           ("plan.fsdp.axis='data'", "DP and FSDP both use mesh axis 'data'")),
    "missing-model-module": (with_("model.factory", "examples.no_such_example.model:CNN"), (),
                             ("model.factory=", "module 'examples.no_such_example' cannot be found")),
    "missing-model-attribute": (with_("model.factory", "examples.mnist_dp.model:CNNN"), (),
                                ("model.factory=", "has no attribute 'CNNN'", "did you mean CNN")),
    "unknown-model-argument": (with_("model.args", {"hiden": 64}), (),
                               ("model.args.hiden is not an argument", "did you mean hidden?")),
    "unknown-plan-part": (with_("plan.data_paralel", {"axis": "data"}), (),
                          ("unknown key plan.data_paralel", "did you mean plan.data_parallel?")),
    "unknown-optimizer": (with_("optimizer.name", "adamww"), (),
                          ("optimizer.name='adamww'", "did you mean adamw?")),
    "unknown-optimizer-argument": (with_("optimizer.args", {"weight_decayy": 0.1}), (),
                                   ("optimizer.args.weight_decayy", "did you mean weight_decay?")),
    "unknown-pipeline-schedule": (sections(mesh={"axes": ["pipe"]}, plan={"pipeline_parallel": {
        "axis": "pipe", "stages": 8, "microbatches": 8, "schedule": "1f1bb"}}), (),
        ("plan.pipeline_parallel.schedule='1f1bb'", "gpipe, circular, 1f1b, interleaved")),
    "pipeline-stages-vs-mesh": (sections(mesh={"axes": ["pipe"]}, plan={"pipeline_parallel": {
        "axis": "pipe", "stages": 4, "microbatches": 4}}), (),
        ("plan.pipeline_parallel.stages=4", "mesh axis 'pipe' has 8 devices")),
    "unknown-precision": (with_("precision.compute", "float17"), (), ("precision.compute='float17'",)),
    "batch-not-divisible": (with_("data.batch_size", 100), (),
                            ("data.batch_size=100", "8 batch shards", "data.batch_size=96")),
    "missing-env-var": (with_("checkpoint.dir", "${oc.env:TITANAX_TEST_UNSET_VARIABLE}"), (),
                        ("checkpoint.dir", "TITANAX_TEST_UNSET_VARIABLE", "${oc.env:TITANAX_TEST_UNSET_VARIABLE,")),
    "missing-train-step": (without("train.step"), (), ("train.step is required",)),
    "missing-model-section": (without("model"), (), ("model is required",)),
    "set-without-equals": (None, ("--set", "train.steps"), ("--set 'train.steps' is not key=value",)),
    "set-unknown-key": (None, ("--set", "train.stepz=3"),
                        ("--set train.stepz=3", "unknown key train.stepz", "did you mean train.step?")),
    "set-wrong-type": (None, ("--set", "train.steps=abc"), ("--set train.steps=abc", "expected an integer")),
    "set-invalid-value": (None, ("--set", "train.steps=-3"), ("--set train.steps=-3: train.steps=-3 must be",)),
    "set-unparsable-value": (None, ("--set", "mesh.shape=[2,"), ("--set 'mesh.shape=[2,' cannot be parsed",)),
    "config-file-not-found": ("<missing>", (), ("cannot read config file", "does_not_exist.yaml")),
    "seed-beyond-32-bits": (None, ("--set", "train.seed=4294967296"),
                            ("train.seed=4294967296 does not fit in 32 bits", "train.seed=0")),
    # `run` builds the checkpointer (relative paths: the CLI runs in the repository root)
    "checkpoint-dir-is-a-file": (with_("checkpoint.dir", "pyproject.toml"), (), ("checkpoint.dir=", "pyproject.toml")),
    "checkpoint-dir-under-a-file": (with_("checkpoint.dir", "pyproject.toml/runs"), (),
                                    ("checkpoint.dir=", "pyproject.toml/runs")),
    "linen-argument-type": (with_("model.args", {"hidden": 64.5}), (),
                            ("model.args.hidden=64.5 does not fit `hidden: int`", "write model.args.hidden as an integer")),
    "data-argument-type": (with_("data.args.data_dir", 5), (),
                           ("data.args.data_dir=5 does not fit `data_dir: str | None`", "a string or null")),
    # model.factory naming an NNX Module class (its signature reads (*args, **kwargs) under Flax 0.12)
    "nnx-class-unknown-argument": (tokens_run(args={"widht": 8}), (),
                                   ("model.args.widht is not an argument", "did you mean width?")),
    "nnx-class-argument-type": (tokens_run(args={"vocab": "many"}), (),
                                ("model.args.vocab='many' does not fit `vocab: int`",)),
    # the vocabulary check traces the factory with eager sharding off, as tx.shard does
    "eager-annotations-vocabulary-too-small": (tokens_run("eager_token_model", args={"vocab": 100}), (),
                                               ("token ids go up to 256", "has 100 entries on its 'vocab' axis")),
    "eager-annotations-built-module-vocabulary-too-small": (
        tokens_run("built_token_model", args={"vocab": 100}), (),
        ("token ids go up to 256", "has 100 entries on its 'vocab' axis")),
    # (a function factory and no vocabulary: only the check named fails)
    "nnx-model-with-input": (tokens_run("eager_token_model", {"vocab_size": None}, input="tokens"), (),
                             ("model.input='tokens' is set", "NNX model")),
    "eval-step-without-eval-data": (tokens_run("eager_token_model", {"vocab_size": None}),
                                    ("--set", f"train.eval_step={__name__}:token_step"),
                                    ("train.eval_step=", "a DataSource without eval data")),
    # byte tokens (257 ids) into a GPT with 200 embedding rows: JAX would clamp, not fail
    "vocabulary-larger-than-embedding": (sections(
        model={"factory": "examples.gpt_small_tp.model:gpt", "args": {"preset": "tiny", "vocab_size": 200}},
        data={"factory": "examples.gpt_small_tp.data:text_source", "args": {"seq_len": 16}, "batch_size": 8},
        train={"step": "examples.gpt_small_tp.steps:train_step", "steps": 2}), (),
        ("token ids go up to 256", "wte/embedding [200, 64] has 200 entries on its 'vocab' axis",
         "a vocabulary of at least 257")),
}


def write_config(tmp_path: pathlib.Path, spec: Callable[[dict], None] | str | None) -> pathlib.Path:
    path = tmp_path / "run.yaml"
    if spec == "<missing>":
        return tmp_path / "does_not_exist.yaml"
    if isinstance(spec, str):
        path.write_text(spec)
        return path
    cfg = copy.deepcopy(BASE)
    if spec is not None:
        spec(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def assert_one_paragraph(stderr: str, *names: str) -> None:
    text = stderr.strip()
    assert text.startswith("titanax: error: "), stderr
    assert "Traceback" not in text, stderr
    assert "\n\n" not in text, f"more than one paragraph:\n{stderr}"
    assert "\n  Suggestion: " in text, stderr
    for name in names:
        assert name in text, f"{name!r} not in:\n{stderr}"


@pytest.fixture
def cli(monkeypatch):
    """Runs ``titanax ...`` in this process; restores what the CLI sets (TITANAX_CPU_DEVICES)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TITANAX_CPU_DEVICES", "8")
    monkeypatch.delenv("TITANAX_TEST_UNSET_VARIABLE", raising=False)
    monkeypatch.delenv("TITANAX_DEBUG", raising=False)
    runner = CliRunner()  # keeps stderr apart (typer >= 0.29 vendors click 8.2+): result.stderr / .stdout
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=True)


def test_at_least_25_distinct_misconfigurations():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_misconfiguration_is_one_paragraph_and_exit_2(cli, tmp_path, case):
    spec, extra, names = CASES[case]
    path = write_config(tmp_path, spec)
    # `describe` for most (it compiles nothing before the checks fail); `run` for a few, to cover both
    command = "run" if case in ("string-for-int", "axis-not-in-mesh", "missing-model-attribute", "checkpoint-dir-is-a-file",
                                "checkpoint-dir-under-a-file") else "describe"
    result = cli(command, str(path), "--cpu-devices", "8", *extra)
    assert result.exit_code == EXIT_CONFIG_ERROR, (result.exit_code, result.exception, result.output)
    assert result.stdout == "", result.stdout
    assert_one_paragraph(result.stderr, *names)


def test_nnx_class_with_eager_annotations_and_vocabulary(cli, tmp_path):
    """An NNX class as model.factory gets ``rngs``; its eager ``nnx.with_partitioning`` annotations
    are read (vocab -> tensor) and the vocabulary check passes when its 300 rows hold 257 ids."""
    path = write_config(tmp_path, tokens_run())
    result = cli("describe", str(path), "--cpu-devices", "8", "--set", "mesh.axes=[data, tensor]",
                 "--set", "mesh.shape=[4, 2]", "--set", "plan.tensor_parallel={axis: tensor}")
    assert result.exit_code == 0, (result.exit_code, result.exception, result.stderr)
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith(("embed/", "head/"))}
    assert "P('tensor', None)" in rows["embed/embedding"], result.stdout
    assert "P(None, 'tensor')" in rows["head/kernel"], result.stdout


def test_optimizer_error_names_config_keys(cli, tmp_path):
    path = write_config(tmp_path, sections(optimizer={"name": "adamw", "schedule": "warmup_cosine",
                                                       "warmup_steps": 50}))
    result = cli("describe", str(path), "--cpu-devices", "8")
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert_one_paragraph(result.stderr, "optimizer.warmup_steps=50", "train.steps=2")


def test_overrides_fix_a_broken_file(cli, tmp_path):
    """--set applies on top of the file: the bad value never reaches validation (checked here
    with a mistake the file makes and the command line corrects, then breaks again)."""
    path = write_config(tmp_path, with_("data.batch_size", 100))
    result = cli("describe", str(path), "--cpu-devices", "8", "--set", "data.batch_size=96",
                 "--set", "plan.data_parallel.axis=batch")
    assert result.exit_code == EXIT_CONFIG_ERROR
    assert_one_paragraph(result.stderr, "plan.data_parallel.axis='batch'")


# ------------------------------------------------------------------------------ fresh processes
def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TITANAX_CPU_DEVICES", "TITANAX_DEBUG")}
    return subprocess.run([sys.executable, "-m", "titanax.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def test_fresh_process_exit_code_and_no_traceback(tmp_path):
    path = write_config(tmp_path, with_("model.factory", "examples.mnist_dp.model:CNNN"))
    result = run_cli("run", str(path), "--cpu-devices", "8")
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    assert result.stdout == ""
    assert_one_paragraph(result.stderr, "model.factory=", "did you mean CNN")


def test_fresh_process_mesh_error(tmp_path):
    path = write_config(tmp_path, sections(mesh={"axes": ["data", "tensor"], "shape": [4, 4]}, plan=TP_PLAN))
    result = run_cli("describe", str(path), "--cpu-devices", "8")
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    assert_one_paragraph(result.stderr, "mesh.shape=[4, 4]", "needs 16 devices but 8 are available")


def test_debug_shows_the_traceback(tmp_path):
    path = write_config(tmp_path, with_("optimizer.lrr", 1e-3))
    result = run_cli("describe", str(path), "--debug")
    assert result.returncode not in (0, EXIT_CONFIG_ERROR), result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr and "optimizer.lrr" in result.stderr


# ------------------------------------------------------------------------------------ help pages
def _click_app() -> Any:
    """The click command tree typer builds (typer >= 0.29 vendors click: no isinstance on click
    classes; ``param_type_name`` tells options from arguments)."""
    return typer.main.get_command(app)


def _help(cli, *args: str) -> str:
    result = cli(*args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def test_top_level_help_lists_every_command(cli):
    group = _click_app()
    assert set(group.commands) == {"run", "describe", "plan", "launch", "plot"}
    for args in (("--help",), ("-h",)):
        text = _help(cli, *args)
        for name in group.commands:
            assert name in text, (name, text)
        for param in group.params:
            for opt in param.opts + param.secondary_opts:
                assert opt in text, (opt, text)


@pytest.mark.parametrize("command", ["run", "describe", "plan", "launch", "plot"])
def test_command_help_lists_every_option(cli, command):
    click_command = _click_app().commands[command]
    text = _help(cli, command, "--help")
    options = [p for p in click_command.params if p.param_type_name == "option"]
    assert options, command
    for param in options:
        for opt in param.opts + param.secondary_opts:
            assert opt in text, f"{opt} missing from `titanax {command} --help`:\n{text}"
        assert param.help and param.help.split()[0] in text, (param.name, text)
    for param in click_command.params:
        if param.param_type_name == "argument":
            assert (param.metavar or param.name.upper()) in text or param.name in text, (param.name, text)


# ------------------------------------------------------------------------- describe, GPT-2 small
# GPT-2 small as examples/gpt_small_tp/model.py builds it (SMALL): vocabulary 50304, 1024
# positions, 12 blocks of width 768 with 12 heads and an MLP of 3072; DP 2 x TP 4.
V, T, L, D, F, TENSOR = 50304, 1024, 12, 768, 3072, 4


@pytest.fixture(scope="module")
def gpt_small():
    from titanax.config import load
    from titanax.config.describe import describe_run

    cfg = load(REPO / "examples" / "configs" / "gpt_small_dp2_tp4.yaml")
    started = time.perf_counter()
    description = describe_run(cfg)
    return description, time.perf_counter() - started


def expected_param_elements_per_device() -> int:
    """Parameters one device holds, from the model code and the rules heads/mlp/vocab -> tensor."""
    per_layer = (
        2 * (D + D)                          # ln_attn, ln_mlp: scale + bias, (embed): replicated
        + D * 3 * D // TENSOR                # attn.qkv kernel [D, 3, H, K]: heads split
        + 3 * D // TENSOR                    # attn.qkv bias [3, H, K]: heads split
        + D * D // TENSOR                    # attn.out kernel [H, K, D]: heads split
        + D                                  # attn.out bias (embed): replicated
        + D * F // TENSOR + F // TENSOR      # mlp.up kernel [D, F] and bias [F]: mlp split
        + F * D // TENSOR                    # mlp.down kernel [F, D]: mlp split
        + D                                  # mlp.down bias (embed): replicated
    )
    return (V * D // TENSOR                  # wte [V, D]: vocab split (also the tied output head)
            + T * D                          # wpe [T, D]: replicated
            + L * per_layer
            + 2 * D)                         # ln_f: replicated


def test_describe_gpt_small_memory_matches_hand_arithmetic(gpt_small):
    description, seconds = gpt_small
    param_bytes = 4 * expected_param_elements_per_device()            # float32 master weights
    adamw_bytes = 3 * param_bytes                                     # params + mu + nu
    assert param_bytes / 2**20 == pytest.approx(121.12, abs=0.01)     # the hand figure, in MiB

    assert description.param_bytes == pytest.approx(param_bytes, rel=0.02)
    assert description.optimizer_bytes == pytest.approx(2 * param_bytes, rel=0.02)
    assert description.param_bytes + description.optimizer_bytes == pytest.approx(adamw_bytes, rel=0.02)
    # XLA's own account of the step's inputs: the state (params + moments + scalars) and one batch
    assert description.stats.argument_bytes == pytest.approx(adamw_bytes, rel=0.02)
    # the whole model: 124.48 M parameters (the tied head adds none)
    per_layer_total = 4 * D + 3 * D * D + 3 * D + D * D + D + D * F + F + F * D + D
    assert description.parameter_count == V * D + T * D + L * per_layer_total + 2 * D
    assert seconds < 240, f"describe took {seconds:.0f} s"  # generous: measured ~35 s for the CLI


def test_describe_gpt_small_layout_table(gpt_small):
    description, _ = gpt_small
    specs = {}
    for line in description.layout.splitlines():
        columns = [c for c in line.split("  ") if c.strip()]
        if columns and "/" in columns[0]:  # a parameter row (the header and the summary have no path)
            specs[columns[0].strip()] = columns[4].strip()
    assert specs == {
        "wte/embedding": "P('tensor', None)",
        "wpe/embedding": "P(None, None)",
        "ln_f/scale": "P(None)",
        "ln_f/bias": "P(None)",
        "blocks/layer/ln_attn/scale": "P(None, None)",
        "blocks/layer/ln_attn/bias": "P(None, None)",
        "blocks/layer/ln_mlp/scale": "P(None, None)",
        "blocks/layer/ln_mlp/bias": "P(None, None)",
        "blocks/layer/attn/qkv/kernel": "P(None, None, None, 'tensor', None)",
        "blocks/layer/attn/qkv/bias": "P(None, None, 'tensor', None)",
        "blocks/layer/attn/out/kernel": "P(None, 'tensor', None, None)",
        "blocks/layer/attn/out/bias": "P(None, None)",
        "blocks/layer/mlp/up/kernel": "P(None, None, 'tensor')",
        "blocks/layer/mlp/up/bias": "P(None, 'tensor')",
        "blocks/layer/mlp/down/kernel": "P(None, 'tensor', None)",
        "blocks/layer/mlp/down/bias": "P(None, None)",
    }
    text = description.render()
    assert "Mesh data=2 x tensor=4" in text
    assert "TP    over 'tensor' (4 devices)" in text
    assert "124.48 M parameters in all" in text
    assert "all-reduce" in text and "nothing was allocated or trained" in text


def test_plain_step_function_is_wrapped(tmp_path, monkeypatch):
    """``train.step`` may name a plain ``(state, batch)`` function, as ``Engine.fit`` takes one:
    ``titanax describe`` lowers it, so ``prepare`` makes it a ``tx.step_fn``."""
    from titanax.config import from_dict, prepare
    from titanax.exec.step import StepFunction

    (tmp_path / "tx_test_plain_steps.py").write_text(
        "def train_step(state, batch):\n    return state, {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = from_dict(BASE, ["train.step=tx_test_plain_steps:train_step"])
    run = prepare(cfg, loggers=False, checkpoint=False)
    assert isinstance(run.step, StepFunction)
