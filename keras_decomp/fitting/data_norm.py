"""The data norm: fits that minimise ||X (W - E)||_F over a layer's inputs X.

A layer sees inputs X (rows are samples), so the error that matters is
||X (W - E)||_F, not ||W - E||_F.  Only the Gram matrix G = X^T X enters:
||X D||_F^2 = trace(D^T G D) = ||R D||_F^2 for any R with R^T R = G, so
``Gram`` accumulates G batch by batch (memory n^2, whatever the number of
samples) and ``whitening`` turns it into R (Cholesky of G damped by
``damping`` times its mean diagonal: G may be singular, e.g. pixels that are
always zero; the damping adds a small ridge towards the weight-norm fit).

Fitting E to W in the data norm is fitting R E to R W in the plain Frobenius
norm, so every generic method of ``approximate`` runs unchanged on the node
``R E`` (a fixed factor in front): exact least squares for structures linear
in their parameters, alternating least squares for multilinear ones, the
gradient fallback for the rest.  Structures with a closed form register a
data-norm method (``methods.register_data_norm``); ``lowrank`` is the
whitened truncated SVD: the best rank-r M to R W, then E = R^-1 M
(SVD-LLM's whitening), optimal in the data norm.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X, W = rng.normal(size=(500, 20)) * np.linspace(0.1, 3, 20), rng.normal(size=(20, 12))
>>> gram = Gram(20)
>>> gram.add(X)
>>> whitening(gram.matrix, damping=0.0).shape
(20, 20)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import DecompError
from ..operators import ir

DAMPING = 0.01  # ridge: this fraction of G's mean diagonal is added to its diagonal


class Gram:
    """X^T X accumulated over batches of X (any leading shape, last axis n).

    >>> g = Gram(3)
    >>> g.add(np.eye(3)); g.add(np.eye(3))
    >>> g.count, float(g.matrix[0, 0])
    (6, 2.0)
    """

    def __init__(self, n: int):
        self.matrix = np.zeros((n, n))
        self.total = np.zeros(n)  # the sum of the rows: their mean, for a bias correction
        self.count = 0

    def add(self, X) -> None:
        X = np.asarray(X, dtype=np.float64)
        n = self.matrix.shape[0]
        if X.shape[-1] != n:
            raise DecompError(f"inputs have {X.shape[-1]} features, expected {n}")
        X = X.reshape(-1, n)
        if not np.all(np.isfinite(X)):
            raise DecompError(f"inputs have {int(X.size - np.count_nonzero(np.isfinite(X)))} NaN or "
                              "infinite entries", hint="clean the calibration data")
        self.matrix += X.T @ X
        self.total += X.sum(axis=0)
        self.count += X.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def scatter(self) -> np.ndarray:
        """sum (x - mean)^T (x - mean): the Gram of the centred rows.  A fit in
        this norm plus the bias correction mean (W - E) is the best affine fit."""
        return self.matrix - self.count * np.outer(self.mean, self.mean)


class CrossGram:
    """The statistics of paired inputs: row i of Z (what a layer sees in the
    compressed model) and row i of X (what it sees in the original, for the same
    sample).  Keeps Z^T Z (``inputs``, a Gram), X^T X (``reference``) and the
    cross term Z^T X: memory 3 n^2 whatever the number of samples.

    The compressed layer should give what the original gave: minimise
    ||X W - Z E||_F.  With W* = argmin_V ||X W - Z V||_F (``target``), that is
    ||X W - Z W*||^2 + ||Z (W* - E)||^2 (the residual of a least-squares fit
    is orthogonal to the columns of Z), so E is fitted to W* in the data norm
    of Z: the usual fit, on a corrected target that undoes part of the error
    of the layers before.

    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 6)); Z = X @ np.diag([1, 1, 1, 1, 1, 0.5])
    >>> cross = CrossGram(6); cross.add(Z, X)
    >>> W = rng.normal(size=(6, 3))
    >>> bool(np.allclose(Z @ cross.target(W, damping=0.0), X @ W))
    True
    """

    def __init__(self, n: int):
        self.inputs, self.reference = Gram(n), Gram(n)
        self.cross = np.zeros((n, n))

    def add(self, Z, X) -> None:
        Z, X = np.asarray(Z, dtype=np.float64), np.asarray(X, dtype=np.float64)
        if Z.shape != X.shape:
            raise DecompError(f"paired inputs differ in shape: {Z.shape} in the compressed model, "
                              f"{X.shape} in the original")
        self.inputs.add(Z)
        self.reference.add(X)
        n = self.cross.shape[0]
        self.cross += Z.reshape(-1, n).T @ X.reshape(-1, n)

    def cross_matrix(self, center: bool = False) -> np.ndarray:
        """Z^T X, or with ``center`` the same of the centred rows."""
        if not center:
            return self.cross
        return self.cross - self.inputs.count * np.outer(self.inputs.mean, self.reference.mean)

    def target(self, W, damping: float = DAMPING, center: bool = False) -> np.ndarray:
        """W* = argmin_V ||X W - Z V||^2 + l ||V - W||^2, l = damping * mean(diag G):
        (G + l I)^-1 (C W + l W), the kernel that maps the compressed model's
        inputs closest to the original's outputs (G = Z^T Z and C = Z^T X centred
        with ``center``).  The ridge pulls towards W, so a layer whose inputs are
        the same in both models (Z = X) keeps W* = W whatever the damping."""
        W = np.asarray(W, dtype=np.float64)
        G = self.inputs.scatter() if center else self.inputs.matrix
        scale = float(np.mean(np.diagonal(G))) if G.size else 0.0
        if not scale > 0:
            return W
        ridge = max(damping, 1e-10) * scale
        system = G + ridge * np.eye(G.shape[0])
        return scipy.linalg.solve((system + system.T) / 2, self.cross_matrix(center) @ W + ridge * W,
                                  assume_a="pos")

    def error(self, W, E) -> float:
        """||X W - Z E||_F / ||X W||_F (biases aside)."""
        W, E = np.asarray(W, dtype=np.float64), np.asarray(E, dtype=np.float64)
        reference = float(np.sum(W * (self.reference.matrix @ W)))
        squared = reference - 2 * float(np.sum(E * (self.cross @ W))) + float(np.sum(E * (self.inputs.matrix @ E)))
        squared = max(squared, 0.0)
        return float(np.sqrt(squared / reference)) if reference > 0 else float(np.sqrt(squared))


def whitening(G, damping: float = DAMPING) -> np.ndarray:
    """An invertible upper-triangular R with R^T R = G + damping * mean(diag G) I.

    A zero Gram (no signal at all) gives the identity: the weight norm.  A Gram
    that the damping leaves numerically singular (damping=0 on rank-deficient
    data) gets the smallest jitter that makes its Cholesky succeed.
    """
    G = np.asarray(G, dtype=np.float64)
    G = (G + G.T) / 2
    scale = float(np.mean(np.diagonal(G))) if G.size else 0.0
    if not scale > 0:
        return np.eye(G.shape[0])
    jitter = damping * scale
    for _ in range(20):
        try:
            L = np.linalg.cholesky(G + jitter * np.eye(G.shape[0]))
            if np.all(np.diagonal(L) > np.sqrt(scale) * 1e-7):
                return L.T
        except np.linalg.LinAlgError:
            pass
        jitter = max(jitter * 10, scale * 1e-10)
    raise DecompError("the calibration inputs' Gram matrix cannot be whitened", hint="raise damping")


def data_error(W, E, G) -> float:
    """||X (W - E)||_F / ||X W||_F computed from G = X^T X."""
    D = np.asarray(W, dtype=np.float64) - np.asarray(E, dtype=np.float64)
    num = float(np.sum(D * (G @ D)))
    den = float(np.sum(W * (G @ W)))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else float(np.sqrt(max(num, 0.0)))


@dataclass(frozen=True, eq=False)
class Whiten(ir.Node):
    """The fixed factor R in front of an expression: R E is fitted to R W."""

    matrix: np.ndarray = None

    def materialize(self, v, xp):
        return self.matrix

    def build_cost(self):
        return 0


def whitened(node: ir.Node, R: np.ndarray) -> ir.Node:
    """The node R E (a product flattened, so a trainable factor keeps its fixed
    neighbours as closed-form left and right matrices)."""
    front = Whiten((R.shape[0], R.shape[0]), matrix=R)
    factors = node.factors if isinstance(node, ir.Product) else (node,)
    return ir.Product(node.shape, factors=(front, *factors))


def whitened_svd(W, R, rank: int):
    """The best rank-``rank`` E in the data norm: (R^-1 U_r s_r^1/2, s_r^1/2 V_r^T)
    from the SVD of R W; columns beyond W's rank are zero."""
    U, s, Vt = np.linalg.svd(R @ W, full_matrices=False)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    u = np.zeros((W.shape[0], rank))
    v = np.zeros((rank, W.shape[1]))
    u[:, :k] = scipy.linalg.solve_triangular(R, U[:, :k] * root, lower=False)
    v[:k] = root[:, None] * Vt[:k]
    return u, v


