"""SSS fitted to a dense W: Hankel-block SVD (balanced truncation) per stage.

Exact when the state size d is at least every Hankel rank; otherwise each
boundary keeps its d leading singular triplets.
"""

from __future__ import annotations

import numpy as np

from ..operators.structures.sss import SSS, _offsets
from . import methods


def hankel_approximation(W, node: SSS, rng=None) -> dict:
    """The stage matrices of ``node`` fitted to W (n, m).

    The diagonal blocks are copied.  At each boundary k (between stages k-1
    and k) the causal Hankel block H_k = W[inputs < k, outputs >= k] is the
    product R_k O_k of the reachability stack (B_i A..A_{k-1}, i < k) and the
    observability row (C_k, A_k C_{k+1}, ...).  A truncated SVD U s V^T of H_k
    gives the balanced pair R_k = U sqrt(s), O_k = sqrt(s) V^T; B_{k-1} is
    the last block of R_k, C_k the first of O_k, and A_k follows from shift
    invariance: H_k without its first output block is R_k A_k O_{k+1}, so
    A_k = R_k^+ W[inputs < k, outputs > k] O_{k+1}^+.  The anticausal part
    is the causal part of W^T.  Exact when d is at least every Hankel rank.
    """
    W = np.asarray(W, dtype=np.float64)
    p, ins, outs = node.p, node.in_sizes, node.out_sizes
    ri, ro = _offsets(ins), _offsets(outs)
    stages = {("D", k): W[ri[k]:ri[k + 1], ro[k]:ro[k + 1]] for k in range(p)}
    if p > 1:
        B, A, C = _causal_realization(W, ins, outs, node.d)
        Gt, Et, Ft = _causal_realization(W.T, outs, ins, node.d)
        for k in range(p):
            if k < p - 1:
                stages["B", k], stages["G", k] = B[k], Gt[k].T
            if k > 0:
                stages["C", k], stages["F", k] = C[k], Ft[k].T
            if 0 < k < p - 1:
                stages["A", k], stages["E", k] = A[k], Et[k].T
    return node.stacked(stages)


def _causal_realization(W, ins, outs, d):
    """B (k < p-1), A (0 < k < p-1), C (k > 0) for the blocks above W's block diagonal."""
    p = len(ins)
    ri, ro = _offsets(ins), _offsets(outs)
    factors = {}  # boundary k -> (U sqrt(s), sqrt(s) V^T, U, 1/sqrt(s), V)
    for k in range(1, p):
        U, s, Vt = np.linalg.svd(W[:ri[k], ro[k]:], full_matrices=False)
        U, s, Vt = _padded(U, s, Vt, d)
        root = np.sqrt(s)
        inverse = np.divide(1.0, root, out=np.zeros_like(root), where=s > _cutoff(s, W))
        factors[k] = (U * root, root[:, None] * Vt, U, inverse, Vt)
    B = {k - 1: factors[k][0][ri[k - 1]:] for k in range(1, p)}
    C = {k: factors[k][1][:, :outs[k]] for k in range(1, p)}
    A = {}
    for k in range(1, p - 1):
        _, _, U, left, _ = factors[k]
        _, _, _, right, Vt = factors[k + 1]
        shared = W[:ri[k], ro[k + 1]:]  # inputs before stage k, outputs after it
        A[k] = (left[:, None] * (U.T @ shared @ Vt.T)) * right[None, :]
    return B, A, C


def _padded(U, s, Vt, d):
    """The leading d singular triplets, with zeros where the block has fewer."""
    r = min(d, len(s))
    U, s, Vt = U[:, :r], s[:r], Vt[:r]
    if r < d:
        U = np.pad(U, [(0, 0), (0, d - r)])
        Vt = np.pad(Vt, [(0, d - r), (0, 0)])
        s = np.pad(s, (0, d - r))
    return U, s, Vt


def _cutoff(s, W) -> float:
    """Singular values below this are numerically zero (rank-deficient blocks)."""
    return max(W.shape) * np.finfo(np.float64).eps * max(float(np.max(s, initial=0.0)), 1e-300)


methods.register(SSS, hankel_approximation)
