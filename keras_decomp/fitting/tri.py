"""tri(k=, h=) fitted to a dense W: the truncated SVD, its scale split evenly."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..operators.structures.tri import Tri
from . import methods


def svd_fit(W, node: Tri, rng=None) -> dict:
    """The best fit of ``node`` to W: the truncated SVD of rank min(k, h).

    The scale is split evenly: G_in = U c, S = diag(s) / c^2, G_out = V c with
    c^6 = mean of the kept s^2, so the three factors have comparable norms."""
    W = np.asarray(W, dtype=np.float64)
    (rows, cols), k, h = W.shape, node.k, node.h
    U, s, Vt = np.linalg.svd(W, full_matrices=True)
    r = min(k, h, len(s))
    c = float(np.mean(s[:r] ** 2)) ** (1.0 / 6.0) if r and np.any(s[:r]) else 1.0
    g_in, g_out, core = np.zeros((rows, k)), np.zeros((cols, h)), np.zeros((k, h))
    g_in[:, :min(k, rows)] = U[:, :min(k, rows)] * c  # beyond rank r: orthonormal, S row zero
    g_out[:, :min(h, cols)] = Vt.T[:, :min(h, cols)] * c
    core[np.arange(r), np.arange(r)] = s[:r] / c ** 2
    return {node.keys["g_in"]: g_in, node.keys["s"]: core, node.keys["g_out"]: g_out}


methods.register(Tri, svd_fit)


def whitened_fit(W, node: Tri, R, rng=None) -> dict:
    """The best fit in the data norm ||R (W - E)||_F: ``svd_fit`` of R W, then
    G_in = R^-1 G_in' (the rank-min(k, h) whitened truncated SVD)."""
    values = svd_fit(R @ np.asarray(W, dtype=np.float64), node)
    values[node.keys["g_in"]] = scipy.linalg.solve_triangular(R, values[node.keys["g_in"]], lower=False)
    return values


methods.register_data_norm(Tri, whitened_fit)
