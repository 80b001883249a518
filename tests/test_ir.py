"""Tests of the operator IR (ir.py, fixed.py, structures/basic.py) as built by parse/lower.

One shared harness, in the manner of tf.linalg.LinearOperator's tests: every case is an
expression plus a hand-written builder of its dense matrix from the same fixed arrays and
trainable values, built here with numpy and scipy, never by the IR itself.  The harness checks
``to_dense``, ``apply``, ``best_apply``, the counts, ``init`` and ``flops`` against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import scipy.fft
import scipy.linalg

import keras_decomp

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12  # to_dense against the hand-built matrix, float64
APPLY_TOL = 1e-10  # x W factor by factor against x @ to_dense, relative to the largest entry


# ---- independent references ------------------------------------------------------------------

def ref_dct(n: int) -> np.ndarray:
    """W with x @ W == scipy's orthonormal DCT-II of the row vector x."""
    return scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=1)


def ref_zigzag(h: int, w: int) -> list[tuple[int, int]]:
    """JPEG zig-zag: anti-diagonals r+c = 0, 1, ...; even ones up-right, odd ones down-left."""
    cells = [(r, c) for r in range(h) for c in range(w)]
    return sorted(cells, key=lambda rc: (sum(rc), rc[1] if sum(rc) % 2 == 0 else rc[0]))


def ref_dct2(h: int, w: int) -> np.ndarray:
    """Column t: the 2-D DCT coefficient zigzag[t] of each unit image (flattened row-major)."""
    coeffs = scipy.fft.dctn(np.eye(h * w).reshape(h * w, h, w), type=2, norm="ortho", axes=(1, 2))
    return np.stack([coeffs[:, r, c] for r, c in ref_zigzag(h, w)], axis=1)


def ref_hadamard(n: int) -> np.ndarray:
    return scipy.linalg.hadamard(n) / np.sqrt(n)  # scipy builds Sylvester's order


def perm_matrix(perm: np.ndarray, n: int, k: int | None = None) -> np.ndarray:
    """The (n, k) matrix with (x W)[:, j] = x[:, perm[j]]: a one in row perm[j] of column j."""
    kept = np.asarray(perm)[: (n if k is None else k)]
    w = np.zeros((n, len(kept)))
    for j, i in enumerate(kept):
        w[i, j] = 1.0
    return w


def diag_matrix(d: np.ndarray, rows: int, cols: int) -> np.ndarray:
    w = np.zeros((rows, cols))
    for i, value in enumerate(d):
        w[i, i] = value
    return w


def weighted(c: np.ndarray, stack) -> np.ndarray:
    """sum_j c_j stack[j], written as a loop."""
    return sum(cj * a for cj, a in zip(c, stack))


# ---- finding arrays by name --------------------------------------------------------------------

def _natural(key: str):
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def named(d: dict, prefix: str, suffix: str = "") -> list[np.ndarray]:
    """The arrays whose key is ``prefix`` or ``prefix.<...>`` and ends with ``suffix``, in text order."""
    keys = [k for k in d if (k == prefix or k.startswith(prefix + ".")) and k.endswith(suffix)]
    return [d[k] for k in sorted(keys, key=_natural)]


def one(d: dict, prefix: str, suffix: str = "") -> np.ndarray:
    found = named(d, prefix, suffix)
    assert len(found) == 1, f"expected one array named {prefix}*{suffix}, keys are {sorted(d)}"
    return found[0]


# ---- the table of cases ------------------------------------------------------------------------

class Case(NamedTuple):
    text: str
    n: int
    m: int
    num_params: int  # computed by hand
    num_fixed: int  # computed by hand: the entries the fixed arrays need
    build: Callable  # (fixed arrays F, trainable values V) -> the dense matrix, by hand
    params: dict | None = None
    fixed: dict | None = None


def case(id_, *args, **kwargs):
    return pytest.param(Case(*args, **kwargs), id=id_)


def _sum_g_sum_r(F, V):
    (g_stack,) = [a for a in named(F, "SUM") if a.ndim == 3]
    c_g, c_r = sorted(named(V, "sum"), key=len)  # lengths 4 and 5
    u, v = one(F, "SUM", ".u"), one(F, "SUM", ".v")
    return weighted(c_g, g_stack) + sum(c * np.outer(a, b) for c, a, b in zip(c_r, u, v))


def _three_sums(F, V):
    mats = [weighted(c, stack) for c, stack in zip(named(V, "sum"), named(F, "SUM"))]
    return mats[0] @ mats[1] @ mats[2]


def _sum_of_tiled_diagonals(F, V):
    combined = weighted(one(V, "sum"), one(F, "SUM"))  # (tiles, rows): one diagonal per tile
    return np.hstack([np.diag(d) for d in combined])


