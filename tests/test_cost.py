"""Tests of the cost model that picks apply or materialise (keras_decomp/operators/cost.py,
``Node.cost``/``Node.choose``): the seconds formula by hand, its choice where one path is
clearly cheaper, the FLOP rule it falls back to when only FLOPs cost time, each term
deciding alone, the constants overridden by ``use`` and KERAS_DECOMP_COST, and the layer
following the choice unless ``mode=`` forces a path.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from keras_decomp import layers, parse
from keras_decomp.operators import cost
from keras_decomp.operators.cost import Cost, Machine, use
from layer_cases import CASES

FREE = 1e300  # a rate so high that its term vanishes


def test_seconds_adds_the_three_terms():
    machine = Machine(flops_per_s=1e9, bytes_per_s=2e9, seconds_per_op=1e-5)
    work = Cost(flops=3e9, numbers=1e9, ops=7)
    assert work.seconds(machine) == pytest.approx(3.0 + 4e9 / 2e9 + 7e-5, rel=1e-12)
    assert (Cost(1, 2, 3) + Cost(10, 20, 30)) == Cost(11, 22, 33)


@pytest.mark.parametrize("text, n, m, batch, expected", [
    # W (64x64) costs 2 M FLOPs to build, once; applying 4 draws of G dense to 4096 rows, 270 M
    ("sum(G dense, n=4)", 64, 64, 4096, "materialize"),
    ("DCT2[:100] dense", 784, 10, 4096, "materialize"),  # 642 M FLOPs through the (784, 100) slice
    ("lowrank(r=4)", 1024, 1024, 1, "apply"),  # 16 K FLOPs against building a 1 M matrix
    ("sss(p=16, d=16)", 4096, 4096, 1, "apply"),
    ("sss(p=16, d=16)", 4096, 4096, 128, "apply"),
    ("sum(R, n=400)", 4096, 4096, 1, "apply"),  # 6.6 M FLOPs against 13 G to build W
    ("kron(dense, dense)", 4096, 4096, 1, "apply"),  # two 64x64 factors against a 16.8 M matrix
])
def test_choice_where_one_path_is_clearly_cheaper(text, n, m, batch, expected):
    node = parse(text, n, m).stages[0]
    times = {mode: node.cost(batch, mode).seconds() for mode in ("apply", "materialize")}
    other = "apply" if expected == "materialize" else "materialize"
    assert times[other] > 3 * times[expected], times  # clearly: a factor of 3 at least
    assert node.choose(batch) == expected


def test_with_only_flops_costing_time_the_choice_is_the_flop_rule():
    # Node.flops counts the same paths by FLOPs alone: with memory and ops free, the two agree
    checked = 0
    with use(bytes_per_s=FREE, seconds_per_op=0.0):
        for case in CASES:
            node = parse(case.W, case.n, case.m, params=case.params).stages[0]
            for batch in (1, 7, 128, 4096):
                fewer = node.flops(batch, "apply") <= node.flops(batch, "materialize")
                assert node.choose(batch) == ("apply" if fewer else "materialize"), (case.id, batch)
                checked += 1
    assert checked >= 4 * 60


# N: the power of two at least max(n, m); log2(N) factors
@pytest.mark.parametrize("n, m, levels", [(16, 16, 4), (12, 8, 4), (8, 32, 5), (1024, 1024, 10)])
def test_butterfly_prices_the_path_it_runs(n, m, levels):
    # butterfly runs by flips or two block products, never by its factors' gathers: the FLOPs
    # its work terms count are the ones its flops() counts, on both paths and at every batch
    node = parse("butterfly", n, m).stages[0]
    assert type(node).__name__ == "ButterflyProduct" and len(node.factors) == levels
    for batch in (1, 7, 128, 4096):
        for mode in ("apply", "materialize"):
            assert node.cost(batch, mode).flops == node.flops(batch, mode), (batch, mode)
    # batch 1 runs by flips: 4 elementwise ops per factor, one factor per bit of N
    assert node.cost(1, "apply").ops == 4 * levels


def test_lowrank_apply_reads_its_input_once():
    # x (128 x 784) u (784 x 4), then (128 x 4) v (4 x 16): 2 * 128 * 784 * 4 + 2 * 128 * 4 * 16 FLOPs;
    # numbers: u and v (3136 + 64), x read once, the middle written and read, y written
    node = parse("lowrank(r=4)", 784, 16).stages[0]
    expected = Cost(2 * 128 * 784 * 4 + 2 * 128 * 4 * 16, 3136 + 64 + 128 * (784 + 2 * 4 + 16), 2)
    assert node.cost(128, "apply") == expected


def test_choosing_prices_each_node_a_bounded_number_of_times(monkeypatch):
    # (((dense * a) * a) ...): each level asks its child for its faster path; pricing the
    # chosen path again made that 2^depth evaluations (a fuzzed expression hung the suite)
    from keras_decomp.operators import ir
    depth, calls, priced = 12, [], ir.Node.cost
    monkeypatch.setattr(ir.Node, "cost", lambda self, *a: calls.append(1) or priced(self, *a))
    node = parse("(" * depth + "dense" + " * a)" * depth, 8, 8).stages[0]
    assert sum(isinstance(n, ir.Scale) for n in node.walk()) == depth
    node.choose(3)
    # both paths of each of the depth + 1 nodes once, and dense's apply priced as its materialise
    assert len(calls) == 2 * (depth + 1) + 1


def test_each_term_alone_decides():
    node = parse("sss(p=4, d=2)", 16, 16).stages[0]
    batch = 4096
    apply, build = node.cost(batch, "apply"), node.cost(batch, "materialize")
    # the batched recursion: fewer ops than building W stage by stage, more activation traffic
    # at this batch than W (16 x 16) and its build
    assert apply.ops < build.ops and apply.numbers > build.numbers
    with use(flops_per_s=FREE, bytes_per_s=FREE, seconds_per_op=1.0):
        assert node.choose(batch) == "apply"
    with use(flops_per_s=FREE, bytes_per_s=1.0, seconds_per_op=0.0):
        assert node.choose(batch) == "materialize"


def test_use_nests_and_restores():
    before = cost.machine()
    with use(seconds_per_op=1.0) as outer:
        assert cost.machine().seconds_per_op == 1.0 and outer.flops_per_s == before.flops_per_s
        with use(Machine(1.0, 2.0, 3.0)):
            assert cost.machine() == Machine(1.0, 2.0, 3.0)
        assert cost.machine() is outer
    assert cost.machine() == before


def test_environment_overrides_the_measured_constants(monkeypatch):
    monkeypatch.setenv("KERAS_DECOMP_COST", "flops_per_s=2e9, seconds_per_op=1e-3")
    assert cost.machine() == Machine(2e9, cost.MEASURED.bytes_per_s, 1e-3)
    monkeypatch.setenv("KERAS_DECOMP_COST", "flops=2e9")
    with pytest.raises(ValueError, match=r"KERAS_DECOMP_COST: unknown constant 'flops'"):
        cost.machine()


def test_measured_constants_are_plausible_for_a_cpu():
    m = cost.MEASURED
    assert 1e9 <= m.flops_per_s <= 1e13 and 1e8 <= m.bytes_per_s <= 1e12 and 0 < m.seconds_per_op <= 1e-3


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="reads the traced TensorFlow graph")
def test_the_layer_follows_the_choice_unless_a_mode_is_forced():
    import tensorflow as tf

    x = tf.ones((4096, 16))

    def traced(layer):
        layer(x[:1])
        found = [op.type for op in tf.function(layer).get_concrete_function(x).graph.get_operations()]
        return "BatchMatMulV2" in found  # the batched SSS recursion, not W built then one MatMul

    with use(flops_per_s=FREE, bytes_per_s=FREE, seconds_per_op=1.0):
        assert traced(layers.Dense(16, W="sss(p=4, d=2)"))
    with use(flops_per_s=FREE, bytes_per_s=1.0, seconds_per_op=0.0):
        assert not traced(layers.Dense(16, W="sss(p=4, d=2)"))
        assert traced(layers.Dense(16, W="sss(p=4, d=2)", mode="apply"))
    with use(flops_per_s=FREE, bytes_per_s=FREE, seconds_per_op=1.0):
        assert not traced(layers.Dense(16, W="sss(p=4, d=2)", mode="materialize"))


def test_calibrate_measures_three_positive_constants():
    from keras_decomp.layers.cost import measure
    machine = measure(repeats=1)
    assert all(math.isfinite(v) and v >= 0 for v in (machine.flops_per_s, machine.bytes_per_s,
                                                      machine.seconds_per_op))
    assert machine.flops_per_s > 1e8 and machine.bytes_per_s > 1e7


def test_paths_agree_whatever_is_chosen():
    # whichever path the constants pick, the layer computes x W
    x = np.random.default_rng(0).normal(size=(5, 16)).astype("float32")
    outputs = []
    for constants in ({"seconds_per_op": 1.0}, {"bytes_per_s": 1.0}):
        with use(flops_per_s=FREE, **{"bytes_per_s": FREE, "seconds_per_op": 0.0, **constants}):
            layer = layers.Dense(16, W="sss(p=4, d=2) + lowrank(r=1)", seed=3, use_bias=False)
            outputs.append(np.asarray(layer(x)))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5 * np.abs(outputs[0]).max())
