"""Tests of sss(p=, d=) (keras_decomp/structures/sss.py): layout and counts by hand, the dense
form against two independent constructions (explicit block products and the paper's closed
form with shift matrices), the recursions against x @ W, the Hankel-SVD approximation
(exact recovery, error decreasing in d), the costs, and the Keras layer (gradients reach every
stage matrix).  The shared layer harness runs the sss rows of tests/layer_cases.py too.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import scipy.linalg
from keras import ops

import keras_decomp
from keras_decomp import DecompError, layers, parse
from keras_decomp.fitting.approximate import approximate, fit
from keras_decomp.fitting.degree import degree
from keras_decomp.operators.structures.sss import SSS, block_sizes

N, M, P, D = 47, 31, 6, 3  # odd block sizes, n != m: inputs (8,8,8,8,8,7), outputs (6,5,5,5,5,5)


def sss_node(p=P, d=D, n=N, m=M) -> SSS:
    return parse(f"sss(p={p}, d={d})", n, m).stages[0]


def random_values(node, seed=0, scale=1.0) -> dict:
    """Stage matrices drawn at random (not the layer's initialiser), stage by stage, then stacked."""
    rng = np.random.default_rng(seed)
    values = {}
    for sub in node.walk():
        if isinstance(sub, SSS):
            stages = {(letter, k): scale * rng.normal(size=shape) for k in range(sub.p)
                      for letter, shape in sorted(sub.stage_shapes(k).items())}
            values.update(sub.stacked(stages))
        else:
            values.update({k: scale * rng.normal(size=s) for k, s in sub.own_params().items()})
    return values


def stage(values, node, letter, k):
    """Stage k's matrix ``letter``, read from the stacks by their names (``<key>.<letter><first
    stage>``, one (stages, rows, cols) array per run of equal shapes), not by the node's accessor."""
    prefix = node.key + "." + letter
    for key, array in values.items():
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            first = int(key[len(prefix):])
            if first <= k < first + len(array):
                return array[k - first]
    return None


# ---- independent references --------------------------------------------------------------------

def dense_by_blocks(node, values) -> np.ndarray:
    """W[i, j] = D_j (i = j), B_i A_{i+1}..A_{j-1} C_j (i < j), F_i E_{i-1}..E_{j+1} G_j (i > j)."""
    p, d = node.p, node.d
    ri = np.concatenate([[0], np.cumsum(node.in_sizes)])
    ro = np.concatenate([[0], np.cumsum(node.out_sizes)])
    W = np.zeros(node.shape)
    for i in range(p):
        for j in range(p):
            if i == j:
                block = stage(values, node, "D", i)
            elif i < j:
                chain = np.eye(d)
                for k in range(i + 1, j):
                    chain = chain @ stage(values, node, "A", k)
                block = stage(values, node, "B", i) @ chain @ stage(values, node, "C", j)
            else:
                chain = np.eye(d)
                for k in range(i - 1, j, -1):
                    chain = chain @ stage(values, node, "E", k)
                block = stage(values, node, "F", i) @ chain @ stage(values, node, "G", j)
            W[ri[i]:ri[i + 1], ro[j]:ro[j + 1]] = block
    return W


def shift(dims_to, dims_from, offset) -> np.ndarray:
    """Block shift matrix: block k of the result is block k + offset of the argument."""
    Z = np.zeros((sum(dims_to), sum(dims_from)))
    to = np.concatenate([[0], np.cumsum(dims_to)])
    fr = np.concatenate([[0], np.cumsum(dims_from)])
    for k in range(len(dims_to)):
        j = k + offset
        if 0 <= j < len(dims_from) and dims_to[k]:
            Z[to[k]:to[k + 1], fr[j]:fr[j + 1]] = np.eye(dims_to[k])
    return Z


def dense_by_paper(node, values) -> np.ndarray:
    """The paper's T = D + C (I - Z A)^-1 Z B + G (I - Z^T E)^-1 Z^T F for column vectors,
    with block-diagonal stage operators and state sizes 0 at the open ends; W = T^T."""
    p, d = node.p, node.d

    def get(letter, k, rows, cols):  # the paper's (column-vector) matrix, or an empty block
        block = stage(values, node, letter, k)
        return block.T if block is not None else np.zeros((rows, cols))

    n, m = node.in_sizes, node.out_sizes
    into = [0] + [d] * (p - 1)  # causal state entering stage k
    out = into[1:] + [0]  # and leaving it
    A = scipy.linalg.block_diag(*[get("A", k, out[k], into[k]) for k in range(p)])
    B = scipy.linalg.block_diag(*[get("B", k, out[k], n[k]) for k in range(p)])
    C = scipy.linalg.block_diag(*[get("C", k, m[k], into[k]) for k in range(p)])
    Dg = scipy.linalg.block_diag(*[get("D", k, m[k], n[k]) for k in range(p)])
    Z = shift(into, out, -1)  # state entering stage k = state leaving stage k - 1
    causal = C @ np.linalg.solve(np.eye(len(Z)) - Z @ A, Z @ B)
    back_in = [d] * (p - 1) + [0]  # anticausal state entering stage k from the right
    back_out = [0] + back_in[:-1]  # and leaving it to the left
    E = scipy.linalg.block_diag(*[get("E", k, back_out[k], back_in[k]) for k in range(p)])
    F = scipy.linalg.block_diag(*[get("F", k, back_out[k], n[k]) for k in range(p)])
    G = scipy.linalg.block_diag(*[get("G", k, m[k], back_in[k]) for k in range(p)])
    Zt = shift(back_in, back_out, +1)
    anticausal = G @ np.linalg.solve(np.eye(len(Zt)) - Zt @ E, Zt @ F)
    return (Dg + causal + anticausal).T


# ---- layout and counts -------------------------------------------------------------------------

@pytest.mark.parametrize("total, p, sizes", [(10, 4, (3, 3, 2, 2)), (47, 6, (8, 8, 8, 8, 8, 7)),
                                             (31, 6, (6, 5, 5, 5, 5, 5)), (8, 8, (1,) * 8), (5, 1, (5,))])
def test_blocks_are_near_equal_and_the_first_ones_larger(total, p, sizes):
    assert block_sizes(total, p) == sizes


def test_stage_shapes_and_count_by_hand():
    node = sss_node()
    assert node.in_sizes == (8, 8, 8, 8, 8, 7) and node.out_sizes == (6, 5, 5, 5, 5, 5)
    # stage matrices of one shape are stacked: a stack breaks where the blocks shrink (after the
    # 47 mod 6 = 5 larger input blocks, after the 31 mod 6 = 1 larger output block)
    k = node.key
    assert node.param_shapes() == {
        f"{k}.D0": (1, 8, 6), f"{k}.D1": (4, 8, 5), f"{k}.D5": (1, 7, 5),
        f"{k}.B0": (5, 8, 3), f"{k}.G0": (1, 3, 6), f"{k}.G1": (4, 3, 5),
        f"{k}.C1": (5, 3, 5), f"{k}.F1": (4, 8, 3), f"{k}.F5": (1, 7, 3),
        f"{k}.A1": (4, 3, 3), f"{k}.E1": (4, 3, 3)}
    values = random_values(node)
    assert stage(values, node, "D", 0).shape == (8, 6) and stage(values, node, "D", 5).shape == (7, 5)
    assert stage(values, node, "B", 0).shape == (8, 3) and stage(values, node, "G", 0).shape == (3, 6)
    assert stage(values, node, "C", 5).shape == (3, 5) and stage(values, node, "F", 5).shape == (7, 3)
    # the open ends carry nothing: no state enters stage 0 causally or leaves stage p-1
    for absent in [("A", 0), ("E", 0), ("C", 0), ("F", 0), ("A", 5), ("E", 5), ("B", 5), ("G", 5)]:
        assert stage(values, node, *absent) is None
    diagonal = 8 * 6 + 4 * 8 * 5 + 7 * 5  # 243
    b, f = 3 * (47 - 7), 3 * (47 - 8)  # B on all stages but the last, F on all but the first
    c, g = 3 * (31 - 6), 3 * (31 - 5)  # C on all but the first, G on all but the last
    transitions = 2 * 4 * 3 * 3  # A and E on the 4 interior stages
    assert node.num_params == diagonal + b + f + c + g + transitions == 705
    assert node.num_fixed == 0


@pytest.mark.parametrize("text, n, m, count", [
    ("sss(p=1, d=5)", 6, 4, 24),  # one stage: a dense matrix
    ("sss(p=2, d=2)", 6, 4, 3 * 2 * 2 + 2 * (3 * 2 + 2 * 2)),  # no transitions
    ("sss(p=8, d=4)", 784, 10, 980 + 2 * 4 * 686 + 4 * 8 + 4 * 9 + 2 * 6 * 16),
    ("sss(p=16, d=16)", 4096, 4096, 16 * 256 * 256 + 4 * 16 * 15 * 256 + 2 * 14 * 256),
])
def test_counts_by_hand(text, n, m, count):
    assert parse(text, n, m).num_params == count


def test_params_budget_picks_the_largest_state_size():
    node = parse("sss(p=4, params=0.5)", 64, 48).stages[0]
    allowed = 0.5 * 64 * 48
    assert node.num_params <= allowed < sss_node(4, node.d + 1, 64, 48).num_params


# ---- the dense form and the recursions ---------------------------------------------------------

@pytest.mark.parametrize("p, d, n, m", [(P, D, N, M), (1, 2, 5, 4), (2, 3, 7, 9), (3, 1, 3, 3), (5, 4, 31, 47)])
def test_to_dense_matches_block_products_and_the_paper_formula(p, d, n, m):
    node = sss_node(p, d, n, m)
    values = random_values(node)
    W = node.to_dense(values)
    np.testing.assert_allclose(W, dense_by_blocks(node, values), rtol=0, atol=1e-12)
    np.testing.assert_allclose(W, dense_by_paper(node, values), rtol=0, atol=1e-11)


@pytest.mark.parametrize("p, d, n, m", [(P, D, N, M), (1, 2, 5, 4), (2, 3, 7, 9), (5, 4, 31, 47)])
def test_recursions_equal_x_times_dense(p, d, n, m):
    node = sss_node(p, d, n, m)
    values = random_values(node, seed=1)
    x = np.random.default_rng(2).normal(size=(5, n))
    expected = x @ node.to_dense(values)
    np.testing.assert_allclose(node.apply(x, values, np), expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_init_gives_the_dense_form_glorot_variance():
    n, m = 400, 300
    node = sss_node(8, 8, n, m)
    W = node.to_dense(node.init(np.random.default_rng(0)))
    variance = 2.0 / (n + m)
    assert 0.8 * variance < np.var(W) < 1.25 * variance
    # off-diagonal blocks too, not only the diagonal ones
    assert 0.7 * variance < np.var(W[:50, -38:]) < 1.4 * variance


# ---- costs -------------------------------------------------------------------------------------

def test_apply_is_cheaper_than_materialising_for_a_big_matrix():
    node = sss_node(16, 16, 4096, 4096)
    for batch in (1, 128):
        assert node.flops(batch, "apply") < node.flops(batch, "materialize") / 4
    # one multiply-add per parameter and row, plus the merges
    assert 2 * node.num_params <= node.flops(1, "apply") < 2.1 * node.num_params
    assert node.flops(128, "apply") == 128 * node.flops(1, "apply")


def test_build_cost_counts_the_products_of_materialize():
    node = sss_node(3, 2, 9, 6)  # inputs (3, 3, 3), outputs (2, 2, 2)
    # causal: R_1 C_1 (3x2 @ 2x2), R_2 = [R_1 A_1; B_1] (3x2 @ 2x2), R_2 C_2 (6x2 @ 2x2); anticausal mirrored
    causal = 2 * 3 * 2 * 2 + 2 * 3 * 2 * 2 + 2 * 6 * 2 * 2
    assert node.build_cost() == 2 * causal
    assert node.flops(4, "materialize") == 2 * causal + 2 * 4 * 9 * 6


# ---- structure for the generic fitting methods -------------------------------------------------

def test_degree_is_the_longest_chain_of_given_keys():
    node = sss_node()
    keys = set(node.param_shapes())
    k = node.key
    assert degree(node, keys) == P  # B_0 A_1 .. A_4 C_5
    # a stack of transitions holds every A_k of a chain: B_0 A_1 .. A_4 C_5 is of degree 4 in it
    assert degree(node, {f"{k}.A1"}) == P - 2
    assert all(degree(node, {key}) == 1 for key in keys - {f"{k}.A1", f"{k}.E1"})
    assert degree(node, {f"{k}.D1"}) == 1
    assert degree(node, {f"{k}.B0", f"{k}.A1", f"{k}.E1"}) == 1 + 4  # B_0 A_1 A_2 A_3 A_4
    # F_4 E_3 E_2 E_1 G_0 (F1 holds F_1..F_4; G0 holds G_0 only, G1 G_1..G_4)
    assert degree(node, {f"{k}.F1", f"{k}.E1", f"{k}.G0"}) == 5
    assert degree(node, set()) == 0


# ---- approximation -----------------------------------------------------------------------------

def test_random_sss_is_recovered():
    node = sss_node()
    W = node.to_dense(random_values(node, seed=3))
    result = fit(W, "sss(p=6, d=3)")
    assert result.method == "sss"
    assert result.rel_error < 1e-9
    # a larger state than needed is exact too (extra state dimensions stay zero)
    assert approximate(W, "sss(p=6, d=5)")[1] < 1e-9


def test_recovered_values_have_the_balanced_shapes_and_a_smaller_state_is_not_exact():
    node = sss_node()
    W = node.to_dense(random_values(node, seed=4))
    values, error = approximate(W, node)
    assert {k: v.shape for k, v in values.items()} == node.param_shapes()
    np.testing.assert_allclose(node.to_dense(values), W, atol=1e-10 * np.abs(W).max())
    assert approximate(W, "sss(p=6, d=2)")[1] > 1e-3


def test_error_decreases_monotonically_in_d_on_a_generic_matrix():
    W = np.random.default_rng(5).normal(size=(N, M))
    errors = [approximate(W, f"sss(p=6, d={d})")[1] for d in range(1, 13)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # Eckart-Young on each Hankel block: W[inputs < k, outputs >= k] and W[inputs > k, outputs <= k]
    # have rank <= d in any SSS matrix, so the error is at least each block's singular tail
    # beyond d; and d >= 1 keeps the diagonal blocks exactly and fits part of the rest, so it
    # beats the block diagonal of W alone
    ri, ro = np.cumsum((0,) + block_sizes(N, 6)), np.cumsum((0,) + block_sizes(M, 6))
    hankels = [W[:ri[k], ro[k]:] for k in range(1, 6)] + [W[ri[k + 1]:, :ro[k + 1]] for k in range(5)]
    norm = np.linalg.norm(W)
    for d, error in zip(range(1, 13), errors):
        tails = [np.sqrt(np.sum(np.linalg.svd(h, compute_uv=False)[d:] ** 2)) / norm for h in hankels]
        assert error >= max(tails) - 1e-12, (d, error, max(tails))
    blocks = scipy.linalg.block_diag(*[W[ri[k]:ri[k + 1], ro[k]:ro[k + 1]] for k in range(6)])
    assert errors[0] < np.linalg.norm(W - blocks) / norm
    # d at least every Hankel rank (min(n, m) suffices): exact
    assert approximate(W, f"sss(p=6, d={min(N, M)})")[1] < 1e-9


def test_one_and_two_stages():
    W = np.random.default_rng(6).normal(size=(9, 7))
    assert approximate(W, "sss(p=1, d=1)")[1] < 1e-14  # a dense copy
    values, error = approximate(W, "sss(p=2, d=4)")  # the Hankel blocks are 5x3 and 4x4
    assert error < 1e-12


def test_stage_hand_over_uses_the_hankel_fit():
    node = sss_node(4, 3, 20, 16)
    W = node.to_dense(random_values(node, seed=7))
    result = fit(W, "sum(G, n=3) | sss(p=4, d=3)")  # the last stage is fitted
    assert result.method == "sss" and result.rel_error < 1e-9


def test_composition_with_lowrank_is_fitted_by_the_generic_method():
    text, n, m = "sss(p=3, d=1) + lowrank(r=1)", 18, 12
    W = np.random.default_rng(8).normal(size=(n, m))
    result = fit(W, text)
    assert result.method == "alternating least squares"
    assert all(b <= a for a, b in zip(result.history, result.history[1:]))
    alone = approximate(W, "sss(p=3, d=1)")[1]
    assert result.rel_error < min(result.history[0], alone)
    # an exact composition is fitted closely
    node = parse(text, n, m).stages[0]
    exact = node.to_dense(random_values(node, seed=9))
    assert fit(exact, node).rel_error < 0.1 * approximate(exact, "sss(p=3, d=1)")[1]


def affine_least_squares(f, shape, target):
    """argmin_X ||target - f(X)||_F for an affine f, from its values at 0 and the unit matrices."""
    zero = f(np.zeros(shape))
    columns = []
    for i in range(math.prod(shape)):
        unit = np.zeros(math.prod(shape))
        unit[i] = 1.0
        columns.append((f(unit.reshape(shape)) - zero).ravel())
    solution = np.linalg.lstsq(np.stack(columns, axis=1), (target - zero).ravel(), rcond=None)[0]
    return solution.reshape(shape)


def test_block_solve_of_each_stage_matrix_is_the_least_squares_one():
    # SSS.solve_block solves the stages of a stack one after the other, each by its closed
    # form; the reference does the same by least squares on W probed entry by entry
    node = sss_node(4, 2, 13, 11)
    values = random_values(node, seed=15)
    target = np.random.default_rng(16).normal(size=node.shape)
    solved = 0
    for key, shape in node.param_shapes().items():
        expected = np.array(values[key])
        for i in range(shape[0]):
            def dense_with(X, i=i, key=key, expected=expected):
                stack = expected.copy()
                stack[i] = X
                return node.to_dense({**values, key: stack})
            expected[i] = affine_least_squares(dense_with, shape[1:], target)
            solved += 1
        np.testing.assert_allclose(node.solve_block(target, key, values)[key], expected, atol=1e-9, err_msg=key)
    assert solved == 4 + 3 * 4 + 2 * 2  # D on 4 stages, B C F G on 3, A E on 2


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, n, m, pattern", [
    ("sss(p=9, d=2)", 20, 8, r"sss\(p=9\) splits the \(20, 8\) operator into 9 blocks[\s\S]*use p <= 8"),
    ("sss(p=3)", 20, 8, r"sss needs the argument 'd'"),
    ("sss(d=3)", 20, 8, r"sss needs the argument 'p'"),
    ("sss(p=0, d=3)", 20, 8, r"sss's p must be an integer >= 1"),
    ("sss(p=2, d=2.5)", 20, 8, r"sss's d must be an integer >= 1"),
    ("sss(p=4, d=2, params=0.1)", 20, 8, r"either d= or params="),
    ("sss(p=8, params=0.001)", 64, 64, r"impossible budget"),
])
def test_bad_arguments_raise_decomp_error_with_caret(text, n, m, pattern):
    with pytest.raises(DecompError, match=pattern) as err:
        parse(text, n, m)
    assert text in str(err.value) and "^" in str(err.value)


def test_direct_construction_checks_its_arguments():
    with pytest.raises(ValueError, match="p <= min"):
        SSS((4, 3), key="s", p=4, d=1)
    with pytest.raises(ValueError, match="d >= 1"):
        SSS((4, 3), key="s", p=2, d=0)


# ---- the Keras layer ---------------------------------------------------------------------------

def layer_of(mode, p=P, d=D, n=N, m=M):
    layer = layers.Dense(m, W=f"sss(p={p}, d={d})", mode=mode, use_bias=False)
    layer.build((None, n))
    return layer


def layer_values(layer):
    return {k: np.asarray(ops.convert_to_numpy(v), np.float64) for k, v in layer.decomposition_variables.items()}


@pytest.mark.parametrize("mode", ["apply", "materialize"])
def test_layer_recursion_equals_x_times_dense_in_float32(mode):
    layer = layer_of(mode)
    x = np.random.default_rng(10).normal(size=(4, N)).astype("float32")
    expected = x.astype(np.float64) @ layer.node.to_dense(layer_values(layer))
    y = np.asarray(ops.convert_to_numpy(layer(x)), np.float64)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_layer_picks_the_recursion_for_a_big_matrix_at_batch_one():
    node = parse("sss(p=16, d=16)", 4096, 4096).stages[0]
    assert node.flops(1, "apply") < node.flops(1, "materialize")


@pytest.mark.parametrize("mode", ["apply", "materialize"])
def test_every_stage_matrix_gets_a_gradient(mode):
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the gradient helper here uses tf.GradientTape")
    layer = layer_of(mode)
    x = tf.constant(np.random.default_rng(11).normal(size=(3, N)).astype("float32"))
    r = tf.constant(np.random.default_rng(12).normal(size=(3, M)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) * r)
    grads = tape.gradient(loss, layer.trainable_variables)
    names = [v.path for v in layer.trainable_variables]
    assert len(names) == len(layer.node.param_shapes()) == 11  # the stacks of test_stage_shapes...
    for name, g in zip(names, grads):
        assert g is not None and np.any(np.asarray(g) != 0), f"no gradient reaches {name}"
    # and the gradient is the right one: d loss / d W = x^T r, chained through the stage matrices
    kernel = x.numpy().T.astype(np.float64) @ r.numpy().astype(np.float64)
    theta = layer_values(layer)
    rng = np.random.default_rng(13)
    for (key, variable), g in zip(layer.decomposition_variables.items(), grads):
        direction = rng.normal(size=theta[key].shape)
        eps = 1e-4
        plus = layer.node.to_dense({**theta, key: theta[key] + eps * direction})
        minus = layer.node.to_dense({**theta, key: theta[key] - eps * direction})
        expected = np.sum((plus - minus) / (2 * eps) * kernel)
        actual = float(np.sum(np.asarray(g, np.float64) * direction))
        assert abs(actual - expected) <= 1e-4 * max(1.0, abs(expected)), key


def test_decompose_replaces_a_trained_dense_layer_exactly_when_d_suffices():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(10, name="hidden", activation="relu"),
                              keras.layers.Dense(3)])
    report = {}
    small = keras_decomp.decompose(model, {"hidden": "sss(p=3, d=4)"}, report=report)  # Hankel ranks <= 4
    assert report["hidden"] < 1e-6
    x = np.random.default_rng(14).normal(size=(5, 12)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(small(x)), ops.convert_to_numpy(model(x)), atol=1e-5)
    assert math.isclose(small.layers[0].node.num_params, parse("sss(p=3, d=4)", 12, 10).num_params)


