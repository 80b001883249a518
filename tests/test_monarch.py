"""Tests of monarch(b=) (operators/structures/monarch.py, fitting/monarch.py).

The reference is built here by hand, independently of the node's apply: the block-diagonal
matrices of L and R and the permutation matrix that sends the first factor's flat output
f = i q + t to the second factor's block f mod b, position f div b, multiplied as dense
matrices.  The fit is checked against the per-block SVD optimum computed on that hand-built
structure, and against a local optimiser started from many points.  The shared layer harness
(tests/layer_cases.py, rows "monarch*") runs Dense and Conv2D in every mode on TF and JAX.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import scipy.optimize

from keras_decomp import DecompError, approximate, layers, parse

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
SHAPES = [  # (n, m, b): q = b; q != b; padded inputs and outputs; rectangular both ways; b = 1
    (16, 16, 4), (12, 8, 2), (12, 10, 4), (10, 6, 3), (6, 20, 3), (20, 6, 2), (9, 9, 1), (64, 64, 8)]


def sizes(n, m, b):
    p, s = -(-n // b), -(-m // b)
    return p, min(p, s), s


def permutation(b, q) -> np.ndarray:
    """(b q, b q): row f (first factor's output i q + t) has its 1 at the second factor's input."""
    P = np.zeros((b * q, b * q))
    for f in range(b * q):
        P[f, (f % b) * q + f // b] = 1.0
    return P


def block_diagonal(blocks) -> np.ndarray:
    rows, cols = blocks.shape[1:]
    out = np.zeros((len(blocks) * rows, len(blocks) * cols))
    for i, block in enumerate(blocks):
        out[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] = block
    return out


def by_hand(L, R, n, m) -> np.ndarray:
    b, _, q = L.shape
    return (block_diagonal(L) @ permutation(b, q) @ block_diagonal(R))[:n, :m]


def node_and_values(n, m, b, seed=0):
    node = parse(f"monarch(b={b})", n, m).stages[0]
    return node, node.init(np.random.default_rng(seed))


@pytest.mark.parametrize("n, m, b", SHAPES)
def test_counts_and_dense_form_by_hand(n, m, b):
    node, v = node_and_values(n, m, b)
    p, q, s = sizes(n, m, b)
    assert node.num_params == b * p * q + b * q * s
    L, R = v[node.key + ".l"], v[node.key + ".r"]
    assert L.shape == (b, p, q) and R.shape == (b, q, s)
    np.testing.assert_allclose(node.to_dense(v), by_hand(L, R, n, m), rtol=0, atol=1e-12)
    x = np.random.default_rng(1).normal(size=(5, n))
    np.testing.assert_allclose(node.apply(x, {**v}, np), x @ by_hand(L, R, n, m), rtol=0, atol=1e-12)


def test_square_count_is_2_n_squared_over_b():
    assert parse("monarch(b=64)", 4096, 4096).stages[0].num_params == 2 * 4096 ** 2 // 64
    assert parse("monarch(b=4)", 1024, 2048).stages[0].num_params == 1024 * (1024 + 2048) // 4


def test_params_budget_picks_the_largest_count_within_it():
    n = m = 4096
    allowed = 0.1 * n * m
    counts = {}
    for b in range(1, n + 1):
        p, q, s = sizes(n, m, b)
        if (b - 1) * p < n and (b - 1) * s < m:
            counts[b] = b * q * (p + s)
    best = max(c for c in counts.values() if c <= allowed)
    node = parse("monarch(params=0.1)", n, m).stages[0]
    assert node.num_params == best and node.blocks == min(b for b, c in counts.items() if c == best)
    assert parse("monarch(params=1)", 8, 8).stages[0].blocks == 2  # b=1: two dense 8x8 factors, 2x dense


@pytest.mark.parametrize("n, m, b", SHAPES)
def test_fit_recovers_a_monarch_matrix_exactly(n, m, b):
    node, v = node_and_values(n, m, b, seed=3)
    W = by_hand(v[node.key + ".l"], v[node.key + ".r"], n, m)
    values, err = approximate(W, node)
    assert err < 1e-12
    np.testing.assert_allclose(by_hand(values[node.key + ".l"], values[node.key + ".r"], n, m), W, atol=1e-12)


def optimum(W, b) -> float:
    """The least error of any monarch(b=) matrix, from the hand-built structure: the pairs of blocks
    are read off the mask of BlockDiag(1) P BlockDiag(1), each block keeps its rank (= shared entries)
    best singular values."""
    n, m = W.shape
    p, q, s = sizes(n, m, b)
    ones = by_hand(np.ones((b, p, q)), np.ones((b, q, s)), b * p, b * s)  # block (i, j) = its rank
    padded = np.zeros((b * p, b * s))
    padded[:n, :m] = W
    lost = 0.0
    for i in range(b):
        for j in range(b):
            rank = int(round(ones[i * p, j * s]))
            sigma = np.linalg.svd(padded[i * p:(i + 1) * p, j * s:(j + 1) * s], compute_uv=False)
            lost += float(np.sum(sigma[rank:] ** 2))
    return np.sqrt(lost) / np.linalg.norm(W)


@pytest.mark.parametrize("n, m, b", SHAPES)
def test_fit_reaches_the_per_block_optimum(n, m, b):
    W = np.random.default_rng(4).normal(size=(n, m))
    node = parse(f"monarch(b={b})", n, m).stages[0]
    values, err = approximate(W, node)
    assert abs(err - optimum(W, b)) < 1e-12
    if b > 1 and min(n, m) > b:
        assert err > 1e-3  # a random W is not a monarch matrix: the check above is not 0 == 0


@pytest.mark.parametrize("n, m, b", [(6, 6, 2), (6, 5, 3), (5, 7, 2)])
def test_no_local_search_beats_the_closed_form(n, m, b):
    W = np.random.default_rng(5).normal(size=(n, m))
    node = parse(f"monarch(b={b})", n, m).stages[0]
    _, err = approximate(W, node)
    p, q, s = sizes(n, m, b)
    split = b * p * q

    def loss(theta):
        L, R = theta[:split].reshape(b, p, q), theta[split:].reshape(b, q, s)
        return np.linalg.norm(by_hand(L, R, n, m) - W) / np.linalg.norm(W)

    rng = np.random.default_rng(6)
    found = [scipy.optimize.minimize(loss, rng.normal(size=node.num_params), method="BFGS").fun
             for _ in range(12)]
    assert len(found) == 12
    assert min(found) >= err - 1e-6  # never better than the optimum
    assert min(found) <= err + 1e-3  # and the optimiser does find it: the two agree


@pytest.mark.parametrize("text, n, m, pattern", [
    ("monarch(b=0)", 8, 8, r"monarch's b must be an integer >= 1, got 0"),
    ("monarch(b=9)", 8, 16, r"monarch\(b=9\) needs at least 9 inputs and 9 outputs, got 8x16"),
    ("monarch(b=4)", 9, 16, r"monarch\(b=4\) cannot pad 9 inputs: blocks of ceil\(9/4\) = 3 leave block 4 "
                            r"with padding only[\s\S]*use b=3"),
    ("monarch(b=4)", 16, 9, r"monarch\(b=4\) cannot pad 9 outputs"),
    ("monarch(b=2.5)", 8, 8, r"monarch's b must be an integer >= 1, got 2.5"),
    ("monarch", 8, 8, r"monarch needs the argument 'b'"),
    ("monarch(params=0.01)", 8, 8, r"impossible budget: the smallest monarch has 16 trainable parameters"),
])
def test_bad_arguments_are_refused_with_a_caret(text, n, m, pattern):
    with pytest.raises(DecompError, match=pattern) as info:
        parse(text, n, m)
    assert "^" in str(info.value)


# ---- the layers, against the hand-built matrix ---------------------------------------------

@pytest.mark.parametrize("n, m, b", [(16, 16, 4), (12, 10, 4), (12, 8, 2)])
def test_layer_output_and_gradients_against_the_hand_built_matrix(n, m, b):
    layer = layers.Dense(m, W=f"monarch(b={b})", seed=1, mode="apply", use_bias=False)
    layer.build((None, n))
    key = layer.node.key
    L, R = (np.asarray(layer.decomposition_variables[key + k].numpy(), np.float64) for k in (".l", ".r"))
    W = by_hand(L, R, n, m)
    x = np.random.default_rng(2).normal(size=(7, n)).astype("float32")
    r = np.random.default_rng(3).normal(size=(7, m))
    y = np.asarray(keras.ops.convert_to_numpy(layer(x)), np.float64)
    np.testing.assert_allclose(y, x @ W, rtol=0, atol=1e-5 * np.abs(x @ W).max())
    # loss = <x W, r>: dW = x' r on the (n, m) part; through W = (BD(L) P BD(R))[:n, :m]
    p, q, s = sizes(n, m, b)
    G = np.zeros((b * p, b * s))
    G[:n, :m] = x.astype(np.float64).T @ r
    PR = permutation(b, q) @ block_diagonal(R)
    LP = block_diagonal(L) @ permutation(b, q)
    dL = np.stack([(G @ PR.T)[i * p:(i + 1) * p, i * q:(i + 1) * q] for i in range(b)])
    dR = np.stack([(LP.T @ G)[j * q:(j + 1) * q, j * s:(j + 1) * s] for j in range(b)])
    grads = _gradients(layer, x, r)
    for name, expected in ((".l", dL), (".r", dR)):
        got = grads[key + name]
        assert got is not None and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _gradients(layer, x, r) -> dict:
    keys = list(layer.decomposition_variables)
    variables = [layer.decomposition_variables[k] for k in keys]
    r = r.astype("float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) * r)
        return {k: None if g is None else g.numpy().astype(np.float64)
                for k, g in zip(keys, tape.gradient(loss, variables))}
    import jax

    def f(trainable):
        y, _ = layer.stateless_call(trainable, [v.value for v in layer.non_trainable_variables], x)
        return (y * r).sum()

    grads = jax.grad(f)([v.value for v in layer.trainable_variables])
    by_path = {v.path: np.asarray(g, np.float64) for v, g in zip(layer.trainable_variables, grads)}
    return {k: by_path.get(layer.decomposition_variables[k].path) for k in keys}


def test_conv2d_applies_monarch_to_the_patches():
    layer = layers.Conv2D(10, (2, 2), W="monarch(b=4)", seed=1, mode="apply", use_bias=False)
    layer.build((None, 5, 5, 3))
    key = layer.node.key
    L, R = (np.asarray(layer.decomposition_variables[key + k].numpy(), np.float64) for k in (".l", ".r"))
    kernel = by_hand(L, R, 12, 10).reshape(2, 2, 3, 10)
    x = np.random.default_rng(4).normal(size=(2, 5, 5, 3)).astype("float32")
    ref = keras.layers.Conv2D(10, (2, 2), use_bias=False)
    ref.build((None, 5, 5, 3))
    ref.set_weights([kernel.astype("float32")])
    expected = np.asarray(keras.ops.convert_to_numpy(ref(x)), np.float64)
    np.testing.assert_allclose(np.asarray(keras.ops.convert_to_numpy(layer(x))), expected,
                               rtol=0, atol=1e-5 * np.abs(expected).max())


def test_save_and_load_keep_the_outputs(tmp_path):
    model = keras.Sequential([keras.Input((12,)), layers.Dense(10, W="monarch(b=4)", seed=2, name="mon")])
    x = np.random.default_rng(5).normal(size=(4, 12)).astype("float32")
    before = np.asarray(model(x))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(np.asarray(again(x)), before)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the JAX run is started from the TensorFlow one")
def test_layer_checks_on_jax_in_a_subprocess():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "layer_output or conv2d or save_and_load"],
                         cwd=ROOT, env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "5 passed" in run.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("n, m, b", [(12, 10, 4), (10, 6, 3), (16, 16, 4)])
def test_data_norm_first_factor_step_is_the_least_squares_optimum(n, m, b):
    """With the second factor held, the conjugate-gradient step over the first factor reaches
    the error of numpy.linalg.lstsq on the design of every first-factor entry (X E(e_k))."""
    from keras_decomp.fitting.monarch import _first_factor

    rng = np.random.default_rng(n + m + b)
    node = parse(f"monarch(b={b})", n, m).stages[0]
    values = node.init(rng)
    l_key, r_key = node.key + ".l", node.key + ".r"
    X = rng.normal(size=(200, n)) * np.linspace(0.2, 2.0, n)
    W = rng.normal(size=(n, m))
    shape = values[l_key].shape
    columns = []
    for k in range(int(np.prod(shape))):
        probe = np.zeros(int(np.prod(shape)))
        probe[k] = 1.0
        columns.append((X @ node.to_dense({**values, l_key: probe.reshape(shape)})).ravel())
    design = np.stack(columns, axis=1)
    best = np.linalg.lstsq(design, (X @ W).ravel(), rcond=None)[0]
    optimum = np.linalg.norm(X @ W - X @ node.to_dense({**values, l_key: best.reshape(shape)}))
    L = _first_factor(W, node, X.T @ X, np.zeros(shape), values[r_key], iterations=10 * design.shape[1])
    got = np.linalg.norm(X @ W - X @ node.to_dense({**values, l_key: L}))
    assert got == pytest.approx(optimum, rel=1e-6)


def test_data_norm_sweeps_never_raise_the_error_and_beat_the_two_starts():
    from keras_decomp.fitting.data_norm import whitening
    from keras_decomp.fitting.monarch import als_sweeps, svd_fit

    rng = np.random.default_rng(3)
    node = parse("monarch(b=4)", 24, 20).stages[0]
    X = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24))
    W = rng.normal(size=(24, 20))
    R = whitening(X.T @ X, damping=0.0)
    start = svd_fit(W, node)
    _, history = als_sweeps(W, node, R, start, sweeps=8, tol=0.0)
    assert len(history) == 9
    assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.9 * history[0]
    fitted = approximate(W, node, gram=X.T @ X, damping=0.0)[0]
    data_error = np.linalg.norm(X @ (W - node.to_dense(fitted))) / np.linalg.norm(X @ W)
    assert data_error < 0.95 * history[0]  # the whitened fit ends below the weight fit's start
