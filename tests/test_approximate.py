"""Tests of keras_decomp.approximate against independent references: numpy.linalg.lstsq on a
design matrix the test builds itself, the Eckart-Young bound, monotone ALS, the gradient
fallback, ill-conditioned systems, refused targets and the nested draws of staged sums.

numpy only: nothing here imports TensorFlow (one test checks that in a fresh process).
"""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import numpy as np
import pytest

from keras_decomp.fitting.approximate import approximate, fit
from keras_decomp.errors import DecompError
from keras_decomp.language.parse import parse

approx = importlib.import_module("keras_decomp.fitting.approximate")


def node_of(text, n, m, params=None, fixed=None):
    return parse(text, n, m, params=params, fixed=fixed).stages[-1]


def target(n, m, seed=0):
    return np.random.default_rng(seed).normal(size=(n, m))


def probed_design(node):
    """(design matrix, offset): column j is E(e_j) - E(0), e_j the j-th parameter entry set
    to 1 and all others to 0, from the node's dense form (``to_dense``) only."""
    shapes = node.param_shapes()
    zero = {k: np.zeros(s) for k, s in shapes.items()}
    offset = node.to_dense(zero)
    columns = []
    for key, shape in shapes.items():
        for index in range(math.prod(shape)):
            probe = np.zeros(math.prod(shape))
            probe[index] = 1.0
            columns.append((node.to_dense({**zero, key: probe.reshape(shape)}) - offset).ravel())
    return np.stack(columns, axis=1), offset


def lstsq_error(W, design, offset=0.0):
    """The relative error of numpy.linalg.lstsq's solution of design @ theta = vec(W - offset)."""
    rhs = (W - offset).ravel()
    theta, *_ = np.linalg.lstsq(design, rhs, rcond=None)
    return float(np.linalg.norm(design @ theta - rhs) / np.linalg.norm(W))