CASES = [
    # fixed bases
    case("I", "I", 5, 5, 0, 0, lambda F, V: np.eye(5)),
    case("G-I", "G I", 5, 3, 0, 15, lambda F, V: one(F, "G")),
    case("DCT", "DCT", 8, 8, 0, 64, lambda F, V: ref_dct(8)),
    case("DCT-slice", "DCT[:3]", 8, 3, 0, 64, lambda F, V: ref_dct(8)[:, :3]),
    case("DCT2-hw", "DCT2(h=3, w=4)", 12, 12, 0, 144, lambda F, V: ref_dct2(3, 4)),
    case("DCT2-square", "DCT2", 16, 16, 0, 256, lambda F, V: ref_dct2(4, 4)),
    case("DCT2-slice", "DCT2[:k]", 16, 5, 0, 256, lambda F, V: ref_dct2(4, 4)[:, :5], {"k": 5}),
    case("G", "G", 7, 3, 0, 21, lambda F, V: one(F, "G")),
    case("S", "S", 6, 4, 0, 24, lambda F, V: one(F, "S")),
    case("P", "P", 6, 6, 0, 6, lambda F, V: perm_matrix(one(F, "P"), 6)),
    case("P-slice", "P[:k]", 10, 4, 0, 10, lambda F, V: perm_matrix(one(F, "P"), 10, 4), {"k": 4}),
    case("R", "R", 6, 4, 0, 10, lambda F, V: np.outer(one(F, "R", ".u"), one(F, "R", ".v"))),
    case("D", "D", 5, 5, 0, 5, lambda F, V: np.diag(one(F, "D"))),
    case("H", "H", 8, 8, 0, 64, lambda F, V: ref_hadamard(8)),
    case("named-G", "A1", 5, 3, 0, 15, lambda F, V: F["A1"]),
    case("named-G-twice", "A1 + A1", 5, 3, 0, 15, lambda F, V: 2 * F["A1"]),
    # trainable structures and names
    case("dense", "dense", 4, 3, 12, 0, lambda F, V: one(V, "dense")),
    case("diag-square", "diag", 4, 4, 4, 0, lambda F, V: diag_matrix(one(V, "diag"), 4, 4)),
    case("diag-tall", "diag", 5, 3, 3, 0, lambda F, V: diag_matrix(one(V, "diag"), 5, 3)),
    case("diag-wide", "diag", 3, 5, 3, 0, lambda F, V: diag_matrix(one(V, "diag"), 3, 5)),
    case("lowrank", "lowrank(r=2)", 6, 5, 22, 0,
         lambda F, V: one(V, "lowrank", ".u") @ one(V, "lowrank", ".v")),
    # params=0.1 of 64x32 allows 204.8: r*(64+32) <= 204.8 gives r = 2
    case("lowrank-budget", "lowrank(params=0.1)", 64, 32, 192, 0,
         lambda F, V: one(V, "lowrank", ".u") @ one(V, "lowrank", ".v")),
    case("scalar-right", "G * a", 5, 3, 1, 15, lambda F, V: V["a"] * one(F, "G")),
    case("scalar-left", "a * G", 5, 3, 1, 15, lambda F, V: V["a"] * one(F, "G")),
    case("named-matrices", "g0 g1", 5, 3, 25 + 15, 0, lambda F, V: V["g0"] @ V["g1"]),
    case("named-tied", "g0 g0'", 4, 4, 16, 0, lambda F, V: V["g0"] @ V["g0"].T),
    # combinators
    case("add", "G + A1", 5, 3, 0, 30, lambda F, V: one(F, "G") + F["A1"]),
    case("sub", "G - A1", 5, 3, 0, 30, lambda F, V: one(F, "G") - F["A1"]),
    case("product-inner-n", "A1 A2", 5, 3, 0, 25 + 15, lambda F, V: F["A1"] @ F["A2"]),
    case("product-at", "A1 @ A2", 5, 3, 0, 25 + 15, lambda F, V: F["A1"] @ F["A2"]),
    case("product-three", "A1 dense A2", 5, 3, 25, 25 + 15, lambda F, V: F["A1"] @ one(V, "dense") @ F["A2"]),
    case("constant", "2 * A1", 5, 3, 0, 15, lambda F, V: 2 * F["A1"]),
    case("constant-float", "A1 * 0.5", 5, 3, 0, 15, lambda F, V: 0.5 * F["A1"]),
    case("transpose", "A1'", 5, 3, 0, 15, lambda F, V: F["A1"].T),
    case("slice-unknown-inner", "G[1:3]", 5, 2, 0, 15, lambda F, V: one(F, "G")[:, 1:3]),
    case("slice-i-j", "H[2:5]", 8, 3, 0, 64, lambda F, V: ref_hadamard(8)[:, 2:5]),
    case("slice-trainable", "(G dense)[:k]", 5, 3, 15, 25,
         lambda F, V: (one(F, "G") @ one(V, "dense"))[:, :3], {"k": 3}),
    # sum, tile, kron
    case("sum-G", "sum(G, n=5)", 6, 4, 5, 120, lambda F, V: weighted(one(V, "sum"), one(F, "SUM"))),
    case("sum-G-bound", "sum(G, n=k)", 6, 4, 5, 120,
         lambda F, V: weighted(one(V, "sum"), one(F, "SUM")), {"k": 5}),
    case("sum-S", "sum(S, n=3)", 6, 4, 3, 72, lambda F, V: weighted(one(V, "sum"), one(F, "SUM"))),
    case("sum-D", "sum(D, n=4)", 5, 5, 4, 20, lambda F, V: np.diag(weighted(one(V, "sum"), one(F, "SUM")))),
    case("sum-R", "sum(R, n=6)", 20, 15, 6, 6 * 35,
         lambda F, V: one(F, "SUM", ".u").T @ np.diag(one(V, "sum")) @ one(F, "SUM", ".v")),
    case("sum-P", "sum(P, n=3)", 5, 5, 3, 15,
         lambda F, V: weighted(one(V, "sum"), [perm_matrix(p, 5) for p in named(F, "P")])),
    case("sum-GP", "sum(G P, n=3)", 5, 4, 3, 3 * (20 + 4),
         lambda F, V: weighted(one(V, "sum"), [g @ perm_matrix(p, 4) for g, p in zip(named(F, "G"), named(F, "P"))])),
    case("sum-DCT", "sum(DCT, n=3)", 6, 6, 3, 36, lambda F, V: one(V, "sum").sum() * ref_dct(6)),
    case("sum-named", "sum(g0, n=2)", 4, 3, 2 + 12, 0, lambda F, V: one(V, "sum").sum() * V["g0"]),
    case("tile-G", "tile(G, n=4)", 5, 12, 0, 60, lambda F, V: np.hstack(list(one(F, "T")))),
    case("tile-R", "tile(R, n=2)", 5, 6, 0, 2 * (5 + 3),
         lambda F, V: np.hstack([np.outer(u, v) for u, v in zip(named(F, "R", ".u"), named(F, "R", ".v"))])),
    case("sum-tile-D", "sum(tile(D, n=8), n=10)", 16, 128, 10, 10 * 8 * 16, _sum_of_tiled_diagonals),
    case("kron-basis-first", "kron(DCT2(h=2, w=2), A1)", 8, 12, 0, 16 + 6,
         lambda F, V: np.kron(ref_dct2(2, 2), F["A1"])),
    case("kron-dense-first", "kron(dense, DCT2(h=2, w=3))", 12, 12, 4, 36,
         lambda F, V: np.kron(one(V, "dense"), ref_dct2(2, 3))),
    case("kron-declared", "kron(A, B)", 6, 12, 0, 6 + 12, lambda F, V: np.kron(F["A"], F["B"]),
         fixed={"A": {"basis": "G", "shape": (2, 3)}}),
    # DESIGN.md section 3 examples, at sizes small enough to build densely
    case("design-dct2-dense", "W = DCT2[:k] dense", 64, 10, 120, 4096,
         lambda F, V: ref_dct2(8, 8)[:, :12] @ one(V, "dense"), {"k": 12}),
    case("design-subsample", "W = P[:k] dense", 30, 4, 28, 30,
         lambda F, V: perm_matrix(one(F, "P"), 30, 7) @ one(V, "dense"), {"k": 7}),
    case("design-three-sums", "W = sum(G, n=3) sum(G, n=3) sum(G, n=3)", 10, 4, 9, 300 + 300 + 120, _three_sums),
    case("design-sum-plus-rank1", "W = sum(G, n=4) + sum(R, n=5)", 8, 6, 9, 4 * 48 + 5 * 14, _sum_g_sum_r),
    case("design-scaled-dct", "W = (A1*a + B1*b)(DCT[:k])", 16, 5, 2, 3 * 256,
         lambda F, V: (V["a"] * F["A1"] + V["b"] * F["B1"]) @ ref_dct(16)[:, :5], {"k": 5}),
    case("design-hadamard-layer", "W = sum(tile(D, n=8), n=100)", 16, 128, 100, 100 * 8 * 16,
         _sum_of_tiled_diagonals),
    case("design-named", "W = g0 s1 g1'", 6, 4, 36 + 36 + 24, 0, lambda F, V: V["g0"] @ V["s1"] @ V["g1"].T),
]


