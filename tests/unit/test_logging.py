"""titanax.logging: loggers write real files / streams that are read back, and only on process 0."""

from __future__ import annotations

import csv
import glob
import io
import itertools
import math
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titanax.exceptions import TitanaxError
from titanax.logging import (
    CSV,
    Basic,
    Logger,
    MultiLogger,
    NullLogger,
    TensorBoard,
    ThroughputMeter,
    format_metrics,
    mfu,
    peak_flops_per_device,
)


class Recorder(Logger):
    def __init__(self, every: int = 1):
        super().__init__(every=every)
        self.rows: list[tuple[int, dict]] = []
        self.started: list[tuple[int | None, int]] = []
        self.closed = 0

    def on_start(self, *, total_steps, start_step):
        self.started.append((total_steps, start_step))

    def write(self, step, metrics):
        self.rows.append((step, metrics))

    def on_close(self):
        self.closed += 1


class FakeClock:
    def __init__(self, times):
        self._times = iter(times)

    def __call__(self) -> float:
        return next(self._times)


@pytest.fixture
def other_process(monkeypatch):
    """Pretend to be process 1 of a multi-process run."""
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- base, NullLogger, MultiLogger ------------------------------------------------------------------

def test_logger_is_abstract():
    with pytest.raises(TypeError):
        Logger()  # type: ignore[abstract]


def test_every_selects_steps_and_the_last_one():
    r = Recorder(every=5)
    r.start(total_steps=12)
    for s in range(1, 13):
        r.log(s, {"loss": float(s)})
    assert [s for s, _ in r.rows] == [5, 10, 12]
    assert r.started == [(12, 0)]


def test_values_become_python_numbers():
    r = Recorder()
    r.log(np.int64(3), {"loss": np.float32(0.5), "n": np.int32(7), "ok": True, "dev": jnp.float32(2.0)})
    step, metrics = r.rows[0]
    assert step == 3 and type(step) is int
    assert metrics == {"loss": 0.5, "n": 7, "ok": 1, "dev": 2.0}
    assert [type(v) for v in metrics.values()] == [float, int, int, float]


@pytest.mark.parametrize("bad", [1.5, "3", True, None])
def test_bad_step_raises(bad):
    with pytest.raises(TitanaxError) as e:
        Recorder().log(bad, {"loss": 1.0})
    assert e.value.suggestion


def test_bad_metric_names_the_key():
    with pytest.raises(TitanaxError, match="'acts'") as e:
        Recorder().log(1, {"loss": 1.0, "acts": np.ones(3)})
    assert e.value.suggestion
    with pytest.raises(TitanaxError):
        Recorder().log(1, [("loss", 1.0)])  # type: ignore[arg-type]


@pytest.mark.parametrize("every", [0, -1, 1.0, True])
def test_bad_every_raises(every):
    with pytest.raises(TitanaxError) as e:
        CSV("x.csv", every=every)
    assert "every" in str(e.value) and e.value.suggestion


def test_context_manager_closes():
    with Recorder() as r:
        r.log(1, {"loss": 1.0})
    assert r.closed == 1


def test_null_logger_accepts_everything():
    with NullLogger() as lg:
        lg.start(total_steps=3)
        lg.log(1, {"loss": 1.0})


def test_multilogger_fans_out_each_with_its_own_every():
    a, b = Recorder(every=1), Recorder(every=2)
    with MultiLogger([a, MultiLogger([b])]) as m:
        m.start(total_steps=3, start_step=0)
        for s in (1, 2, 3):
            m.log(s, {"loss": 1.0 / s})
    assert [s for s, _ in a.rows] == [1, 2, 3]
    assert [s for s, _ in b.rows] == [2, 3]  # 3 is the last step
    assert a.started == b.started == [(3, 0)]
    assert a.closed == b.closed == 1


