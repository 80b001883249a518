"""fitting/autodiff.py and the gradient fallback built on it, against central differences.

Reference: the derivative of <C, f(theta)> for a random cotangent C, by central
differences in float64 with step 1e-6 (truncation ~1e-12, rounding ~1e-16 / 1e-6 = 1e-10
relative), so the reverse-mode gradient must agree to 1e-6 relative; a wrong rule is off
by O(1).  The fits are checked against closed forms (Eckart-Young on a PSD matrix).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest

import keras_decomp
from keras_decomp import parse
from keras_decomp.fitting.autodiff import SUPPORTED, value_and_pullback, xp
from keras_decomp.fitting.gradient import gradient_fit, loss_and_gradient

STEP = 1e-6
RTOL = 1e-6


def central_differences(f, params, cotangent):
    """d <cotangent, f(params)> / d params[k], entry by entry."""
    out = {}
    for key, value in params.items():
        grad = np.zeros(value.shape)
        for i in range(value.size):
            plus, minus = np.array(value, dtype=np.float64), np.array(value, dtype=np.float64)
            plus.flat[i] += STEP
            minus.flat[i] -= STEP
            grad.flat[i] = (np.sum(cotangent * f({**params, key: plus}))
                            - np.sum(cotangent * f({**params, key: minus}))) / (2 * STEP)
        out[key] = grad
    return out


def assert_close(got, want):
    scale = max(np.max(np.abs(want)), 1e-300)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= RTOL * scale, (got, want)


def check_gradient(fn, shapes, seed=0):
    """fn(p, ns) runs on ns = numpy (the reference) and ns = xp (traced)."""
    rng = np.random.default_rng(seed)
    params = {k: np.array(rng.normal(size=s) + 0.5) for k, s in shapes.items()}  # + 0.5: away from 0 for division
    want = np.asarray(fn(params, np))
    value, pullback = value_and_pullback(lambda p: fn(p, xp), params)
    np.testing.assert_array_equal(value, want)  # the forward pass is numpy's own arithmetic
    cotangent = rng.normal(size=want.shape)
    grads = pullback(cotangent)
    reference = central_differences(lambda p: np.asarray(fn(p, np)), params, cotangent)
    for key in params:
        assert_close(grads[key], reference[key])


C = np.arange(1.0, 13.0).reshape(3, 4)  # a constant operand
IDX = np.array([2, 0, 2, 1])  # repeated index: take's gradient must add up

# (name, fn(params, ns), shapes): every arithmetic form and xp function that materialize uses
OPS = [
    ("add", lambda p, ns: p["a"] + p["b"], {"a": (3, 4), "b": (3, 4)}),
    ("add broadcast", lambda p, ns: p["a"] + p["b"][None, :], {"a": (3, 4), "b": (4,)}),
    ("add constant", lambda p, ns: p["a"] + C, {"a": (3, 4)}),
    ("radd constant", lambda p, ns: C + p["a"], {"a": (3, 4)}),
    ("radd zero (builtin sum)", lambda p, ns: sum([p["a"], p["a"]]), {"a": (3, 4)}),
    ("sub", lambda p, ns: p["a"] - p["b"][:, None], {"a": (3, 4), "b": (3,)}),
    ("rsub", lambda p, ns: C - p["a"], {"a": (3, 4)}),
    ("mul", lambda p, ns: p["a"] * p["b"], {"a": (3, 4), "b": (3, 4)}),
    ("mul broadcast", lambda p, ns: p["a"] * p["b"][None, :], {"a": (3, 4), "b": (4,)}),
    ("mul scalar param", lambda p, ns: p["a"] * p["s"], {"a": (3, 4), "s": ()}),
    ("mul python float", lambda p, ns: p["a"] * 0.25, {"a": (3, 4)}),
    ("rmul python float", lambda p, ns: 3.0 * p["a"], {"a": (3, 4)}),
    ("rmul numpy array", lambda p, ns: C * p["a"], {"a": (3, 4)}),
    ("rmul numpy scalar", lambda p, ns: np.float64(2.5) * p["a"], {"a": (3, 4)}),
    ("truediv", lambda p, ns: p["a"] / p["b"], {"a": (3, 4), "b": (3, 4)}),
    ("rtruediv", lambda p, ns: 1.0 / p["a"], {"a": (3, 4)}),
    ("neg", lambda p, ns: -p["a"], {"a": (3, 4)}),
    ("index column", lambda p, ns: p["a"][:, 1], {"a": (3, 4)}),
    ("index slice", lambda p, ns: p["a"][:, 1:3], {"a": (3, 4)}),
    ("index newaxis", lambda p, ns: p["a"][None, :] * p["a"][:, None], {"a": (4,)}),
    ("index int", lambda p, ns: p["a"][1], {"a": (3, 4)}),
    ("matmul", lambda p, ns: ns.matmul(p["a"], p["b"]), {"a": (3, 4), "b": (4, 2)}),
    ("matmul constant", lambda p, ns: ns.matmul(C.T, p["a"]), {"a": (3, 2)}),
    ("matmul batched", lambda p, ns: ns.matmul(p["a"], p["b"]), {"a": (2, 3, 4), "b": (4, 2)}),
    ("reshape", lambda p, ns: ns.reshape(p["a"], (2, 6)), {"a": (3, 4)}),
    ("concatenate", lambda p, ns: ns.concatenate([p["a"], C, p["b"]], axis=1), {"a": (3, 2), "b": (3, 1)}),
    ("concatenate axis 0", lambda p, ns: ns.concatenate([p["a"], p["a"]], axis=0), {"a": (2, 4)}),
    ("stack", lambda p, ns: ns.stack([p["a"], C, p["a"] * 2.0]), {"a": (3, 4)}),
    ("eye", lambda p, ns: ns.eye(3, 4) * p["a"][None, :], {"a": (4,)}),
    ("einsum outer", lambda p, ns: ns.einsum("ij,kl->ikjl", p["a"], p["b"]), {"a": (2, 3), "b": (3, 2)}),
    ("einsum contract", lambda p, ns: ns.einsum("cj,ajm->acm", p["u"], p["s"]), {"u": (3, 2), "s": (4, 2, 5)}),
    ("einsum index in one operand", lambda p, ns: ns.einsum("ij,jk->k", p["a"], p["b"]), {"a": (2, 3), "b": (3, 2)}),
    ("transpose", lambda p, ns: ns.transpose(p["a"]), {"a": (3, 4)}),
    ("transpose axes", lambda p, ns: ns.transpose(p["a"], (1, 2, 0)), {"a": (2, 3, 4)}),
    ("take", lambda p, ns: ns.take(p["a"], IDX, axis=1), {"a": (4, 3)}),
    ("take constant, scaled", lambda p, ns: ns.take(C, IDX[:3], axis=1) * p["a"][None, :], {"a": (3,)}),
    ("tensordot axes=1", lambda p, ns: ns.tensordot(p["c"], p["s"], axes=1), {"c": (3,), "s": (3, 2, 4)}),
    ("tensordot pairs", lambda p, ns: ns.tensordot(p["u"] * p["c"][:, None], p["v"], axes=[[0], [0]]),
     {"u": (3, 4), "c": (3,), "v": (3, 5)}),
    ("sum", lambda p, ns: ns.sum(p["a"]) * p["a"], {"a": (3, 4)}),
    ("sum axis", lambda p, ns: ns.sum(p["a"], axis=0), {"a": (3, 4)}),
    ("sum axis keepdims", lambda p, ns: ns.sum(p["a"], axis=-1, keepdims=True) * p["a"], {"a": (3, 4)}),
    ("pad", lambda p, ns: ns.pad(p["a"], [[0, 0], [0, 2]]), {"a": (3, 4)}),
    ("tile", lambda p, ns: ns.tile(p["a"], [3]) * np.arange(12.0), {"a": (4,)}),
    ("tile 2-D", lambda p, ns: ns.tile(p["a"], (2, 3)) * np.arange(36.0).reshape(6, 6), {"a": (3, 2)}),
    ("unstack", lambda p, ns: ns.unstack(p["a"])[2] * 2.0 + ns.unstack(p["a"])[0], {"a": (3, 4)}),
    ("unstack axis 1, pieces reused", lambda p, ns: ns.stack(ns.unstack(p["a"], axis=1)[::-1] + ns.unstack(p["a"], axis=1)[:1]),
     {"a": (2, 3, 2)}),
    ("flip", lambda p, ns: ns.flip(ns.reshape(p["a"], (2, 2, 3)), axis=1) * C.reshape(2, 2, 3), {"a": (3, 4)}),
    ("ones, arange", lambda p, ns: p["a"] * ns.ones((3, 4)) + ns.arange(4), {"a": (3, 4)}),
    ("scatter", lambda p, ns: (ns.scatter(IDX[:3, None] * 2 + 1, p["a"], (8,)) if ns is not np
                               else np.bincount(IDX[:3] * 2 + 1, p["a"], minlength=8)) * np.arange(8.0), {"a": (3,)}),
]


@pytest.mark.parametrize("name,fn,shapes", OPS, ids=[case[0] for case in OPS])
def test_every_operation_has_the_right_gradient(name, fn, shapes):
    check_gradient(fn, shapes)


def test_the_namespace_covers_what_the_operators_use_and_the_table_covers_the_namespace():
    package = Path(keras_decomp.__file__).parent
    used = {name for path in (package / "operators").rglob("*.py")
            for name in re.findall(r"\bxp\.(\w+)", path.read_text())}
    assert len(used) >= 10 and used <= set(SUPPORTED), used - set(SUPPORTED)
    assert {name for name in dir(type(xp)) if not name.startswith("_")} == set(SUPPORTED)
    sources = [inspect.getsource(case[1]) for case in OPS]
    for name in SUPPORTED:
        assert any(f"ns.{name}(" in source for source in sources), f"no gradient check of xp.{name}"


def test_a_value_used_many_times_sums_its_gradients():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    _, pullback = value_and_pullback(lambda p: xp.matmul(p["g"], xp.transpose(p["g"])) + p["g"] * 3.0, {"g": a})
    ones = np.ones((2, 2))
    np.testing.assert_allclose(pullback(ones)["g"], ones @ a + ones.T @ a + 3.0, rtol=1e-15)


def test_a_parameter_not_used_gets_zeros_and_constants_stay_numpy():
    params = {"a": np.ones((2, 4)), "b": np.ones(3)}
    value, pullback = value_and_pullback(lambda p: xp.matmul(xp.eye(2), C[:2]) + p["a"], params)
    np.testing.assert_array_equal(value, C[:2] + 1.0)
    assert type(xp.eye(2)) is np.ndarray and type(xp.take(C, IDX[:2], axis=1)) is np.ndarray
    grads = pullback(np.full((2, 4), 2.0))
    np.testing.assert_array_equal(grads["b"], np.zeros(3))
    np.testing.assert_array_equal(grads["a"], np.full((2, 4), 2.0))


@pytest.mark.parametrize("fn,error,match", [
    (lambda p: xp.where(p["a"] > 0, p["a"], 0), AttributeError, r"^autodiff's xp has no 'where'; supported: arange, concatenate"),
    (lambda p: p["a"].T, AttributeError, r"^autodiff does not support '\.T' on traced arrays"),
    (lambda p: p["a"][IDX], NotImplementedError, r"^autodiff supports basic indexing only"),
    (lambda p: np.asarray(p["a"]), NotImplementedError, r"^a traced array cannot become a numpy array"),
    (lambda p: np.matmul(p["a"], C), TypeError, r"Traced"),
    (lambda p: xp.einsum("ii->i", p["a"]), NotImplementedError, r"^autodiff's einsum needs explicit '->'"),
    (lambda p: xp.matmul(p["a"][0], C), NotImplementedError, r"^autodiff's matmul needs arrays of 2 or more"),
    (lambda p: xp.pad(p["a"], [[0, 0], [0, 1]], mode="edge"), NotImplementedError, r"mode='constant' only"),
])
def test_what_is_not_supported_says_so(fn, error, match):
    with pytest.raises(error, match=match):
        value_and_pullback(fn, {"a": np.ones((4, 4))})


# ---- the loss of the gradient fallback, for one node of every kind -----------------------------

NODES = [
    ("dense", 4, 5), ("diag", 4, 6), ("diag", 6, 4), ("lowrank(r=2)", 5, 4),
    ("sum(G, n=3)", 4, 5), ("sum(R, n=2)", 4, 5), ("sum(D, n=3)", 4, 4), ("sum(P, n=2)", 4, 4),
    ("sum(sss(p=2, d=1), n=2)", 4, 4), ("tile(dense, n=2)", 4, 8), ("tile(D[:2], n=2) dense", 4, 3), ("tile(G, n=2) dense", 4, 3),
    ("kron(DCT2(h=2, w=2), dense)", 8, 12), ("sketch(k=2)", 6, 5), ("sketch(k=2, spatial=2)", 12, 5),
    ("sss(p=2, d=2)", 6, 6), ("sss(p=3, d=2)", 7, 6), ("tri(k=2, h=3)", 5, 4),
    ("sparse(q=2, s=2)", 6, 5), ("butterfly", 8, 8), ("g g'", 5, 5), ("g0 s1 g1'", 4, 4),
    ("g0 g1 g0'", 4, 4), ("dense'", 4, 5), ("dense[1:4]", 5, 3), ("G[:3] dense[1:4]", 5, 3),
    ("2 * dense - lowrank(r=1)", 4, 4), ("(A1*a + B1*b) dense", 4, 4), ("g g' * a", 4, 4),
]


@pytest.mark.parametrize("text,rows,cols", NODES, ids=[case[0] for case in NODES])
def test_the_loss_gradient_of_every_node_kind(text, rows, cols):
    node = parse(text, rows, cols).stages[-1]
    rng = np.random.default_rng(1)
    theta = {k: np.asarray(v, dtype=np.float64) for k, v in node.init(rng).items()}
    assert theta, f"{text} has nothing to train"
    fixed = node.fixed_arrays()
    W = rng.normal(size=node.shape)

    def loss(p):
        E = np.asarray(node.materialize({**fixed, **p}, np))
        return np.sum((W - E) ** 2) / np.sum(W * W)

    value, grads = loss_and_gradient(W, node, theta, fixed)
    assert abs(value - loss(theta)) <= 1e-14 * loss(theta)
    reference = central_differences(loss, theta, np.ones(()))
    assert set(grads) == set(node.param_shapes())
    for key in theta:
        assert_close(grads[key], reference[key])


def test_the_node_table_reaches_every_structure():
    kinds = {type(n).__name__ for text, r, c in NODES for n in parse(text, r, c).stages[-1].walk()}
    assert {"Dense", "Diag", "LowRank", "SumOf", "Tile", "Kron", "Sketch", "SSS", "Tri", "SparseProduct",
            "SparseFactor", "Product", "Transpose", "Slice", "Scale", "Add", "TiledLeaf"} <= kinds, kinds


# ---- the fit reaches known optima --------------------------------------------------------------

def test_gradient_fit_recovers_a_psd_matrix_at_full_width():
    A = np.random.default_rng(2).normal(size=(6, 6))
    node = parse("g g'", 6, 6).stages[0]
    values, history = gradient_fit(A @ A.T, node, node.init(np.random.default_rng(3)), {})
    assert history[0] > 0.5
    # Adam reaches the exact optimum here (~1e-14 measured); 1e-9 leaves room for its last steps
    assert history[-1] < 1e-9
    g = values[node.param_shapes().popitem()[0]]
    np.testing.assert_allclose(g @ g.T, A @ A.T, atol=1e-9 * np.linalg.norm(A @ A.T))


def test_gradient_fit_of_rank_two_meets_eckart_young():
    # On a PSD W the best g g' of rank 2 keeps the top two eigenpairs: error = the rest's norm.
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    eigenvalues = np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    W = (Q * eigenvalues) @ Q.T
    best = np.linalg.norm(eigenvalues[2:]) / np.linalg.norm(eigenvalues)
    node = parse("g[:2] g[:2]'", 6, 6).stages[0]
    values, history = gradient_fit(W, node, node.init(np.random.default_rng(5)), {})
    assert best - 1e-12 <= history[-1] <= best + 1e-9, (history[-1], best)
    g = values[node.param_shapes().popitem()[0]]
    top = Q[:, :2] * eigenvalues[:2] @ Q[:, :2].T
    np.testing.assert_allclose(g @ g.T, top, atol=1e-6 * np.linalg.norm(W))
