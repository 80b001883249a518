"""Tests of sketch(k=, l=) (keras_decomp/structures/sketch.py): counts by hand, the dense form
against a construction written out here from the paper's definition (mode products on the
4-D kernel for SK-CONV), the unbiased estimator and its variance, the least-squares fit
against numpy.linalg.lstsq, costs, and the Conv2D layer's kernel geometry.

The Keras layer checks (apply, gradients, saving) are rows of tests/layer_cases.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from keras_decomp import DecompError, parse
from keras_decomp.operators import bases
from keras_decomp.fitting.approximate import approximate, fit
from keras_decomp.fitting.sketch import compare, estimator, least_squares
from keras_decomp.operators.structures.sketch import Sketch


def sketch(text, n, m, spatial=None, seed=0):
    params = {} if spatial is None else {"spatial": spatial}
    node = parse(text, n, m, params=params, seed=seed).stages[0]
    assert isinstance(node, Sketch)
    return node


def target(n, m, seed=0):
    return np.random.default_rng(seed).normal(size=(n, m))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- counts and shapes, by hand ---------------------------------------------------------------

@pytest.mark.parametrize("text, n, m, spatial, s1, s2, u1, u2", [
    # Dense: S1_i (n, k), S2_i (k, m) for each of the l draws, side by side
    ("sketch(k=16, l=2)", 784, 10, None, (784, 32), (32, 10), (32, 10), (784, 32)),
    ("sketch(k=3)", 12, 8, None, (12, 3), (3, 8), (3, 8), (12, 3)),
    # Conv2D 5x5, cin=32, cout=64: S1_i (25*32, k), S2_i (25*k, 64), U2_i (32, k)
    ("sketch(k=4, l=2)", 25 * 32, 64, 25, (800, 8), (200, 64), (8, 64), (32, 8)),
])
def test_shapes_and_counts_by_hand(text, n, m, spatial, s1, s2, u1, u2):
    node = sketch(text, n, m, spatial)
    key = node.key
    assert node.param_shapes() == {key + ".s1": s1, key + ".s2": s2}
    assert node.num_params == s1[0] * s1[1] + s2[0] * s2[1]
    fixed = node.fixed_shapes()
    assert sorted(fixed.values()) == sorted([u1, u2])
    assert node.num_fixed == u1[0] * u1[1] + u2[0] * u2[1]


def test_counts_of_the_design_example():
    # l*k*(n + m) = 2*16*(784 + 10)
    assert parse("W = sketch(k=16, l=2)", 784, 10).num_params == 25408


@pytest.mark.parametrize("text, n, m, spatial, k", [
    ("sketch(params=0.2)", 100, 50, None, 6),          # k*(100+50) <= 1000
    ("sketch(params=0.2, l=2)", 100, 50, None, 3),     # 2k*150 <= 1000
    ("sketch(params=0.1)", 800, 64, 25, 2),            # k*(800 + 25*64) <= 5120
])
def test_params_budget_picks_the_largest_k(text, n, m, spatial, k):
    node = sketch(text, n, m, spatial)
    assert node.k == k
    budget = float(text.split("params=")[1].split(")")[0].split(",")[0]) * n * m
    assert node.num_params <= budget < dataclasses.replace(node, k=k + 1).num_params


@pytest.mark.parametrize("text, spatial, pattern", [
    ("sketch", None, r"sketch needs the argument 'k'"),
    ("sketch(k=2, r=1)", None, r"sketch has no argument 'r'[\s\S]*usage: sketch\(k="),
    ("sketch(k=0)", None, r"sketch's k must be an integer >= 1"),
    ("sketch(k=2, spatial=5)", None, r"sketch\(spatial=5\) needs a number of rows divisible by 5, got 12"),
    ("sketch(k=2)", 5, r"sketch\(spatial=5\) needs a number of rows divisible by 5"),
    ("sketch(params=0.01)", None, r"impossible budget: the smallest sketch"),
    ("sketch(k=2, params=0.5)", None, r"either k= or params="),
])
def test_errors(text, spatial, pattern):
    with pytest.raises(DecompError, match=pattern):
        sketch(text, 12, 8, spatial)


# ---- the dense form against the paper's definition ------------------------------------------

def signs(seed, path, rows, cols):
    """A (rows, cols) matrix of +-1/sqrt(cols), as bases.sign draws it."""
    return bases.sign(bases.generator(seed, path), rows, cols)


def paper_kernel(node, values, kh, kw):
    """K = 1/(2l) sum_i (S1_i x_4 U1_i + S2_i x_3 U2_i) on the 4-D kernel, then reshaped to the
    (kh*kw*cin, cout) matrix; with kh = kw = 1 it is SK-FC: 1/(2l) sum_i (S1_i U1_i + U2_i S2_i).
    The U are drawn here from the node's seed and rng key, not taken from the node."""
    n, m = node.shape
    k, l, cin = node.k, node.l, n // (kh * kw)
    s1 = values[node.key + ".s1"].reshape(kh, kw, cin, l, k)
    s2 = values[node.key + ".s2"].reshape(kh, kw, l, k, m)  # rows in (position, draw, k) order
    K = np.zeros((kh, kw, cin, m))
    for i in range(l):
        u1 = signs(node.seed, node.rng_key + (1, i), m, k).T  # (k, m), entries +-1/sqrt(k)
        u2 = signs(node.seed, node.rng_key + (2, i), cin, k)  # (cin, k)
        K += np.einsum("abcr,rd->abcd", s1[..., i, :], u1)  # output-channel mode
        K += np.einsum("cr,abrd->abcd", u2, s2[:, :, i])    # input-channel mode
    return K.reshape(n, m) / (2 * l)


