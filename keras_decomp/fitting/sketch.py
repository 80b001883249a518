"""A sketch fitted to a dense W: the paper's unbiased estimator and the exact
least-squares fit (the one ``approximate`` uses)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import DecompError
from ..language.parse import parse
from ..operators.structures.sketch import Sketch
from . import methods
from .target import check_target, rel_error


def estimator(W, node: Sketch) -> dict:
    """The paper's unbiased estimator: S1_i = W U1_i^T, S2_i = U2_i^T W (per kernel
    position for SK-CONV).  Its dense form has expectation W over the random signs."""
    W = np.asarray(W, dtype=np.float64)
    fixed = node.fixed_arrays()
    u1, u2 = fixed[node.keys["U1"]], fixed[node.keys["U2"]]
    return {node.keys["s1"]: W @ u1.T, node.keys["s2"]: node.gather(u2, W)}


def least_squares(W, node: Sketch) -> dict:
    """The exact least-squares fit, in closed form.

    With A = s1 U1 and B = (I (x) U2) s2 the reachable matrices are A + B where A
    has its rows in U1's row space and B its columns in V = I (x) U2's column space.
    With P_U, P_V the orthogonal projectors onto those, the best fit is
    W P_U + P_V W - P_V W P_U (the residual (I - P_V) W (I - P_U) is orthogonal to
    every reachable matrix).  The shared part P_V W P_U is split evenly between the
    two terms, so both carry signal when training goes on."""
    W = np.asarray(W, dtype=np.float64)
    fixed = node.fixed_arrays()
    u1, u2 = fixed[node.keys["U1"]], fixed[node.keys["U2"]]
    u1_pinv, u2_pinv = _pinv(u1), _pinv(u2)
    scale = 2.0 * node.l
    projected = node.spread(u2, node.spread(u2_pinv, W))  # P_V W
    s1 = scale * (W - 0.5 * projected) @ u1_pinv
    s2 = scale * node.spread(u2_pinv, W - 0.5 * (W @ u1_pinv) @ u1)
    return {node.keys["s1"]: s1, node.keys["s2"]: s2}


@dataclass(frozen=True)
class SketchFits:
    """Both initialisations of a sketch from W, with their relative Frobenius errors."""

    estimator: dict
    estimator_error: float
    least_squares: dict
    least_squares_error: float


def compare(W, node_or_text, seed: int = 0, params=None) -> SketchFits:
    """The unbiased estimator and the least-squares fit of a sketch to W.

    >>> W = np.random.default_rng(0).normal(size=(30, 20))
    >>> fits = compare(W, "sketch(k=5, l=2)")
    >>> fits.least_squares_error <= fits.estimator_error
    True
    """
    W = check_target(W)
    node = node_or_text
    if isinstance(node, str):
        node = parse(node, *W.shape, params=params, seed=seed).stages[-1]
    if not isinstance(node, Sketch):
        raise DecompError(f"compare needs a sketch(...) expression, got {node.label()}")
    if node.shape != W.shape:
        raise DecompError(f"the sketch is {node.shape} but W is {W.shape}")
    fixed = node.fixed_arrays()
    est, ls = estimator(W, node), least_squares(W, node)
    return SketchFits(est, rel_error(W, node, est, fixed), ls, rel_error(W, node, ls, fixed))


def _pinv(a):
    # the same relative cutoff as approximate.lstsq: rank-deficient draws stay finite
    return np.linalg.pinv(a, rcond=max(a.shape) * np.finfo(np.float64).eps)


def _fit(W, node, rng):
    return least_squares(W, node)


methods.register(Sketch, _fit)


def whitened_least_squares(W, node: Sketch, R, rng=None) -> dict:
    """The exact least-squares fit in the data norm ||R (W - E)||_F.

    In whitened coordinates the reachable matrices are R A + R B: R A = (R s1) U1
    has its rows in U1's row space, R B = (R V) s2 its columns in R V's column
    space (V = I (x) U2).  ``least_squares``'s argument holds there with P_V
    replaced by the projector onto R V's columns; s1 and s2 then follow by
    solving with R and with R V."""
    W = np.asarray(W, dtype=np.float64)
    fixed = node.fixed_arrays()
    u1, u2 = fixed[node.keys["U1"]], fixed[node.keys["U2"]]
    V = node.spread(u2, np.eye(node.spatial * node.width))  # (n, spatial * l * k)
    RV = R @ V
    RV_pinv = _pinv(RV)
    M = R @ W
    u1_pinv = _pinv(u1)
    on_u = (M @ u1_pinv) @ u1  # M P_U
    on_v = RV @ (RV_pinv @ M)  # P_RV M
    both = RV @ (RV_pinv @ on_u)  # P_RV M P_U
    scale = 2.0 * node.l
    s1 = scale * scipy.linalg.solve_triangular(R, on_u - 0.5 * both, lower=False) @ u1_pinv
    s2 = scale * RV_pinv @ (on_v - 0.5 * both)
    return {node.keys["s1"]: s1, node.keys["s2"]: s2}


methods.register_data_norm(Sketch, whitened_least_squares)
