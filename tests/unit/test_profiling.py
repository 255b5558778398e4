"""Tests for titanax.profiling: HLO collective parsing, memory/cost introspection, units."""
# ruff: noqa: E501  (HLO lines below are kept verbatim, as XLA prints them)

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import titanax as tx
from titanax.exceptions import TitanaxError
from titanax.profiling import (
    COLLECTIVE_KINDS,
    CollectiveStats,
    CompiledStats,
    collectives_by_axis,
    count_collectives,
    human_bytes,
    human_count,
    inspect,
    shape_bytes,
)
from titanax.profiling.collectives import _count
from titanax.profiling.compiled import _stats_from

F32 = 4


# --------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (1024**2 - 1, "1.00 MiB"),  # rounds up into the next unit, never "1024.00 KiB"
        (256 * 1024**2, "256.00 MiB"),
        (3 * 1024**3, "3.00 GiB"),
        (5 * 1024**4, "5.00 TiB"),
        (-2048, "-2.00 KiB"),
        (1024**7, "1024.00 EiB"),
        (1536.0, "1.50 KiB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("bad", ["12", None, True, float("nan")])
def test_human_bytes_rejects_non_numbers(bad):
    with pytest.raises(TitanaxError) as info:
        human_bytes(bad)
    assert info.value.suggestion


def test_human_count():
    assert human_count(950, "FLOP") == "950 FLOP"
    assert human_count(4_194_304, "FLOP") == "4.19 MFLOP"
    assert human_count(999_999) == "1.00 M"
    assert human_count(2.5e12, "FLOP") == "2.50 TFLOP"


# ------------------------------------------------------------------------------ HLO shape sizes


@pytest.mark.parametrize(
    "shape, nbytes",
    [
        ("f32[8,16]{1,0}", 8 * 16 * 4),
        ("f32[]", 4),
        ("bf16[4,4]{1,0}", 32),
        ("f16[3]{0}", 6),
        ("f8e4m3fn[10]{0}", 10),
        ("f8e5m2[3,3]{1,0}", 9),
        ("s4[3]{0}", 2),  # packed sub-byte type, rounded up to whole bytes
        ("pred[7]{0}", 7),
        ("c64[2]{0}", 16),
        ("f64[2,2]", 32),
        ("(f32[2]{0}, (s32[3]{0}, pred[]))", 8 + 12 + 1),
        ("(f32[8]{0}, /*index=1*/bf16[8]{0})", 32 + 16),
        ("f32[<=8,16]{1,0}", 512),  # dynamic dimension counts at its bound
        ("f32[8,128]{1,0:T(8,128)}", 8 * 128 * 4),  # TPU tiled layout
        ("f32[8]{0:S(1)}", 32),  # memory-space annotation
        ("token[]", 0),
    ],
)
def test_shape_bytes(shape, nbytes):
    assert shape_bytes(shape) == nbytes


# ------------------------------------------------------------------- parser on literal HLO lines

KIND_LINES = {
    "all-reduce": "  %all-reduce = f32[32,64]{1,0} all-reduce(%fusion.1), channel_id=3, "
    "replica_groups=[4,2]<=[8], use_global_device_ids=true, to_apply=%add.clone",
    "all-gather": "  %all-gather.2 = f32[32,512]{1,0} all-gather(%p), channel_id=6, "
    "replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, use_global_device_ids=true",
    "reduce-scatter": "  %reduce-scatter = bf16[4,64]{1,0} reduce-scatter(%x), channel_id=2, "
    "replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add",
    "collective-permute": "  %collective-permute = f32[8,64]{1,0} collective-permute(%x), "
    "channel_id=4, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}",
    "all-to-all": "  %all-to-all = f32[1,512]{1,0} all-to-all(%x), channel_id=5, "
    "replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}",
    "collective-broadcast": "  %collective-broadcast = f8e4m3fn[128]{0} collective-broadcast(%x), "
    "replica_groups={{0,1}}",
    "ragged-all-to-all": "  ragged_all_to_all.1 = f32[16]{0} ragged-all-to-all(reshape.2, "
    "broadcast.7, mul.4, broadcast.6, broadcast_in_dim.1, broadcast.6), channel_id=1, "
    "replica_groups={{0,1,2,3,4,5,6,7}}",
}
KIND_BYTES = {
    "all-reduce": 32 * 64 * 4,
    "all-gather": 32 * 512 * 4,
    "reduce-scatter": 4 * 64 * 2,
    "collective-permute": 8 * 64 * 4,
    "all-to-all": 512 * 4,
    "collective-broadcast": 128,
    "ragged-all-to-all": 16 * 4,
}


def test_kind_tables_cover_every_kind():
    assert set(KIND_LINES) == set(COLLECTIVE_KINDS) == set(KIND_BYTES)


@pytest.mark.parametrize("kind", COLLECTIVE_KINDS)
def test_parser_counts_each_kind(kind):
    stats = count_collectives(KIND_LINES[kind])
    assert list(stats) == list(COLLECTIVE_KINDS)  # every kind present, fixed order
    assert stats[kind] == CollectiveStats(count=1, bytes=KIND_BYTES[kind])
    assert all(s == CollectiveStats(0, 0) for k, s in stats.items() if k != kind)


def test_parser_all_kinds_together_and_root():
    text = "\n".join(KIND_LINES.values()) + "\n  ROOT %all-reduce.9 = f32[] all-reduce(%s), to_apply=%add"
    stats = count_collectives(text)
    assert stats["all-reduce"] == CollectiveStats(2, KIND_BYTES["all-reduce"] + 4)
    for kind in COLLECTIVE_KINDS[1:]:
        assert stats[kind] == CollectiveStats(1, KIND_BYTES[kind])


def test_parser_async_pairs_counted_once_with_result_bytes():
    text = """
  %all-gather-start = (f32[4,64]{1,0}, f32[16,64]{1,0}) all-gather-start(f32[4,64]{1,0} %p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %all-gather-done = f32[16,64]{1,0} all-gather-done((f32[4,64]{1,0}, f32[16,64]{1,0}) %all-gather-start)
  %all-reduce-start = bf16[1024]{0} all-reduce-start(bf16[1024]{0} %g), replica_groups={}, to_apply=%add
  %all-reduce-done = bf16[1024]{0} all-reduce-done(bf16[1024]{0} %all-reduce-start)
  %collective-permute-start = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(f32[8]{0} %a), source_target_pairs={{0,1},{1,0}}
  ROOT %collective-permute-done = f32[8]{0} collective-permute-done((f32[8]{0}, f32[8]{0}, u32[], u32[]) %collective-permute-start)
"""
    stats = count_collectives(text)
    assert stats["all-gather"] == CollectiveStats(1, 16 * 64 * 4)
    assert stats["all-reduce"] == CollectiveStats(1, 1024 * 2)
    assert stats["collective-permute"] == CollectiveStats(1, 8 * 4)


def test_parser_generic_async_wrapper_counts_the_wrapped_op_once():
    text = """
%async_computation (param_0: f32[64]) -> f32[8] {
  %param_0 = f32[64]{0} parameter(0)
  ROOT %reduce-scatter.1 = f32[8]{0} reduce-scatter(f32[64]{0} %param_0), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main (p: f32[64]) -> f32[8] {
  %p = f32[64]{0} parameter(0)
  %reduce-scatter-start = ((f32[64]{0}), f32[8]{0}, s32[]) async-start(f32[64]{0} %p), calls=%async_computation
  ROOT %reduce-scatter-done = f32[8]{0} async-done(((f32[64]{0}), f32[8]{0}, s32[]) %reduce-scatter-start)
}
"""
    assert count_collectives(text)["reduce-scatter"] == CollectiveStats(1, 32)


def test_parser_tuple_results_are_summed():
    line = ("  %all-reduce.4 = (f32[512,256]{1,0}, f32[], /*index=2*/bf16[10]{0}) "
            "all-reduce(%dot.3, %r, %b), channel_id=5, replica_groups=[2,4]<=[4,2]T(1,0), to_apply=%add")
    assert count_collectives(line)["all-reduce"] == CollectiveStats(1, 512 * 256 * 4 + 4 + 20)
    a2a = "  %all-to-all.1 = (f32[2,4]{1,0}, f32[2,4]{1,0}) all-to-all(%a, %b), replica_groups={{0,1}}"
    assert count_collectives(a2a)["all-to-all"] == CollectiveStats(1, 64)


def test_parser_counts_fusion_once_and_a_while_of_unknown_trip_count_once_as_a_lower_bound():
    text = """HloModule jit_step, is_scheduled=true, num_partitions=8

%fused_computation (param_0.1: f32[8,16]) -> f32[8,16] {
  %param_0.1 = f32[8,16]{1,0} parameter(0)
  ROOT %all-reduce.7 = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %param_0.1), replica_groups={}, to_apply=%add
}

%body (carry: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %carry = (s32[], f32[8,16]{1,0}) parameter(0)
  %x = f32[8,16]{1,0} get-tuple-element((s32[], f32[8,16]{1,0}) %carry), index=1
  %all-gather.3 = f32[64,16]{1,0} all-gather(f32[8,16]{1,0} %x), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %collective-permute.1 = f32[8,16]{1,0} collective-permute(f32[8,16]{1,0} %x), source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %collective-permute.1)
}

ENTRY %main (p: f32[8,16]) -> f32[8,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %fusion = f32[8,16]{1,0} fusion(f32[8,16]{1,0} %p), kind=kLoop, calls=%fused_computation
  %while = (s32[], f32[8,16]{1,0}) while((s32[], f32[8,16]{1,0}) %init), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%while), index=1
}
"""
    stats, unknown_trip_loops = _count(text)
    assert stats == count_collectives(text)
    # No known_trip_count on the while: its body counts once, and the loop is reported.
    assert stats["all-reduce"] == CollectiveStats(1, 512)
    assert stats["all-gather"] == CollectiveStats(1, 64 * 16 * 4)
    assert stats["collective-permute"] == CollectiveStats(1, 512)
    assert unknown_trip_loops == 1
    compiled = _stats_from(None, None, text)
    assert compiled.unknown_trip_loops == 1
    assert "at least: 1 loop of unknown trip count" in compiled.describe()


# A scanned stack: ENTRY runs a while of 5 trips; its body holds one all-reduce (async pair) and a
# nested while of 3 trips whose body all-gathers inside a fusion-like async wrapper; the outer
# condition holds a (scalar) all-reduce, run trips + 1 = 6 times. Written as XLA:CPU prints it.
NESTED_LOOPS = """HloModule jit_stack, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%gather_wrapper (p0: f32[2,16]) -> f32[16,16] {
  %p0 = f32[2,16]{1,0} parameter(0)
  ROOT %all-gather.1 = f32[16,16]{1,0} all-gather(f32[2,16]{1,0} %p0), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

%inner_body (q: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %q = (s32[], f32[2,16]{1,0}) parameter(0)
  %h = f32[2,16]{1,0} get-tuple-element(%q), index=1
  %ag-start = ((f32[2,16]{1,0}), f32[16,16]{1,0}, s32[]) async-start(f32[2,16]{1,0} %h), calls=%gather_wrapper
  %ag-done = f32[16,16]{1,0} async-done(((f32[2,16]{1,0}), f32[16,16]{1,0}, s32[]) %ag-start), calls=%gather_wrapper
  ROOT %t = (s32[], f32[2,16]{1,0}) tuple(%i, %h)
}

%inner_cond (q.1: (s32[], f32[2,16])) -> pred[] {
  %q.1 = (s32[], f32[2,16]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%outer_body (c: (s32[], f32[2,16])) -> (s32[], f32[2,16]) {
  %c = (s32[], f32[2,16]{1,0}) parameter(0)
  %v = f32[2,16]{1,0} get-tuple-element(%c), index=1
  %all-reduce-start = f32[2,16]{1,0} all-reduce-start(f32[2,16]{1,0} %v), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %all-reduce-done = f32[2,16]{1,0} all-reduce-done(f32[2,16]{1,0} %all-reduce-start)
  %inner = (s32[], f32[2,16]{1,0}) while((s32[], f32[2,16]{1,0}) %init.1), condition=%inner_cond, body=%inner_body, metadata={op_name="jit(stack)/while/body/while"}, backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0","step":"1"}}
  ROOT %t.1 = (s32[], f32[2,16]{1,0}) tuple(%i.1, %all-reduce-done)
}

%outer_cond (c.1: (s32[], f32[2,16])) -> pred[] {
  %c.1 = (s32[], f32[2,16]{1,0}) parameter(0)
  %flag = f32[] all-reduce(f32[] %z), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %lt.1 = pred[] compare(%a.1, %b.1), direction=LT
}

ENTRY %main (p: f32[2,16]) -> f32[2,16] {
  %p = f32[2,16]{1,0} parameter(0)
  %outer = (s32[], f32[2,16]{1,0}) while((s32[], f32[2,16]{1,0}) %init), condition=%outer_cond, body=%outer_body, metadata={op_name="jit(stack)/while"}, backend_config={"dynamic_variables":[],"known_induction_variable":{"tuple_index":"0"},"known_init_step":{"init":"0","step":"1"},"known_trip_count":{"n":"5"}}
  ROOT %out = f32[2,16]{1,0} get-tuple-element(%outer), index=1
}
"""


def test_parser_counts_a_loop_body_once_per_trip_and_nested_loops_multiply():
    stats, unknown_trip_loops = _count(NESTED_LOOPS)
    assert unknown_trip_loops == 0
    # Per step: the body's all-reduce 5 times, the condition's scalar all-reduce 5 + 1 times.
    assert stats["all-reduce"] == CollectiveStats(count=5 + 6, bytes=5 * 2 * 16 * F32 + 6 * F32,
                                                  static_count=2, static_bytes=2 * 16 * F32 + F32)
    # The inner body runs 3 times per outer trip; its async-done repeating `calls=` is no call.
    assert stats["all-gather"] == CollectiveStats(count=15, bytes=15 * 16 * 16 * F32,
                                                  static_count=1, static_bytes=16 * 16 * F32)
    compiled = _stats_from(None, None, NESTED_LOOPS)
    assert compiled.total_collective_count == 11 + 15
    assert compiled.total_collective_bytes == stats["all-reduce"].bytes + stats["all-gather"].bytes
    assert (compiled.unknown_trip_loops, compiled.num_partitions) == (0, 8)
    text = compiled.describe()
    assert "once per trip" in text and "at least" not in text
    assert "all-gather" in text and "15.00 KiB" in text  # 15 trips x 1 KiB, not 1 KiB


def test_parser_loop_with_zero_trips_counts_nothing_but_stays_in_the_text():
    text = NESTED_LOOPS.replace('"known_trip_count":{"n":"5"}', '"known_trip_count":{"n":"0"}')
    stats = count_collectives(text)
    assert stats["all-gather"] == CollectiveStats(0, 0, 1, 16 * 16 * F32)
    assert stats["all-reduce"] == CollectiveStats(1, F32, 2, 2 * 16 * F32 + F32)  # condition once
    assert "all-gather" in _stats_from(None, None, text).describe()


def test_parser_conditional_counts_its_heaviest_branch_once():
    text = """HloModule m, num_partitions=2

%small (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %a), replica_groups={{0,1}}, to_apply=%add
}

%large (b: f32[4]) -> f32[64] {
  %b = f32[4]{0} parameter(0)
  %all-gather.1 = f32[8]{0} all-gather(f32[4]{0} %b), replica_groups={{0,1}}, dimensions={0}
  ROOT %all-gather.2 = f32[64]{0} all-gather(f32[32]{0} %big), replica_groups={{0,1}}, dimensions={0}
}

%none (c: f32[4]) -> f32[4] {
  ROOT %c = f32[4]{0} parameter(0)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %case = f32[64]{0} conditional(s32[] %i, f32[4]{0} %x, f32[4]{0} %x, f32[4]{0} %x), branch_computations={%small, %large, %none}
  %if = f32[4]{0} conditional(pred[] %p, f32[4]{0} %x, f32[4]{0} %x), true_computation=%small, false_computation=%none
  ROOT %r = (s32[], f32[4]{0}) tuple(%i, %x)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %o = f32[4]{0} get-tuple-element(%w), index=1
}
"""
    stats = count_collectives(text)
    # 4 trips x (the `large` branch of the case + the `small` branch of the if).
    assert stats["all-gather"] == CollectiveStats(8, 4 * (32 + 256), 2, 32 + 256)
    assert stats["all-reduce"] == CollectiveStats(4, 4 * 16, 1, 16)
    assert _stats_from(None, None, text).conditionals == 2


# ------------------------------------------------------------------- cost of one run, loops too

# ENTRY: a dot (2 * 8 * 4 * 16 = 1024 FLOPs) and a while of 5 trips whose body runs a fusion holding
# a dot (2 * 8 * 16 * 16 = 4096) and a tanh (128 transcendentals), a conditional whose heavier
# branch negates 128 elements, and the counter's add; the condition compares once per trip plus once.
ONE_TRIP = 4096 + 128 + 1
COSTED_LOOP = """HloModule jit_costed, num_partitions=1

%fused_dot (a: f32[8,16], b: f32[16,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,16]{1,0} parameter(1)
  %d = f32[8,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = f32[8,16]{1,0} tanh(%d)
}

%light (x: f32[8,16]) -> f32[8,16] {
  ROOT %x = f32[8,16]{1,0} parameter(0)
}

%heavy (y: f32[8,16]) -> f32[8,16] {
  %y = f32[8,16]{1,0} parameter(0)
  ROOT %n = f32[8,16]{1,0} negate(%y)
}

%body (c: (s32[], f32[8,16], f32[16,16], pred[])) -> (s32[], f32[8,16], f32[16,16], pred[]) {
  %c = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}, pred[]) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %h = f32[8,16]{1,0} get-tuple-element(%c), index=1
  %w = f32[16,16]{1,0} get-tuple-element(%c), index=2
  %p = pred[] get-tuple-element(%c), index=3
  %f = f32[8,16]{1,0} fusion(%h, %w), kind=kOutput, calls=%fused_dot
  %k = f32[8,16]{1,0} conditional(%p, %f, %f), true_computation=%heavy, false_computation=%light
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %r = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}, pred[]) tuple(%next, %k, %w, %p)
}

%cond (c.1: (s32[], f32[8,16], f32[16,16], pred[])) -> pred[] {
  %c.1 = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}, pred[]) parameter(0)
  %i.1 = s32[] get-tuple-element(%c.1), index=0
  %n.1 = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.1, %n.1), direction=LT
}

ENTRY %main (x: f32[8,4], v: f32[4,16], w: f32[16,16], p: pred[]) -> f32[8,16] {
  %x = f32[8,4]{1,0} parameter(0)
  %v = f32[4,16]{1,0} parameter(1)
  %w = f32[16,16]{1,0} parameter(2)
  %p = pred[] parameter(3)
  %h0 = f32[8,16]{1,0} dot(%x, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %z = s32[] constant(0)
  %t0 = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}, pred[]) tuple(%z, %h0, %w, %p)
  %loop = (s32[], f32[8,16]{1,0}, f32[16,16]{1,0}, pred[]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_loop_bodies_are_costed_once_per_trip_on_top_of_xlas_figure():
    once_flops = 1024 + ONE_TRIP + 1  # XLA: the entry's dot, one body, one condition
    per_run = 1024 + 5 * ONE_TRIP + 6
    stats = _stats_from(None, {"flops": float(once_flops), "transcendentals": 128.0,
                               "bytes accessed": 1000.0}, COSTED_LOOP)
    assert (stats.xla_flops, stats.flops) == (once_flops, per_run)
    assert (stats.xla_transcendentals, stats.transcendentals) == (128, 5 * 128)
    # XLA's own byte count is kept; the walk adds the 4 trips XLA left out, as it costs them.
    assert stats.bytes_accessed > stats.xla_bytes_accessed == 1000.0
    assert (stats.unknown_trip_loops, stats.conditionals) == (0, 1)
    text = stats.describe()
    assert "XLA counts" in text and "at most: 1 conditional counted at its heaviest branch" in text
    # Without a cost analysis, the restatement of XLA's cost model stands alone.
    assert _stats_from(None, None, COSTED_LOOP).flops == per_run
    # A backend whose cost model already counted every trip is not corrected twice.
    assert _stats_from(None, {"flops": float(per_run)}, COSTED_LOOP).flops == per_run


def test_trip_count_is_read_off_a_counted_loop_without_xlas_annotation():
    unannotated = COSTED_LOOP.replace(', backend_config={"known_trip_count":{"n":"5"}}', "")
    stats = _stats_from(None, None, unannotated)
    assert stats.flops == 1024 + 5 * ONE_TRIP + 6 and stats.unknown_trip_loops == 0
    # A bound that is not a constant leaves the count unknown: the body counts once.
    unknown = unannotated.replace("%n.1 = s32[] constant(5)", "%n.1 = s32[] get-tuple-element(%c.1), index=0")
    stats = _stats_from(None, None, unknown)
    assert stats.flops == 1024 + ONE_TRIP + 1 and stats.unknown_trip_loops == 1
    assert "at least: 1 loop of unknown trip count" in stats.describe()


def test_parser_lowered_text_without_percent_signs_and_deep_nesting():
    # Lowered (not optimized) HLO: `name {` headers, no trip counts, names shared by an
    # instruction and a computation. 2000 nested calls must not hit Python's recursion limit.
    depth = 2000
    parts = ["HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[4]{0}}", ""]
    parts += ["leaf {", "  a = f32[4]{0} parameter(0)",
              "  ROOT all-reduce.1 = f32[4]{0} all-reduce(a), replica_groups={}, to_apply=add", "}", ""]
    prev = "leaf"
    for i in range(depth):
        parts += [f"call.{i} {{", "  x = f32[4]{0} parameter(0)",
                  f"  ROOT call.{i} = f32[4]{{0}} call(x), to_apply={prev}", "}", ""]
        prev = f"call.{i}"
    parts += ["region_0.2 {", "  t = (s32[], f32[4]{0}) parameter(0)",
              f"  c = f32[4]{{0}} call(t), to_apply={prev}", "}", "",
              "ENTRY main.4 {", "  x.1 = f32[4]{0} parameter(0)",
              "  while.5 = (s32[], f32[4]{0}) while(while.4), condition=region_1.3, body=region_0.2",
              "}"]
    stats, unknown_trip_loops = _count("\n".join(parts))
    assert stats["all-reduce"] == CollectiveStats(1, 16)
    assert unknown_trip_loops == 1


def test_parser_ignores_lookalikes():
    text = """
  %all-reduce-fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused, metadata={op_name="x all-reduce(y)"}
  %all-gather.3 = f32[8]{0} copy(%a)
  %reduce-scatter-start = ((f32[64]{0}), f32[8]{0}) async-start(%p), calls=%wrapped
  %reduce-scatter-done = f32[8]{0} async-done(%reduce-scatter-start)
  %add.1 = f32[] add(%x, %y), metadata={op_name="jit(f)/all-to-all"}
  // %all-reduce = f32[8]{0} all-reduce(%a) in a comment-like line without an instruction head
"""
    stats = count_collectives(text)
    assert all(s == CollectiveStats(0, 0) for s in stats.values()), stats


def test_parser_accepts_names_without_percent_sign():
    line = "  ROOT all-gather.1 = bf16[8,4]{1,0} all-gather(p.1), replica_groups={{0,1}}, dimensions={0}"
    assert count_collectives(line)["all-gather"] == CollectiveStats(1, 64)


def test_count_collectives_rejects_non_text():
    with pytest.raises(TitanaxError) as info:
        count_collectives(b"%all-reduce = f32[] all-reduce(%x)")
    assert "as_text" in info.value.suggestion


# --------------------------------------------------------------------- CompiledStats behaviour


def test_stats_methods_and_kind_validation():
    stats = CompiledStats(collectives={"all-reduce": CollectiveStats(2, 64),
                                       "all-gather": CollectiveStats(1, 1024)})
    assert stats.count("all-reduce") == stats.count("all_reduce") == 2
    assert stats.bytes("all-gather") == 1024
    assert stats.count("reduce-scatter") == 0  # known kind, absent from the mapping
    assert stats.total_collective_bytes == 1088
    assert stats.total_collective_count == 3
    with pytest.raises(TitanaxError) as info:
        stats.count("psum")
    assert "all-reduce" in info.value.suggestion
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.flops = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.collectives["all-to-all"] = CollectiveStats(1, 1)  # type: ignore[index]


def test_peak_bytes_prefers_reported_peak_and_falls_back_to_sum():
    base = dict(argument_bytes=100, output_bytes=50, alias_bytes=20, temp_bytes=10)
    summed = CompiledStats(**base)
    assert (summed.peak_bytes, summed.peak_source, summed.allocated_bytes) == (140, "sum", 140)
    reported = CompiledStats(**base, reported_peak_bytes=120)
    assert (reported.peak_bytes, reported.peak_source, reported.allocated_bytes) == (120, "reported", 140)
    empty = CompiledStats()
    assert (empty.peak_bytes, empty.peak_source) == (None, "unavailable")


def test_stats_from_handles_missing_and_list_shaped_backend_answers():
    # Older JAX returned cost_analysis() as a list of dicts (one per executable); newer a dict.
    stats = _stats_from(None, [{"flops": 10.0, "bytes accessed": 4.0}, {"flops": 5.0}], None)
    assert (stats.flops, stats.bytes_accessed) == (15.0, 4.0)
    assert stats.argument_bytes is None and stats.peak_bytes is None
    assert dict(stats.collectives) == {} and stats.count("all-reduce") == 0
    text = stats.describe()
    assert "n/a" in text and "unavailable" in text
    as_dict = _stats_from(None, {"flops": 7.0}, "")
    assert as_dict.flops == 7.0 and as_dict.bytes_accessed is None
    assert _stats_from(None, None, None).flops is None


# ------------------------------------------------------------------ real compiled programs (CPU)


@pytest.fixture(scope="module")
def devices8():
    return jax.devices()[:8]  # tests/conftest.py guarantees 8 fake CPU devices


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _sds(shape, sharding, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def test_sharded_matmul_memory_and_flops_are_per_device(devices8):
    mesh = _mesh((4, 2), ("data", "model"))
    M, K, N = 64, 128, 256
    xs, ws = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P(None, "model"))
    lowered = jax.jit(lambda x, w: x @ w, in_shardings=(xs, ws)).lower(
        _sds((M, K), xs), _sds((K, N), ws))
    stats = inspect(lowered.compile())

    assert stats.argument_bytes == (M // 4) * K * F32 + K * (N // 2) * F32
    assert stats.output_bytes == (M // 4) * (N // 2) * F32
    assert stats.alias_bytes == 0
    assert stats.total_collective_count == 0  # both operands already laid out for the output
    assert stats.num_partitions == 8
    # XLA's cost model counts the partitioned program: one device's share of 2*M*K*N.
    assert stats.flops == pytest.approx(2 * M * K * N / 8, rel=1e-3)
    # Unlike the lowered (unpartitioned) module, which counts the whole matmul.
    lowered_cost = lowered.cost_analysis()
    lowered_cost = lowered_cost[0] if isinstance(lowered_cost, list) else lowered_cost
    assert lowered_cost["flops"] == pytest.approx(2 * M * K * N, rel=1e-3)
    assert stats.bytes_accessed and stats.bytes_accessed >= stats.argument_bytes


def test_contraction_sharded_matmul_all_reduces_full_output(devices8):
    mesh = _mesh((8,), ("d",))
    M, K, N = 32, 256, 64
    xs, ws = NamedSharding(mesh, P(None, "d")), NamedSharding(mesh, P("d", None))
    out = NamedSharding(mesh, P())
    stats = inspect(jax.jit(lambda x, w: x @ w, in_shardings=(xs, ws), out_shardings=out)
                    .lower(_sds((M, K), xs), _sds((K, N), ws)))  # a Lowered is compiled for us
    assert stats.count("all-reduce") == 1
    assert stats.bytes("all-reduce") == M * N * F32  # partial sums of the full output
    assert stats.argument_bytes == (M * K + K * N) * F32 // 8
    assert stats.flops == pytest.approx(2 * M * K * N / 8, rel=0.05)  # + the all-reduce's adds


def test_shard_map_program_emits_each_collective_kind(devices8):
    mesh = _mesh((8,), ("d",))

    def body(blk):  # blk: f32[8, 64] on each device
        a = jax.lax.psum(blk, "d")
        b = jax.lax.all_gather(blk, "d", tiled=True)
        c = jax.lax.psum_scatter(blk, "d", scatter_dimension=0, tiled=True)
        d = jax.lax.ppermute(blk, "d", perm=[(i, (i + 1) % 8) for i in range(8)])
        e = jax.lax.all_to_all(blk, "d", split_axis=0, concat_axis=1, tiled=True)
        return (a.sum() + b.sum() + c.sum() + d.sum() + e.sum())[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    stats = inspect(f.lower(_sds((64, 64), NamedSharding(mesh, P("d")))).compile())
    blk = 8 * 64 * F32
    assert stats.collectives["all-reduce"] == CollectiveStats(1, blk)
    assert stats.collectives["all-gather"] == CollectiveStats(1, 8 * blk)
    assert stats.collectives["reduce-scatter"] == CollectiveStats(1, blk // 8)
    assert stats.collectives["collective-permute"] == CollectiveStats(1, blk)
    assert stats.collectives["all-to-all"] == CollectiveStats(1, blk)
    assert stats.count("collective-broadcast") == stats.count("ragged-all-to-all") == 0
    assert stats.total_collective_bytes == blk * (1 + 8 + 1 + 1) + blk // 8


def test_ragged_all_to_all_in_lowered_hlo_text(devices8):
    # XLA:CPU cannot compile ragged-all-to-all, but the lowered HLO already holds the op.
    mesh = _mesh((8,), ("d",))

    def body(x):  # x: f32[1, 16] on each device; send 2 elements to every peer
        sizes = jnp.full((8,), 2, jnp.int32)
        offsets = jnp.arange(8, dtype=jnp.int32) * 2
        out_offsets = jnp.full((8,), jax.lax.axis_index("d") * 2, jnp.int32)
        r = jax.lax.ragged_all_to_all(x.reshape(-1), jnp.zeros((16,), x.dtype), offsets, sizes,
                                      out_offsets, sizes, axis_name="d")
        return r[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    text = f.lower(_sds((8, 16), NamedSharding(mesh, P("d")))).as_text(dialect="hlo")
    assert count_collectives(text)["ragged-all-to-all"] == CollectiveStats(1, 16 * F32)


def test_data_parallel_sgd_step_all_reduces_exactly_the_gradients(devices8):
    mesh = _mesh((8,), ("data",))
    D, H, B = 64, 256, 64
    params = {"w1": (D, H), "b1": (H,), "w2": (H, D), "b2": (D,)}
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def loss_fn(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - x) ** 2)

    def sgd_step(p, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        return jax.tree.map(lambda a, g: a - 0.1 * g, p, grads), loss

    step = jax.jit(sgd_step, in_shardings=(rep, batch), out_shardings=(rep, rep))
    abstract = {k: _sds(s, rep) for k, s in params.items()}
    stats = inspect(step.lower(abstract, _sds((B, D), batch)).compile())

    grad_bytes = sum(F32 * int(jnp.prod(jnp.array(s))) for s in params.values())
    assert stats.bytes("all-reduce") == pytest.approx(grad_bytes, rel=0.01)  # + the loss scalar
    assert stats.count("all-reduce") >= 1
    assert stats.count("all-gather") == 0 and stats.count("reduce-scatter") == 0
    assert stats.argument_bytes == grad_bytes + (B // 8) * D * F32  # replicated params + a shard
    assert stats.peak_bytes and stats.peak_bytes > 0
    text = str(stats)
    assert text == stats.describe()
    assert "all-reduce" in text and "KiB" in text and "peak" in text


def test_peak_bytes_matches_memory_analysis(devices8):
    mesh = _mesh((8,), ("d",))
    s = NamedSharding(mesh, P("d"))
    compiled = jax.jit(lambda a: jnp.tanh(a) * 2, in_shardings=s).lower(_sds((512, 128), s)).compile()
    stats, ma = inspect(compiled), compiled.memory_analysis()
    assert stats.temp_bytes == ma.temp_size_in_bytes
    if getattr(ma, "peak_memory_in_bytes", 0):
        assert (stats.peak_bytes, stats.peak_source) == (ma.peak_memory_in_bytes, "reported")
    else:
        assert stats.peak_source == "sum"
    assert stats.allocated_bytes == (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                     - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def test_scan_body_cost_and_collectives_are_counted_once_per_trip(devices8):
    mesh = _mesh((8,), ("d",))
    n, trips = 64, 10

    def body(x):  # x: f32[n, n] per device
        def step(c, _):
            return jax.lax.psum(c @ x, "d"), None
        return jax.lax.scan(step, jax.lax.psum(x, "d"), None, length=trips)[0]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P()))
    stats = inspect(f.lower(_sds((8 * n, n), NamedSharding(mesh, P("d")))).compile())
    one_trip = 2 * n**3 + n * n  # the matmul, then the all-reduce's adds
    # XLA's cost model visits the loop body once: about one trip's FLOPs...
    assert one_trip <= stats.xla_flops < 2 * one_trip
    # ... inspect adds the other trips: the psum before the loop, `trips` bodies, the loop counter.
    assert stats.flops == pytest.approx(n * n + trips * one_trip, rel=1e-4)
    assert stats.bytes_accessed > 5 * stats.xla_bytes_accessed
    # One psum before the loop, one inside its body: the body's runs once per trip.
    assert stats.count("all-reduce") == 1 + trips
    assert stats.bytes("all-reduce") == (1 + trips) * n * n * F32
    assert stats.collectives["all-reduce"].static_count == 2  # each op once in the text
    assert stats.unknown_trip_loops == 0


def _stack_collectives(layers, unroll, nest=None):
    """Collectives of a compiled Megatron MLP stack under GSPMD: each layer's column- then
    row-parallel matmul leaves partial sums that one all-reduce of [B, D] completes."""
    mesh = _mesh((8,), ("d",))
    B, D, H = 4, 16, 32
    lead = (layers,) if nest is None else (layers // nest, nest)
    rep = NamedSharding(mesh, P())
    w1s = NamedSharding(mesh, P(*(None,) * len(lead), None, "d"))
    w2s = NamedSharding(mesh, P(*(None,) * len(lead), "d", None))

    def layer(h, w):
        return jnp.tanh(jnp.tanh(h @ w[0]) @ w[1]), None

    def inner(h, w):
        return jax.lax.scan(layer, h, w, unroll=unroll)[0], None

    def stack(x, w1, w2):
        return jax.lax.scan(layer if nest is None else inner, x, (w1, w2), unroll=unroll)[0]

    step = jax.jit(stack, in_shardings=(rep, w1s, w2s), out_shardings=rep)
    compiled = step.lower(_sds((B, D), rep), _sds((*lead, D, H), w1s), _sds((*lead, H, D), w2s)).compile()
    return inspect(compiled), B * D * F32


@pytest.mark.parametrize("nest", [None, 2], ids=["scan", "scan_in_scan"])
def test_scanned_stack_moves_as_many_bytes_per_step_as_the_unrolled_one(devices8, nest):
    layers = 6
    scanned, activation = _stack_collectives(layers, unroll=1, nest=nest)
    unrolled, _ = _stack_collectives(layers, unroll=True, nest=nest)
    # Unrolled: one all-reduce per layer in the text. Scanned: one in the (innermost) loop body.
    assert unrolled.collectives["all-reduce"] == CollectiveStats(layers, layers * activation)
    assert scanned.collectives["all-reduce"] == CollectiveStats(layers, layers * activation,
                                                                static_count=1, static_bytes=activation)
    assert scanned.total_collective_bytes == unrolled.total_collective_bytes == layers * activation
    assert scanned.total_collective_count == unrolled.total_collective_count == layers
    assert scanned.unknown_trip_loops == unrolled.unknown_trip_loops == 0
    # Reading the scanned program's text once per appearance sees one layer's worth.
    assert sum(s.static_bytes for s in scanned.collectives.values()) * layers == scanned.total_collective_bytes
    # FLOPs too: every (inner) loop body once per trip, as many as the unrolled stack's.
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.02)
    assert scanned.xla_flops < 0.5 * unrolled.flops  # XLA's own count visits each body once


def test_counted_loops_in_lowered_text_are_counted_per_trip(devices8):
    # Lowered (not optimized) text carries no known_trip_count: the counts come from each loop's
    # constant start, step and bound, and agree with the compiled program's.
    mesh = _mesh((8,), ("d",))

    def body(x):
        def step(c, _):
            return jax.lax.psum(c @ x, "d"), None
        c = jax.lax.scan(step, jax.lax.psum(x, "d"), None, length=10)[0]
        return jax.lax.fori_loop(3, 12, lambda i, c: jax.lax.psum(c, "d") * 2, c)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P()))
    lowered = f.lower(_sds((64, 8), NamedSharding(mesh, P("d"))))
    stats, unknown_trip_loops = _count(lowered.as_text(dialect="hlo"))
    assert stats["all-reduce"] == CollectiveStats(1 + 10 + 9, 20 * 8 * 8 * F32, 3, 3 * 8 * 8 * F32)
    assert unknown_trip_loops == 0
    assert count_collectives(lowered.compile().as_text())["all-reduce"].count == 20


class _Residual(nnx.Module):
    """A Megatron MLP block with a residual: column- then row-parallel under TP, so each layer
    ends in one all-reduce of its [batch, embed] output."""

    def __init__(self, rngs: nnx.Rngs):
        self.mlp = models.NNXMLP(rngs, dim=64, hidden=256)

    def __call__(self, x_BD):
        return x_BD + self.mlp(x_BD)


class _StackedModel(nnx.Module):
    """An MLP, then (unless ``layers == 0``) a ``tx.nn.LayerStack`` of ``layers`` blocks."""

    def __init__(self, rngs: nnx.Rngs, layers: int, unroll: int | bool):
        self.first = models.NNXMLP(rngs, dim=64, hidden=256)
        self.stack = tx.nn.LayerStack(_Residual, layers, rngs=rngs, unroll=unroll) if layers else None

    def __call__(self, x_BD):
        h_BD = self.first(x_BD)
        return h_BD if self.stack is None else self.stack(h_BD)


@functools.cache
def _stacked_model_stats(layers: int, unroll: int | bool = 1, grad: bool = False):
    """Stats of the model's forward (or loss gradient) compiled under TP over 8 devices."""
    mesh = tx.MeshSpec(axes=("tensor",)).build()
    sm = tx.shard(lambda rngs: _StackedModel(rngs, layers, unroll),
                  tx.Plan(tensor_parallel=tx.TP(axis="tensor")), mesh, abstract=True)
    x = models.float_batch(dim=64)
    if not grad:
        return inspect(sm.lower(x).compile())
    step = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(sm.apply(p, x) ** 2)))
    return inspect(step.lower(sm.params, sm.shard_batch(x)).compile())