@pytest.mark.parametrize("text, n, m, kernel", [
    ("sketch(k=3, l=2)", 12, 8, (1, 1)),
    ("sketch(k=1)", 5, 7, (1, 1)),
    ("sketch(k=2, l=3)", 2 * 3 * 4, 5, (2, 3)),
    ("sketch(k=5, l=1)", 3 * 3 * 2, 4, (3, 3)),
])
def test_to_dense_matches_the_paper_construction(text, n, m, kernel):
    node = sketch(text, n, m, kernel[0] * kernel[1], seed=3)
    values = node.init(np.random.default_rng(1))
    np.testing.assert_allclose(node.to_dense(values), paper_kernel(node, values, *kernel), rtol=0, atol=1e-12)


def test_sign_entries_and_their_scale():
    node = sketch("sketch(k=4, l=2)", 18, 6, spatial=9)
    for array in node.fixed_arrays().values():
        np.testing.assert_array_equal(np.abs(array), 0.5)  # 1/sqrt(k)


def test_fixed_arrays_come_from_the_seed_and_draws_are_nested():
    a = sketch("sketch(k=3, l=2)", 10, 6, seed=5).fixed_arrays()
    b = sketch("sketch(k=3, l=2)", 10, 6, seed=5).fixed_arrays()
    c = sketch("sketch(k=3, l=2)", 10, 6, seed=6).fixed_arrays()
    one = sketch("sketch(k=3, l=1)", 10, 6, seed=5).fixed_arrays()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        assert not np.array_equal(a[key], c[key])
    u1, u2 = (key for key in sorted(a))
    np.testing.assert_array_equal(a[u1][:3], one[u1])      # the first draw of l=2 is l=1's
    np.testing.assert_array_equal(a[u2][:, :3], one[u2])


@pytest.mark.parametrize("spatial", [1, 4])
def test_apply_equals_x_times_dense(spatial):
    node = sketch("sketch(k=2, l=3)", 4 * 5, 7, spatial)
    values = node.init(np.random.default_rng(0))
    x = np.random.default_rng(1).normal(size=(6, 20))
    v = {**node.fixed_arrays(), **values}
    y = node.apply(x, v, np)
    np.testing.assert_allclose(y, x @ node.to_dense(values), rtol=0, atol=1e-12)
    from keras import ops  # the same code on tensors: both paths of apply and materialize
    tensors = {key: ops.convert_to_tensor(a, "float64") for key, a in v.items()}
    x64 = ops.convert_to_tensor(x, "float64")
    np.testing.assert_allclose(ops.convert_to_numpy(node.apply(x64, tensors, ops)), y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ops.convert_to_numpy(node.materialize(tensors, ops)), node.to_dense(values),
                               rtol=0, atol=1e-10)


