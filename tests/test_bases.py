"""Tests of keras_decomp.bases: the fixed matrices, against scipy and their definitions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import scipy.stats
from hypothesis import given, strategies as st

from keras_decomp.operators import bases
from keras_decomp.errors import ArgumentError

TOL = 1e-12
ROOT = Path(__file__).resolve().parents[1]

# libjpeg's jpeg_natural_order: zig-zag position -> natural index row*8 + col, where row is the
# vertical frequency (v in the JPEG standard's S_vu) and col the horizontal one.
JPEG_NATURAL_ORDER = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
]


def rng(key=(0,)):
    return bases.generator(0, key)


# --- DCT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17])
def test_dct_is_orthonormal_and_matches_scipy(n):
    d = bases.dct(n)
    assert d.shape == (n, n) and d.dtype == np.float64
    np.testing.assert_allclose(d.T @ d, np.eye(n), atol=TOL)
    np.testing.assert_allclose(d @ d.T, np.eye(n), atol=TOL)
    # scipy transforms each column e_i of eye(n) along axis 0: entry [k, i] is frequency k of e_i.
    np.testing.assert_allclose(d, scipy.fft.dct(np.eye(n), norm="ortho", axis=0).T, atol=TOL)
    x = np.random.default_rng(n).standard_normal((4, n))
    np.testing.assert_allclose(x @ d, scipy.fft.dct(x, norm="ortho"), atol=TOL)
    np.testing.assert_allclose(d[:, 0], 1 / np.sqrt(n), atol=TOL)


def test_dct_truncation_keeps_lowest_frequencies():
    x = np.random.default_rng(1).standard_normal((3, 10))
    np.testing.assert_allclose(x @ bases.dct(10)[:, :4], scipy.fft.dct(x, norm="ortho")[:, :4], atol=TOL)


# --- zig-zag and DCT2 -----------------------------------------------------------------------

def test_zigzag_8x8_is_jpeg_order():
    order = bases.zigzag(8, 8)
    assert order[:7] == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3)]
    assert [u * 8 + v for u, v in order] == JPEG_NATURAL_ORDER


@pytest.mark.parametrize("h, w, expected", [
    (1, 1, [(0, 0)]),
    (1, 3, [(0, 0), (0, 1), (0, 2)]),
    (3, 1, [(0, 0), (1, 0), (2, 0)]),
    (2, 3, [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)]),
    (3, 2, [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (2, 1)]),
])
def test_zigzag_small_grids(h, w, expected):
    assert bases.zigzag(h, w) == expected


@given(st.integers(1, 12), st.integers(1, 12))
def test_zigzag_walks_every_pair_once_by_antidiagonal(h, w):
    order = bases.zigzag(h, w)
    assert sorted(order) == [(u, v) for u in range(h) for v in range(w)]
    sums = [u + v for u, v in order]
    assert sums == sorted(sums)
    for (u0, v0), (u1, v1) in zip(order, order[1:]):
        if u0 + v0 == u1 + v1:  # inside a diagonal: one step, up-right on even ones, down-left on odd
            assert (u1 - u0, v1 - v0) == ((1, -1) if (u0 + v0) % 2 else (-1, 1))


@pytest.mark.parametrize("h, w", [(1, 1), (2, 2), (3, 1), (4, 6), (5, 3), (8, 8)])
def test_dct2_is_orthonormal_and_matches_scipy_in_zigzag_order(h, w):
    d = bases.dct2(h, w)
    assert d.shape == (h * w, h * w)
    np.testing.assert_allclose(d.T @ d, np.eye(h * w), atol=TOL)
    images = np.random.default_rng(h * 10 + w).standard_normal((5, h, w))
    coefficients = scipy.fft.dctn(images, norm="ortho", axes=(1, 2))
    rows, cols = zip(*bases.zigzag(h, w))
    expected = coefficients[:, list(rows), list(cols)]
    np.testing.assert_allclose(images.reshape(5, h * w) @ d, expected, atol=TOL)


def test_dct2_columns_are_separable_basis_images():
    d, order = bases.dct2(4, 6), bases.zigzag(4, 6)
    for t in (0, 1, 2, 7, 23):
        u, v = order[t]
        np.testing.assert_allclose(d[:, t], np.outer(bases.dct(4)[:, u], bases.dct(6)[:, v]).ravel(),
                                   atol=TOL)


# --- random bases ---------------------------------------------------------------------------

def test_gaussian_scale():
    g = bases.gaussian(rng(), 400, 300)
    assert g.shape == (400, 300) and g.dtype == np.float64
    assert abs(g.mean()) < 0.01
    assert abs((g ** 2).mean() * 400 - 1) < 0.03
    assert abs((g ** 2).sum(axis=0).mean() - 1) < 0.03  # columns of unit norm on average


def test_sign_entries_are_exact_and_equiprobable():
    s = bases.sign(rng(), 250, 400)
    assert s.shape == (250, 400)
    assert set(np.unique(s).tolist()) == {-1 / np.sqrt(400), 1 / np.sqrt(400)}
    assert abs((s > 0).mean() - 0.5) < 0.01
    assert set(np.unique(bases.sign(rng(), 3, 4)).tolist()) <= {-0.5, 0.5}


@pytest.mark.parametrize("n, k", [(1, 1), (5, 3), (64, 10)])
def test_permutation_subsamples_distinct_inputs(n, k):
    perm = bases.permutation(rng(), n)
    assert perm.dtype == np.int64 and perm.shape == (n,)
    assert sorted(perm.tolist()) == list(range(n))
    p = bases.permutation_matrix(perm)
    assert p.dtype == np.float64
    assert all(p[perm[j], j] == 1 for j in range(n)) and p.sum() == n
    np.testing.assert_array_equal(p.T @ p, np.eye(n))
    x = np.random.default_rng(2).standard_normal((3, n))
    np.testing.assert_array_equal(x @ p[:, :k], x[:, perm[:k]])


@pytest.mark.parametrize("perm", [[0, 0, 1], [1, 2, 3], [[0, 1], [1, 0]], [0.0, 1.0], []])
def test_permutation_matrix_rejects_non_permutations(perm):
    with pytest.raises(ArgumentError, match="not a permutation index vector"):
        bases.permutation_matrix(np.array(perm))


def test_rank1_is_an_outer_product_with_the_documented_scales():
    u, v = bases.rank1(rng(), 3, 5)
    assert u.shape == (3,) and v.shape == (5,)
    assert np.linalg.matrix_rank(np.outer(u, v)) == 1
    u, v = bases.rank1(rng(), 20000, 20000)
    assert abs(u.var() - 1) < 0.05
    assert abs(v.var() * 20000 - 1) < 0.05


@pytest.mark.parametrize("seed, key", [(0, (0,)), (3, (1, 2)), (12345, ())])
def test_diagonal_is_the_documented_standard_normal_stream(seed, key):
    """d = N(0, 1) draws of PCG64 seeded by SeedSequence(seed, spawn_key=key), generated here
    without keras_decomp: the fixed arrays of a seed must never change."""
    independent = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))
    d = bases.diagonal(bases.generator(seed, key), 6)
    assert d.shape == (6,) and d.dtype == np.float64
    np.testing.assert_array_equal(d, independent.standard_normal(6))


def test_diagonal_entries_are_standard_normal():
    n = 20000
    d = bases.diagonal(rng(), n)
    # 5 standard errors: mean sd 1/sqrt(n), variance sd sqrt(2/n)
    assert abs(d.mean()) < 5 / np.sqrt(n)
    assert abs(d.var() - 1) < 5 * np.sqrt(2 / n)
    assert scipy.stats.kstest(d, "norm").pvalue > 1e-4
    other = bases.diagonal(rng((1,)), n)  # another key: an independent draw
    assert abs(np.corrcoef(d, other)[0, 1]) < 5 / np.sqrt(n)


def test_the_D_basis_is_the_diagonal_matrix_of_its_draw():
    from keras_decomp import parse
    node = parse("D", 5, 5, seed=4).stages[0]
    (d,) = node.fixed_arrays().values()
    np.testing.assert_array_equal(node.to_dense(), np.diag(d))
    np.testing.assert_array_equal(d, bases.diagonal(bases.generator(4, node.rng_key), 5))


def test_identity():
    np.testing.assert_array_equal(bases.identity(3), np.eye(3))


# --- Hadamard -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
def test_hadamard_is_sylvester_orthogonal_symmetric(n):
    h = bases.hadamard(n)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=TOL)
    np.testing.assert_array_equal(np.abs(h), np.full((n, n), 1 / np.sqrt(n)))
    i = np.arange(n)
    parity = np.array([[bin(a & b).count("1") % 2 for b in i] for a in i])
    np.testing.assert_array_equal(np.sign(h), 1 - 2 * parity)  # (-1)^popcount(i & j)


@pytest.mark.parametrize("shape", [(1,), (8,), (3, 16), (2, 3, 32), (1, 1024)])
def test_fwht_equals_matrix_product(shape):
    x = np.random.default_rng(3).standard_normal(shape)
    y = bases.fwht(x)
    assert y.shape == x.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, x @ bases.hadamard(shape[-1]), atol=TOL)
    np.testing.assert_allclose(bases.fwht(y), x, atol=TOL)  # H is its own inverse


def test_fwht_dtypes():
    x = np.arange(8)
    np.testing.assert_allclose(bases.fwht(x), x @ bases.hadamard(8), atol=TOL)
    assert bases.fwht(x).dtype == np.float64
    x32 = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
    assert bases.fwht(x32).dtype == np.float32
    np.testing.assert_allclose(bases.fwht(x32), x32.astype(np.float64) @ bases.hadamard(16), atol=1e-6)


@pytest.mark.parametrize("n, lower, upper", [(3, 2, 4), (5, 4, 8), (6, 4, 8), (12, 8, 16), (100, 64, 128)])
def test_hadamard_needs_a_power_of_two(n, lower, upper):
    message = (rf"H needs a power-of-2 size, got {n}\n"
               rf"use a size of {lower} or {upper} \(e\.g\. slice or pad the input\), or another basis")
    with pytest.raises(ArgumentError, match=message):
        bases.hadamard(n)
    with pytest.raises(ArgumentError, match=message):
        bases.fwht(np.ones((2, n)))


# --- validation and caching -----------------------------------------------------------------

SIZED = [
    lambda s: bases.identity(s),
    lambda s: bases.dct(s),
    lambda s: bases.zigzag(s, 2),
    lambda s: bases.zigzag(2, s),
    lambda s: bases.dct2(s, 2),
    lambda s: bases.dct2(2, s),
    lambda s: bases.gaussian(rng(), s, 2),
    lambda s: bases.gaussian(rng(), 2, s),
    lambda s: bases.sign(rng(), s, 2),
    lambda s: bases.sign(rng(), 2, s),
    lambda s: bases.permutation(rng(), s),
    lambda s: bases.rank1(rng(), s, 2),
    lambda s: bases.rank1(rng(), 2, s),
    lambda s: bases.diagonal(rng(), s),
    lambda s: bases.hadamard(s),
]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3", None])
@pytest.mark.parametrize("make", SIZED)
def test_bad_sizes_raise_argument_error(make, bad):
    bases.dct(1), bases.hadamard(1)  # cached first: True must not be served from the cache as 1
    with pytest.raises(ArgumentError, match=r"must be an integer >= 1, got"):
        make(bad)


def test_numpy_integer_sizes_are_accepted():
    np.testing.assert_array_equal(bases.dct(np.int64(4)), bases.dct(4))
    assert bases.gaussian(rng(), np.int32(3), np.int64(2)).shape == (3, 2)


@pytest.mark.parametrize("seed, key", [(-1, ()), (0, (-1,)), (1.5, ()), (0, (1, "a")), (True, ())])
def test_generator_rejects_bad_seeds_and_keys(seed, key):
    with pytest.raises(ArgumentError, match=r"must be an integer >= 0"):
        bases.generator(seed, key)


def test_fwht_rejects_a_scalar():
    with pytest.raises(ArgumentError, match="at least one axis"):
        bases.fwht(np.float64(1.0))


@pytest.mark.parametrize("make", [lambda: bases.dct(5), lambda: bases.dct2(3, 4), lambda: bases.hadamard(8)])
def test_cached_arrays_are_read_only(make):
    a = make()
    assert make() is a
    before = a.copy()
    with pytest.raises(ValueError, match="read-only"):
        a[0, 0] = 7.0
    np.testing.assert_array_equal(make(), before)


def test_zigzag_returns_a_fresh_list():
    order = bases.zigzag(3, 3)
    order.append((9, 9))
    order[0] = (5, 5)
    assert bases.zigzag(3, 3)[0] == (0, 0) and len(bases.zigzag(3, 3)) == 9


# --- determinism ----------------------------------------------------------------------------

RANDOM = {
    "gaussian": lambda g: bases.gaussian(g, 6, 4),
    "sign": lambda g: bases.sign(g, 6, 4),
    "permutation": lambda g: bases.permutation(g, 30),
    "rank1": lambda g: np.concatenate(bases.rank1(g, 6, 4)),
    "diagonal": lambda g: bases.diagonal(g, 6),
}


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_and_key_same_draws_else_different(name):
    draw = RANDOM[name]
    np.testing.assert_array_equal(draw(bases.generator(3, (1, 2))), draw(bases.generator(3, (1, 2))))
    for seed, key in [(3, (1, 3)), (3, (2, 1)), (3, (1,)), (4, (1, 2))]:
        assert not np.array_equal(draw(bases.generator(3, (1, 2))), draw(bases.generator(seed, key)))


def test_draws_are_the_same_in_another_process():
    code = ("import hashlib; from keras_decomp.operators import bases; "
            "print(hashlib.sha256(bases.gaussian(bases.generator(0, (3, 1)), 7, 5).tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True)
    here = hashlib.sha256(bases.gaussian(bases.generator(0, (3, 1)), 7, 5).tobytes()).hexdigest()
    assert result.stdout.strip() == here
