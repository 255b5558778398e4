"""The ``titanax`` command: ``run``, ``describe``, ``plan`` and ``launch`` a training run from a YAML file,
and ``plot`` its metrics.

    titanax run examples/configs/mnist_dp.yaml --cpu-devices 8
    titanax describe examples/configs/gpt_small_dp2_tp4.yaml --html report.html
    titanax plot runs/mnist/metrics.csv --out runs/mnist/plots
    titanax plan examples/configs/gpt_70b_fsdp32_tp8.yaml --devices 256 --device h100
    titanax launch --nprocs 2 --cpu-devices-per-proc 4 -- titanax run examples/configs/mnist_dp.yaml

A configuration mistake (``TitanaxError``) prints one paragraph — what is wrong, which key, what to
change — and exits with status 2, without a Python traceback (``--debug`` shows it).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Annotated, Any, Optional

import typer

__all__ = ["app", "main"]

EXIT_CONFIG_ERROR = 2
"""Exit status of a misconfiguration (the same as a command-line usage error)."""

app = typer.Typer(
    name="titanax",
    help="Train JAX/Flax models across devices from a YAML run configuration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
"""The ``titanax`` command as a Typer application (``main`` runs it; tests call it with Typer's ``CliRunner``)."""

ConfigPath = Annotated[str, typer.Argument(help="The run configuration: a YAML file (see examples/configs/).",
                                           show_default=False)]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a configuration value (YAML syntax; repeatable), e.g. --set train.steps=20 "
    "--set mesh.shape=[2,4].")]
CpuDevices = Annotated[Optional[int], typer.Option(
    "--cpu-devices", min=1, metavar="N",
    help="Simulate N devices on the CPU (for machines without accelerators; also "
    "TITANAX_CPU_DEVICES).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full Python traceback of an error.")]


def _fail(error: BaseException, debug: bool) -> None:
    from titanax.exceptions import TitanaxError

    if debug or os.environ.get("TITANAX_DEBUG"):
        raise error
    message = error.message if isinstance(error, TitanaxError) else str(error)
    suggestion = getattr(error, "suggestion", None)
    text = f"titanax: error: {message}" + (f"\n  Suggestion: {suggestion}" if suggestion else "")
    typer.echo(text, err=True)
    raise typer.Exit(EXIT_CONFIG_ERROR)