def test_flops_by_hand():
    node = sketch("sketch(k=2, l=3)", 4 * 5, 7, spatial=4)  # n=20, m=7, l*k=6, cin=5
    b = 10
    apply = 2 * b * 20 * 6 + 2 * b * 6 * 7 + 2 * b * 20 * 6 + 2 * b * (4 * 6) * 7 + 2 * b * 7
    build = 2 * 20 * 6 * 7 + 4 * (2 * 5 * 6 * 7) + 2 * 20 * 7
    assert node.flops(b, "apply") == apply
    assert node.flops(b, "materialize") == build + 2 * b * 20 * 7
    big = sketch("sketch(k=8)", 1024, 1024)
    assert big.flops(1, "apply") < big.flops(1, "materialize")  # one row: apply without W


def test_init_from_scratch_has_glorot_scale():
    n, m = 300, 200
    node = sketch("sketch(k=16, l=2)", n, m)
    W = node.to_dense(node.init(np.random.default_rng(0)))
    assert abs(W.var() / (2.0 / (n + m)) - 1) < 0.1


# ---- the unbiased estimator ---------------------------------------------------------------------

def estimates(node, W, seeds):
    """The dense form of the estimator for each seed (fresh signs each time)."""
    out = []
    for seed in seeds:
        drawn = dataclasses.replace(node, seed=seed)
        out.append(drawn.to_dense(estimator(W, drawn)))
    return np.array(out)


@pytest.mark.parametrize("text, n, m, spatial", [
    ("sketch(k=8, l=3)", 24, 16, None),
    ("sketch(k=4, l=3)", 4 * 6, 8, 4),  # SK-CONV, 2x2 kernel, cin=6
])
def test_estimator_is_unbiased_over_400_seeds(text, n, m, spatial):
    W = target(n, m)
    node = sketch(text, n, m, spatial)
    draws = estimates(node, W, range(400))
    assert rel(draws.mean(axis=0), W) < 0.05
    assert rel(draws[0], W) > 0.3  # a single draw is far off: the mean does the work


def test_estimator_variance_falls_with_l():
    W = target(20, 12)

    def spread(l):
        draws = estimates(sketch(f"sketch(k=4, l={l})", 20, 12), W, range(100))
        return float(np.mean(np.sum((draws - W) ** 2, axis=(1, 2))) / np.sum(W ** 2))

    one, two, four = spread(1), spread(2), spread(4)
    assert four < two < one
    assert four < 0.5 * one  # the variance goes as 1/l


# ---- least squares --------------------------------------------------------------------------------

def design_matrix_fit(W, node):
    """argmin ||W - E(s1, s2)|| by numpy.linalg.lstsq on the probed design matrix."""
    fixed, shapes = node.fixed_arrays(), node.param_shapes()
    zero = {key: np.zeros(shape) for key, shape in shapes.items()}
    columns = []
    for key, shape in shapes.items():
        for index in range(int(np.prod(shape))):
            probe = np.zeros(int(np.prod(shape)))
            probe[index] = 1.0
            columns.append(node.materialize({**fixed, **zero, key: probe.reshape(shape)}, np).ravel())
    theta, *_ = np.linalg.lstsq(np.stack(columns, axis=1), W.ravel(), rcond=None)
    values, start = {}, 0
    for key, shape in shapes.items():
        values[key] = theta[start:start + int(np.prod(shape))].reshape(shape)
        start += int(np.prod(shape))
    return values


