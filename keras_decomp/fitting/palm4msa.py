"""palm4MSA and hierarchical palm4MSA: W ~ lam * F_1 F_2 ... F_J with sparse F_j.

Numpy only.  Our own implementation of the algorithms of Le Magoarou and
Gribonval, "Flexible multilayer sparse approximations of matrices and
applications" (IEEE JSTSP 2016), in the library's row-vector convention:
W is (n, m), ``x @ W`` applies F_1 first.  The paper's ``splin`` on A = W^T
(s non-zeros in each row of A) is ``spcol`` here (s in each column of W).

palm4MSA is PALM (proximal alternating linearised minimisation) on
1/2 ||W - lam L F_j R||_F^2, one factor at a time: a gradient step of size
1/c_j with the Lipschitz constant c_j = lam^2 ||L||_2^2 ||R||_2^2 of the
gradient (L and R the products of the factors left and right of F_j; spectral
norms by warm-started power iteration), then the projection onto the factor's
constraint set; after each sweep lam is the least-squares scale
<W, P> / <P, P> of the product P.  Projections return unit Frobenius norm
(``normcol``: unit columns), so lam carries the scale.

Hierarchical palm4MSA peels one factor at a time off the residual: the
residual T is split into T' F (two-factor palm4MSA, F sparse, T' less
sparse), then all factors found so far are refined together (a global
palm4MSA from the current values).  The factors need ``splincol`` (s per
row and per column) for the Hadamard matrix to come out exact; with ``splin``
or ``spcol`` alone both this code and pyfaust stop near 0.97.  Everything is
deterministic: the initialisation is fixed (identity and zero factors, plus
noise from a seeded ``rng`` where an identity would leave rows empty), ties
in the projections are broken by position.

>>> W = np.kron(np.kron([[1., 1.], [1., -1.]], [[1., 1.], [1., -1.]]), [[1., 1.], [1., -1.]])
>>> result = hierarchical(W, [Constraint("splincol", 2)] * 2, [Constraint("splincol", 4), Constraint("splincol", 2)])
>>> len(result.factors), result.rel_error < 1e-12
(3, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import progress

# ---- projections ----------------------------------------------------------------------------


def _unit(X: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(X)
    return X / norm if norm > 0 else X


def _keep_largest(X: np.ndarray, k: int, axis: int) -> np.ndarray:
    """X with all but its k largest-magnitude entries along ``axis`` set to zero.

    Ties at the threshold go to the lower index, so the result depends on X
    alone (not on a sort algorithm): O(size) by a partition, not a sort.
    """
    size = X.shape[axis]
    if k >= size:
        return X.copy()
    mag = np.abs(X)
    threshold = np.take(-np.partition(-mag, k - 1, axis=axis), [k - 1], axis=axis)
    above = mag > threshold
    tied = mag == threshold
    room = k - np.sum(above, axis=axis, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=axis) <= room))
    return np.where(keep, X, 0.0)


def splin(X: np.ndarray, k: int) -> np.ndarray:
    """The k largest-magnitude entries of each row, then unit Frobenius norm.

    >>> splin(np.array([[3., -4., 1.], [0., 2., -1.]]), 1).tolist()
    [[0.0, -0.8944271909999159, 0.0], [0.0, 0.4472135954999579, 0.0]]
    """
    return _unit(_keep_largest(np.asarray(X, dtype=np.float64), int(k), axis=1))


def spcol(X: np.ndarray, k: int) -> np.ndarray:
    """The k largest-magnitude entries of each column, then unit Frobenius norm.

    >>> spcol(np.array([[3., 0.], [-4., 1.]]), 1).tolist()
    [[0.0, 0.0], [-0.9701425001453319, 0.24253562503633297]]
    """
    return _unit(_keep_largest(np.asarray(X, dtype=np.float64), int(k), axis=0))


def splincol(X: np.ndarray, k: int) -> np.ndarray:
    """The entries among the k largest of their row or of their column (the
    union of the splin and spcol supports), then unit Frobenius norm.

    >>> (splincol(np.array([[3., 2., 0.], [1., 0., 0.], [0., 0., 5.]]), 1) != 0).astype(int).tolist()
    [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    """
    X = np.asarray(X, dtype=np.float64)
    keep = (_keep_largest(X, int(k), axis=0) != 0) | (_keep_largest(X, int(k), axis=1) != 0)
    return _unit(np.where(keep, X, 0.0))


def sp(X: np.ndarray, k: int) -> np.ndarray:
    """The k largest-magnitude entries of the whole matrix, then unit Frobenius norm.

    >>> sp(np.array([[3., 0.], [-4., 1.]]), 2).tolist()
    [[0.6, 0.0], [-0.8, 0.0]]
    """
    X = np.asarray(X, dtype=np.float64)
    return _unit(_keep_largest(X.reshape(1, -1), int(k), axis=1).reshape(X.shape))


def normcol(X: np.ndarray, k: float = 1.0) -> np.ndarray:
    """Every non-zero column scaled to norm k (zero columns stay zero).

    >>> normcol(np.array([[3., 0.], [4., 0.]])).round(12).tolist()
    [[0.6, 0.0], [0.8, 0.0]]
    """
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=0)
    return X * np.where(norms > 0, k / np.where(norms > 0, norms, 1.0), 0.0)


def support(X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The entries on a fixed support ``mask``, then unit Frobenius norm.

    >>> support(np.array([[3., 1.], [4., 1.]]), np.array([[True, False], [True, False]])).tolist()
    [[0.6, 0.0], [0.8, 0.0]]
    """
    return _unit(np.where(mask, np.asarray(X, dtype=np.float64), 0.0))


PROJECTIONS: dict[str, Callable] = {"splin": splin, "spcol": spcol, "splincol": splincol, "sp": sp,
                                    "normcol": normcol}


@dataclass(frozen=True)
class Constraint:
    """A constraint set, applied by its projection: ``Constraint("spcol", 2)(X)``."""

    name: str
    value: float

    def __post_init__(self):
        if self.name not in PROJECTIONS:
            raise ValueError(f"unknown constraint {self.name!r}; known: {', '.join(PROJECTIONS)}")
        if not self.value > 0:
            raise ValueError(f"{self.name} needs a positive value, got {self.value!r}")

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return PROJECTIONS[self.name](X, self.value)


class Support:
    """The constraint set of matrices on a fixed support: ``Support(mask)(X)``."""

    def __init__(self, mask: np.ndarray):
        self.mask = np.asarray(mask, dtype=bool)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return support(X, self.mask)


# ---- palm4MSA --------------------------------------------------------------------------------


@dataclass
class Factorization:
    """lam * factors[0] @ factors[1] @ ... and the relative error after each sweep."""

    factors: list
    lam: float
    history: list = field(default_factory=list)

    @property
    def rel_error(self) -> float:
        return self.history[-1] if self.history else math.nan

    def product(self) -> np.ndarray:
        return self.lam * chain(self.factors)


def chain(factors: Sequence[np.ndarray]) -> np.ndarray:
    out = factors[0]
    for f in factors[1:]:
        out = out @ f
    return out


class _Norm2:
    """Squared spectral norms by power iteration, warm-started per slot: the
    factors move little between sweeps, so a few iterations suffice."""

    def __init__(self, tol: float = 1e-6, max_iter: int = 100):
        self.tol, self.max_iter, self.vectors = tol, max_iter, {}

    def __call__(self, X: np.ndarray | None, slot) -> float:
        if X is None:
            return 1.0
        v = self.vectors.get(slot)
        if v is None or v.shape[0] != X.shape[1]:
            v = np.ones(X.shape[1]) / math.sqrt(X.shape[1])
        value = 0.0
        for _ in range(self.max_iter):
            w = X.T @ (X @ v)
            new = float(np.linalg.norm(w))
            if new == 0.0:
                return 0.0
            v = w / new
            if abs(new - value) <= self.tol * new:
                value = new
                break
            value = new
        self.vectors[slot] = v
        return value


def palm4msa(W, constraints: Sequence[Constraint], factors: Sequence[np.ndarray] | None = None,
             lam: float | None = None, n_iter: int = 100, tol: float = 1e-12, rtol: float = 1e-9,
             dims: Sequence[int] | None = None, order: str = "right", norms: _Norm2 | None = None
             ) -> Factorization:
    """Fit lam * F_1 ... F_J to W, F_j in the set of ``constraints[j]``.

    A sweep updates F_J first and F_1 last (``order="right"``) or the other
    way round (``"left"``).  ``factors`` are starting values (with ``lam``
    None, each is scaled to unit norm and ``lam`` is the best scale of their
    product); by default (``lam`` 1) the factor updated last is zero and the others are identity-like, so the
    first sweep projects the identities and then takes the zero factor one
    gradient step from the data.  ``dims`` are the inner sizes (default: W's
    row count).  Stops after ``n_iter`` sweeps, when the relative error is
    below ``tol``, or when a sweep changes it by less than ``rtol`` (relative;
    a sweep that moves a support may raise it for a while, so a rise is no stop).

    >>> rng = np.random.default_rng(0)
    >>> A, B = spcol(rng.normal(size=(6, 6)), 3), spcol(rng.normal(size=(6, 5)), 2)
    >>> fit = palm4msa(A @ B, [Constraint("spcol", 3), Constraint("spcol", 2)], factors=[A, B])
    >>> fit.rel_error < 1e-12
    True
    """
    if order not in ("left", "right"):
        raise ValueError(f"order must be 'left' or 'right', got {order!r}")
    W = np.asarray(W, dtype=np.float64)
    J = len(constraints)
    if factors is None:
        factors = initial_factors(W.shape, J, dims, zero=0 if order == "right" else J - 1)
    factors = [np.asarray(f, dtype=np.float64).copy() for f in factors]
    if len(factors) != J:
        raise ValueError(f"{J} constraints but {len(factors)} factors")
    if lam is None:
        factors = [_unit(f) for f in factors]
        lam = _best_scale(W, chain(factors), 1.0)
    norms = norms or _Norm2()
    norm_w = float(np.linalg.norm(W)) or 1.0
    history = []
    sweep = _sweep_left if order == "left" else _sweep_right
    bar = progress.Bar(f"palm4MSA {W.shape[0]}x{W.shape[1]}, {J} factors", total=n_iter)
    for i in range(n_iter):
        product = sweep(W, constraints, factors, lam, norms)
        lam = _best_scale(W, product, lam)
        history.append(float(np.linalg.norm(W - lam * product)) / norm_w)
        bar.update(i + 1, error=history[-1])
        if history[-1] <= tol or (len(history) > 1 and abs(history[-2] - history[-1]) <= rtol * history[-2]):
            break
    bar.close()
    return Factorization(factors, lam, history)


def initial_factors(shape, J: int, dims=None, zero: int = 0) -> list[np.ndarray]:
    """Identity-like (rows, cols) factors, factor ``zero`` all zeros."""
    n, m = shape
    dims = [n] + list(dims if dims is not None else [n] * (J - 1)) + [m]
    out = [np.eye(dims[j], dims[j + 1]) for j in range(J)]
    out[zero] = np.zeros_like(out[zero])
    return out


def _step(W, F, left, right, lam, norms, slot, constraint) -> np.ndarray:
    """One projected gradient step on F in 1/2 ||W - lam left F right||^2
    (``left``/``right`` None: identity), step 1/c with c above the Lipschitz constant."""
    c = (1.0 + 1e-3) * lam * lam * norms(left, ("L",) + slot) * norms(None if right is None else right.T,
                                                                    ("R",) + slot)
    if c > 0:
        LF = F if left is None else left @ F
        residual = lam * (LF if right is None else LF @ right) - W
        grad = residual if right is None else residual @ right.T
        grad = lam * (grad if left is None else left.T @ grad)
        F = F - grad / c
    return constraint(F)


def _sweep_left(W, constraints, factors, lam, norms) -> np.ndarray:
    """Update F_1 ... F_J in turn (each sees the new factors on its left);
    returns the new product."""
    J = len(factors)
    right = [None] * J  # right[j] = F_{j+1} ... F_J
    for j in range(J - 2, -1, -1):
        right[j] = factors[j + 1] if right[j + 1] is None else factors[j + 1] @ right[j + 1]
    left = None
    for j in range(J):
        factors[j] = _step(W, factors[j], left, right[j], lam, norms, (J, j), constraints[j])
        left = factors[j] if left is None else left @ factors[j]
    return left


def _sweep_right(W, constraints, factors, lam, norms) -> np.ndarray:
    """Update F_J ... F_1 in turn (each sees the new factors on its right)."""
    J = len(factors)
    left = [None] * J  # left[j] = F_1 ... F_{j-1}
    for j in range(1, J):
        left[j] = factors[j - 1] if left[j - 1] is None else left[j - 1] @ factors[j - 1]
    right = None
    for j in range(J - 1, -1, -1):
        factors[j] = _step(W, factors[j], left[j], right, lam, norms, (J, j), constraints[j])
        right = factors[j] if right is None else factors[j] @ right
    return right


def _best_scale(W, product, lam) -> float:
    energy = float(np.vdot(product, product))
    return float(np.vdot(W, product)) / energy if energy > 0 else lam


# ---- hierarchical palm4MSA ---------------------------------------------------------------------


def hierarchical(W, factor_constraints: Sequence[Constraint], residual_constraints: Sequence[Constraint],
                 n_iter_local: int = 50, n_iter_global: int = 50, dims: Sequence[int] | None = None,
                 tol: float = 1e-12, rtol: float = 1e-9, rng: np.random.Generator | None = None
                 ) -> Factorization:
    """Fit lam * F_1 ... F_J to W by peeling factors off the right, J-1 levels.

    Level l (1-based) splits the residual T_{l-1} (T_0 = W) into
    T_l @ F_{J-l+1}: F_{J-l+1} in ``factor_constraints[l-1]``, T_l in
    ``residual_constraints[l-1]``; then refines all factors together.  The
    last residual is F_1, so ``residual_constraints[-1]`` is F_1's constraint.
    ``dims`` are the inner sizes F_1 ... F_J meet at (default: W's rows).
    Each split starts from a zero residual and an identity-like factor.  When
    the factor has more rows than columns, the identity leaves rows empty, and
    no gradient ever reaches them (nor the residual's matching columns): with
    ``rng`` those rows start from Gaussian noise (0.1 per entry) instead.

    >>> H = np.array([[1., 1.], [1., -1.]])
    >>> result = hierarchical(np.kron(H, H), [Constraint("splincol", 2)], [Constraint("splincol", 2)])
    >>> result.rel_error < 1e-12
    True
    """
    W = np.asarray(W, dtype=np.float64)
    J = len(factor_constraints) + 1
    if len(residual_constraints) != J - 1:
        raise ValueError(f"{J - 1} factor constraints need {J - 1} residual constraints, "
                         f"got {len(residual_constraints)}")
    n, m = W.shape
    dims = list(dims) if dims is not None else [n] * (J - 1)
    sizes = [n] + dims + [m]
    peeled: list[np.ndarray] = []  # F_{J-l+1}, ..., F_J after level l
    residual, lam = W / (np.linalg.norm(W) or 1.0), float(np.linalg.norm(W))
    history: list[float] = []
    norms = _Norm2()
    for level in range(1, J):
        inner = sizes[J - level]
        start = initial_factors(residual.shape, 2, [inner])
        rows, cols = start[1].shape
        if rng is not None and rows > cols:
            start[1][cols:] = 0.1 * rng.normal(size=(rows - cols, cols))
        local = palm4msa(residual, [residual_constraints[level - 1], factor_constraints[level - 1]], start,
                         lam=1.0, n_iter=n_iter_local, tol=tol, rtol=rtol)
        T, F = local.factors
        constraints = [residual_constraints[level - 1], factor_constraints[level - 1]]
        constraints += [factor_constraints[k] for k in range(level - 2, -1, -1)]
        glob = palm4msa(W, constraints, [T, F] + peeled, lam=lam * local.lam, n_iter=n_iter_global,
                        tol=tol, rtol=rtol, norms=norms)
        residual, peeled, lam = glob.factors[0], glob.factors[1:], glob.lam
        history += glob.history
    return Factorization([residual] + peeled, lam, history)