# ---- the batched apply: a few tens of ops, only the state recursion stage by stage ---------------

STEPS = {"seconds_per_op": 0.0}  # ops free: the recursion runs step by step (fewer FLOPs)
ROUNDS = {"flops_per_s": 1e300, "bytes_per_s": 1e300, "seconds_per_op": 1.0}  # only ops cost: doubling


def traced_ops(p, n=256, d=4, **constants):
    import tensorflow as tf

    from keras_decomp.operators.cost import use
    with use(**constants):
        layer = layers.Dense(n, W=f"sss(p={p}, d={d})", mode="apply", use_bias=False)
        x = tf.ones((1, n))
        graph = tf.function(layer).get_concrete_function(x).graph
    return [op.type for op in graph.get_operations() if op.type not in ("Placeholder", "Const", "NoOp", "Identity")]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="reads the traced TensorFlow graph")
def test_the_batched_apply_is_a_few_tens_of_graph_ops_two_more_per_stage():
    sixteen, thirty_two = traced_ops(16, **STEPS), traced_ops(32, **STEPS)
    # 7 variable reads, one batched product per letter, the recursion's 2-D product and add per step
    assert len(sixteen) <= 70 and sixteen.count("ReadVariableOp") == 7
    assert len(thirty_two) - len(sixteen) == 2 * 16
    assert thirty_two.count("MatMul") - sixteen.count("MatMul") == 16
    assert sixteen.count("BatchMatMulV2") == thirty_two.count("BatchMatMulV2") == 5  # D, B, F, C, G


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="reads the traced TensorFlow graph")
def test_by_doubling_a_long_recursion_is_a_few_ops_per_doubling_of_p():
    counts = {p: len(traced_ops(p, n=512, **ROUNDS)) for p in (64, 128, 256)}  # 6, 7, 8 rounds
    assert counts[256] <= 90  # stepping 255 steps would be 510 ops
    # one more round: the states' shift, product and add, the transitions' shift and product
    assert counts[128] - counts[64] == counts[256] - counts[128] == 7


