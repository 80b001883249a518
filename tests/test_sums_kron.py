"""Sums of structured draws stored compactly, the memory guard counting what they store, and
kron with its factors sized from the outer shape (keras_decomp/operators/memory.py,
operators/structures/registry.py ``_draws``, operators/structures/kron.py).

References are built independently: rank-1 sums from each draw's own u and v, Kronecker
products with ``numpy.kron``.
"""

from __future__ import annotations

import numpy as np
import pytest

from keras_decomp import DecompError, layers, parse
from keras_decomp.errors import ShapeError

GIB = 2 ** 30


@pytest.fixture
def one_gib(monkeypatch):
    """A memory limit that does not depend on the machine: 1 GiB = 134 M float64 numbers."""
    monkeypatch.setenv("KERAS_DECOMP_MAX_BYTES", str(GIB))


# ---- the memory guard ---------------------------------------------------------------------------

def test_four_hundred_rank_one_terms_at_4096_are_their_vectors(one_gib):
    node = parse("sum(R, n=400)", 4096, 4096).stages[0]
    assert node.num_params == 400
    assert node.num_fixed == 400 * (4096 + 4096) == 3_276_800  # U and V, not 400 dense matrices
    assert sorted(node.fixed_shapes().values()) == [(400, 4096), (400, 4096)]


@pytest.mark.parametrize("text, n, m", [
    ("sum(D, n=2000)", 4096, 4096),  # 2000 diagonals: 8 M numbers
    ("sum(tile(D, n=8), n=100)", 4096, 8 * 4096),  # 100 x 8 diagonals side by side: 3.3 M
    ("sum(R, n=400) + sum(D, n=400)", 4096, 4096),
])
def test_sums_of_vectors_are_accepted_at_4096(one_gib, text, n, m):
    node = parse(text, n, m).stages[0]
    assert node.num_params + node.num_fixed < 10_000_000


@pytest.mark.parametrize("text, n, m, need", [
    ("sum(G, n=400)", 4096, 4096, "6,710,886,400"),  # 400 dense Gaussians: 50 GiB
    ("sum(G dense, n=10)", 4096, 4096, "335,544,320"),  # each draw: its G and its dense (and W)
    ("sum(sum(R, n=100), n=100)", 4096, 4096, "1,677,721,600"),  # 10,000 generic draws of the inner sum
])
def test_what_would_not_fit_is_still_refused(one_gib, text, n, m, need):
    with pytest.raises(ShapeError, match=rf"would need {need} numbers") as err:
        parse(text, n, m)
    assert "^" in str(err.value)


def test_rank_one_terms_are_refused_when_even_their_vectors_do_not_fit(monkeypatch):
    monkeypatch.setenv("KERAS_DECOMP_MAX_BYTES", str(16 * 2 ** 20))  # 2 M numbers
    with pytest.raises(ShapeError, match=r"sum\(n=400\) of 4096x4096 terms would need 3,276,800 numbers"):
        parse("sum(R, n=400)", 4096, 4096)


def test_a_sum_of_rank_one_terms_is_u_diag_c_v_in_the_layer():
    n, m, terms = 48, 40, 30
    layer = layers.Dense(m, W=f"sum(R, n={terms})", use_bias=False, seed=5)
    x = np.random.default_rng(0).normal(size=(3, n)).astype("float32")
    y = np.asarray(layer(x), np.float64)
    c = np.asarray(layer.decomposition_variables[layer.node.key], np.float64)
    # each draw generates its own u and v from its seed, apart from the stacked arrays
    W = np.zeros((n, m))
    for coefficient, draw in zip(c, layer.node.draws):
        arrays = draw.generate_fixed()
        W += coefficient * np.outer(arrays[draw.key + ".u"], arrays[draw.key + ".v"])
    expected = x.astype(np.float64) @ W
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert len(layer.node.children()) == 0  # collapsed: no draw is applied on its own


def test_the_4096_layer_builds_and_runs(one_gib):
    layer = layers.Dense(4096, W="sum(R, n=400)")
    y = layer(np.ones((2, 4096), "float32"))
    assert tuple(y.shape) == (2, 4096) and layer.count_params() == 400 + 4096
    assert layer.node.choose(128) == "apply"  # x U^T, times c, then V: never the 4096 x 4096 W