def test_multilogger_closes_all_even_if_one_raises(tmp_path):
    class Broken(Recorder):
        def on_close(self):
            raise RuntimeError("disk full")

    path = tmp_path / "m.csv"
    c = CSV(path)
    m = MultiLogger([Broken(), c, Broken()])
    m.log(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="disk full") as e:
        m.close()
    assert c._file is None  # the CSV after the broken logger was still closed
    assert any("also failed" in n for n in getattr(e.value, "__notes__", []))
    assert read_csv(path) == [{"step": "1", "loss": "1.0"}]


def test_multilogger_rejects_non_loggers():
    with pytest.raises(TitanaxError, match="item 1") as e:
        MultiLogger([NullLogger(), print])  # type: ignore[list-item]
    assert "Logger" in e.value.suggestion


# -- Basic ------------------------------------------------------------------------------------------

def test_format_metrics_numbers():
    line = format_metrics(
        120,
        {"loss": 0.41234, "accuracy": 0.9125, "examples_per_s": 12300.0, "lr": 3e-5, "big": 123456.0,
         "tokens": 4096, "mfu": 0.4123, "mem_bytes": 3 * 2**30, "bad": float("nan")},
        total_steps=1000,
    )
    assert line == ("step 120/1000 | loss 0.4123 | accuracy 0.9125 | 12.3k examples/s | lr 3.00e-05"
                    " | big 123k | tokens 4096 | mfu 41.2% | mem_bytes 3.00 GiB | bad nan")
    # people's numbers: a loss to 4 significant digits with its zeros, rates with SI suffixes
    assert format_metrics(1, {"loss": 3.0, "tokens_per_s": 22_340.0, "grad_norm": 0.0}) == (
        "step 1 | loss 3.000 | 22.3k tokens/s | grad_norm 0")
    assert format_metrics(1, {"loss": 1234.5, "x": 0.1}) == "step 1 | loss 1234 | x 0.1000"
    assert format_metrics(5, {"tokens": 12_345_678}) == "step 5 | tokens 12.35 M"


def test_basic_plain_lines_with_rate_and_eta():
    out = io.StringIO()
    # step 1 (after the compile) at t=5, then one step per second, then 7 steps in 6 s.
    lg = Basic(stream=out, clock=FakeClock([5.0, 6.0, 7.0, 13.0, 14.0]))
    lg.start(total_steps=12)
    for s in (1, 2, 3):
        lg.log(s, {"loss": 1.0 / s, "examples_per_s": 12345.0})
    lg.log(10, {"loss": 0.1})
    lg.log(11, {"loss": 0.1, "steps_per_s": 0.25})  # a meter's rate wins over the logger's clock
    lg.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 1/12 | loss 1.000 | 12.3k examples/s",  # its interval holds the compile: no rate
        "step 2/12 | loss 0.5000 | 12.3k examples/s | 1.00 steps/s | eta 0:00:10",
        "step 3/12 | loss 0.3333 | 12.3k examples/s | 1.00 steps/s | eta 0:00:09",
        "step 10/12 | loss 0.1000 | 1.17 steps/s | eta 0:00:02",  # over the interval since step 3
        "step 11/12 | loss 0.1000 | 4.00 s/step | eta 0:00:04",
    ]


def test_basic_resumed_run_counts_from_start_step():
    out = io.StringIO()
    lg = Basic(stream=out, clock=FakeClock([2.0, 4.0]))
    lg.start(total_steps=1000, start_step=500)
    lg.log(600, {"loss": 0.5})
    lg.log(700, {"loss": 0.4})
    assert out.getvalue().splitlines() == ["step 600/1000 | loss 0.5000",
                                           "step 700/1000 | loss 0.4000 | 50.0 steps/s | eta 0:00:06"]


def test_basic_without_progress_or_start(capsys):
    lg = Basic(progress=False)  # default stream: sys.stdout at write time (captured here)
    lg.log(1, {"loss": 2.5})
    lg.close()
    assert capsys.readouterr().out == "step 1 | loss 2.500\n"


def test_basic_every(capsys):
    with Basic(every=2, progress=False) as lg:
        for s in range(1, 6):
            lg.log(s, {"loss": float(s)})
    assert [l.split(" |")[0] for l in capsys.readouterr().out.splitlines()] == ["step 2", "step 4"]


