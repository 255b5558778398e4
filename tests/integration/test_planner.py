"""``tx.autoplan`` on GPT tiny over 8 simulated devices: candidates, pruning reasons, the
loop-aware figures its estimate reads, and the configuration it writes."""

from __future__ import annotations

import pathlib
import sys

import pytest

import titanax as tx
from titanax.planner import Candidate, DeviceSpec
from titanax.planner.search import _evaluate, model_facts

ROOT = pathlib.Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))

BASE = {
    "model": {"factory": "examples.gpt_small_tp.model:gpt", "args": {"preset": "tiny"}},
    "data": {"factory": "examples.gpt_small_tp.data:text_source",
             "args": {"seq_len": 32, "max_bytes": 200_000, "eval_batches": 1}, "batch_size": 16},
    "mesh": {"axes": ["data"], "shape": [8]},
    "plan": {"data_parallel": {"axis": "data"}},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "train": {"step": "examples.gpt_small_tp.steps:train_step", "steps": 10},
}

# Made-up constants: the figures below do not depend on them.
SPEC = DeviceSpec(name="test", peak_flops_bf16=1e12, peak_flops_fp32=5e11, memory_bytes=2**30,
                  hbm_bandwidth=1e11, intra_node_bandwidth=1e10, inter_node_bandwidth=1e9,
                  devices_per_node=4, collective_latency=1e-5)


@pytest.fixture(scope="module")
def facts():
    return model_facts(BASE)


def test_facts_read_the_model(facts):
    assert facts.dims["heads"] == frozenset({8}) and 256 in facts.dims["mlp"]
    assert facts.dims["layers"] == frozenset({2})
    assert facts.batch_size == 16 and facts.parameter_count > 0
    assert facts.optimizer_bytes == pytest.approx(2 * facts.param_bytes, rel=0.01)  # AdamW: two moments


def test_every_pruned_candidate_says_why(facts):
    kept, rejected = tx.planner.enumerate_candidates(8, facts, memory_bytes=2**30, devices_per_node=4)
    reasons = {r.candidate.label: r.reason for r in rejected}
    assert "tensor parallelism over 8 devices crosses nodes of 4" in reasons["tp8"]
    assert "stages do not divide [2] layers" in reasons["pp4(gpipe,m4) dp2"]
    assert "does not divide into" in reasons["pp2(gpipe,m8) dp4"]  # batch 16 / (4 x 8) microbatches
    assert all(r.reason for r in rejected)
    labels = {c.label for c in kept}
    assert {"dp8", "fsdp8", "dp2 fsdp2 tp2", "dp4 tp2+sp", "pp2(1f1b,m2) dp4"} <= labels
    assert len(kept) >= 10
    tight = tx.planner.enumerate_candidates(8, facts, memory_bytes=facts.state_bytes // 3)[1]
    assert any("parameters and optimizer state alone need" in r.reason for r in tight)


# Under sequence parallelism XLA compiles the unrolled layers differently (it reuses 4 of the 19
# all-gathers the rolled program executes), so the two programs differ there, not the counting.
@pytest.mark.parametrize("candidate", [Candidate(pipe=2, data=2, tensor=2, schedule="1f1b", microbatches=4)],
                         ids=lambda c: c.label)
def test_estimate_reads_loop_aware_figures_equal_to_the_unrolled_program(candidate):
    # The estimate's FLOPs and collective bytes come from the rolled program (layers in a scan,
    # inside the pipeline's tick loop, counted per trip); with the layers unrolled XLA's own count
    # has fewer loops to miss.
    rolled = _evaluate(BASE, candidate, SPEC)
    unrolled_values = {**BASE, "model": {**BASE["model"], "args": {"preset": "tiny", "unroll_layers": True}}}
    unrolled = _evaluate(unrolled_values, candidate, SPEC)
    assert rolled["flops"] == pytest.approx(unrolled["flops"], rel=0.02)
    assert rolled["collective_bytes"] == pytest.approx(unrolled["collective_bytes"], rel=0.02)
    assert rolled["estimate"].total_s > 0 and rolled["peak_bytes"] >= rolled["state_bytes"] > 0