def relative_difference(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# ---- least squares == numpy.linalg.lstsq ------------------------------------------------

LINEAR = [
    # (expression, n, m, params)
    ("sum(G, n=8)", 12, 9, None),
    ("sum(G, n=5) + sum(R, n=7)", 12, 9, None),
    ("DCT[:k] dense", 16, 6, {"k": 5}),
    ("G[:k] dense G", 10, 8, {"k": 4}),  # one trainable factor between fixed ones
    ("(A1*a + B1*b)(DCT[:k])", 12, 8, {"k": 8}),
    ("diag", 7, 5, None),
    ("diag", 5, 7, None),
    ("sum(G, n=6) - 2 * sum(D, n=3) G", 9, 9, None),
    ("sum(tile(D, n=2), n=5)", 6, 12, None),
    ("A1 * a + diag'", 6, 5, None),
]


@pytest.mark.parametrize("text,n,m,params", LINEAR, ids=[c[0] for c in LINEAR])
def test_least_squares_error_equals_lstsq(text, n, m, params):
    node = node_of(text, n, m, params)
    W = target(n, m)
    result = fit(W, node)
    assert result.method == "least squares"
    design, offset = probed_design(node)
    expected = lstsq_error(W, design, offset)
    # a real fit, not a trivial one: neither exact nor only as good as all parameters zero
    assert 1e-3 < expected < (1 - 1e-6) * np.linalg.norm(W - offset) / np.linalg.norm(W)
    assert relative_difference(result.rel_error, expected) < 1e-6
    # the values reproduce the error they report
    assert relative_difference(approx.rel_error(W, node, result.values), expected) < 1e-6


def test_one_factor_between_fixed_ones_matches_the_kronecker_design():
    """L X R = W is, row-major, kron(L, R^T) vec(X) = vec(W): a design built from the fixed
    factors alone, not from probing the expression."""
    node = node_of("G[:k] dense G", 10, 8, {"k": 4})
    left, right = node.factors[0].to_dense(), node.factors[2].to_dense()
    W = target(10, 8, seed=3)
    expected = lstsq_error(W, np.kron(left, right.T))
    assert relative_difference(fit(W, node).rel_error, expected) < 1e-6


def test_sum_and_scalars_match_designs_built_from_the_bases():
    node = node_of("(A1*a + B1*b)(DCT[:k])", 12, 8, {"k": 8})
    A1, B1 = (t.child.to_dense() for t in node.factors[0].terms)
    dct = node.factors[1].to_dense()
    W = target(12, 8, seed=4)
    design = np.stack([(A1 @ dct).ravel(), (B1 @ dct).ravel()], axis=1)
    assert relative_difference(fit(W, node).rel_error, lstsq_error(W, design)) < 1e-6

    node = node_of("sum(G, n=8)", 12, 9)
    draws = next(iter(node.fixed_arrays().values()))  # (8, 12, 9): the stacked draws
    design = draws.reshape(8, -1).T
    W = target(12, 9, seed=5)
    assert relative_difference(fit(W, node).rel_error, lstsq_error(W, design)) < 1e-6


GRAM = ["sum(G, n=8)", "sum(G, n=5) + sum(R, n=7)", "(A1*a + B1*b)(DCT[:k])", "sum(D, n=30)"]


@pytest.mark.parametrize("text", GRAM)
def test_gram_path_agrees_with_the_direct_path_and_lstsq(text, monkeypatch):
    node = node_of(text, 12, 12, {"k": 12})
    W = target(12, 12, seed=1)
    shapes = []
    real_lstsq = approx.lstsq
    monkeypatch.setattr(approx, "lstsq", lambda A, B: shapes.append(A.shape) or real_lstsq(A, B))
    direct = fit(W, node)
    assert shapes and all(s[0] == 144 for s in shapes)  # (size, p): the design matrix itself
    shapes.clear()
    monkeypatch.setattr(approx, "DESIGN_LIMIT", 100)  # one column at a time
    gram = fit(W, node)
    assert not shapes  # no design matrix went to lstsq: the p x p Gram system was solved
    assert relative_difference(gram.rel_error, direct.rel_error) < 1e-6
    design, offset = probed_design(node)
    assert relative_difference(gram.rel_error, lstsq_error(W, design, offset)) < 1e-6
    if text != "sum(D, n=30)":  # full column rank: the solution is unique
        for key in direct.values:
            np.testing.assert_allclose(gram.values[key], direct.values[key], rtol=1e-8, atol=1e-10)


# ---- truncated SVD ---------------------------------------------------------------------

@pytest.mark.parametrize("text,transposed,scale", [
    ("lowrank(r={r})", False, 1.0),
    ("lowrank(r={r})'", True, 1.0),
    ("2 * lowrank(r={r})", False, 2.0),
    ("0.5 * lowrank(r={r})'", True, 0.5),
    ("lowrank(r={r}) * a", False, 1.0),
])
@pytest.mark.parametrize("r", [1, 3, 6, 8, 11])
def test_truncated_svd_meets_eckart_young(text, transposed, scale, r):
    W = target(12, 8, seed=r)
    s = np.linalg.svd(W, compute_uv=False)
    bound = math.sqrt(float(np.sum(s[r:] ** 2))) / np.linalg.norm(W)
    result = fit(W, node_of(text.format(r=r), 12, 8))
    assert result.method == "truncated SVD"
    assert abs(result.rel_error - bound) < 1e-12


# ---- alternating least squares -----------------------------------------------------------

ALS = [
    ("g0 g1", 10, 8, None),
    ("sum(G, n=4) sum(G, n=4)", 10, 10, None),
    ("sum(G, n=3) sum(G, n=3) sum(G, n=3)", 8, 8, None),
    ("lowrank(r=2) + dense", 8, 6, None),
    ("g0 s1 g1'", 8, 8, None),
    ("DCT[:k] g0 g1", 12, 6, {"k": 4}),
]


@pytest.mark.parametrize("text,n,m,params", ALS, ids=[c[0] for c in ALS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_als_error_never_increases(text, n, m, params, seed):
    node = node_of(text, n, m, params)
    W = target(n, m, seed)
    result = fit(W, node, seed=seed)
    assert result.method == "alternating least squares"
    history = result.history
    assert len(history) >= 2 and history[-1] < history[0]
    assert all(b <= a for a, b in zip(history, history[1:])), history
    assert result.rel_error == history[-1]
    assert abs(approx.rel_error(W, node, result.values) - history[-1]) < 1e-12


def test_als_reaches_exact_fits():
    W = target(8, 6)
    assert fit(W, node_of("lowrank(r=2) + dense", 8, 6)).rel_error < 1e-10
    assert fit(W, node_of("g0 g1", 8, 6)).rel_error < 1e-10


def test_als_with_a_redundant_block_stays_at_the_lowrank_optimum():
    """DCT[:k] g0 g1 can do no better than the best rank-k approximation inside span(DCT[:k])."""
    node = node_of("DCT[:k] g0 g1", 12, 6, {"k": 4})
    W = target(12, 6, seed=7)
    basis = node.factors[0].to_dense()
    projected = basis @ (basis.T @ W)
    best = np.linalg.norm(W - projected) / np.linalg.norm(W)
    assert abs(fit(W, node).rel_error - best) < 1e-8


# ---- gradient fallback ---------------------------------------------------------------------

def test_gradient_fallback_on_a_parameter_used_twice():
    node = node_of("g g'", 6, 6)
    W = target(6, 6)
    result = fit(W, node)
    assert result.method == "gradient descent"
    assert all(np.isfinite(v).all() for v in result.values.values())
    assert result.rel_error < result.history[0]
    assert result.rel_error == min(result.history)
    # g g' is symmetric positive semidefinite: no fit beats the projection onto that cone
    sym = (W + W.T) / 2
    eigenvalues, vectors = np.linalg.eigh(sym)
    psd = (vectors * np.clip(eigenvalues, 0, None)) @ vectors.T
    best = np.linalg.norm(W - psd) / np.linalg.norm(W)
    # No fit beats best (the two norms agree to float64 rounding, ~1e-15).  The fit reaches it:
    # its error is 1e-16 above here (2.5e-13 on another target), and it stops only when its
    # error moves by <= 1e-12 in 50 steps; 1e-10 leaves room for other rounding, not a worse fit.
    assert best - 1e-13 <= result.rel_error <= best + 1e-10


# ---- ill-conditioned systems -----------------------------------------------------------------

@pytest.mark.parametrize("perturbation,design_limit", [
    (1e-4, None), (1e-8, None), (1e-12, None), (0.0, None),
    # The Gram path squares the condition number: it resolves singular values down to about
    # sqrt(p * eps) of the largest, so it is held to lstsq's error only where that suffices.
    (1e-4, 10), (0.0, 10),
])
def test_nearly_identical_bases_stay_finite(perturbation, design_limit, monkeypatch):
    """C and C + eps E, each with its own scalar: the columns of the design matrix are
    nearly (or, at eps = 0, exactly) parallel."""
    if design_limit is not None:
        monkeypatch.setattr(approx, "DESIGN_LIMIT", design_limit)
    rng = np.random.default_rng(0)
    C = rng.normal(size=(6, 5))
    fixed = {"C": {"matrix": C}, "C2": {"matrix": C + perturbation * rng.normal(size=(6, 5))}}
    node = node_of("C * a + C2 * b + sum(G, n=3)", 6, 5, fixed=fixed)
    W = target(6, 5, seed=2)
    values, error = approximate(W, node)
    assert all(np.isfinite(v).all() for v in values.values())
    design, offset = probed_design(node)
    assert error <= lstsq_error(W, design, offset) * (1 + 1e-6)


def test_gram_path_stays_finite_where_it_cannot_resolve():
    """Columns parallel to 1e-12: the Gram path drops that direction (a truncated solve):
    finite values, an error between lstsq's and that of the fit without C2."""
    rng = np.random.default_rng(0)
    C = rng.normal(size=(6, 5))
    fixed = {"C": {"matrix": C}, "C2": {"matrix": C + 1e-12 * rng.normal(size=(6, 5))}}
    node = node_of("C * a + C2 * b + sum(G, n=3)", 6, 5, fixed=fixed)
    W = target(6, 5, seed=2)
    saved, approx.DESIGN_LIMIT = approx.DESIGN_LIMIT, 10
    try:
        values, error = approximate(W, node)
    finally:
        approx.DESIGN_LIMIT = saved
    assert all(np.isfinite(v).all() for v in values.values())
    design, offset = probed_design(node)
    without_c2 = np.delete(design, 1, axis=1)
    assert lstsq_error(W, design, offset) <= error <= lstsq_error(W, without_c2, offset) * (1 + 1e-6)


@pytest.mark.parametrize("design_limit", [None, 10])
def test_dependent_diagonals_stay_finite(design_limit, monkeypatch):
    """50 random diagonals of a 4x4 matrix: rank 4, 46 dependent columns."""
    if design_limit is not None:
        monkeypatch.setattr(approx, "DESIGN_LIMIT", design_limit)
    node = node_of("sum(D, n=50)", 4, 4)
    W = target(4, 4)
    values, error = approximate(W, node)
    assert np.isfinite(values[next(iter(values))]).all()
    design, offset = probed_design(node)
    assert np.linalg.matrix_rank(design) == 4
    expected = lstsq_error(W, design, offset)
    assert error <= expected * (1 + 1e-6)
    assert relative_difference(error, expected) < 1e-6


@pytest.mark.parametrize("design_limit", [None, 10])
def test_badly_scaled_bases(design_limit, monkeypatch):
    """Bases of sizes 1e-6 and 1e6: the coefficients differ by 1e12, the fit is exact on
    both paths (the Gram path scales its columns before solving)."""
    if design_limit is not None:
        monkeypatch.setattr(approx, "DESIGN_LIMIT", design_limit)
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    node = node_of("A * a + B * b", 5, 4, fixed={"A": {"matrix": 1e-6 * A}, "B": {"matrix": 1e6 * B}})
    values, error = approximate(3 * A - 2 * B, node)
    assert error < 1e-10
    np.testing.assert_allclose([values["a"], values["b"]], [3e6, -2e-6], rtol=1e-8)


# ---- refused targets and trivial cases ---------------------------------------------------------

def test_non_finite_target_is_refused():
    W = target(4, 3)
    W[0, 0], W[2, 1] = np.nan, -np.inf
    with pytest.raises(DecompError, match=r"^the matrix to approximate has 2 NaN or infinite entries\n"
                                          r"check the trained weights \(a diverged run\?\) before decomposing$"):
        approximate(W, "dense")


def test_non_2d_target_is_refused():
    with pytest.raises(DecompError, match=r"^the matrix to approximate must be 2-D, got shape \(3, 3, 2\)\n"
                                          r"reshape a Conv2D kernel"):
        approximate(np.zeros((3, 3, 2)), "dense")
    with pytest.raises(DecompError, match=r"must be 2-D, got shape \(5,\)"):
        approximate(np.zeros(5), "dense")


def test_node_of_another_shape_is_refused():
    with pytest.raises(DecompError, match=r"^the expression is \(4, 3\) but W is \(3, 4\)$"):
        approximate(np.ones((3, 4)), node_of("dense", 4, 3))


def test_nothing_to_train():
    W = target(6, 6)
    node = node_of("DCT", 6, 6)
    values, error = approximate(W, node)
    assert values == {}
    assert error == pytest.approx(np.linalg.norm(W - node.to_dense()) / np.linalg.norm(W), abs=1e-15)
    assert fit(W, node).method == "none (nothing to train)"


def test_zero_target():
    values, error = approximate(np.zeros((5, 4)), "sum(G, n=3)")
    assert error == 0.0 and np.all(values["sum.0.0"] == 0)


# ---- text or node ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["sum(G, n=5) + sum(R, n=7)", "lowrank(r=2)", "g0 g1", "sum(G, n=2) | dense"])
def test_text_and_node_give_the_same_fit(text):
    W = target(9, 7)
    from_text = approximate(W, text, seed=3)
    from_node = approximate(W, parse(text, 9, 7, seed=3).stages[-1], seed=3)
    assert from_text[1] == from_node[1]
    assert from_text[0].keys() == from_node[0].keys()
    for key in from_text[0]:
        np.testing.assert_array_equal(from_text[0][key], from_node[0][key])


def test_text_fits_the_last_stage():
    assert approximate(target(9, 7), "sum(G, n=2) | dense")[1] < 1e-15


# ---- staged sums: nested draws -------------------------------------------------------------------

def test_nested_draws_stage_two_fits_stage_one_exactly():
    """sum(G, n=10) | sum(G, n=50): the first 10 draws of stage 2 are stage 1's draws, so the
    hand-over keeps stage 1's matrix exactly, with the same coefficients and zeros after."""
    d = parse("sum(G, n=10) | sum(G, n=50)", 784, 10, seed=4)
    first = d.stages[0]
    c = np.random.default_rng(0).normal(size=10)
    W = first.to_dense({"sum.0.0": c})
    values, error = approximate(W, "sum(G, n=10) | sum(G, n=50)", seed=4)
    assert error < 1e-10
    (coefficients,) = values.values()
    np.testing.assert_allclose(coefficients, np.concatenate([c, np.zeros(40)]), atol=1e-9)
    values, error = approximate(W, "sum(G, n=10) | sum(G, n=50) | dense", seed=4)
    assert error < 1e-15


# ---- framework-free ------------------------------------------------------------------------------

def test_approximate_imports_no_tensorflow():
    code = ("import sys, numpy as np\n"
            "from keras_decomp.fitting.approximate import approximate\n"
            "approximate(np.ones((6, 4)), 'sum(G, n=3) + lowrank(r=1)')\n"
            "approximate(np.ones((6, 4)), 'lowrank(r=2)')\n"
            "bad = sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules)\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_package_attributes_are_the_functions_after_the_submodules_are_imported():
    code = ("import keras_decomp\n"
            "import keras_decomp.training.staging, keras_decomp.fitting.approximate, keras_decomp.export\n"
            "import keras_decomp.compression.prune, keras_decomp.compression.decompose\n"
            "assert callable(keras_decomp.approximate), keras_decomp.approximate\n"
            "assert callable(keras_decomp.export), keras_decomp.export\n"
            "assert callable(keras_decomp.prune) and callable(keras_decomp.decompose)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
