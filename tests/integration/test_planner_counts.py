"""The planner's estimate reads FLOPs and collective bytes from each candidate's compiled program
(loops per trip, a pipeline's slots by their busy share). Here every candidate of a small search
runs that same program under the profiler, whose trace lists each instruction every device
executed: the estimate's figures must equal what ran."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

# GPT tiny (2 layers) with SGD, batch 16 of 32 tokens, on 2 devices: autoplan's search with as many
# microbatches as stages is one plan of each kind — DP, FSDP, TP with and without sequence
# parallelism, and both pipeline code paths (GPipe's autodiff of the forward loop, 1F1B's explicit
# table). The same check passes for the 17 plans on 4 devices and the 32 on 8 (`python
# tests/executed.py 8 '<these values as JSON>'` prints them); each plan costs a compile, so the
# suite runs the smallest search that holds every kind.
VALUES = {
    "model": {"factory": "examples.gpt_small_tp.model:gpt", "args": {"preset": "tiny"}},
    "data": {"factory": "examples.gpt_small_tp.data:text_source",
             "args": {"seq_len": 32, "max_bytes": 600_000, "eval_batches": 1}, "batch_size": 16},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "train": {"step": "examples.gpt_small_tp.steps:train_step", "steps": 10},
}
CANDIDATES = {"dp2", "fsdp2", "tp2", "tp2+sp", "pp2(gpipe,m2)", "pp2(1f1b,m2)"}


def test_every_candidate_of_a_small_search_is_estimated_from_what_its_program_executes():
    # A process of its own for 2 devices; LLVM's optimizations off to compile quicker: the HLO,
    # which is what is counted, and the thunks that run are XLA's either way.
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    run = subprocess.run([sys.executable, str(REPO / "tests" / "executed.py"), "2", json.dumps(VALUES)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {row["label"] for row in rows} == CANDIDATES
    table = "\n".join(f"{r['label']:<24} FLOPs {r['estimate_flops']:.4e} / {r['executed_flops']:.4e}   collective "
                      f"bytes {r['estimate_collective_bytes']} / {r['executed_collective_bytes']:.0f}" for r in rows)
    for row in rows:
        assert row["matched"] > 100, table  # the trace named the program's instructions
        assert abs(row["estimate_flops"] / row["executed_flops"] - 1) < 0.02, table
        assert abs(row["estimate_collective_bytes"] / row["executed_collective_bytes"] - 1) < 0.02, table
        assert row["estimate_s"] > 0
