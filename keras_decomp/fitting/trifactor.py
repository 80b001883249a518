"""Simultaneous tri-factorisation of a chain of neighbouring weight matrices.

An MLP's kernels W_0 .. W_{L-1}, W_j of shape (n_j, n_{j+1}), connect L+1
layers of neurons.  Each layer of neurons j gets one factor G_j (n_j, k_j),
shared by the two kernels that touch it, and each kernel a core S_j
(k_j, k_{j+1}):

    W_j ~ G_j S_j G_{j+1}^T

(data fusion as in Zitnik and Zupan's DFMF, used for pruning by Rostan).
Weights are signed, so there is no non-negativity constraint, and the fit is
alternating least squares on

    E = sum_j a_j ||W_j - G_j S_j G_{j+1}^T||_F^2,   a_j = 1 / ||W_j||_F^2

(``weighting="relative"``: each kernel counts by its relative error, so a
784x1024 kernel does not drown a 1024x10 one; ``"absolute"``: a_j = 1).

- start: G_j = the k_j leading left singular vectors of the weighted
  [W_{j-1}^T, W_j] (the neurons' incoming and outgoing weights side by side);
- a sweep solves each G_j exactly by least squares, the cores and other
  factors held, then re-orthonormalises it (G_j = Q R, R moved into S_{j-1}
  and S_j: the products do not change), and finally every core exactly,
  S_j = G_j^T W_j G_{j+1} (the G have orthonormal columns).

Every step is an exact block minimiser, so E never increases; ``history``
records it after the start and after every sweep.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> Ws = [rng.normal(size=(12, 8)), rng.normal(size=(8, 6)), rng.normal(size=(6, 3))]
>>> fit = trifactorize(Ws, ranks=[5, 4, 4, 3])
>>> [g.shape for g in fit.G], [s.shape for s in fit.S]
([(12, 5), (8, 4), (6, 4), (3, 3)], [(5, 4), (4, 4), (4, 3)])
>>> bool(np.all(np.diff(fit.history) <= 1e-12)), len(fit.errors)
(True, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import DecompError

WEIGHTINGS = ("relative", "absolute")


@dataclass
class TriFactorization:
    """The factors of a chain: ``G[j]`` (n_j, k_j) for every layer of neurons,
    ``S[j]`` (k_j, k_{j+1}) for every kernel; ``errors[j]`` is kernel j's
    relative Frobenius error, ``history`` the weighted total E per sweep."""

    G: list
    S: list
    ranks: tuple
    errors: list = field(default_factory=list)
    history: list = field(default_factory=list)

    def approximation(self, j: int) -> np.ndarray:
        """The approximation G_j S_j G_{j+1}^T of kernel j."""
        return self.G[j] @ self.S[j] @ self.G[j + 1].T

    @property
    def num_params(self) -> int:
        """Entries of all factors and cores (each shared G counted once)."""
        return sum(a.size for a in self.G) + sum(a.size for a in self.S)


def trifactorize(matrices: Sequence, ranks=None, sweeps: int = 100, tol: float = 1e-7,
                 weighting: str = "relative") -> TriFactorization:
    """Fit W_j ~ G_j S_j G_{j+1}^T to the chain ``matrices`` (see the module).

    ``ranks``: one k_j per layer of neurons (len(matrices) + 1 numbers), one
    int for all, or a fraction in (0, 1) of each layer's width (at least 1);
    None is ``default_ranks`` (a quarter, at least 16).  A rank above a layer's width is cut to the width.
    Stops after ``sweeps`` sweeps or when a sweep lowers E by less than
    ``tol`` of its value.
    """
    Ws = check_chain(matrices)
    widths = chain_widths(Ws)
    ks = resolve_ranks(ranks, widths)
    if weighting not in WEIGHTINGS:
        raise DecompError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    norms = [float(np.sum(W ** 2)) for W in Ws]
    a = [1.0 / n if weighting == "relative" and n > 0 else 1.0 for n in norms]
    G = [_start(Ws, a, j, k) for j, k in enumerate(ks)]
    S = _cores(Ws, G)
    history = [_objective(Ws, G, S, a)]
    for _ in range(sweeps):
        for j in range(len(G)):
            _update_factor(Ws, G, S, a, j)
        S = _cores(Ws, G)
        history.append(_objective(Ws, G, S, a))
        if history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            break
    fit = TriFactorization(G, S, ks, history=history)
    fit.errors = [_relative(W, fit.approximation(j)) for j, W in enumerate(Ws)]
    return fit


def default_ranks(widths: Sequence[int], fraction: float = 0.25, least: int = 16) -> tuple:
    """``fraction`` of each layer's width, but at least ``least`` (the whole
    width when that is narrower): a rank below the number of classes would
    merge classes in the output layer's approximation.

    >>> default_ranks([784, 256, 40, 10])
    (196, 64, 16, 10)
    """
    return tuple(min(w, max(least, math.ceil(fraction * w))) for w in widths)


def check_chain(matrices) -> list:
    """The matrices as float64 arrays, checked to form a chain."""
    Ws = [np.asarray(W, dtype=np.float64) for W in matrices]
    if not Ws:
        raise DecompError("trifactorize needs at least one matrix")
    for j, W in enumerate(Ws):
        if W.ndim != 2:
            raise DecompError(f"matrix {j} must be 2-D, got shape {W.shape}")
        if not np.all(np.isfinite(W)):
            raise DecompError(f"matrix {j} has NaN or infinite entries")
        if j and Ws[j - 1].shape[1] != W.shape[0]:
            raise DecompError(f"matrices {j - 1} and {j} are not neighbours: {Ws[j - 1].shape} then {W.shape}",
                              hint="the columns of one (its output neurons) must be the rows of the next")
    return Ws


def chain_widths(Ws) -> list:
    """The widths of the L+1 layers of neurons: n_0 .. n_L."""
    return [Ws[0].shape[0]] + [W.shape[1] for W in Ws]


def resolve_ranks(ranks, widths) -> tuple:
    """One rank per layer of neurons, each in 1..width."""
    if ranks is None:
        return default_ranks(widths)
    if isinstance(ranks, float) and not float(ranks).is_integer():
        if not 0 < ranks < 1:
            raise DecompError(f"a fractional rank must be in (0, 1), got {ranks}")
        return default_ranks(widths, ranks, least=1)
    if isinstance(ranks, (int, float, np.integer)) and not isinstance(ranks, bool):
        ranks = [int(ranks)] * len(widths)
    ranks = list(ranks)
    if len(ranks) != len(widths):
        raise DecompError(f"ranks gives {len(ranks)} numbers for {len(widths)} layers of neurons "
                          f"(widths {widths})", hint="give one rank per layer of neurons: inputs, hidden, outputs")
    for k in ranks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DecompError(f"every rank must be an integer >= 1, got {k!r}")
    return tuple(min(int(k), w) for k, w in zip(ranks, widths))


# ---- the steps ---------------------------------------------------------------------

def _start(Ws, a, j, k) -> np.ndarray:
    """k leading left singular vectors of layer j's weighted [incoming^T, outgoing]."""
    blocks = []
    if j > 0:
        blocks.append(math.sqrt(a[j - 1]) * Ws[j - 1].T)
    if j < len(Ws):
        blocks.append(math.sqrt(a[j]) * Ws[j])
    U, _, _ = np.linalg.svd(np.concatenate(blocks, axis=1), full_matrices=True)
    return U[:, :k]


