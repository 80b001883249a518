"""sparse(q=, s=) and butterfly() against dense matrices built here by hand, in numpy, from
their supports and values -- never by the code that the layer runs (``materialize``).

A factor F (rows, cols) of y = x F reads, for output c, the inputs support[c, j] with weights
values[c, j]: F[support[c, j], c] = values[c, j] (an index >= rows reads the zero padding).
The scale multiplies the first factor; W = scale * F_0 F_1 ... F_{q-1}.  The butterfly supports
are also built here from their definition (output c of factor k reads inputs c and c xor 2^k),
and with the Walsh-Hadamard values the product must be scipy's Sylvester Hadamard matrix.

The keras_decomp.layers.Dense output, in apply and in materialize mode, is compared with
x @ W_hand + bias in float32 (1e-5 of the largest output).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.linalg

from keras_decomp import layers, parse

SEED = 7
TOL64 = 1e-12
TOL32 = 1e-5  # float32, relative to the largest output


def factor_dense(support: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    """The (rows, cols) factor with F[support[c, j], c] = values[c, j], written as a loop."""
    cols, s = support.shape
    f = np.zeros((rows, cols))
    for c in range(cols):
        for j in range(s):
            i = int(support[c, j])
            if i < rows:  # an index equal to rows reads the zero padding input
                f[i, c] += values[c, j]
    return f


def key_of(node) -> str:
    """'sparse.0.0' / 'butterfly.0.0': the prefix of the node's arrays."""
    (scale,) = [k for k in node.param_shapes() if k.endswith(".scale")]
    return scale[: -len(".scale")]


def random_values(node, seed=1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape) for k, shape in node.param_shapes().items()}


def sparse_dense(node, fixed, values, n, m, q) -> np.ndarray:
    """W = scale * F_0 ... F_{q-1} for sparse(q, s) on (n, m): factors (n, n) ... (n, m)."""
    key = key_of(node)
    shapes = [(n, n)] * (q - 1) + [(n, m)]
    w = np.eye(n)
    for i, (rows, _) in enumerate(shapes):
        w = w @ factor_dense(fixed[f"{key}.support{i}"], values[f"{key}.f{i}"], rows)
    return values[f"{key}.scale"] * w


def butterfly_supports(size: int) -> list[np.ndarray]:
    """Output c of factor k reads inputs c and c xor 2^k, for every c < size."""
    c = np.arange(size)
    return [np.stack([c, c ^ (1 << k)], axis=1) for k in range(size.bit_length() - 1)]


def butterfly_dense(key, values, n, m) -> np.ndarray:
    """The top-left (n, m) block of scale * B_0 ... B_{L-1}, each B_k (N, N) with N the power
    of two >= max(n, m); outputs a factor does not have get zero weights."""
    size = max(2, 1 << (max(n, m) - 1).bit_length())
    w = np.eye(size)
    for k, support in enumerate(butterfly_supports(size)):
        v = np.zeros((size, 2))
        given = values[f"{key}.f{k}"]
        v[: len(given)] = given
        w = w @ factor_dense(support, v, size)
    return values[f"{key}.scale"] * w[:n, :m]


SPARSE = [  # (q, s, n, m)
    (3, 2, 12, 8),
    (2, 3, 6, 10),   # wide: the last factor (6, 10)
    (1, 20, 16, 8),  # one factor; s capped at the 16 inputs: a dense factor
    (4, 1, 9, 9),
]
BUTTERFLY = [(16, 16), (12, 8), (5, 7), (8, 16), (2, 2)]


@pytest.mark.parametrize("q, s, n, m", SPARSE)
def test_sparse_to_dense_is_the_product_of_hand_built_factors(q, s, n, m):
    node = parse(f"sparse(q={q}, s={s})", n, m, seed=SEED).stages[0]
    fixed, values = node.fixed_arrays(), random_values(node)
    key = key_of(node)
    # the supports: s distinct inputs per output, inside the factor's rows
    for i in range(q):
        support = fixed[f"{key}.support{i}"]
        rows = n
        assert support.shape == (n if i < q - 1 else m, min(s, rows))
        assert all(len(set(row)) == support.shape[1] for row in support.tolist())
        assert support.min() >= 0 and support.max() < rows
    expected = sparse_dense(node, fixed, values, n, m, q)
    np.testing.assert_allclose(node.to_dense(values), expected, rtol=0, atol=TOL64 * np.abs(expected).max())
    # the zeros are where no support points: each output reads at most s inputs per factor
    if q == 1:
        assert np.count_nonzero(expected) == m * min(s, n)


