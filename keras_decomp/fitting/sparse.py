"""sparse(q=, s=) and butterfly() fitted to a dense W by palm4MSA.

sparse(): free supports found by hierarchical palm4MSA; butterfly(): palm4MSA on
the fixed butterfly supports.
"""

from __future__ import annotations

import math

import numpy as np

from ..operators.structures.butterfly import ButterflyProduct
from ..operators.structures.sparse import SparseFactor, SparseProduct
from . import methods
from . import palm4msa as palm

N_ITER = 60  # palm4MSA sweeps per stage of the fit (local and global)


def fit(W, node: SparseProduct, rng, n_iter: int | None = None) -> dict:
    """Values (and, for sparse(), supports) of ``node`` fitted to W by palm4MSA.

    sparse(): hierarchical palm4MSA peels F_q, F_{q-1}, ... off the right with
    ``splincol`` constraints (s per row and column; the residual of k factors
    s^k), then a palm4MSA pass with exactly s per column (``spcol``) fixes the
    supports.  butterfly(): palm4MSA on the fixed butterfly supports.
    """
    W = np.asarray(W, dtype=np.float64)
    n_iter = n_iter or N_ITER  # read now: a benchmark may lower the module's default
    if isinstance(node, SparseFactor):
        kind = "butterfly" if node.pattern == "butterfly" else "sparse"
        node = SparseProduct(node.shape, factors=(node,), key=node.key, kind=kind, s=node.s)
    if node.kind == "butterfly":
        result = _fit_fixed(W, node, rng, n_iter)
        return _to_values(node, result, fixed_support=True)
    result = _fit_free(W, node, rng, n_iter)
    return _to_values(node, result, fixed_support=False)


def _fit_free(W, node, rng, n_iter) -> palm.Factorization:
    factors = node.factors
    q = len(factors)
    exact = [palm.Constraint("spcol", f.s) for f in factors]
    if q == 1:
        return palm.palm4msa(W, exact, n_iter=n_iter)
    dims = [f.shape[1] for f in factors[:-1]]
    peeled = [palm.Constraint("splincol", factors[q - 1 - l].s) for l in range(q - 1)]
    residual = [palm.Constraint("splincol", min(W.shape[0], math.prod(f.s for f in factors[:q - 1 - l])))
                for l in range(q - 1)]
    rough = palm.hierarchical(W, peeled, residual, n_iter_local=n_iter, n_iter_global=n_iter, dims=dims,
                              rng=rng)
    start = [c(f) for c, f in zip(exact, rough.factors)]
    return palm.palm4msa(W, exact, start, lam=rough.lam * _scale_after(rough.factors, start), n_iter=n_iter)


def _scale_after(before, after) -> float:
    """The scale that keeps lam * product unchanged when each factor is rescaled
    from ``before`` to ``after`` (projection renormalises)."""
    ratio = 1.0
    for b, a in zip(before, after):
        nb, na = np.linalg.norm(b), np.linalg.norm(a)
        ratio *= nb / na if na > 0 else 1.0
    return ratio


def _fit_fixed(W, node, rng, n_iter) -> palm.Factorization:
    """Hierarchical palm4MSA with every constraint a fixed support: a residual's
    support is the boolean product of the supports it stands for."""
    masks = [_mask(f, f.generate_fixed()[f.support_key]) for f in node.factors]
    q = len(masks)
    if q == 1:
        return palm.palm4msa(W, [palm.Support(masks[0])], n_iter=n_iter)
    dims = [f.shape[1] for f in node.factors[:-1]]
    reach = [masks[0]]
    for m in masks[1:-1]:
        reach.append((reach[-1].astype(np.int64) @ m) > 0)
    peeled = [palm.Support(masks[q - 1 - l]) for l in range(q - 1)]
    residual = [palm.Support(reach[q - 2 - l]) for l in range(q - 1)]
    return palm.hierarchical(W, peeled, residual, n_iter_local=n_iter, n_iter_global=n_iter, dims=dims,
                             rng=rng)


def _mask(factor, support) -> np.ndarray:
    rows, cols = factor.shape
    mask = np.zeros((rows + 1, cols), dtype=bool)
    mask[support, np.arange(cols)[:, None]] = True
    return mask[:rows]


def _to_values(node, result: palm.Factorization, fixed_support: bool) -> dict:
    values = {node.factors[0].scale_key: np.asarray(result.lam, dtype=np.float64)}
    for factor, F in zip(node.factors, result.factors):
        rows = factor.shape[0]
        if fixed_support:
            support = factor.generate_fixed()[factor.support_key]
        else:
            support = np.sort(np.argsort(-np.abs(F), axis=0, kind="stable")[:factor.s].T, axis=1)
            values[factor.support_key] = support.astype(np.int64)
        padded = np.vstack([F, np.zeros((1, F.shape[1]))])  # index ``rows`` reads zero
        values[factor.key] = padded[np.minimum(support, rows), np.arange(F.shape[1])[:, None]]
    return values


methods.register(SparseProduct, fit)
methods.register(SparseFactor, fit)
methods.register(ButterflyProduct, fit)
