"""monarch(b=) fitted to a dense W in closed form: a truncated SVD per block pair.

W (zero-padded to (b p, b s)) is read as a b x b grid of (p x s) blocks.  The
pair (first-factor block i, second-factor block j) shares the intermediate
entries T_ij = {t < q : (i q + t) mod b = j} (see operators/structures/monarch.py),
so block (i, j) of the product is L_i[:, T_ij] R_j[T_ij', :], a matrix of rank
|T_ij|, and no parameter serves two pairs.  The Frobenius error is the sum of
the blocks' errors, each minimised by its own truncated SVD (Eckart-Young):
the fit is optimal.  Padded rows and columns are zero in the target, so the
fit leaves them zero and pays nothing for them.  For n = m = b^2 every pair
shares one entry: the rank-1 SVD of each block, as in the Monarch paper.

>>> import numpy as np
>>> from keras_decomp import parse
>>> node = parse("monarch(b=4)", 16, 16).stages[0]
>>> W = node.to_dense(node.init(np.random.default_rng(0)))
>>> values = svd_fit(W, node)
>>> bool(np.allclose(node.to_dense(values), W))  # a monarch matrix is recovered exactly
True
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ..operators.structures.monarch import Monarch
from . import methods

SWEEPS = 10  # most alternating sweeps of the data-norm fit


def pair_entries(b: int, q: int) -> list[list[np.ndarray]]:
    """T[i][j]: the first-factor outputs t of block i that reach second-factor block j."""
    t = np.arange(q)
    return [[t[(i * q + t) % b == j] for j in range(b)] for i in range(b)]


def svd_fit(W, node: Monarch, rng=None) -> dict:
    """The best fit of ``node`` to W (Frobenius norm): L (b, p, q) and R (b, q, s)."""
    W = np.asarray(W, dtype=np.float64)
    (n, m), b, (p, q, s) = W.shape, node.blocks, node.sizes
    padded = np.zeros((b * p, b * s))
    padded[:n, :m] = W
    blocks = padded.reshape(b, p, b, s).transpose(0, 2, 1, 3)  # [i, j] = the (p, s) block
    U, sigma, Vt = np.linalg.svd(blocks, full_matrices=False)  # batched over the b x b pairs
    L, R = np.zeros((b, p, q)), np.zeros((b, q, s))
    for i, row in enumerate(pair_entries(b, q)):
        for j, ts in enumerate(row):
            k = len(ts)
            if not k:
                continue
            root = np.sqrt(sigma[i, j, :k])
            L[i][:, ts] = U[i, j][:, :k] * root
            R[j][(i * q + ts) // b, :] = root[:, None] * Vt[i, j][:k]
    return {node.key + ".l": L, node.key + ".r": R}


methods.register(Monarch, svd_fit)


def whitened_fit(W, node: Monarch, R, rng=None) -> dict:
    """The fit in the data norm ||R (W - E)||_F (R^T R the damped Gram).

    Two starts: ``svd_fit`` of W, and ``svd_fit`` of Rb W with Rb the Cholesky
    factor of the Gram's diagonal blocks of p rows, the first factor's input
    blocks (so Rb^-1 keeps L block-diagonal: L_i <- Rb_i^-1 L_i).  From each,
    the second factor is solved exactly in the data norm (its blocks see
    disjoint outputs: one small least-squares problem per block), and the
    start with the lower data error is kept: never worse than the weight fit.
    Then alternating sweeps (``als_sweeps``) refine both factors in the data
    norm."""
    W = np.asarray(W, dtype=np.float64)
    n, b, p = W.shape[0], node.blocks, node.sizes[0]
    G = R.T @ R
    spans = [(i * p, min((i + 1) * p, n)) for i in range(b)]
    chol = [np.linalg.cholesky(G[a:e, a:e]).T for a, e in spans]
    whitened = svd_fit(scipy.linalg.block_diag(*chol) @ W, node)
    L = whitened[node.key + ".l"].copy()
    for i, ((a, e), c) in enumerate(zip(spans, chol)):
        L[i][:e - a] = scipy.linalg.solve_triangular(c, L[i][:e - a], lower=False)
    best = None
    for start in (svd_fit(W, node)[node.key + ".l"], L):
        values = {node.key + ".l": start, node.key + ".r": _second_factor(W, node, R, start)}
        error = np.linalg.norm(R @ (W - node.to_dense(values)))
        if best is None or error < best[0]:
            best = (error, values)
    return als_sweeps(W, node, R, best[1])[0]


def als_sweeps(W, node: Monarch, R, values: dict, sweeps: int = SWEEPS, tol: float = 1e-3):
    """(values, data errors): alternate the first factor (conjugate gradients,
    ``_first_factor``) and the second (exact, ``_second_factor``) in the data
    norm from ``values``, until a sweep lowers the error by less than ``tol``
    (relative).  Neither step can raise the error: it never rises."""
    G, (l, r) = R.T @ R, (node.key + ".l", node.key + ".r")
    norm = max(float(np.linalg.norm(R @ W)), 1e-300)
    history = [float(np.linalg.norm(R @ (W - node.to_dense(values)))) / norm]
    for _ in range(sweeps):
        first = _first_factor(W, node, G, values[l], values[r])
        values = {**values, l: first, r: _second_factor(W, node, R, first)}
        history.append(float(np.linalg.norm(R @ (W - node.to_dense(values)))) / norm)
        if history[-1] > history[-2] * (1 - tol):
            break
    return values, history


def _second_factor(W, node: Monarch, R, L) -> np.ndarray:
    """argmin over the second factor of ||R (W - E)||_F with L held: block j of
    the second factor writes output columns j s .. (j+1) s alone."""
    (n, m), b, (p, q, s) = W.shape, node.blocks, node.sizes
    x = np.pad(np.eye(n), [(0, 0), (0, b * p - n)])
    z = np.matmul(np.transpose(x.reshape(n, b, p), (1, 0, 2)), L)  # (b, n, q), as Monarch.apply
    z = np.transpose(z, (2, 1, 0)) if q == b else np.transpose(
        np.transpose(z, (1, 0, 2)).reshape(n, q, b), (2, 0, 1))
    target = np.pad(R @ W, [(0, 0), (0, b * s - m)])
    out = np.zeros((b, q, s))
    for j in range(b):
        out[j] = np.linalg.lstsq(R @ z[j], target[:, j * s:(j + 1) * s], rcond=None)[0]
    return out



def _spread(node: Monarch, right: np.ndarray) -> np.ndarray:
    """B (b q, b s) with E (zero-padded) = blockdiag(L_1 .. L_b) B for the second
    factor ``right``: row i q + t of B is row (i q + t) div b of the second
    factor's block j = (i q + t) mod b, in output columns j s .. (j + 1) s."""
    b, (_, q, s) = node.blocks, node.sizes
    f = np.arange(b * q)
    B = np.zeros((b * q, b, s))
    B[f, f % b] = right[f % b, f // b]
    return B.reshape(b * q, b * s)


def _first_factor(W, node: Monarch, G, L, right, iterations: int = 60) -> np.ndarray:
    """Lower ||R (W - E)||_F (G = R^T R) over the first factor with the second held:
    conjugate gradients on the normal equations P(G A K) = P(G W B^T), A =
    blockdiag(L) and P keeping its diagonal blocks (K = B B^T).  Starts at ``L``;
    each step lowers the (convex, quadratic) error, so the result is never worse."""
    (n, m), b, (p, q) = W.shape, node.blocks, node.sizes[:2]
    B = _spread(node, right)[:, :m]  # padded outputs are dropped: they cost nothing
    K = B @ B.T
    Gp = np.zeros((b * p, b * p))  # padded inputs are zero: their rows of L cost nothing either
    Gp[:n, :n] = G
    Wp = np.zeros((b * p, m))
    Wp[:n] = W

    def diagonal(M):  # the (b, p, q) diagonal blocks of a (b p, b q) matrix
        return np.einsum("ipiq->ipq", M.reshape(b, p, b, q))

    G_by_block = Gp.reshape(b * p, b, p).transpose(1, 0, 2)  # (b, b p, p): the columns of each block
    K_by_block = K.reshape(b * q, b, q).transpose(1, 0, 2)  # (b, b q, q)

    def apply(A):  # diagonal(G blockdiag(A) K), block by block: never the dense blockdiag(A)
        GA = np.matmul(G_by_block, A).transpose(1, 0, 2).reshape(b * p, b * q)
        return np.matmul(GA.reshape(b, p, b * q), K_by_block)
    x = np.array(L, dtype=np.float64)
    r = diagonal(Gp @ Wp @ B.T) - apply(x)
    d, rr = r.copy(), float(np.sum(r * r))
    scale = rr
    for _ in range(iterations):
        if rr <= 1e-24 * scale or rr == 0:
            break
        Ad = apply(d)
        curvature = float(np.sum(d * Ad))
        if curvature <= 0:
            break
        alpha = rr / curvature
        x += alpha * d
        r -= alpha * Ad
        rr, old = float(np.sum(r * r)), rr
        d = r + (rr / old) * d
    return x


methods.register_data_norm(Monarch, whitened_fit)
