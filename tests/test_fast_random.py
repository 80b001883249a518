"""The fast random basis F (issue 19): sum(F, n) against a slow explicit build of its draws.

The reference below builds each draw B_j entry by entry from the definition in
operators/fast_random.py (bucket of entry (p, q) = (p*cols + q) mod m, m the least m >= n
coprime with cols, signs scaled by sqrt(m/rows), then A = kron(a factors) on the left and
B = kron(b factors) on the right), from the seeded arrays only: none of the fast path's
reshapes, tiles or einsums.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_decomp import DecompError, approximate, parse

ROOT = Path(__file__).resolve().parents[1]


def node_of(text, rows, cols, seed=0, params=None):
    return parse(text, rows, cols, seed=seed, params=params).stages[0]


def reference_draws(node) -> np.ndarray:
    """(n, rows, cols): the draws of a sum(F, n) node, built one entry at a time."""
    rows, cols = node.shape
    n = node.n
    size = rows * cols
    m = next((k for k in range(n, size + 1) if math.gcd(k, cols) == 1), n)
    fixed = node.fixed_arrays()
    key = node.leaf.key

    def kron(letter):
        factors = [fixed[f"{key}.{letter}{i}"] for i in range(8) if f"{key}.{letter}{i}" in fixed]
        out = np.ones((1, 1))
        for f in factors:
            out = np.kron(out, f)
        return out

    A, B = kron("a"), kron("b")
    s = fixed[key + ".s"]
    draws = np.zeros((n, rows, cols))
    for j in range(n):
        M = np.zeros((rows, cols))
        for p in range(rows):
            for q in range(cols):
                if (p * cols + q) % m == j:
                    M[p, q] = s[p, q] * math.sqrt(m / rows)
        draws[j] = A @ M @ B
    return draws


SHAPES = [(12, 10, 7), (16, 9, 30), (6, 5, 30), (67, 4, 9), (20, 8, 1), (28, 20, 101)]


@pytest.mark.parametrize("rows,cols,n", SHAPES)
def test_to_dense_is_the_sum_of_reference_draws(rows, cols, n):
    node = node_of(f"sum(F, n={n})", rows, cols, seed=3)
    c = np.random.default_rng(1).normal(size=n)
    expected = np.tensordot(c, reference_draws(node), axes=1)
    np.testing.assert_allclose(node.to_dense({node.key: c}), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    x = np.random.default_rng(2).normal(size=(5, rows))
    np.testing.assert_allclose(node.apply(x, {**node.fixed_arrays(), node.key: c}, np), x @ expected,
                               rtol=0, atol=1e-12 * np.abs(x @ expected).max())


def test_draw_statistics_over_many_seeds():
    """Entry (p, q) of draw j over S seeds: mean 0 and mean square 1/rows within 5 standard
    errors of the sample; each draw's squared norm is cols up to the bucket rounding (m/size);
    draws of one sum exactly orthogonal; draws of different seeds nearly orthogonal
    (cos ~ N(0, 1/size): root mean square below 2/sqrt(size), largest of the S(S-1)/2 pairs
    below 6/sqrt(size))."""
    rows, cols, n, S = 24, 16, 40, 300
    size = rows * cols
    m = 41  # the least m >= 40 coprime with 16
    draws = np.stack([reference_draws(node_of(f"sum(F, n={n})", rows, cols, seed=s)) for s in range(S)])
    assert draws.shape == (S, n, rows, cols)
    entries = draws[:, :, 5, 7]  # one entry, S seeds x n draws, independent across seeds
    per_seed = entries.mean(axis=1)
    assert abs(per_seed.mean()) <= 5 * per_seed.std(ddof=1) / math.sqrt(S)
    squares = (entries ** 2).mean(axis=1)
    assert abs(squares.mean() - 1 / rows) <= 5 * squares.std(ddof=1) / math.sqrt(S)
    flat = draws.reshape(S, n, size)
    gram = np.einsum("sik,sjk->sij", flat, flat)
    np.testing.assert_allclose(gram.diagonal(axis1=1, axis2=2) / cols, 1.0, atol=m / size + 1e-12)
    off = gram - np.einsum("sij,ij->sij", gram, np.eye(n))
    assert np.abs(off).max() <= 1e-12 * cols
    unit = flat[:, 0] / np.linalg.norm(flat[:, 0], axis=1, keepdims=True)
    cos = (unit @ unit.T)[np.triu_indices(S, 1)]
    assert np.sqrt((cos ** 2).mean()) <= 2 / math.sqrt(size)
    assert np.abs(cos).max() <= 6 / math.sqrt(size)


def test_one_draw_looks_gaussian_across_entries():
    """A single F (4096 entries): the entries' mean, variance and fourth moment are those of
    N(0, 1/rows) within 5 standard errors (kurtosis 3 +- 5 * sqrt(24 / size))."""
    rows, cols = 64, 64
    W = node_of("F", rows, cols, seed=1).to_dense() * math.sqrt(rows)
    size = W.size
    assert abs(W.mean()) <= 5 / math.sqrt(size)
    assert abs(W.var() - 1) <= 5 * math.sqrt(2 / size)
    assert abs(np.mean(W ** 4) / W.var() ** 2 - 3) <= 5 * math.sqrt(24 / size)


_DRAWS = "import numpy as np, sys; from keras_decomp import parse; " \
         "node = parse('sum(F, n=7)', 9, 6, seed=int(sys.argv[1])).stages[0]; " \
         "np.save(sys.argv[2], node.to_dense({node.key: np.arange(1.0, 8.0)}))"


def test_same_seed_same_draws_in_another_process_other_seed_others(tmp_path):
    out = tmp_path / "w.npy"
    subprocess.run([sys.executable, "-c", _DRAWS, "3", str(out)], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    other = np.load(out)
    node = node_of("sum(F, n=7)", 9, 6, seed=3)
    here = node.to_dense({node.key: np.arange(1.0, 8.0)})
    assert np.array_equal(here, other)
    node4 = node_of("sum(F, n=7)", 9, 6, seed=4)
    assert np.abs(node4.to_dense({node4.key: np.arange(1.0, 8.0)}) - here).max() > 0.1 * np.abs(here).max()
    seeded = node_of("sum(F(seed=1), n=7)", 9, 6, seed=3)
    assert not np.allclose(seeded.to_dense({seeded.key: np.ones(7)}), node.to_dense({node.key: np.ones(7)}))


def test_least_squares_matches_lstsq():
    rng = np.random.default_rng(0)
    for rows, cols, n in [(12, 10, 7), (16, 9, 30), (6, 5, 30), (20, 8, 160)]:
        node = node_of(f"sum(F, n={n})", rows, cols)
        W = rng.normal(size=(rows, cols))
        P = reference_draws(node).reshape(n, -1).T
        expected = np.linalg.lstsq(P, W.ravel(), rcond=None)[0]
        values, err = approximate(W, f"sum(F, n={n})")
        np.testing.assert_allclose(values[node.key], expected, atol=1e-10 * np.abs(expected).max())
        assert err == pytest.approx(np.linalg.norm(P @ expected - W.ravel()) / np.linalg.norm(W), abs=1e-12)


@pytest.mark.parametrize("text,left", [("DCT[:k] sum(F, n=20)", "DCT"), ("Q sum(F, n=20)", "Q")])
def test_least_squares_between_fixed_factors_matches_lstsq(text, left):
    """Conjugate gradients through the transform and its adjoint (exact in one step for the
    orthonormal DCT columns; a Gaussian Q needs more) against lstsq on the design matrix."""
    rows, inner, cols = 10, 6, 8
    node = node_of(text, rows, cols, params={"k": inner})
    fast = node.factors[1]
    L = node.factors[0].to_dense()
    P = np.stack([(L @ B).ravel() for B in reference_draws(fast)], axis=1)
    W = np.random.default_rng(5).normal(size=(rows, cols))
    expected = np.linalg.lstsq(P, W.ravel(), rcond=None)[0]
    values, _ = approximate(W, text, params={"k": inner})
    np.testing.assert_allclose(values[fast.key], expected, atol=1e-8 * np.abs(expected).max())


def test_least_squares_of_a_sum_with_rank_one_terms_matches_lstsq():
    node = node_of("sum(F, n=12) + sum(R, n=3)", 8, 6)
    fast, rank1 = node.terms
    R = rank1.to_dense
    columns = [B.ravel() for B in reference_draws(fast)]
    columns += [R({rank1.key: np.eye(3)[j]}).ravel() for j in range(3)]
    W = np.random.default_rng(6).normal(size=(8, 6))
    expected = np.linalg.lstsq(np.stack(columns, axis=1), W.ravel(), rcond=None)[0]
    values, _ = approximate(W, "sum(F, n=12) + sum(R, n=3)")
    got = np.concatenate([values[fast.key], values[rank1.key]])
    np.testing.assert_allclose(got, expected, atol=1e-9 * np.abs(expected).max())


def test_staged_hand_over_is_exact_for_the_same_draws_and_least_squares_otherwise():
    first = parse("sum(F, n=30) | sum(F, n=30) | sum(F, n=60)", 16, 12)
    c = np.random.default_rng(7).normal(size=30)
    W = first.stages[0].to_dense({first.stages[0].key: c})
    values, err = approximate(W, first.stages[1])
    assert err <= 1e-12
    np.testing.assert_allclose(values[first.stages[1].key], c, atol=1e-12)
    wider = first.stages[2]
    P = reference_draws(wider).reshape(60, -1).T
    values, err = approximate(W, wider)
    expected = np.linalg.lstsq(P, W.ravel(), rcond=None)[0]
    np.testing.assert_allclose(values[wider.key], expected, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("text,match,caret", [
    ("sum(F, n=0)", r"sum's n must be an integer >= 1, got 0", "n=0"),
    ("sum(F, n=121)", r"sum\(F, n=121\) needs at most 120 draws on a 12x10 matrix", "n=121"),
    ("sum(F, n=k)", r"sum\(F, n=500\) needs at most 120 draws", "n=k"),
])
def test_bad_sizes_are_refused_with_a_caret(text, match, caret):
    with pytest.raises(DecompError, match=match) as info:
        parse(text, 12, 10, params={"k": 500})
    lines = str(info.value).splitlines()
    assert lines[1].strip() == text
    assert lines[2].index("^") == lines[1].index(caret)


def test_memory_is_one_matrix_of_signs_whatever_n():
    for n in (100, 2000, 20000):
        node = node_of(f"sum(F, n={n})", 4096, 4096)
        assert node.num_fixed == 4096 * 4096 + 4 * 64 * 64
        assert node.num_params == n
    with pytest.raises(DecompError, match="would need"):
        parse("sum(G, n=2000)", 4096, 4096)


def test_gradient_of_every_coefficient_matches_central_differences():
    import keras
    import tensorflow as tf

    from keras_decomp.layers import Dense

    x = np.random.default_rng(8).normal(size=(4, 15))
    r = np.random.default_rng(9).normal(size=(4, 6))
    for mode in ("apply", "materialize"):
        layer = Dense(6, W="sum(F, n=11)", use_bias=False, mode=mode, dtype="float64")
        layer.build((None, 15))
        (variable,) = layer.decomposition_variables.values()

        def loss(layer=layer):
            return tf.reduce_sum(tf.sin(layer(x)) * r)

        with tf.GradientTape() as tape:
            value = loss()
        grad = tape.gradient(value, variable).numpy()
        c0 = variable.numpy()
        numeric = []
        for j in range(11):
            h = 1e-6 * np.eye(11)[j]
            variable.assign(c0 + h)
            plus = float(loss())
            variable.assign(c0 - h)
            numeric.append((plus - float(loss())) / 2e-6)
        variable.assign(c0)
        np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-8)
        assert keras.backend.backend() == "tensorflow"


@pytest.mark.parametrize("W,units", [("sum(F, n=50)", 24), ("DCT[:k] sum(F, n=600) + sum(R, n=3)", 40)])
def test_dense_layer_is_x_times_the_reference_matrix_and_survives_save_load(W, units, tmp_path):
    import keras

    from keras_decomp.layers import Dense

    rows = 30
    x = np.random.default_rng(10).normal(size=(5, rows)).astype("float32")
    model = keras.Sequential([keras.Input((rows,)), Dense(units, W=W, use_bias=False, params={"k": 20})])
    layer = model.layers[0]
    values = {k: v.numpy().astype(np.float64) for k, v in layer.decomposition_variables.items()}
    node = layer.node
    fast = next(sub for sub in node.walk() if type(sub).__name__ == "FastSum")
    draws = reference_draws(fast)
    expected = np.tensordot(values[fast.key], draws, axes=1)
    if node is not fast:  # DCT[:k] F-sum + rank-1 terms (their collapse is tested in test_layers)
        dct = np.cos(np.pi * np.outer(2 * np.arange(rows) + 1, np.arange(20)) / (2 * rows)) * np.sqrt(2 / rows)
        dct[:, 0] = np.sqrt(1 / rows)
        rank1 = node.terms[1]
        expected = dct @ expected + rank1.to_dense({rank1.key: values[rank1.key]})
    y = model(x).numpy()
    np.testing.assert_allclose(y, x.astype(np.float64) @ expected, rtol=0, atol=1e-5 * np.abs(y).max())
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_array_equal(again(x).numpy(), y)


def test_conv2d_kernel_is_the_reference_sum():
    import keras

    from keras_decomp.layers import Conv2D

    x = np.random.default_rng(11).normal(size=(2, 7, 7, 3)).astype("float32")
    layer = Conv2D(5, 3, W="sum(F, n=40)", padding="same", use_bias=False)
    y = layer(x).numpy()
    c = layer.decomposition_variables[layer.node.key].numpy().astype(np.float64)
    kernel = np.tensordot(c, reference_draws(layer.node), axes=1).reshape(3, 3, 3, 5)
    expected = keras.ops.conv(x, kernel.astype("float32"), padding="same").numpy()
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
def test_export_folds_sum_of_f_and_the_factored_form_agrees(tmp_path):
    """Folded W is rows*cols numbers, the factored form the signs, factors and coefficients on
    top: auto folds.  Both TFLite files agree with Keras to float32 rounding."""
    import keras

    from keras_decomp.export import export
    from keras_decomp.layers import Dense

    model = keras.Sequential([keras.Input((64,)), Dense(32, W="sum(F, n=50)", name="f")])
    x = np.random.default_rng(12).normal(size=(16, 64)).astype("float32")
    reports = {mode: export(model, tmp_path / f"{mode}.tflite", mode=mode, sample=x)
               for mode in ("auto", "factored")}
    assert reports["auto"]["forms"] == {"f": "folded"}
    assert reports["auto"]["parameters_stored"] == 64 * 32 + 32
    assert reports["factored"]["parameters_stored"] == 64 * 32 + 64 * 64 + 32 * 32 + 50 + 32  # one factor each
    for report in reports.values():
        assert report["max_abs_diff"] <= 1e-5 * max(1.0, float(np.abs(model(x)).max())), report