def test_basic_progress_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    lg = Basic(stream=out, clock=FakeClock(itertools.count(0.0, 0.5)))
    lg.start(total_steps=4)
    for s in range(1, 5):
        lg.log(s, {"loss": 1.0 / s})
    lg.close()
    lg.close()  # idempotent
    text = out.getvalue()
    assert lg._bar is None
    assert "step 2/4 | loss 0.5000 | 2.00 steps/s | eta 0:00:01" in text  # the line, above the bar
    assert "100%" in text and "eta 0:00:00" in text  # the bar at the end


def test_basic_rejects_non_stream():
    with pytest.raises(TitanaxError) as e:
        Basic(stream="out.txt")  # type: ignore[arg-type]
    assert e.value.suggestion


# -- CSV --------------------------------------------------------------------------------------------

def test_csv_writes_and_flushes_each_row(tmp_path):
    path = tmp_path / "runs" / "x" / "metrics.csv"  # parents do not exist yet
    lg = CSV(path)
    lg.start(total_steps=3)
    lg.log(1, {"loss": 0.1, "acc": 0.5})
    assert read_csv(path) == [{"step": "1", "loss": "0.1", "acc": "0.5"}]  # readable before close
    lg.log(2, {"loss": 1 / 3, "acc": 1e-20})
    lg.close()
    rows = read_csv(path)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert float(rows[1]["loss"]) == 1 / 3 and float(rows[1]["acc"]) == 1e-20  # exact round trip


def test_csv_appends_across_restarts(tmp_path):
    path = tmp_path / "metrics.csv"
    with CSV(path) as lg:
        lg.start(total_steps=4)
        lg.log(1, {"loss": 1.0})
        lg.log(2, {"loss": 0.5})
    # "restart": a new process resumes from step 2 with a second logger on the same file
    with CSV(str(path)) as lg:
        lg.start(total_steps=4, start_step=2)
        lg.log(3, {"loss": 0.25})
        lg.log(4, {"loss": 0.125})
    assert path.read_text().count("step") == 1  # one header
    assert [(r["step"], r["loss"]) for r in read_csv(path)] == [
        ("1", "1.0"), ("2", "0.5"), ("3", "0.25"), ("4", "0.125")]


