"""examples/mixed_precision/: the README's three ``titanax run`` commands (float32, bfloat16, and
float16 with dynamic loss scaling) run in this process (typer's ``CliRunner``; this process already
has the 8 CPU devices ``--cpu-devices 8`` asks for), each writing its metrics CSV to a temporary
folder; the loss-scale trajectory, the skipped steps and the losses are read back from the CSVs and
checked as ``examples/mixed_precision/compare.py`` checks them."""

from __future__ import annotations

import pathlib

import pytest
from typer.testing import CliRunner

import titanax as tx
from examples.mixed_precision import compare
from titanax import config as txconfig
from titanax.cli import app
from titanax.config.loader import load_values

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mixed_precision"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed_precision")
    runner = CliRunner()
    logs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.delenv("TITANAX_CPU_DEVICES", raising=False)  # --cpu-devices sets it; restored after
        for name in compare.RUNS:
            # The README's command, with the CSV written under `out` instead of runs/.
            result = runner.invoke(app, ["run", f"examples/mixed_precision/{name}.yaml", "--cpu-devices", "8",
                                         "--set", f"logging.csv={out / name / 'metrics.csv'}"],
                                   catch_exceptions=False)
            assert result.exit_code == 0, result.output[-3000:]
            # The CLI prints a TitanaxWarning as "titanax: warning: ..." (pytest cannot turn it into an error).
            assert "titanax: warning:" not in result.stderr, result.stderr[-3000:]
            logs[name] = result.stdout
    return out, logs


def test_configs_differ_only_in_precision():
    values = {name: load_values(EXAMPLE / f"{name}.yaml") for name in compare.RUNS}
    for name in compare.RUNS:
        assert values[name]["logging"]["csv"] == f"runs/mixed_precision/{name}/metrics.csv"
        del values[name]["logging"]["csv"], values[name]["precision"]
    assert values["fp32"] == values["bf16"] == values["fp16"]
    built = {name: txconfig.load(EXAMPLE / f"{name}.yaml").precision.build() for name in compare.RUNS}
    assert built["fp32"] == tx.Precision()
    assert built["bf16"] == tx.Precision(compute="bfloat16")
    assert built["fp16"] == tx.Precision(compute="float16", loss_scale="dynamic", initial_scale=2.0**20,
                                      growth_interval=5)


def test_mixed_precision_runs_match_fp32_and_fp16_skips_overflowing_steps(runs):
    out, logs = runs
    metrics = {name: compare.read_metrics(str(out / name / "metrics.csv")) for name in compare.RUNS}
    steps = txconfig.load(EXAMPLE / "fp16.yaml").train.steps
    for name, rows in metrics.items():
        assert sorted(rows) == list(range(1, steps + 1)), name
        assert f"step {steps}/{steps} | loss " in logs[name] and "held-out after step" in logs[name]

    fp16 = metrics["fp16"]
    # Shown every step in the log and the CSV: the scale and the steps skipped so far.
    assert "| loss_scale " in logs["fp16"] and "| skipped_steps " in logs["fp16"]
    assert "loss_scale" not in metrics["fp32"][steps] and "loss_scale" not in metrics["bf16"][steps]
    skips = compare.skipped(fp16)
    assert skips and skips[0] == 1  # 2**20 overflows float16 at once
    assert fp16[steps]["skipped_steps"] == len(skips)
    # The scale halves at each overflow, and doubles after growth_interval finite steps.
    for step in skips[1:]:
        assert fp16[step]["loss_scale"] == fp16[step - 1]["loss_scale"] / 2
    grew = [s for s in range(2, steps + 1) if fp16[s]["loss_scale"] == 2 * fp16[s - 1]["loss_scale"]]
    assert grew and grew[0] > skips[0] and any(s > grew[0] for s in skips), (skips, grew)
    # A skipped step left the parameters as they were: the held-out loss after it is unchanged.
    for step in skips[1:]:
        assert fp16[step]["eval/loss"] == fp16[step - 1]["eval/loss"], step
    # Training went on: most steps updated, and the loss fell.
    assert len(skips) <= steps // 3 and fp16[steps]["eval/loss"] < 0.7 * fp16[1]["eval/loss"]

    assert compare.check(metrics, compare.TOLERANCE) == [], compare.check(metrics, compare.TOLERANCE)
    for name in ("bf16", "fp16"):
        final, reference = metrics[name][steps]["eval/loss"], metrics["fp32"][steps]["eval/loss"]
        assert abs(final - reference) <= compare.TOLERANCE * reference, (name, final, reference)


def test_compare_script_reports_the_runs(runs, capsys):
    out, _ = runs
    assert compare.main(["--dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fp16 loss scale: step 1 524288 (skipped), step 2 262144 (skipped)" in printed, printed
    assert "OK: bf16 and fp16 within 1% of fp32" in printed
    assert compare.main(["--dir", str(out), "--tolerance", "0"]) == 1