def _warnings_as_lines() -> None:
    """Print a ``TitanaxWarning`` as ``titanax: warning: ...``, like errors, without the source
    line Python's format adds (it points into Titanax, not at the configuration)."""
    import warnings

    from titanax.exceptions import TitanaxWarning

    python_format = warnings.showwarning

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, TitanaxWarning):
            typer.echo(f"titanax: warning: {message}", err=True)
        else:
            python_format(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _log_lines() -> None:
    """Show the ``titanax`` logger's messages (the step resumed from, a preemption) as
    ``titanax: ...`` lines on stderr; the library itself configures no handler."""
    import logging

    logger = logging.getLogger("titanax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("titanax: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _start(config: str, overrides: list[str] | None, cpu_devices: int | None, *,
           default_devices: Any = None) -> Any:
    """Read the configuration, then start JAX: simulated devices first, then ``jax.distributed``."""
    import titanax as tx
    from titanax import config as txconfig

    _warnings_as_lines()
    _log_lines()

    if os.getcwd() not in sys.path:  # import paths in the config resolve from here, as with `python -m`
        sys.path.insert(0, os.getcwd())
    cfg = txconfig.load(config, overrides or [])
    count = cpu_devices
    if count is None and "TITANAX_CPU_DEVICES" not in os.environ and default_devices is not None:
        count = default_devices(cfg)
    if count is not None:
        os.environ["TITANAX_CPU_DEVICES"] = str(count)
    tx.runtime.initialize()  # joins the launcher's processes; simulates TITANAX_CPU_DEVICES
    return cfg


@app.command()
def run(config: ConfigPath, overrides: Overrides = None, cpu_devices: CpuDevices = None,
        profile_steps: Annotated[Optional[str], typer.Option(
            "--profile-steps", metavar="FIRST:STOP",
            help="Trace these steps with the JAX profiler, e.g. 5:8 for steps 5, 6 and 7 "
            "(logging.profile_steps; TensorBoard's profile plugin or ui.perfetto.dev reads it).")] = None,
        profile_dir: Annotated[Optional[str], typer.Option(
            "--profile-dir", metavar="DIR", help="Where the trace goes (logging.profile_dir, default profile).")] = None,
        run_dir: Annotated[Optional[str], typer.Option(
            "--run-dir", metavar="DIR",
            help="Write (or resume) the run in DIR instead of a new runs/<name>-<time>/ (output.dir).")] = None,
        compile_cache: Annotated[Optional[str], typer.Option(
            "--compile-cache", metavar="DIR",
            help="Keep compiled programs in DIR (JAX's persistent cache; train.compile_cache): a restarted "
            "run skips the compile.")] = None,
        debug: Debug = False) -> None:
    """Train the run a configuration describes.

    Writes a new run directory, runs/<name>-<time>/ (output.root, output.name; --run-dir to name it):
    the resolved config.yaml, metrics.csv, tensorboard/, checkpoints/ and profile/, for whichever of
    logging.csv, logging.tensorboard, checkpoint.dir and logging.profile_dir the configuration
    leaves unset. Resumes from the latest checkpoint in checkpoint.dir, if any (--run-dir DIR resumes
    the run in DIR). Under `titanax launch` (or SLURM,
    Open MPI, Kubernetes) every process runs this same command and joins one jax.distributed job.
    """
    from titanax.exceptions import TitanaxError

    cfg = None
    flags = {"logging.profile_steps": profile_steps, "logging.profile_dir": profile_dir,
             "train.compile_cache": compile_cache, "output.dir": run_dir}
    # quoted: YAML would read an unquoted 5:8 as the base-60 number 308
    overrides = list(overrides or []) + [f"{key}={json.dumps(value)}" for key, value in flags.items()
                                         if value is not None]
    try:
        cfg = _start(config, overrides, cpu_devices)
        _say_when_one_cpu_device(cfg)
        import jax

        from titanax.config import resolve_run_directory, train

        where = resolve_run_directory(cfg, name=os.path.splitext(os.path.basename(config))[0])
        train(cfg, run_directory=where)
        if where is not None and jax.process_index() == 0:
            typer.echo(f"run directory: {where.path}")
    except TitanaxError as error:
        _fail(_with_cpu_devices_hint(error, cfg), debug)


def _say_when_one_cpu_device(cfg: Any) -> None:
    """A run on one CPU device is nearly always ``--cpu-devices`` left out: say so, not silently."""
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() == 1:
        want = _mesh_devices(cfg)
        typer.echo(f"titanax: training on 1 CPU device (no accelerator found, none simulated): every mesh "
                   f"axis has size 1. To simulate {want} devices: --cpu-devices {want}", err=True)


def _mesh_devices(cfg: Any) -> int:
    """The devices ``cfg``'s mesh is meant for: the product of ``mesh.shape`` when every size is
    given, else the smallest multiple of the given sizes that is at least 8."""
    shape = cfg.mesh.shape or ()
    given = math.prod(size for size in shape if size > 0)
    if shape and all(size > 0 for size in shape):
        return given
    return given * -(-8 // given)


def _with_cpu_devices_hint(error: BaseException, cfg: Any) -> BaseException:
    """``error``, with the ``--cpu-devices`` that fixes it when it is a mesh larger than (or not
    dividing) the CPU devices this process simulates: on a machine without accelerators that is
    nearly always the flag left out, not a wrong ``mesh.shape``."""
    from titanax.exceptions import MeshError

    if not isinstance(error, MeshError) or cfg is None:
        return error
    import jax

    if jax.default_backend() != "cpu":
        return error
    try:
        spec = cfg.mesh.spec()
        want = _mesh_devices(cfg)
        spec.resolved_shape(want)
    except MeshError:
        return error  # the shape itself is wrong: no device count helps
    try:
        spec.resolved_shape(jax.device_count())
        return error  # the mesh fits these devices: the error is about something else
    except MeshError:
        pass
    processes = jax.process_count()
    if processes == 1:
        flag = f"--cpu-devices {want}"
    elif want % processes == 0:
        flag = f"titanax launch --cpu-devices-per-proc {want // processes}"
    else:
        return error
    hint = f"simulate {want} devices on the CPU with {flag}"
    hinted = error.replace(suggestion=hint + (f"; or {error.suggestion}" if error.suggestion else ""))
    hinted.__cause__ = error  # --debug shows where the mesh error came from
    return hinted


@app.command()
def describe(config: ConfigPath, overrides: Overrides = None, cpu_devices: CpuDevices = None,
             device: Annotated[Optional[str], typer.Option(
                 "--device", metavar="NAME",
                 help="Judge the plan against one device's memory: a100-40gb, a100, h100, h200, b200, "
                 "mi300x, tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e.")] = None,
             device_memory: Annotated[Optional[str], typer.Option(
                 "--device-memory", metavar="SIZE",
                 help="Judge the plan against this much memory per device, e.g. 80GiB or 96GB.")] = None,
             html: Annotated[Optional[str], typer.Option(
                 "--html", metavar="PATH",
                 help="Also write the report as one self-contained HTML page: layout table, memory bars, "
                 "the pipeline schedule as a Gantt chart, collectives by kind and mesh axis.")] = None,
             debug: Debug = False) -> None:
    """Dry run: lay out and compile the training step without allocating or training anything.

    Builds the mesh and plan on simulated CPU devices (as many as the mesh shape asks for, or
    --cpu-devices), compiles one training step ahead of time from abstract state and prints the
    layout of every parameter, memory per device (parameters, optimizer state, activations and
    temporaries, the peak; with --device or --device-memory a verdict), collectives per step and
    the pipeline bubble; with --html also as one HTML page. Nothing is allocated, trained or
    loaded.
    """
    from titanax.exceptions import TitanaxError

    cfg = None
    try:
        from titanax.profiling.devices import device_memory as memory_of

        judged = memory_of(device, device_memory) if device is not None or device_memory is not None else None
        # Nothing runs, so no collective can wait for a thread: the simulated devices keep the
        # machine's thread count (8 per device for 1024 devices took 40 s just to shut down).
        os.environ.setdefault("PJRT_NPROC", str(os.cpu_count() or 1))
        cfg = _start(config, overrides, cpu_devices, default_devices=_mesh_devices)
        from titanax.config.describe import describe_run

        report = describe_run(cfg, device=judged).render()
        typer.echo(report)
        if html:
            typer.echo(f"wrote {report.save(html)}")
    except TitanaxError as error:
        _fail(_with_cpu_devices_hint(error, cfg), debug)


@app.command()
def plan(config: ConfigPath,
         devices: Annotated[int, typer.Option("--devices", "-n", min=1, metavar="N",
                                              help="Devices to plan for (simulated on the CPU).")],
         overrides: Overrides = None,
         device: Annotated[str, typer.Option(
             "--device", metavar="NAME",
             help="The accelerator to estimate for: h100, h200, a100, b200, tpu-v5p, tpu-v5e; or "
             "'calibrate' to measure this machine's devices.")] = "h100",
         device_memory: Annotated[Optional[str], typer.Option(
             "--device-memory", metavar="SIZE", help="Memory budget per device, e.g. 80GiB (default: the device's).")] = None,
         top: Annotated[int, typer.Option("--top", min=1, metavar="K", help="Rows of the table to print.")] = 25,
         write: Annotated[Optional[str], typer.Option(
             "--write", metavar="PATH", help="Write the configuration with the chosen plan here.")] = None,
         time_budget: Annotated[float, typer.Option(
             "--time-budget", metavar="SECONDS", help="Seconds to spend compiling candidates.")] = 240.0,
         remat: Annotated[Optional[list[str]], typer.Option(
             "--remat", metavar="POLICY", help="Also try the model's remat argument with this value (repeatable).")] = None,
         measure: Annotated[int, typer.Option(
             "--measure", metavar="STEPS", help="Also run each plan that fits for STEPS steps here (small models).")] = 0,
         debug: Debug = False) -> None:
    """Choose the plan: compile candidate plans abstractly and rank them by a roofline estimate.

    Enumerates every split of N devices over pipe, data, fsdp and tensor axes (with sequence
    parallelism, pipeline schedules and microbatches, and --remat policies), prunes by
    divisibility and memory arithmetic, compiles the rest abstractly (nothing is allocated),
    cheapest first within --time-budget, and ranks those that fit the device's memory by their
    estimated step time. Every candidate not chosen says why.
    """
    from titanax.exceptions import TitanaxError

    cfg = None
    try:
        from titanax.profiling.devices import device_memory as memory_of

        budget = memory_of(size=device_memory).bytes if device_memory is not None else None
        os.environ.setdefault("PJRT_NPROC", str(os.cpu_count() or 1))
        cfg = _start(config, overrides, devices)
        from titanax.planner import autoplan

        search = autoplan(config, devices=devices, device=device, memory_bytes=budget, overrides=overrides or (),
                          time_budget=time_budget, remat=(None, *remat) if remat else (None,),
                          measure_steps=measure, progress=True)
        typer.echo(search.table(limit=top))
        if search.best is None:
            raise TitanaxError("no candidate fits the memory budget",
                               suggestion="more devices, --remat full, a smaller data.batch_size or a larger device")
        typer.echo(f"chosen: {search.best.candidate.label}")
        if write:
            search.write(write)
            typer.echo(f"wrote {write}: titanax run {write}")
    except TitanaxError as error:
        _fail(_with_cpu_devices_hint(error, cfg), debug)


@app.command(context_settings={"allow_interspersed_args": False})
def launch(
    command: Annotated[list[str], typer.Argument(
        help="The command every process runs, after `--` (e.g. -- titanax run config.yaml).",
        metavar="-- COMMAND...", show_default=False)],
    nprocs: Annotated[int, typer.Option("--nprocs", "-n", min=1, help="Number of processes to start.")] = 1,
    cpu_devices_per_proc: Annotated[Optional[int], typer.Option(
        "--cpu-devices-per-proc", min=1, metavar="K",
        help="Simulate K CPU devices in each process (sets TITANAX_CPU_DEVICES).")] = None,
    port: Annotated[Optional[int], typer.Option(
        help="Coordinator port on this machine (default: a free one).")] = None,
    grace: Annotated[float, typer.Option(
        min=0.0, help="Seconds the other processes get to exit after one fails, before they are killed.")] = 10.0,
    debug: Debug = False,
) -> None:
    """Start N local processes as one jax.distributed job.

    Like torchrun --standalone: each process gets TITANAX_COORDINATOR_ADDRESS, TITANAX_NUM_PROCESSES and TITANAX_PROCESS_ID
    (read by titanax.runtime.initialize(), which `titanax run` calls). Output is streamed with a
    [pN] prefix (without the collective runtime's per-rank connection lines unless --debug). If one
    process fails, the others are stopped and its exit code is returned.
    Each process waits at most TITANAX_INIT_TIMEOUT seconds (default 120) for the others to start.
    """
    from titanax.exceptions import TitanaxError
    from titanax.launch import launch as launch_local

    try:
        code = launch_local(list(command), nprocs=nprocs, cpu_devices_per_proc=cpu_devices_per_proc,
                            port=port, grace_s=grace, verbose=debug)
    except TitanaxError as error:
        _fail(error, debug)
    raise typer.Exit(code)


@app.command()
def plot(metrics: Annotated[str, typer.Argument(
             help="The metrics CSV a run wrote (logging.csv in its configuration).", show_default=False)],
         out: Annotated[Optional[str], typer.Option(
             "--out", "-o", metavar="DIR", help="Directory for the PNG files (default: the CSV's own).")] = None,
         debug: Debug = False) -> None:
    """Draw a run's metrics CSV as PNG curves: loss (train and held-out), throughput, MFU.

    Writes loss.png, throughput.png (tokens/s, else examples/s) and mfu.png, each when the CSV has
    its columns. Needs matplotlib: pip install "titanax[plot]".
    """
    from titanax.exceptions import TitanaxError

    try:
        from titanax.logging.plot import plot_metrics

        for path in plot_metrics(metrics, out_dir=out):
            typer.echo(f"wrote {path}")
    except TitanaxError as error:
        _fail(error, debug)


def main(argv: list[str] | None = None) -> None:
    """The console script's entry point (``titanax ...``)."""
    app(args=argv, prog_name="titanax")


if __name__ == "__main__":
    main(sys.argv[1:])
