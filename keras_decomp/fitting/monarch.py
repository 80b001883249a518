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

from ..operators.structures.monarch import Monarch
from . import methods


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