def test_scanned_layer_stack_reports_four_layers_cost_and_collectives(devices8):
    rest, one, four = (_stacked_model_stats(layers) for layers in (0, 1, 4))

    def stack(stats, field):
        return getattr(stats, field) - getattr(rest, field)

    # One layer costs ~0.14 MFLOP per device; four layers, scanned, four times that.
    assert stack(four, "flops") == pytest.approx(4 * stack(one, "flops"), rel=0.02)
    assert stack(four, "transcendentals") == pytest.approx(4 * stack(one, "transcendentals"), rel=0.02)
    # XLA's own figure visits the scan's body once: about one layer's FLOPs.
    assert four.xla_flops - rest.flops == pytest.approx(stack(one, "flops"), rel=0.02)
    # The collectives exactly: one all-reduce of the [16, 64] activation per layer.
    assert stack(one, "total_collective_count") == 1
    assert stack(one, "total_collective_bytes") == 16 * 64 * F32
    for kind in COLLECTIVE_KINDS:
        assert four.count(kind) - rest.count(kind) == 4 * (one.count(kind) - rest.count(kind)), kind
        assert four.bytes(kind) - rest.bytes(kind) == 4 * (one.bytes(kind) - rest.bytes(kind)), kind
    assert four.unknown_trip_loops == four.conditionals == 0


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
def test_scanned_layer_stack_costs_what_the_unrolled_one_does(devices8, grad):
    scanned, unrolled = _stacked_model_stats(4, 1, grad), _stacked_model_stats(4, True, grad)
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.02)
    assert scanned.transcendentals == pytest.approx(unrolled.transcendentals, rel=0.02)
    assert {k: (c.count, c.bytes) for k, c in scanned.collectives.items()} == {
        k: (c.count, c.bytes) for k, c in unrolled.collectives.items()}
    assert scanned.xla_flops < 0.6 * unrolled.flops