# ---- kron sized from the outer shape ----------------------------------------------------------

@pytest.mark.parametrize("text, n, m, a, b", [
    ("kron(dense, dense)", 4096, 4096, (64, 64), (64, 64)),
    ("kron(dense, dense)", 784, 10, (28, 2), (28, 5)),  # the largest divisor <= sqrt: 28, 2
    ("kron(dense, dense)", 12, 8, (3, 2), (4, 4)),
    ("kron(dense, dense)", 13, 8, (1, 2), (13, 4)),  # a prime side cannot be split
    ("kron(dense, dense, rows=64, cols=16)", 4096, 1024, (64, 16), (64, 64)),
    ("kron(dense, dense, rows=8)", 64, 64, (8, 8), (8, 8)),
    ("kron(DCT2(h=4, w=4), dense)", 64, 32, (16, 16), (4, 2)),
    ("kron(dense, DCT2(h=2, w=2))", 8, 12, (2, 3), (4, 4)),
    ("kron(H, dense)", 16, 8, (2, 2), (8, 4)),  # a square factor: near-square of gcd(16, 8)
    ("kron(dense, H, cols=2)", 16, 8, (4, 2), (4, 4)),
])
def test_factor_shapes(text, n, m, a, b):
    node = parse(text, n, m).stages[0]
    assert (node.a.shape, node.b.shape) == (a, b)


@pytest.mark.parametrize("text, n, m", [
    ("kron(dense, dense)", 12, 8),
    ("kron(dense, lowrank(r=1), rows=2, cols=4)", 12, 8),
    ("kron(G, dense)", 16, 16),
])
def test_kron_is_numpy_kron_of_its_factors(text, n, m):
    node = parse(text, n, m).stages[0]
    values = {k: np.random.default_rng(1).normal(size=s) for k, s in node.param_shapes().items()}
    full = {**node.fixed_arrays(), **values}
    expected = np.kron(node.a.materialize(full, np), node.b.materialize(full, np))
    np.testing.assert_allclose(node.to_dense(values), expected, rtol=0, atol=1e-12)
    x = np.random.default_rng(2).normal(size=(3, n))
    np.testing.assert_allclose(node.apply(x, full, np), x @ expected, rtol=0, atol=1e-12)


def test_kron_of_two_trainable_factors_in_a_layer():
    layer = layers.Dense(64, W="kron(dense, dense)", use_bias=False)
    x = np.random.default_rng(3).normal(size=(4, 64)).astype("float32")
    y = np.asarray(layer(x), np.float64)
    a, b = (np.asarray(layer.decomposition_variables[f.key], np.float64) for f in (layer.node.a, layer.node.b))
    assert a.shape == b.shape == (8, 8) and layer.count_params() == 2 * 64
    expected = x.astype(np.float64) @ np.kron(a, b)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("text, n, m, pattern", [
    ("kron(dense, dense, rows=5)", 12, 8, r"kron: the first factor's 5 rows do not divide the operator's 12"),
    ("kron(dense, dense, cols=3)", 12, 8, r"kron: the first factor's 3 cols do not divide the operator's 8"),
    # the first factor's 2 columns (I[:2]) before the square I could divide by them (found by test_property)
    ("kron(I[:2], I)", 1, 1, r"kron: the first factor's 2 cols do not divide the operator's 1"),
    ("kron(DCT2(h=2, w=2), dense, rows=2)", 8, 8, r"rows disagree: 2 from rows=2, 4 from the first factor's shape"),
    ("kron(dense, dense, depth=2)", 12, 8, r"kron has no argument 'depth'"),
    ("kron(dense, dense, rows=0)", 12, 8, r"kron's rows must be an integer >= 1"),
    ("kron(dense)", 12, 8, r"kron takes 2 expression argument\(s\), got 1"),
])
def test_bad_kron_arguments_raise_with_a_caret(text, n, m, pattern):
    with pytest.raises(DecompError, match=pattern) as err:
        parse(text, n, m)
    assert "^" in str(err.value)