@pytest.mark.parametrize("n, m", BUTTERFLY)
def test_butterfly_to_dense_is_the_product_of_hand_built_factors(n, m):
    node = parse("butterfly", n, m, seed=SEED).stages[0]
    values = random_values(node)
    expected = butterfly_dense(key_of(node), values, n, m)
    atol = TOL64 * np.abs(expected).max()
    np.testing.assert_allclose(node.to_dense(values), expected, rtol=0, atol=atol)
    # both ways of applying it (butterfly.py picks one by the batch): x = I gives W
    v = {**node.fixed_arrays(), **values}
    ways = [getattr(node, name) for name in ("apply_flips", "apply_blocks") if hasattr(node, name)]
    for way in ways:
        np.testing.assert_allclose(way(np.eye(n), v, np), expected, rtol=0, atol=atol, err_msg=way.__name__)
    assert len(ways) == 2 or n * m <= 4  # (a 2x2 butterfly is one factor)


@pytest.mark.parametrize("size", [2, 4, 16, 64])
def test_butterfly_with_hadamard_values_is_sylvester_hadamard(size):
    """y_c = x_c + x_{c^2^k} where bit k of c is 0, x_{c^2^k} - x_c where it is 1 (the supports
    read [c, c xor 2^k] in that order): every level applies [[1, 1], [1, -1]] along bit k."""
    node = parse("butterfly", size, size, seed=SEED).stages[0]
    key = key_of(node)
    c = np.arange(size)
    values = {f"{key}.scale": np.array(1.0)}
    for k in range(size.bit_length() - 1):
        bit = (c >> k) & 1
        values[f"{key}.f{k}"] = np.stack([np.where(bit == 0, 1.0, -1.0), np.ones(size)], axis=1)
    np.testing.assert_array_equal(node.to_dense(values), scipy.linalg.hadamard(size))


def layer_output(text, n, m, values, mode, x):
    layer = layers.Dense(m, W=text, seed=SEED, mode=mode)
    layer.build((None, n))
    for key, variable in layer.decomposition_variables.items():
        variable.assign(values[key].astype("float32"))
    layer.bias.assign(np.linspace(-1.0, 1.0, m).astype("float32"))
    return np.asarray(keras.ops.convert_to_numpy(layer(x)), np.float64)


def assert_close(actual, expected, tol):
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


LAYER_CASES = [(f"sparse(q={q}, s={s})", n, m, q) for q, s, n, m in SPARSE[:2]] + \
              [("butterfly", n, m, None) for n, m in BUTTERFLY[:2]]


@pytest.mark.parametrize("text, n, m, q", LAYER_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}" for c in LAYER_CASES])
def test_layer_output_is_x_times_the_hand_built_matrix_in_both_modes(text, n, m, q):
    node = parse(text, n, m, seed=SEED).stages[0]
    values = random_values(node, seed=4)
    # the layer holds float32 values: the reference is built from the same rounded numbers
    rounded = {k: v.astype("float32").astype(np.float64) for k, v in values.items()}
    if q is None:
        w = butterfly_dense(key_of(node), rounded, n, m)
    else:
        w = sparse_dense(node, node.fixed_arrays(), rounded, n, m, q)
    for batch in (1, 5):  # butterfly: flips at batch 1, block products at 5
        x = np.random.default_rng(batch).normal(size=(batch, n)).astype("float32")
        expected = x.astype(np.float64) @ w + np.linspace(-1.0, 1.0, m)
        for mode in ("apply", "materialize"):
            assert_close(layer_output(text, n, m, values, mode, x), expected, TOL32)
