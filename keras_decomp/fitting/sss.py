"""SSS fitted to a dense W: Hankel-block SVD (balanced truncation) per stage.

Exact when the state size d is at least every Hankel rank; otherwise each
boundary keeps its d leading singular triplets.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..operators.structures.sss import SSS, _offsets, _stacks
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


def whitened_hankel(W, node: SSS, R, rng=None, sweeps: int = 5) -> dict:
    """The fit in the data norm ||R (W - E)||_F.

    Start: the Hankel SVD of Rb W, Rb the Cholesky factor of the Gram's
    diagonal blocks (one per stage, so Rb^-1 E' is still SSS with the same
    state size: it only scales the rows of D_k, B_k and F_k).  Then
    alternating least squares in the full data norm (``data_norm_sweeps``).
    """
    W = np.asarray(W, dtype=np.float64)
    G = R.T @ R
    ri = _offsets(node.in_sizes)
    blocks = [np.linalg.cholesky(G[a:b, a:b]).T for a, b in zip(ri[:-1], ri[1:])]
    values = hankel_approximation(scipy.linalg.block_diag(*blocks) @ W, node)
    for k, block in enumerate(blocks):
        for letter in "DBF":
            if letter in node.stage_shapes(k):
                unscaled = scipy.linalg.solve_triangular(block, node.stage(values, letter, k), lower=False)
                values = _with_stage(node, values, letter, k, unscaled)
    return data_norm_sweeps(W, node, R, values, sweeps)[0]


def _with_stage(node: SSS, values, letter: str, k: int, X) -> dict:
    """``values`` with stage k's matrix ``letter`` replaced by X, in a copy of its stack."""
    key = node.name(letter, k)
    stack = np.array(values[key], dtype=np.float64)
    stack[k - int(key[len(node.key) + 2:])] = X
    return {**values, key: stack}


def data_norm_sweeps(W, node: SSS, R, values, sweeps: int = 8, tol: float = 1e-6):
    """(values, history of ||R (W - E)||_F / ||R W||_F): alternating least
    squares over the stage matrices in the data norm.

    Each stage matrix X enters E once, in a block E[rows, cols] = left X right
    (between the state stacks), so with the others held the best X is
    argmin ||R (W - E_0)[:, cols] - R[:, rows] left X right||_F, E_0 the rest.
    R E is kept up to date by the change of one block, so a solve costs
    O(n d |cols|), not O(n^2 m).  Each solve is exact: the error never rises.
    """
    RW, RE = R @ W, R @ node.to_dense(values)
    norm = np.linalg.norm(RW) or 1.0
    history = [np.linalg.norm(RW - RE) / norm]
    # one stage matrix at a time (the stacks hold several), stage by stage
    matrices = [(letter, k) for k in range(node.p) for letter in sorted(node.stage_shapes(k))]
    for _ in range(sweeps):
        for letter, k in matrices:
            rows, left, cols, right = _placement(node, letter, k, values)
            Rleft = R[:, rows] if left is None else R[:, rows] @ left
            old = _block(Rleft, node.stage(values, letter, k), right)
            rest = RW[:, cols] - (RE[:, cols] - old)
            X = _between(Rleft, rest, right)
            RE[:, cols] += _block(Rleft, X, right) - old
            values = _with_stage(node, values, letter, k, X)
        history.append(np.linalg.norm(RW - RE) / norm)
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    return values, history


def _placement(node: SSS, letter: str, k: int, values):
    """(rows, left, cols, right): where stage k's matrix ``letter`` enters W, and the
    stacks on each side (None: the identity), as in ``SSS.solve_block``."""
    ri, ro = _offsets(node.in_sizes), _offsets(node.out_sizes)
    reach, observe, back, observe_back = _stacks(node, values)
    here_in, here_out = slice(ri[k], ri[k + 1]), slice(ro[k], ro[k + 1])
    return {"D": (here_in, None, here_out, None),
            "B": (here_in, None, slice(ro[k + 1], None), observe[k + 1] if k + 1 < node.p else None),
            "C": (slice(0, ri[k]), reach[k], here_out, None),
            "A": (slice(0, ri[k]), reach[k], slice(ro[k + 1], None), observe[k + 1] if k + 1 < node.p else None),
            "F": (here_in, None, slice(0, ro[k]), observe_back[k - 1] if k > 0 else None),
            "G": (slice(ri[k + 1], None), back[k] if k < node.p - 1 else None, here_out, None),
            "E": (slice(ri[k + 1], None), back[k] if k < node.p - 1 else None, slice(0, ro[k]),
                  observe_back[k - 1] if k > 0 else None)}[letter]


def _block(left, X, right):
    out = left @ X
    return out if right is None else out @ right


def _between(left, target, right):
    """argmin_X ||target - left X right||_F through the small Gram matrices
    left^T left and right right^T (at most a stage's size across): an SVD of
    the tall left would dominate the sweep.  Their pseudo-inverse cuts what
    they cannot resolve, so rank-deficient stacks give finite values."""
    def solve(gram, rhs):
        return np.linalg.pinv(gram, rcond=gram.shape[0] * 1e-12, hermitian=True) @ rhs
    X = solve(left.T @ left, left.T @ target)
    return X if right is None else solve(right @ right.T, right @ X.T).T


methods.register_data_norm(SSS, whitened_hankel)