@pytest.mark.parametrize("text, n, m, spatial", [
    ("sketch(k=2, l=2)", 12, 8, None),
    ("sketch(k=1, l=3)", 9, 6, None),
    ("sketch(k=1, l=2)", 4 * 5, 6, 4),
    ("sketch(k=2)", 9 * 3, 5, 9),
])
def test_least_squares_is_the_lstsq_optimum_and_beats_the_estimator(text, n, m, spatial):
    W = target(n, m, seed=2)
    node = sketch(text, n, m, spatial)
    fits = compare(W, node)
    reference = rel(node.to_dense(design_matrix_fit(W, node)), W)
    assert fits.least_squares_error == pytest.approx(reference, abs=1e-10)
    assert rel(node.to_dense(fits.least_squares), W) == pytest.approx(fits.least_squares_error, abs=1e-12)
    assert fits.least_squares_error <= fits.estimator_error
    assert rel(node.to_dense(estimator(W, node)), W) == pytest.approx(fits.estimator_error, abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_least_squares_is_never_worse_than_the_estimator(seed):
    rng = np.random.default_rng(seed)
    n, m, k, l = (int(v) for v in rng.integers(1, 12, size=4))
    spatial = int(rng.choice([1, 2, 4]))
    W = rng.normal(size=(n * spatial, m))
    fits = compare(W, sketch(f"sketch(k={k}, l={l})", n * spatial, m, spatial, seed=seed))
    assert fits.least_squares_error <= fits.estimator_error + 1e-12


def test_least_squares_is_exact_when_the_sketches_span_the_outputs():
    W = target(30, 6)
    node = sketch("sketch(k=6, l=2)", 30, 6)
    u1 = node.fixed_arrays()[node.keys["U1"]]
    assert np.linalg.matrix_rank(u1) == 6  # the rows of U1 span every output
    assert compare(W, node).least_squares_error < 1e-10


def test_approximate_uses_least_squares():
    W = target(40, 12)
    node = sketch("sketch(k=3, l=2)", 40, 12)
    result = fit(W, node)
    assert result.method == "sketch"
    values, error = approximate(W, "sketch(k=3, l=2)")
    assert error == pytest.approx(compare(W, node).least_squares_error, abs=1e-12)
    for key, value in least_squares(W, node).items():
        np.testing.assert_allclose(values[key], value, atol=1e-12)


def test_compare_takes_text_and_rejects_other_structures():
    W = target(10, 4)
    # the text is parsed at W's shape with the seed: the same figure as the node, which is
    # the lstsq optimum over the node's design matrix
    node = sketch("sketch(k=2)", 10, 4, seed=1)
    expected = rel(node.to_dense(design_matrix_fit(W, node)), W)
    assert compare(W, "sketch(k=2)", seed=1).least_squares_error == pytest.approx(expected, abs=1e-10)
    assert compare(W, "sketch(k=2)", seed=2).least_squares_error != pytest.approx(expected, abs=1e-6)
    with pytest.raises(DecompError, match="compare needs a sketch"):
        compare(W, "lowrank(r=2)")


def test_staged_sketches_hand_over():
    d = parse("sketch(k=2) | sketch(k=4, l=2)", 16, 8)
    first, second = d.stages
    W = first.to_dense(first.init(np.random.default_rng(0)))
    _, error = approximate(W, second)
    assert error <= compare(W, second).estimator_error


# ---- the layers -------------------------------------------------------------------------------------

def test_conv2d_binds_the_kernel_geometry_and_dense_does_not():
    from keras_decomp import layers

    conv = layers.Conv2D(6, (3, 2), W="sketch(k=2)")
    conv.build((None, 8, 8, 5))
    assert conv.node.spatial == 6 and conv.node.channels == 5
    assert conv.count_params() == 2 * (6 * 5 + 6 * 6) + 6  # k*(n + spatial*m) + bias
    flat = layers.Conv2D(6, (3, 2), W="sketch(k=2, spatial=1)")
    flat.build((None, 8, 8, 5))
    assert flat.node.spatial == 1
    dense = layers.Dense(6, W="sketch(k=2)")
    dense.build((None, 30))
    assert dense.node.spatial == 1
    assert "spatial" not in conv.get_config()["params"]  # bound at build time, not stored


def test_decompose_a_trained_conv_model_with_sketches():
    import keras

    from keras_decomp import decompose

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(8, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(5, name="fc")])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    report = {}
    # conv: l*k = 4 < cout = 8, so the U1 term alone cannot fit, but U2 (3, 4) spans the 3 input
    # channels, so the U2 term fits exactly if and only if it acts on the channel mode of every
    # kernel position (the (kh, kw, cin) row order).  fc: l*k = 2*m, the U1 term fits exactly.
    small = decompose(model, {"conv": "sketch(k=2, l=2)", "fc": "sketch(k=10)"}, report=report)
    assert small.get_layer("conv").node.spatial == 9
    assert max(report.values()) < 1e-6
    np.testing.assert_allclose(small(x), model(x), atol=1e-4)
    flat = decompose(model, {"conv": "sketch(k=2, l=2, spatial=1)"}, report=report)
    assert report["conv"] > 0.1  # sketching the reshaped kernel as a plain matrix is not exact
    assert flat.get_layer("conv").node.spatial == 1