def test_inspect_rejects_what_is_not_compiled(devices8):
    jitted = jax.jit(lambda a: a + 1)
    with pytest.raises(TitanaxError) as info:
        inspect(jitted)
    assert ".lower(" in info.value.suggestion and ".compile()" in info.value.suggestion
    with pytest.raises(TitanaxError) as info:
        inspect(jitted.trace(jnp.ones(3)))
    assert ".lower().compile()" in info.value.suggestion
    with pytest.raises(TitanaxError):
        inspect("HloModule m")
    with pytest.raises(TitanaxError):
        inspect(None)


# ------------------------------------------------------------------------- collectives by axis


def _sums_to_totals(by_axis, stats):
    """Per kind, the axes tuples add up to inspect's figures exactly."""
    for kind in COLLECTIVE_KINDS:
        parts = [d[kind] for d in by_axis.values()]
        assert sum(parts, CollectiveStats()) == stats.collectives[kind], kind


def _spans(by_axis):
    """axes -> {kind: (count, bytes)}, only what occurs."""
    return {axes: {k: (s.count, s.bytes) for k, s in d.items() if s.static_count}
            for axes, d in by_axis.items()}


def _mlp_step(mesh, plan):
    """A GPT-like MLP's loss gradient: column- then row-parallel under TP, the batch over DP."""
    sm = tx.shard(lambda rngs: models.NNXMLP(rngs, dim=64, hidden=256), plan, mesh, abstract=True)
    step = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(sm.apply(p, x) ** 2)))
    return step.lower(sm.params, sm.shard_batch(models.float_batch(dim=64))).compile()


