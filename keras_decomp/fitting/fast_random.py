"""Least squares for sum(F, n=) between fixed factors: min_c ||T - L W(c) R||_F.

Alone (no L, R) the draws are orthogonal and the fit is one adjoint pass
(``FastSum.solve_block``).  Between fixed factors, conjugate gradients on the normal
equations P^T (L^T L (x) R R^T) P c = P^T vec(L^T T R^T), each step one fast transform
and one adjoint, preconditioned by the draws' squared norms: with orthonormal L and R
(``DCT2[:k] sum(F, n)``) it is exact in one step.  numpy only.

>>> import numpy as np
>>> from keras_decomp import parse
>>> node = parse("sum(F, n=12)", 5, 4).stages[0]
>>> L = np.random.default_rng(0).normal(size=(7, 5))
>>> W = L @ node.to_dense({node.key: np.arange(12.0)})
>>> c = solve_between(W, node, node.key, L, None)[node.key]
>>> bool(np.allclose(c, np.arange(12.0)))
True
"""

from __future__ import annotations

import numpy as np

from ..operators import fast_random
from ..operators.structures.fast_random import FastSum


def solve_between(target, node: FastSum, key: str, left=None, right=None, tol: float = 1e-12,
                  iterations: int = 500) -> dict:
    """argmin_c ||target - left W(c) right||_F (left, right None: the identity)."""
    if left is None and right is None:
        return node.solve_block(target, key, {})
    a = node.leaf._mine(node.leaf.generate_fixed())
    n = node.n
    L = None if left is None else np.asarray(left, dtype=np.float64)
    R = None if right is None else np.asarray(right, dtype=np.float64)

    def wrap(M, transpose=False):
        if L is not None:
            M = (L.T @ M) if transpose else (L @ M)
        if R is not None:
            M = (M @ R.T) if transpose else (M @ R)
        return M

    def normal(c):  # A^T A c
        return fast_random.adjoint(wrap(wrap(fast_random.matrix(c, a, n, np)), transpose=True), a, n)

    b = fast_random.adjoint(wrap(np.asarray(target, dtype=np.float64), transpose=True), a, n)
    precond = 1.0 / node.gram_diagonal()
    x = np.zeros(n)
    r = b.copy()
    z = precond * r
    p = z.copy()
    rz = r @ z
    stop = tol * max(np.linalg.norm(b), 1e-300)
    for _ in range(iterations):
        if np.linalg.norm(r) <= stop:
            break
        q = normal(p)
        curvature = p @ q
        if curvature <= 0:  # nothing left that the factors can resolve
            break
        step = rz / curvature
        x += step * p
        r -= step * q
        z = precond * r
        rz, previous = r @ z, rz
        p = z + (rz / previous) * p
    return {key: x}