def test_csv_new_metrics_widen_the_header(tmp_path):
    path = tmp_path / "metrics.csv"
    with CSV(path) as lg:
        lg.log(1, {"loss": 1.0})
        lg.log(2, {"loss": 0.5, "grad_norm": 3.0})
        lg.log(3, {"grad_norm": 2.0})  # a missing metric leaves its cell empty
    with CSV(path) as lg:  # and after a restart, another new one
        lg.log(4, {"loss": 0.1, "lr": 1e-3})
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["step", "loss", "grad_norm", "lr"]
    assert read_csv(path) == [
        {"step": "1", "loss": "1.0", "grad_norm": "", "lr": ""},
        {"step": "2", "loss": "0.5", "grad_norm": "3.0", "lr": ""},
        {"step": "3", "loss": "", "grad_norm": "2.0", "lr": ""},
        {"step": "4", "loss": "0.1", "grad_norm": "", "lr": "0.001"},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


def test_csv_after_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\r\n1,1.0\r\n2,0.")  # killed mid-row
    with CSV(path) as lg:
        lg.log(2, {"loss": 0.5})
    assert read_csv(path)[-1] == {"step": "2", "loss": "0.5"}


def test_csv_refuses_foreign_file_and_step_metric(tmp_path):
    foreign = tmp_path / "data.csv"
    foreign.write_text("name,value\na,1\n")
    with pytest.raises(TitanaxError, match="not a Titanax metrics CSV") as e:
        CSV(foreign).log(1, {"loss": 1.0})
    assert e.value.suggestion
    assert foreign.read_text() == "name,value\na,1\n"
    with pytest.raises(TitanaxError, match="clashes"):
        CSV(tmp_path / "m.csv").log(1, {"step": 1})


# -- TensorBoard ------------------------------------------------------------------------------------

def read_scalars(logdir):
    """Parses every event file in logdir (TFRecord framing, CRCs checked) into
    ({tag: [(step, value), ...]}, [purge steps])."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, list[tuple[int, float]]] = {}
    purges: list[int] = []
    files = sorted(glob.glob(os.path.join(logdir, "*tfevents*")), key=os.path.getmtime)
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
            pos += 16 + length
            event = event_pb2.Event.FromString(body)
            if event.HasField("session_log"):
                purges.append(event.step)
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars, purges, files


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboardX")
    logdir = tmp_path / "tb"
    with TensorBoard(logdir, every=2) as tb:
        tb.start(total_steps=5)
        for s in range(1, 6):
            tb.log(s, {"loss": 1.0 / s, "lr": 0.5})
    scalars, purges, files = read_scalars(logdir)
    assert len(files) == 1 and purges == []
    assert [s for s, _ in scalars["loss"]] == [2, 4, 5]
    assert [v for _, v in scalars["loss"]] == pytest.approx([0.5, 0.25, 0.2])  # float32 on disk
    assert scalars["lr"] == [(2, 0.5), (4, 0.5), (5, 0.5)]


def test_tensorboard_restart_writes_a_second_file_and_purge_marker(tmp_path):
    pytest.importorskip("tensorboardX")
    with TensorBoard(tmp_path) as tb:
        tb.log(1, {"loss": 1.0})
        tb.log(2, {"loss": 0.5})
    tb = TensorBoard(tmp_path, flush_secs=0)
    tb.start(total_steps=3, start_step=1)  # resumed from the step-1 checkpoint
    tb.log(2, {"loss": 0.4})
    scalars, purges, files = read_scalars(tmp_path)  # flush_secs=0: on disk before close
    tb.close()
    assert len(files) == 2
    assert purges == [1]  # TensorBoard hides the first run's points from step 1 on
    assert scalars["loss"] == [(1, 1.0), (2, 0.5), (2, pytest.approx(0.4))]


def test_tensorboard_without_the_extra_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes `import tensorboardX` fail
    with pytest.raises(TitanaxError, match="tensorboardX") as e:
        TensorBoard(tmp_path)
    assert 'pip install "titanax[tensorboard]"' in e.value.suggestion


# -- process 0 only ---------------------------------------------------------------------------------

def test_nothing_is_written_off_process_zero(tmp_path, capsys, other_process):
    assert jax.process_index() == 1
    out = io.StringIO()
    loggers = [Basic(stream=out), Basic(), CSV(tmp_path / "csv" / "m.csv"), Recorder()]
    if "tensorboardX" in sys.modules or _has_tensorboardx():
        loggers.append(TensorBoard(tmp_path / "tb"))
    with MultiLogger(loggers) as m:
        m.start(total_steps=2)
        m.log(1, {"loss": 1.0})
        m.log(2, {"loss": 0.5})
    assert out.getvalue() == "" and capsys.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []  # not even the directories
    assert loggers[3].rows == [] and loggers[3].started == [] and loggers[3].closed == 0
    with pytest.raises(TitanaxError):  # bad input still fails on every process
        m.log(1.5, {"loss": 1.0})


def _has_tensorboardx() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


# -- throughput -------------------------------------------------------------------------------------

def test_throughput_meter_rates():
    m = ThroughputMeter(examples_per_step=32, tokens_per_step=32 * 512, flops_per_step=2e15,
                        num_devices=8, peak_flops_per_device=1e15)
    assert m.update(100, now=10.0) == {}  # first call starts the clock
    r = m.update(110, now=15.0)  # 10 steps in 5 s
    assert r == {"steps_per_s": 2.0, "examples_per_s": 64.0, "tokens_per_s": 32768.0, "mfu": pytest.approx(0.5)}
    r = m.update(111, now=17.0)  # only the last interval counts
    assert r["examples_per_s"] == 16.0 and r["mfu"] == pytest.approx(0.125)
    assert m.update(50, now=20.0) == {}  # a restart at an earlier step restarts the clock
    assert m.update(52, now=21.0)["examples_per_s"] == 64.0
    m.reset()
    assert m.update(60, now=30.0) == {}


def test_throughput_meter_without_flops_or_tokens():
    m = ThroughputMeter(examples_per_step=8, num_devices=1, flops_per_step=1e9)  # no peak: no mfu
    m.update(0, now=0.0)
    assert m.update(4, now=2.0) == {"steps_per_s": 2.0, "examples_per_s": 16.0}
    assert m.update(4, now=3.0) == {}  # step did not advance
    assert m.update(5, now=3.0) == {}  # clock did not move
    m.update(1, now=None)  # the default clock
    assert set(m.update(2)) == {"steps_per_s", "examples_per_s"}


@pytest.mark.parametrize("kwargs", [
    dict(examples_per_step=0, num_devices=1),
    dict(examples_per_step=8, num_devices=0),
    dict(examples_per_step=8.5, num_devices=1),
    dict(examples_per_step=8, num_devices=1, tokens_per_step=-1),
    dict(examples_per_step=8, num_devices=1, flops_per_step=math.inf),
    dict(examples_per_step=8, num_devices=1, peak_flops_per_device=0.0),
])
def test_throughput_meter_rejects_bad_counts(kwargs):
    with pytest.raises(TitanaxError) as e:
        ThroughputMeter(**kwargs)
    assert e.value.suggestion


def test_mfu_helper():
    assert mfu(400e12, 2, 1000e12) == pytest.approx(0.2)
    assert mfu(0.0, 1, 1.0) == 0.0
    for bad in [(-1.0, 1, 1.0), (1.0, 0, 1.0), (1.0, 1, 0.0), (1.0, 1.5, 1.0)]:
        with pytest.raises(TitanaxError):
            mfu(*bad)


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5e12),
    ("NVIDIA H100 NVL", "bf16", 835.5e12),
    ("NVIDIA H200", "bfloat16", 989.5e12),
    ("NVIDIA H200 NVL", "bfloat16", 835.5e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", "float16", 312e12),
    ("Tesla V100-SXM2-16GB", "float16", 125e12),
    ("Tesla V100-PCIE-32GB", "fp16", 112e12),
    ("Tesla V100-SXM2-16GB", "bfloat16", None),  # no bf16 tensor cores
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L40S", "bfloat16", None),  # not mistaken for an L4
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v4 lite", "bfloat16", None),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5e", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", jnp.bfloat16, 918e12),
    ("NVIDIA H100 80GB HBM3", "float32", None),
    ("cpu", "bfloat16", None),
    ("Some Future Chip", "bfloat16", None),
])
def test_peak_flops_table(kind, dtype, expected):
    assert peak_flops_per_device(kind, dtype) == expected


def test_peak_flops_of_a_cpu_device_and_bad_inputs():
    assert peak_flops_per_device(jax.devices()[0]) is None
    with pytest.raises(TitanaxError):
        peak_flops_per_device(3)  # type: ignore[arg-type]
    with pytest.raises(TitanaxError) as e:
        peak_flops_per_device("NVIDIA H100", dtype="bfloat17")
    assert e.value.suggestion


def test_unusable_destinations_are_refused_when_the_logger_is_made(tmp_path):
    # Found at construction, not at the first logged step after compiling.
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(TitanaxError, match=r"CSV\(path=...\): .* exists and is not a file"):
        CSV(tmp_path)
    with pytest.raises(TitanaxError, match=r"CSV\(path=...\): .*metrics.csv cannot be created: .*notes.txt is a file"):
        CSV(afile / "metrics.csv")
    with pytest.raises(TitanaxError, match=r"TensorBoard\(logdir=...\): .*notes.txt exists and is not a directory"):
        TensorBoard(afile)
    with pytest.raises(TitanaxError, match=r"TensorBoard\(logdir=...\): .* cannot be created"):
        TensorBoard(afile / "tb")
    CSV(tmp_path / "new" / "metrics.csv")  # a path to create is fine