_DP_TP = tx.Plan(data_parallel=tx.DP(axis="data"), tensor_parallel=tx.TP(axis="tensor"))


def test_collectives_by_axis_splits_a_dp_tp_step_into_gradient_and_tensor_all_reduces(devices8):
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()
    compiled = _mlp_step(mesh, _DP_TP)
    by_axis, stats = collectives_by_axis(compiled, mesh), inspect(compiled)
    spans = _spans(by_axis)
    assert list(spans) == [("data",), ("tensor",)]
    # TP: the row-parallel matmul's partial sums of the [16 / 4, 64] activation, over the pair.
    assert spans[("tensor",)] == {"all-reduce": (1, 16 // 4 * 64 * F32)}
    # DP: the gradients (each device holds half of the TP-split ones), and the loss.
    assert set(spans[("data",)]) == {"all-reduce"} and spans[("data",)]["all-reduce"][1] > 64 * 256 * F32
    _sums_to_totals(by_axis, stats)
    # The Lowered and the text give the same; every kind is present, zero where absent.
    assert collectives_by_axis(compiled.as_text(), mesh) == by_axis
    assert by_axis[("tensor",)]["all-gather"] == CollectiveStats()


def test_collectives_by_axis_maps_devices_through_the_device_assignment(devices8):
    # Mesh position (i, j) holds device 4 * j + i: a group of consecutive device ids is not a
    # tensor pair, so reading ids as mesh positions or as ids in order would be wrong.
    devices = np.array(jax.devices()[:8]).reshape(2, 4).T
    mesh = jax.sharding.Mesh(devices, ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    compiled = _mlp_step(mesh, _DP_TP)
    spans = _spans(collectives_by_axis(compiled, mesh))
    assert list(spans) == [("data",), ("tensor",)]
    assert spans[("tensor",)] == {"all-reduce": (1, 16 // 4 * 64 * F32)}
    # The same program read against a mesh in plain order: devices, not positions, decide.
    plain = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    assert ("tensor",) not in collectives_by_axis(compiled, plain)
    # HLO text has no device assignment: the mesh's own order is taken.
    text = ("%ar = f32[4]{0} all-reduce(%p), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, "
            "use_global_device_ids=true, to_apply=%add")
    assert list(collectives_by_axis(text, mesh)) == [("tensor",)]


def test_collectives_by_axis_counts_a_scanned_stack_per_layer(devices8):
    mesh = tx.MeshSpec(axes=("data", "tensor"), shape=(4, 2)).build()

    def by_axis(layers):
        sm = tx.shard(lambda rngs: _StackedModel(rngs, layers, 1), _DP_TP, mesh, abstract=True)
        compiled = sm.lower(models.float_batch(dim=64)).compile()
        out = collectives_by_axis(compiled, mesh)
        _sums_to_totals(out, inspect(compiled))
        return out

    rest, one, four = by_axis(0), by_axis(1), by_axis(4)
    zero = CollectiveStats()
    layer = {axes: {k: (one[axes][k].count - rest.get(axes, {}).get(k, zero).count,
                        one[axes][k].bytes - rest.get(axes, {}).get(k, zero).bytes) for k in COLLECTIVE_KINDS}
             for axes in one}
    assert layer[("tensor",)]["all-reduce"] == (1, 16 // 4 * 64 * F32)  # one per layer
    assert set(four) == set(one)
    for axes in four:
        for kind in COLLECTIVE_KINDS:
            got = (four[axes][kind].count - rest.get(axes, {}).get(kind, zero).count,
                   four[axes][kind].bytes - rest.get(axes, {}).get(kind, zero).bytes)
            assert got == (4 * layer[axes][kind][0], 4 * layer[axes][kind][1]), (axes, kind)
    assert four[("tensor",)]["all-reduce"].static_count == one[("tensor",)]["all-reduce"].static_count


def test_collectives_by_axis_finds_fsdp_all_gathers_on_the_fsdp_axis(devices8):
    mesh = tx.MeshSpec(axes=("data", "fsdp", "tensor"), shape=(2, 2, 2)).build()
    compiled = _mlp_step(mesh, tx.Plan(data_parallel=tx.DP(axis="data"), fsdp=tx.FSDP(axis="fsdp"),
                                       tensor_parallel=tx.TP(axis="tensor")))
    by_axis = collectives_by_axis(compiled, mesh)
    gathers = {axes: d["all-gather"] for axes, d in by_axis.items() if d["all-gather"].count}
    assert list(gathers) == [("fsdp",)] and gathers[("fsdp",)].count >= 2  # both matmuls' weights
    assert by_axis[("tensor",)]["all-reduce"].count == 1
    _sums_to_totals(by_axis, inspect(compiled))


_AXES_MESH = ("a", "b", "c")


@pytest.mark.parametrize("groups, axes", [
    ("{{0,1},{2,3},{4,5},{6,7}}", ("c",)),
    ("{{0,2,4,6},{1,3,5,7}}", ("a", "b")),
    ("{}", ("a", "b", "c")),  # no groups: every device in one
    ("{{0},{1},{2},{3},{4},{5},{6},{7}}", ()),
    ("[2,4]<=[4,2]T(1,0)", ("a", "b")),  # the iota form: rows of arange(8).reshape(4, 2).T
    ("[4,2]<=[2,2,2]T(0,2,1)", ("b",)),
    ("[4,2]<=[8]", ("c",)),
    ("mesh['x'=4,'y'=2] {'x'}", ("a", "b")),  # the mesh-axes form, XLA's own axis names
    ("mesh['a'=2,'b'=2,'c'=2] {'a','c'}", ("a", "c")),
    ("mesh[x=4,y=2] {x:(2)2}", ("b",)),  # a sub-axis: the minor half of x
    ("mesh['x'=4,'y'=2], device_ids=([4,2]<=[2,4]T(1,0)) {'y'}", ("a",)),
    ("mesh['x'=4,'y'=2], device_ids=(0,4,1,5,2,6,3,7) {'y'}", ("a",)),
    ("mesh['x'=4,'y'=2], device_ids=([2,4]T(1,0)) {'y'}", ("a",)),  # as XLA 0.10 prints it
])
def test_collectives_by_axis_reads_every_replica_group_form(devices8, groups, axes):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), _AXES_MESH)
    text = (f"%ag = f32[16]{{0}} all-gather(%p), channel_id=1, replica_groups={groups}, "
            f"dimensions={{0}}, use_global_device_ids=true, metadata={{op_name=\"x\"}}")
    assert collectives_by_axis(text, mesh) == {axes: {
        k: CollectiveStats(1, 64) if k == "all-gather" else CollectiveStats() for k in COLLECTIVE_KINDS}}


def test_collectives_by_axis_follows_xla_group_modes_pairs_async_ops_and_loops(devices8):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), _AXES_MESH)
    text = """HloModule m, num_partitions=8

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %s = f32[8]{0} all-reduce-start(%x), channel_id=2, replica_groups=[4,2]<=[8], use_global_device_ids=true, to_apply=%add
  %d = f32[8]{0} all-reduce-done(%s)
  %cp = f32[8]{0} collective-permute(%d), channel_id=3, source_target_pairs={{0,4},{4,0},{1,1}}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %cp)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %cr = f32[8]{0} all-reduce(%a), replica_groups={{0}}, to_apply=%add
  %cp2 = f32[8]{0} all-to-all(%a), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = f32[8]{0} all-reduce(%cp2), channel_id=5, replica_groups={{0}}, to_apply=%add
}
"""
    spans = _spans(collectives_by_axis(text, mesh))
    assert spans == {
        (): {"all-reduce": (1, 32)},  # cross-replica in a one-replica program: one device each
        ("a",): {"collective-permute": (5, 5 * 32)},  # pairs {0,4}: a; {1,1} stays put
        ("a", "b", "c"): {"all-reduce": (1, 32)},  # replica 0, and with it every partition
        ("b", "c"): {"all-to-all": (1, 32)},  # channel_id without the flag: partition ids
        ("c",): {"all-reduce": (5, 5 * 32)},  # the async pair once per trip, groups of the -start
    }
    assert sum((d["all-reduce"] for d in collectives_by_axis(text, mesh).values()),
               CollectiveStats()) == count_collectives(text)["all-reduce"]


def test_collectives_by_axis_rejects_what_it_cannot_read(devices8):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
    with pytest.raises(TitanaxError):
        collectives_by_axis(jax.jit(jnp.sin), mesh)
    with pytest.raises(TitanaxError) as info:
        collectives_by_axis("%a = f32[4]{0} all-reduce(%p), replica_groups={}", mesh.abstract_mesh)
    assert info.value.field == "mesh"
    small = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "tensor"))
    with pytest.raises(TitanaxError) as info:
        collectives_by_axis("HloModule m, num_partitions=8\n%a = f32[4]{0} all-reduce(%p), "
                            "channel_id=1, replica_groups={{0,1}}, use_global_device_ids=true", small)
    assert "8 devices" in str(info.value)
    assert collectives_by_axis("%n = f32[4]{0} negate(%p)", mesh) == {}


