"""``tx.autoplan`` on GPT tiny over 8 simulated devices: candidates, pruning reasons, the
loop-aware figures its estimate reads, and the configuration it writes."""

from __future__ import annotations

import pathlib
import sys

import pytest

import titanax as tx
from titanax.planner import DeviceSpec
from titanax.planner.search import model_facts

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