def check_gram(G, n: int) -> np.ndarray:
    """G as a symmetric float64 (n, n) array, or a DecompError saying what is wrong."""
    G = np.asarray(G, dtype=np.float64)
    if G.shape != (n, n):
        raise DecompError(f"the Gram matrix of the inputs is {G.shape}, expected ({n}, {n}) for a kernel "
                          f"with {n} rows")
    if not np.all(np.isfinite(G)):
        raise DecompError("the Gram matrix of the inputs has NaN or infinite entries")
    return (G + G.T) / 2


def refine(W, node, R, values, steps: int = 300):
    """(values, history): Adam on ||R (W - E)||_F from ``values``; the best seen
    is kept, so the data error never rises.  Values of keys that are not
    trainable (a support found by palm4MSA) stay as they are."""
    from .gradient import gradient_fit

    trainable = set(node.param_shapes())
    fixed = {**node.fixed_arrays(), **{k: v for k, v in values.items() if k not in trainable}}
    start = {k: np.asarray(v, dtype=np.float64) for k, v in values.items() if k in trainable}
    scale = max(float(np.sqrt(np.mean([np.mean(np.square(v)) for v in start.values()]))), 1e-8)
    refined, history = gradient_fit(R @ W, whitened(node, R), start, fixed, steps=steps, lr=1e-2 * scale)
    return {**values, **refined}, history