def test_collectives_by_axis_takes_a_conditionals_heaviest_branch_as_inspect_does(devices8):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), _AXES_MESH)
    text = """HloModule m, num_partitions=8

%light (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%p), channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
}

%heavy (q: f32[8]) -> f32[8] {
  %q = f32[8]{0} parameter(0)
  %ag = f32[64]{0} all-gather(%q), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  ROOT %s = f32[8]{0} slice(%ag), slice={[0:8]}
}

ENTRY %main (i: s32[], x: f32[8]) -> f32[8] {
  %i = s32[] parameter(0)
  %x = f32[8]{0} parameter(1)
  ROOT %c = f32[8]{0} conditional(%i, %x, %x), branch_computations={%light, %heavy}
}
"""
    by_axis = collectives_by_axis(text, mesh)
    assert by_axis[("a", "b", "c")]["all-gather"] == CollectiveStats(1, 256)
    # The branch not counted still shows in the text's (static) figures.
    assert by_axis[("a",)]["all-reduce"] == CollectiveStats(0, 0, static_count=1, static_bytes=32)
    totals = count_collectives(text)
    for kind in COLLECTIVE_KINDS:
        assert sum((d[kind] for d in by_axis.values()), CollectiveStats()) == totals[kind]


def test_a_conditional_under_busy_scope_counts_each_branch_by_its_share():
    # A loop of 10 ticks whose slot computes a 64x64 matmul (2 * 64**3 FLOPs) on 4 of them: the
    # program says so through the scope's name, and the count follows it rather than charging the
    # matmul on every tick.
    from titanax.parallel.busy import busy_scope

    def program(share: tuple[int, int] | None):
        def tick(h, busy):
            def run():
                return jax.lax.cond(busy, lambda x: jnp.tanh(x @ x), lambda x: jnp.zeros_like(x), h)
            if share is None:
                return run(), None
            with busy_scope("forward", *share):
                return run(), None
        busy = jnp.arange(10) % 5 < 2  # 4 of 10
        return jax.jit(lambda h: jax.lax.scan(tick, h, busy)[0]).lower(jnp.ones((64, 64))).compile()

    heaviest, weighted = tx.profiling.inspect(program(None)), tx.profiling.inspect(program((4, 10)))
    matmul = 2 * 64**3
    assert heaviest.conditionals == 1 and heaviest.flops >= 10 * matmul
    assert weighted.conditionals == 0
    assert weighted.flops == pytest.approx(heaviest.flops - 6 * matmul, rel=0.01)
    assert weighted.transcendentals == pytest.approx(4 * 64 * 64, rel=0.01)