def root_of(c: Case, seed: int = 0):
    return keras_decomp.parse(c.text, c.n, c.m, params=c.params, seed=seed, fixed=c.fixed).stages[0]


def random_values(root, seed: int = 1) -> dict[str, np.ndarray]:
    """Random trainable values (not init's: init sets diagonals and scalars to ones)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape) for k, shape in root.param_shapes().items()}


# ---- the harness -------------------------------------------------------------------------------

@pytest.mark.parametrize("c", CASES)
def test_to_dense_matches_hand_built(c):
    root = root_of(c)
    fixed, values = root.fixed_arrays(), random_values(root)
    w = root.to_dense(values)
    expected = c.build(fixed, values)
    assert root.shape == (c.n, c.m)
    assert w.shape == (c.n, c.m) and w.dtype == np.float64
    np.testing.assert_allclose(w, expected, rtol=0, atol=TOL)
    assert (root.num_params, root.num_fixed) == (c.num_params, c.num_fixed)


@pytest.mark.parametrize("c", CASES)
def test_apply_matches_dense(c):
    root = root_of(c)
    values = random_values(root)
    v = {**root.fixed_arrays(), **values}
    w = root.to_dense(values)
    for batch in (1, 3, 256):  # small and large batches: best_apply takes both paths
        x = np.random.default_rng(batch).standard_normal((batch, c.n))
        expected = x @ w
        tol = APPLY_TOL * max(1.0, np.abs(expected).max())
        for y in (root.apply(x, v, np), root.best_apply(x, v, np, batch), x @ root.materialize(v, np)):
            assert y.shape == (batch, c.m)
            np.testing.assert_allclose(y, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("c", CASES)
def test_counts_init_and_fixed_arrays(c):
    root = root_of(c)
    init = root.init(np.random.default_rng(0))
    shapes = root.param_shapes()
    assert {k: v.shape for k, v in init.items()} == shapes
    assert sum(v.size for v in init.values()) == root.num_params
    assert all(np.isfinite(v).all() for v in init.values())
    fixed = root.fixed_arrays()
    assert {k: a.shape for k, a in fixed.items()} == root.fixed_shapes()
    assert sum(a.size for a in fixed.values()) == root.num_fixed
    assert not set(fixed) & set(shapes), "a key is both fixed and trainable"
    w = root.to_dense(init)
    assert w.shape == (c.n, c.m) and np.isfinite(w).all()


@pytest.mark.parametrize("c", CASES)
def test_flops(c):
    root = root_of(c)
    for node in root.walk():
        rows, cols = node.shape
        for batch in (1, 32):
            apply = node.flops(batch, "apply")
            materialize = node.flops(batch, "materialize")
            for f in (apply, materialize):
                assert isinstance(f, int) and not isinstance(f, bool), (node.label(), type(f))
            assert apply >= 0  # 0 only where x W is a copy or a gather (I, P)
            assert materialize >= 2 * batch * rows * cols > 0
    assert root.flops(32, "apply") > 0 or all(type(n).__name__ in ("Identity", "Permutation", "Slice")
                                              for n in root.walk())
    with pytest.raises(ValueError, match="mode must be"):
        root.flops(1, "fast")


# FLOPs by hand, per case: mm(a, b, c) = 2abc is an (a, b) @ (b, c) product, multiplies and
# adds counted; b is the batch.  "apply" goes factor by factor (each factor of a product or term
# of a sum by its own cheaper way), "materialize" builds W and does one mm(b, n, m).  The counts
# choose between the two in the layers, so each formula is written out from the structure.
def mm(a, b, c):
    return 2 * a * b * c


FLOPS = [
    # id, text, n, m, params, apply(b), materialize(b)
    ("dense", "dense", 4, 3, None, lambda b: mm(b, 4, 3), lambda b: mm(b, 4, 3)),
    ("diag", "diag", 5, 3, None, lambda b: 3 * b, lambda b: mm(b, 5, 3)),
    ("lowrank", "lowrank(r=2)", 6, 5, None,  # x U then (x U) V; U V then x W
     lambda b: mm(b, 6, 2) + mm(b, 2, 5), lambda b: mm(6, 2, 5) + mm(b, 6, 5)),
    ("identity", "I", 5, 5, None, lambda b: 0, lambda b: mm(b, 5, 5)),
    ("P-slice", "P[:k]", 10, 4, {"k": 4}, lambda b: 0, lambda b: mm(b, 10, 4)),  # a gather
    ("D", "D", 5, 5, None, lambda b: 5 * b, lambda b: mm(b, 5, 5)),
    ("R", "R", 6, 4, None, lambda b: 2 * b * (6 + 4), lambda b: 6 * 4 + mm(b, 6, 4)),  # (x u) v^T
    ("H", "H", 8, 8, None, lambda b: mm(b, 8, 8), lambda b: mm(b, 8, 8)),
    # sums of fixed draws: c . stack (2 n entries per matrix entry), then one product
    ("sum-G", "sum(G, n=5)", 6, 4, None,
     lambda b: 2 * 5 * 6 * 4 + mm(b, 6, 4), lambda b: 2 * 5 * 6 * 4 + mm(b, 6, 4)),
    ("sum-D", "sum(D, n=4)", 5, 5, None,
     lambda b: 2 * 4 * 5 + 5 * b, lambda b: 2 * 4 * 5 + mm(b, 5, 5)),
    ("sum-R", "sum(R, n=6)", 20, 15, None,  # ((x U^T) * c) V: 2b n (rows + cols) + b n
     lambda b: 2 * b * 6 * (20 + 15) + b * 6, lambda b: 2 * 6 * 20 * 15 + mm(b, 20, 15)),
    ("sum-DCT", "sum(DCT, n=3)", 6, 6, None,  # one DCT draw: x DCT, times sum(c) (n adds, b*m products)
     lambda b: mm(b, 6, 6) + b * 6 + 3, lambda b: 6 * 6 + 3 + mm(b, 6, 6)),
    ("tile-G", "tile(G, n=4)", 5, 12, None, lambda b: 4 * mm(b, 5, 3), lambda b: mm(b, 5, 12)),
    ("kron", "kron(DCT2(h=2, w=2), A1)", 8, 12, None,  # A1 (2, 3): x3 B over (4b, 2), then A
     lambda b: mm(4 * b, 2, 3) + mm(3 * b, 4, 4), lambda b: 8 * 12 + mm(b, 8, 12)),
    ("product", "A1 dense A2", 5, 3, None,
     lambda b: mm(b, 5, 5) + mm(b, 5, 5) + mm(b, 5, 3),
     lambda b: mm(5, 5, 5) + mm(5, 5, 3) + mm(b, 5, 3)),
    ("slice", "(G dense)[:k]", 5, 3, {"k": 3},  # the product (5, 5)(5, 3) by its cheaper way
     lambda b: min(mm(b, 5, 5) + mm(b, 5, 3), mm(5, 5, 3) + mm(b, 5, 3)),
     lambda b: mm(5, 5, 3) + mm(b, 5, 3)),
    ("transpose", "A1'", 5, 3, None, lambda b: mm(b, 5, 3), lambda b: mm(b, 5, 3)),
    ("scale", "2 * A1", 5, 3, None, lambda b: mm(b, 5, 3) + b * 3, lambda b: 5 * 3 + mm(b, 5, 3)),
    ("scalar", "G * a", 5, 3, None, lambda b: mm(b, 5, 3) + b * 3, lambda b: 5 * 3 + mm(b, 5, 3)),
    ("add", "G + A1", 5, 3, None, lambda b: 2 * mm(b, 5, 3) + b * 3, lambda b: 5 * 3 + mm(b, 5, 3)),
    # the families
    ("tri", "tri(k=3, h=2)", 12, 8, None,  # x G_in S G_out^T
     lambda b: mm(b, 12, 3) + mm(b, 3, 2) + mm(b, 2, 8),
     lambda b: mm(12, 3, 2) + mm(12, 2, 8) + mm(b, 12, 8)),
    ("sketch", "sketch(k=2, l=2)", 12, 8, None,  # width l*k = 4; two paths, then their average
     lambda b: 2 * (mm(b, 12, 4) + mm(b, 4, 8)) + 2 * b * 8,
     lambda b: mm(12, 4, 8) + mm(12, 4, 8) + 2 * 12 * 8 + mm(b, 12, 8)),
    # sss(p=2, d=1) on 4x4: blocks of 2; D_0, D_1 (2, 2), B_0, F_1 (2, 1), C_1, G_0 (1, 2): 16
    # parameters, one multiply-add each per row; the batched apply then adds the causal part
    # (zero-padded in stage 0) and the anticausal part (zero-padded in stage 1) to the whole
    # (p=2 stages, batch, 2 outputs) stack: 2 additions x 2 stages x 2 outputs = 8 per row;
    # materialised: the two off-diagonal blocks B_0 C_1 and F_1 G_0, mm(2, 1, 2) each
    ("sss", "sss(p=2, d=1)", 4, 4, None, lambda b: 2 * b * 16 + 8 * b, lambda b: 2 * mm(2, 1, 2) + mm(b, 4, 4)),
    # sparse(q=3, s=2) on 12x8: factors (12, 12), (12, 12), (12, 8).  A gather counts GATHER = 128
    # FLOPs per number read (sparse.py: memory-bound kernels): applied, a factor reads s inputs
    # per output, 128 b cols s; built, one scatter of its cols*s values into rows x cols zeros,
    # 2 rows cols + 128 cols s.  Each factor goes its cheaper way (at b = 32 and 1000: built).
    ("sparse", "sparse(q=3, s=2)", 12, 8, None,
     lambda b: 2 * min(128 * b * 12 * 2, 2 * 144 + 128 * 24 + mm(b, 12, 12))
     + min(128 * b * 8 * 2, 2 * 96 + 128 * 16 + mm(b, 12, 8)),
     lambda b: 2 * (2 * 144 + 128 * 24) + (2 * 96 + 128 * 16) + mm(12, 12, 12) + mm(12, 12, 8) + mm(b, 12, 8)),
    # butterfly on 16: 4 factors.  An elementwise op counts ELEMENTWISE = 8 FLOPs (butterfly.py).
    # Flips: 4 elementwise ops per factor and entry, 8 * 4 * 4 * 16 b.  Blocks (split h = 2:
    # blocks of 4): building them 8 * 2 * 16 * (4 + 4), three transposes 8 * 3 * 16 b, two block
    # products mm(4b, 4, 4).  Materialised: the cheaper way applied to the 16 rows of I, then x W.
    ("butterfly", "butterfly", 16, 16, None,
     lambda b: min(8 * 4 * 4 * 16 * b, 8 * 2 * 16 * 8 + 8 * 3 * 16 * b + 2 * mm(4 * b, 4, 4)),
     lambda b: min(8 * 4 * 4 * 16 * 16, 8 * 2 * 16 * 8 + 8 * 3 * 16 * 16 + 2 * mm(4 * 16, 4, 4)) + mm(b, 16, 16)),
]


@pytest.mark.parametrize("id_, text, n, m, params, apply, materialize", FLOPS, ids=[f[0] for f in FLOPS])
def test_flops_are_the_hand_counts(id_, text, n, m, params, apply, materialize):
    root = keras_decomp.parse(text, n, m, params=params).stages[0]
    checked = 0
    for batch in (1, 32, 1000):
        assert root.flops(batch, "apply") == apply(batch), (id_, batch, "apply")
        assert root.flops(batch, "materialize") == materialize(batch), (id_, batch, "materialize")
        checked += 1
    assert checked == 3


def test_flops_cases_cover_every_kind():
    assert len(FLOPS) >= 15
    kinds = {type(node).__name__ for f in FLOPS
             for node in keras_decomp.parse(f[1], f[2], f[3], params=f[4]).stages[0].walk()}
    assert kinds >= {"Dense", "Diag", "LowRank", "SumOf", "Kron", "Product", "Slice", "Transpose", "Scale",
                     "Add", "Tri", "Sketch", "SSS", "SparseProduct", "ButterflyProduct", "SparseFactor", "Identity",
                     "Permutation", "Diagonal", "RankOne", "Deterministic", "Gaussian", "TiledLeaf"}, kinds


# ---- properties of single node kinds -------------------------------------------------------------

def dense_of(text, n, m, params=None, seed=0, values_seed=1):
    root = keras_decomp.parse(text, n, m, params=params, seed=seed).stages[0]
    return root, root.to_dense(random_values(root, values_seed))


@pytest.mark.parametrize("n", [1, 7, 16])
def test_dct_columns_are_orthonormal_frequencies(n):
    _, w = dense_of("DCT", n, n)
    np.testing.assert_allclose(w.T @ w, np.eye(n), atol=TOL)
    np.testing.assert_allclose(w[:, 0], np.full(n, 1 / np.sqrt(n)), atol=TOL)
    x = np.random.default_rng(0).standard_normal((3, n))
    np.testing.assert_allclose(x @ w, scipy.fft.dct(x, norm="ortho", axis=-1), atol=TOL)


def test_dct2_keeps_the_lowest_zigzag_frequencies():
    _, w = dense_of("DCT2(h=4, w=6)[:5]", 24, 5)
    images = np.random.default_rng(0).standard_normal((3, 4, 6))
    coeffs = scipy.fft.dctn(images, norm="ortho", axes=(1, 2))
    expected = np.stack([coeffs[:, 0, 0], coeffs[:, 0, 1], coeffs[:, 1, 0], coeffs[:, 2, 0], coeffs[:, 1, 1]], 1)
    np.testing.assert_allclose(images.reshape(3, 24) @ w, expected, atol=TOL)


@pytest.mark.parametrize("text", ["G", "A1", "G(seed=7)", "sum(G, n=1)"])
@pytest.mark.parametrize("n, m", [(400, 50), (50, 400)])
def test_gaussians_are_scaled_by_one_over_sqrt_rows(text, n, m):
    root = keras_decomp.parse(text, n, m).stages[0]
    (g,) = [a for a in root.fixed_arrays().values()]
    g = g.reshape(n, m)
    assert abs(g.mean()) * np.sqrt(n) < 0.05
    assert 0.95 < g.std() * np.sqrt(n) < 1.05


def test_sign_entries_are_plus_minus_one_over_sqrt_cols():
    _, w = dense_of("S", 30, 16)
    np.testing.assert_array_equal(np.abs(w), np.full((30, 16), 0.25))
    assert 0.35 < (w > 0).mean() < 0.65


@pytest.mark.parametrize("k", [1, 5, 12])
def test_subsampling_keeps_k_distinct_inputs(k):
    root, w = dense_of("P[:k]", 12, k, params={"k": k})
    perm = one(root.fixed_arrays(), "P")
    assert sorted(perm.tolist()) == list(range(12))
    assert len(set(perm[:k].tolist())) == k
    x = np.random.default_rng(0).standard_normal((4, 12))
    np.testing.assert_array_equal(x @ w, x[:, perm[:k]])
    assert set(np.unique(w)) <= {0.0, 1.0} and (w.sum(axis=0) == 1).all()


def test_rank_one_and_diagonal_leaves():
    assert np.linalg.matrix_rank(dense_of("R", 9, 7)[1]) == 1
    _, d = dense_of("D", 6, 6)
    np.testing.assert_array_equal(d, np.diag(np.diag(d)))
    assert np.count_nonzero(np.diag(d)) == 6


@pytest.mark.parametrize("n", [1, 2, 16])
def test_hadamard_is_sylvester_and_orthogonal(n):
    _, w = dense_of("H", n, n)
    np.testing.assert_allclose(w, ref_hadamard(n), atol=TOL)
    np.testing.assert_allclose(w @ w, np.eye(n), atol=TOL)


def test_lowrank_has_rank_at_most_r():
    _, w = dense_of("lowrank(r=3)", 12, 9)
    assert np.linalg.matrix_rank(w) == 3


@pytest.mark.parametrize("n, m, fraction", [(64, 32, 0.1), (100, 10, 0.5), (20, 20, 1.0), (784, 10, 0.25)])
def test_lowrank_budget_is_the_largest_r_within_it(n, m, fraction):
    root = keras_decomp.parse(f"lowrank(params={fraction})", n, m).stages[0]
    r = root.num_params // (n + m)
    assert r * (n + m) == root.num_params
    assert r * (n + m) <= fraction * n * m < (r + 1) * (n + m)


def test_same_name_is_one_variable_or_one_matrix():
    root, _ = dense_of("g0 g0'", 5, 5)
    assert root.param_shapes() == {"g0": (5, 5)}
    root, w = dense_of("A1 + A1", 5, 3)
    assert list(root.fixed_arrays()) == ["A1"]
    _, a1 = dense_of("A1", 5, 3)
    np.testing.assert_array_equal(w, 2 * a1)


def test_sum_is_linear_in_its_coefficients_and_its_draws_are_independent():
    root = keras_decomp.parse("sum(G, n=5)", 6, 4).stages[0]
    (key,) = root.param_shapes()
    rng = np.random.default_rng(0)
    c1, c2 = rng.standard_normal(5), rng.standard_normal(5)
    np.testing.assert_allclose(root.to_dense({key: c1 + 2 * c2}),
                               root.to_dense({key: c1}) + 2 * root.to_dense({key: c2}), atol=TOL)
    draws = one(root.fixed_arrays(), "SUM")
    assert draws.shape == (5, 6, 4)
    for j in range(5):  # a unit coefficient picks out one draw
        np.testing.assert_allclose(root.to_dense({key: np.eye(5)[j]}), draws[j], atol=TOL)
    assert np.linalg.matrix_rank(draws.reshape(5, -1)) == 5


def test_sum_of_diagonals_stays_diagonal_and_of_rank_ones_stays_low_rank():
    _, w = dense_of("sum(D, n=4)", 7, 7)
    np.testing.assert_array_equal(w, np.diag(np.diag(w)))
    root, w = dense_of("sum(R, n=6)", 20, 15)
    assert np.linalg.matrix_rank(w) == 6
    assert root.num_fixed == 6 * (20 + 15)  # stored as U and V, never as 6 dense terms


def test_sum_of_tiled_diagonals_is_diagonal_blocks_side_by_side():
    _, w = dense_of("sum(tile(D, n=8), n=10)", 16, 128)
    blocks = np.split(w, 8, axis=1)
    for block in blocks:
        np.testing.assert_array_equal(block, np.diag(np.diag(block)))
        assert np.count_nonzero(np.diag(block)) == 16
    assert not np.allclose(blocks[0], blocks[1])  # independent draws


# ---- DESIGN.md section 3: every example --------------------------------------------------------------


def sss_784_10(d):  # sss(p=8, d=) on (784, 10): inputs 8 x 98, outputs (2, 2, 1, 1, 1, 1, 1, 1)
    diagonal = 98 * 10
    b_and_f = 2 * d * (784 - 98)  # B on stages 0..6, F on 1..7
    c, g = d * (10 - 2), d * (10 - 1)  # C on stages 1..7, G on 0..6
    return diagonal + b_and_f + c + g + 2 * 6 * d * d  # A and E on the 6 interior stages


# (text, n, m, params, trainable count of each stage, computed by hand)
DESIGN_EXAMPLES = [
    ("W = DCT2[:k] dense", 784, 10, {"k": 100}, [100 * 10]),
    ("W = P[:k] dense", 784, 10, {"k": 100}, [100 * 10]),
    ("W = sum(G, n=8) sum(G, n=8) sum(G, n=8)", 784, 10, None, [8 + 8 + 8]),
    ("W = sum(G, n=20) + sum(R, n=50)", 784, 10, None, [20 + 50]),
    ("W = (A1*a + B1*b)(DCT[:k])", 784, 10, {"k": 10}, [2]),
    ("W = sum(G, n=10) | sum(G, n=50) | dense", 784, 10, None, [10, 50, 784 * 10]),
    ("W = sum(tile(D, n=8), n=100)", 100, 800, None, [100]),
    ("W = lowrank(r=2)", 784, 10, None, [2 * (784 + 10)]),  # the second term of sss + lowrank
    ("W = g0 s1 g1'", 784, 10, None, [784 * 784 + 784 * 784 + 10 * 784]),
    ("W = sketch(k=16, l=2)", 784, 10, None, [2 * 16 * (784 + 10)]),
    ("W = (A1*a + B1*b)(DCT[:k]) | sss(p=8, d=4)", 784, 10, {"k": 10}, [2, sss_784_10(4)]),
    ("W = sss(p=8, d=4) | sss(p=8, d=16)", 784, 10, None, [sss_784_10(4), sss_784_10(16)]),
    ("W = sss(p=8, d=4) + lowrank(r=2)", 784, 10, None, [sss_784_10(4) + 2 * (784 + 10)]),
]


@pytest.mark.parametrize("text, n, m, params, counts", DESIGN_EXAMPLES, ids=[e[0] for e in DESIGN_EXAMPLES])
def test_design_examples_parse_with_shape_and_count(text, n, m, params, counts):
    d = keras_decomp.parse(text, n, m, params=params)
    assert d.shape == (n, m)
    assert [stage.shape for stage in d.stages] == [(n, m)] * len(counts)
    assert [stage.num_params for stage in d.stages] == counts
    assert d.num_params == counts[0]


# ---- determinism ---------------------------------------------------------------------------------

MIXED = ("sum(G, n=3) + S + R + D G + A1 + sum(R, n=2) + tile(G, n=2) + G(seed=5) + sum(tile(D, n=2), n=2)"
         " + P[:8]' + sum(P S, n=2) + DCT2(h=4, w=4)[:8]' dense")  # on (8, 16)


def test_same_text_and_seed_give_identical_fixed_arrays():
    a = keras_decomp.parse(MIXED, 8, 16, seed=4).stages[0].fixed_arrays()
    b = keras_decomp.parse(MIXED, 8, 16, seed=4).stages[0].fixed_arrays()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("text", ["G", "S", "R", "A1", "sum(G, n=2)", "tile(G, n=2)"])
def test_another_seed_gives_other_matrices(text):
    w0 = dense_of(text, 8, 8, seed=0)[1]
    w1 = dense_of(text, 8, 8, seed=1)[1]
    assert not np.allclose(w0, w1)


def test_two_occurrences_are_two_draws_but_a_given_seed_is_one_matrix():
    _, g = dense_of("G(seed=3)", 6, 6)
    np.testing.assert_array_equal(dense_of("G(seed=3) + G(seed=3)", 6, 6)[1], 2 * g)
    assert not np.allclose(dense_of("G(seed=4)", 6, 6)[1], g)
    two, _ = dense_of("G + G", 6, 6)
    assert len(two.fixed_arrays()) == 2
    assert not np.allclose(*two.fixed_arrays().values())
    # one seed at two shapes: each factor has its own shape (this once reused the first array)
    _, w = dense_of("G(seed=3) G(seed=3)", 6, 4)
    np.testing.assert_allclose(w, g @ dense_of("G(seed=3)", 6, 4)[1], atol=TOL)
    _, w = dense_of("D(seed=3) kron(D(seed=3), DCT2(h=1, w=2))", 6, 6)
    d6, d3 = dense_of("D(seed=3)", 6, 6)[1], dense_of("D(seed=3)", 3, 3)[1]
    np.testing.assert_allclose(w, d6 @ np.kron(d3, ref_dct2(1, 2)), atol=TOL)


DIGEST_SOURCE = """
import hashlib
import numpy as np
def digest(root):
    h = hashlib.sha256()
    for key, a in sorted(root.fixed_arrays().items()):
        a = np.ascontiguousarray(a)
        h.update(f"{key}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
"""


def test_fixed_arrays_are_the_same_in_another_process():
    scope: dict = {}
    exec(DIGEST_SOURCE, scope)
    here = scope["digest"](keras_decomp.parse(MIXED, 8, 16, seed=4).stages[0])
    code = DIGEST_SOURCE + f"import keras_decomp\nprint(digest(keras_decomp.parse({MIXED!r}, 8, 16, seed=4).stages[0]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == here


# ---- equivalent expressions give identical matrices ------------------------------------------------

E = "sum(G, n=3) A1 + D lowrank(r=2)"
EQUIVALENT = [
    ("juxtaposition-vs-at", "sum(G, n=2) S R dense", "sum(G, n=2) @ S @ R @ dense"),
    ("constant-left-vs-right", f"2 * ({E})", f"({E}) * 2"),
    ("scalar-left-vs-right", "a * sum(G, n=2)", "sum(G, n=2) * a"),
    ("double-transpose", f"(({E})')'", E),
    ("slice-start-zero", "(G dense)[0:3] + DCT[0:3]", "(G dense)[:3] + DCT[:3]"),
    ("target-name", f"W = {E}", E),
    ("target-name-stages", f"W = {E} | sum(R, n=2)", f"{E} | sum(R, n=2)"),
    ("spacing-and-comment", "sum(G,n=3)A1+D lowrank(r=2)", "  sum( G , n = 3 )  A1 +  D lowrank( r = 2 )  # E"),
    ("grouping", f"({E})", E),
]


@pytest.mark.parametrize("left, right", [e[1:] for e in EQUIVALENT], ids=[e[0] for e in EQUIVALENT])
def test_equivalent_expressions_give_identical_matrices(left, right):
    a = keras_decomp.parse(left, 6, 3, seed=2).stages
    b = keras_decomp.parse(right, 6, 3, seed=2).stages
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.param_shapes() == y.param_shapes()
        fa, fb = x.fixed_arrays(), y.fixed_arrays()
        assert sorted(fa) == sorted(fb)
        for key in fa:
            np.testing.assert_array_equal(fa[key], fb[key])
        values = random_values(x)
        np.testing.assert_array_equal(x.to_dense(values), y.to_dense(values))