def _cores(Ws, G) -> list:
    """The exact least-squares cores for orthonormal G: S_j = G_j^T W_j G_{j+1}."""
    return [G[j].T @ W @ G[j + 1] for j, W in enumerate(Ws)]


def _update_factor(Ws, G, S, a, j) -> None:
    """G_j by exact least squares, then G_j = Q R with R moved into the cores.

    G_j appears as W_{j-1}^T ~ G_j (G_{j-1} S_{j-1})^T and W_j ~ G_j (S_j G_{j+1}^T).
    The neighbours' G have orthonormal columns, so the normal equations are
    G_j M = B with the small M = a S_{j-1}^T S_{j-1} + a' S_j S_j^T (k_j x k_j)."""
    M = np.zeros((G[j].shape[1],) * 2)
    B = np.zeros(G[j].shape)
    if j > 0:
        M += a[j - 1] * S[j - 1].T @ S[j - 1]
        B += a[j - 1] * Ws[j - 1].T @ (G[j - 1] @ S[j - 1])
    if j < len(Ws):
        M += a[j] * S[j] @ S[j].T
        B += a[j] * Ws[j] @ (G[j + 1] @ S[j].T)
    # M is symmetric: solve through its eigendecomposition, dropping directions
    # it cannot resolve (the minimum-norm solution, finite when M is singular)
    lam, V = np.linalg.eigh(M)
    keep = lam > max(lam[-1], 0.0) * len(lam) * np.finfo(np.float64).eps
    X = ((B @ V[:, keep]) / lam[keep]) @ V[:, keep].T
    Q, R = np.linalg.qr(X)
    G[j] = Q
    if j > 0:
        S[j - 1] = S[j - 1] @ R.T
    if j < len(Ws):
        S[j] = R @ S[j]


def _objective(Ws, G, S, a) -> float:
    return float(sum(aj * np.sum((W - G[j] @ S[j] @ G[j + 1].T) ** 2) for j, (W, aj) in enumerate(zip(Ws, a))))


def _relative(W, approximation) -> float:
    norm = np.linalg.norm(W)
    return float(np.linalg.norm(W - approximation) / (norm if norm > 0 else 1.0))