@pytest.mark.parametrize("scan", ["steps", "doubling"])
@pytest.mark.parametrize("p", [3, 4, 7, 16])
def test_both_scans_equal_x_times_dense(monkeypatch, scan, p):
    monkeypatch.setattr(SSS, "scan", lambda self, batch: scan)
    node = sss_node(p, 3, 50, 37)
    values = random_values(node, seed=22, scale=0.6)
    x = np.random.default_rng(23).normal(size=(5, 50))
    expected = x @ dense_by_blocks(node, values)
    np.testing.assert_allclose(node.apply(x, values, np), expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_the_scan_is_chosen_by_its_cost():
    from keras_decomp.operators.cost import use
    with use(**ROUNDS):  # only ops cost: 2 per step against 7 per round
        assert [sss_node(p, 3, 50, 37).scan(1) for p in (7, 16)] == ["steps", "doubling"]
    with use(**STEPS):  # ops free: the fewer FLOPs of steps
        assert sss_node(16, 3, 50, 37).scan(1) == "steps"


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="converts to TFLite")
def test_the_factored_tflite_file_has_two_operators_per_stage(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from keras_decomp.export import export
    from keras_decomp.operators.cost import use
    counts = {}
    for p in (8, 16):
        model = keras.Sequential([keras.Input((256,)), layers.Dense(256, W=f"sss(p={p}, d=4)", name="s")])
        with use(**STEPS):
            report = export(model, tmp_path / f"sss{p}.tflite", mode="factored", sample=np.ones((2, 256), "float32"))
        assert report["forms"] == {"s": "factored"} and report["max_abs_diff"] < 1e-4
        counts[p] = len(Interpreter(model_path=str(tmp_path / f"sss{p}.tflite"))._get_ops_details())
    assert counts[16] <= 2 * 16 + 20 and counts[16] - counts[8] == 2 * 8


@pytest.mark.parametrize("n, m", [(250, 90), (13, 8), (64, 64)])
def test_padded_equal_blocks_are_exact_in_float32(n, m):
    # near-equal blocks padded to equal ones: the padding meets zeros and is cut off
    layer = layers.Dense(m, W="sss(p=4, d=3)", mode="apply", use_bias=False)
    x = np.random.default_rng(20).normal(size=(6, n)).astype("float32")
    y = np.asarray(ops.convert_to_numpy(layer(x)), np.float64)
    values = layer_values(layer)
    expected = x.astype(np.float64) @ dense_by_blocks(layer.node, values)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_a_composition_with_many_stages_is_still_fitted_by_alternating_least_squares():
    # a stack of transitions is of degree p - 2 in W, but SSS solves it stage by stage, exactly
    W = np.random.default_rng(21).normal(size=(30, 24))
    result = fit(W, "sss(p=6, d=2) + lowrank(r=1)")
    assert result.method == "alternating least squares"
    assert all(b <= a for a, b in zip(result.history, result.history[1:]))
    assert result.rel_error < approximate(W, "sss(p=6, d=2)")[1]
