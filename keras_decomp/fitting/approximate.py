"""Dense W (numpy) + expression -> the parameters that fit it best.

Methods, chosen from the expression's structure:
- ``lowrank``: truncated SVD (Eckart-Young optimal);
- linear in all its parameters: exact least squares (one block: solved in
  closed form through the tree; several: one system on probed columns,
  through its Gram matrix when the design matrix would be large);
- multilinear (several trainable factors, each appearing once):
  alternating least squares, each block solved exactly, so the error never
  increases from one sweep to the next;
- anything else: gradient descent on ||W - E||_F^2 (``gradient.py``), its
  gradient by reverse-mode differentiation in numpy (``autodiff.py``).
Structures with their own method (sss, sparse, sketch, tri) register it with
``methods.register`` in their module of this package.  numpy and scipy only.

>>> import numpy as np
>>> W = np.random.default_rng(0).normal(size=(20, 12))
>>> values, err = approximate(W, "lowrank(r=12)")
>>> round(err, 8)
0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from ..errors import DecompError
from ..operators import ir
from ..language.parse import parse
from ..operators.structures.basic import Dense, Diag, LowRank, SumOf
from . import methods, progress
from . import monarch, sketch, sparse, sss, tri  # noqa: F401 - each registers its structure's own fit
from .methods import register  # noqa: F401 - the plug-in entry point, also here
from .degree import degree, solved_by_parts
from .data_norm import DAMPING, check_gram, data_error, refine, whitened, whitened_svd, whitening
from .fast_random import FastSum, solve_between
from .target import check_target, rel_error

DESIGN_LIMIT = 4e7  # entries of a design matrix we are willing to hold (320 MB)
PROBE_LIMIT = 5e10  # FLOPs we are willing to spend probing columns


@dataclass
class Approximation:
    values: dict
    rel_error: float  # in the norm that was minimised: the data norm when a Gram was given
    method: str
    history: list = field(default_factory=list)  # relative error after each sweep / step
    weight_error: float | None = None  # ||W - E||_F / ||W||_F
    data_error: float | None = None  # ||X (W - E)||_F / ||X W||_F, with a Gram X^T X


def approximate(W, node_or_text, seed: int = 0, params=None, init: dict | None = None, gram=None,
                damping: float = DAMPING):
    """(values, relative Frobenius error) of the best fit of ``node_or_text`` to W.

    ``node_or_text`` is an IR node or an expression (its last ``|`` stage) for
    W's shape.  ``init`` gives starting values for iterative methods.  With
    ``gram`` = X^T X of the layer's inputs X (n, n), the fit minimises the data
    norm ||X (W - E)||_F instead (``data_norm.py``; ``damping`` regularises a
    singular Gram) and the error returned is ||X (W - E)||_F / ||X W||_F.

    >>> rng = np.random.default_rng(1)
    >>> X, W = rng.normal(size=(200, 16)), rng.normal(size=(16, 8))
    >>> _, weight_fit = approximate(W, "lowrank(r=2)")
    >>> _, data_fit = approximate(W, "lowrank(r=2)", gram=X.T @ X, damping=0.0)
    >>> fit(W, "lowrank(r=2)", gram=X.T @ X).weight_error >= weight_fit
    True
    """
    result = fit(W, node_or_text, seed=seed, params=params, init=init, gram=gram, damping=damping)
    return result.values, result.rel_error


def fit(W, node_or_text, seed: int = 0, params=None, init: dict | None = None, gram=None,
        damping: float = DAMPING) -> Approximation:
    """Like ``approximate`` but returns the method, the error history and both
    errors (``weight_error``, and ``data_error`` when ``gram`` is given)."""
    W = check_target(W)
    node = _node(node_or_text, W.shape, seed, params)
    if gram is not None:
        return fit_data_norm(W, node, check_gram(gram, W.shape[0]), damping, seed, init)
    result = _fit_weight_norm(W, node, seed, init)
    result.weight_error = result.rel_error
    return result


def _fit_weight_norm(W, node, seed, init) -> Approximation:
    rng = np.random.default_rng(seed)
    fixed = node.fixed_arrays()
    values = {**node.init(rng), **(init or {})}
    if not node.param_shapes():
        return Approximation({}, rel_error(W, node, {}, fixed), "none (nothing to train)")
    method = methods.lookup(type(node))
    if method is not None:
        values = method(W, node, rng)
        return Approximation(values, rel_error(W, node, values, fixed), type(node).__name__.lower())
    lowrank = _lowrank_view(W, node)
    if lowrank is not None:
        values = _svd(*lowrank)
        return Approximation(values, rel_error(W, node, values, fixed), "truncated SVD")
    keys = list(node.param_shapes())
    if degree(node, set(keys)) <= 1:
        values = _solve_linear(W, node, values, fixed, keys)
        return Approximation(values, rel_error(W, node, values, fixed), "least squares")
    if all(degree(node, {k}) <= 1 or solved_by_parts(node, k) for k in keys):
        return _als(W, node, values, fixed, keys)
    from .gradient import gradient_fit
    values, history = gradient_fit(W, node, values, fixed)
    return Approximation(values, history[-1], "gradient descent", history)


def fit_data_norm(W, node, gram, damping: float = DAMPING, seed: int = 0, init: dict | None = None):
    """The fit of ``node`` to W in the data norm (see ``data_norm.py``): a
    structure's own data-norm method; the whitened truncated SVD for
    ``lowrank``; otherwise the generic methods on R E against R W, started,
    for a structure with its own weight-norm method only, from that fit."""
    R = whitening(gram, damping)
    fixed = node.fixed_arrays()
    own, weight_method = methods.lookup_data_norm(type(node)), methods.lookup(type(node))
    rng = np.random.default_rng(seed)
    history = []
    if not node.param_shapes():
        values, name = {}, "none (nothing to train)"
    elif own is not None:
        values, name = own(W, node, R, rng), type(node).__name__.lower() + " in the data norm"
    elif isinstance(node, LowRank):
        u, v = whitened_svd(W, R, node.rank)
        values, name = {node.key + ".u": u, node.key + ".v": v}, "whitened truncated SVD"
    elif weight_method is not None:
        start = weight_method(W, node, rng)
        values, history = refine(W, node, R, start)
        name = type(node).__name__.lower() + ", refined by gradient in the data norm"
    else:
        inner = _fit_weight_norm(R @ W, whitened(node, R), seed, {**node.init(rng), **(init or {})})
        values, name, history = inner.values, inner.method + " in the data norm", inner.history
    E = node.materialize({**fixed, **values}, np)
    error = data_error(W, E, gram)
    return Approximation(values, error, name, history, rel_error(W, node, values, fixed), error)


def _node(node_or_text, shape, seed, params) -> ir.Node:
    if isinstance(node_or_text, ir.Node):
        if node_or_text.shape != shape:
            raise DecompError(f"the expression is {node_or_text.shape} but W is {shape}")
        return node_or_text
    return parse(node_or_text, *shape, params=params, seed=seed).stages[-1]


# ---- structure ---------------------------------------------------------------

def _lowrank_view(W, node):
    """(target, LowRank node, other values) when ``node`` is a ``lowrank`` under
    transposes and scalings: (c L)' = W is L = W' / c, so truncated SVD stays
    optimal there.  A trainable scale is redundant with u and is set to 1."""
    scales = {}
    while True:
        if isinstance(node, LowRank):
            return W, node, scales
        if isinstance(node, ir.Transpose):
            node, W = node.child, W.T
        elif isinstance(node, ir.Scale) and node.constant != 0 and node.key not in scales:
            if node.key:
                scales[node.key] = np.ones(())
            node, W = node.child, W / node.constant
        else:
            return None


def _svd(W, node: LowRank, others: dict | None = None) -> dict:
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    r = node.rank
    root = np.sqrt(s[:r])
    u = np.zeros((W.shape[0], r))
    v = np.zeros((r, W.shape[1]))
    k = min(r, len(s))
    u[:, :k] = U[:, :k] * root[:k]
    v[:k] = root[:k, None] * Vt[:k]
    return {**(others or {}), node.key + ".u": u, node.key + ".v": v}


# ---- least squares -------------------------------------------------------------

def _solve_linear(W, node, values, fixed, keys) -> dict:
    if len(keys) == 1:
        return {**values, **solve_block(W, node, values, fixed, keys[0])}
    return {**values, **_probe_solve(W, node, values, fixed, keys)}


def solve_block(target, node, values, fixed, key) -> dict:
    """Exact least squares for the one parameter array ``key``, all else fixed,
    walking down the tree so no design matrix is formed where the structure
    gives a closed form.  A structure may give its own (``node.solve_block``)."""
    own = getattr(node, "solve_block", None)
    if own is not None and key in node.own_params():
        return own(target, key, values)
    if isinstance(node, Dense) and node.key == key:
        return {key: target}
    if isinstance(node, Diag) and node.key == key:
        return {key: np.diagonal(target)[:min(node.shape)].copy()}
    if isinstance(node, LowRank) and key in (node.key + ".u", node.key + ".v"):
        if key.endswith(".u"):
            return {key: lstsq(values[node.key + ".v"].T, target.T).T}
        return {key: lstsq(values[node.key + ".u"], target)}
    if isinstance(node, ir.Transpose):
        return solve_block(target.T, node.child, values, fixed, key)
    if isinstance(node, ir.Scale) and node.key != key:
        factor = node.constant * (values[node.key] if node.key else 1.0)
        if factor != 0:
            return solve_block(target / factor, node.child, values, fixed, key)
    if isinstance(node, ir.Add):
        holders = [i for i, t in enumerate(node.terms) if key in t.param_shapes()]
        if len(holders) == 1:
            i = holders[0]
            rest = sum((s * dense(t, values, fixed) for j, (s, t) in enumerate(zip(node.signs, node.terms))
                        if j != i), np.zeros(node.shape))
            return solve_block((target - rest) * node.signs[i], node.terms[i], values, fixed, key)
    if isinstance(node, ir.Product):
        holders = [i for i, f in enumerate(node.factors) if key in f.param_shapes()]
        if len(holders) == 1:
            i = holders[0]
            inner = node.factors[i]
            if isinstance(inner, FastSum) and key == inner.key:  # fast transforms, no design matrix
                return solve_between(target, inner, key, _chain(node.factors[:i], values, fixed),
                                     _chain(node.factors[i + 1:], values, fixed))
            if isinstance(inner, Dense) or (i == 0 and len(node.factors) == 1):
                left = _chain(node.factors[:i], values, fixed)
                right = _chain(node.factors[i + 1:], values, fixed)
                return solve_block(_between(left, target, right), inner, values, fixed, key)
            return _probe_solve(target, inner, values, fixed, [key],
                                left=_chain(node.factors[:i], values, fixed),
                                right=_chain(node.factors[i + 1:], values, fixed))
    return _probe_solve(target, node, values, fixed, [key])


def _chain(factors, values, fixed):
    """The dense product of ``factors`` (None for an empty product)."""
    if not factors:
        return None
    out = dense(factors[0], values, fixed)
    for f in factors[1:]:
        out = out @ dense(f, values, fixed)
    return out


def _between(left, target, right):
    """argmin_X ||target - left X right||_F = left^+ target right^+ (stably)."""
    X = target if left is None else lstsq(left, target)
    return X if right is None else lstsq(right.T, X.T).T


def dense(node, values, fixed) -> np.ndarray:
    return np.asarray(node.materialize({**fixed, **values}, np), dtype=np.float64)


def lstsq(A, B) -> np.ndarray:
    """Least-squares solution by SVD with a relative cutoff: stable for
    ill-conditioned or rank-deficient A (no NaN, no inf)."""
    cutoff = max(A.shape) * np.finfo(np.float64).eps
    X, *_ = scipy.linalg.lstsq(A, B, cond=cutoff, lapack_driver="gelsd")
    return X


def _probe_solve(target, node, values, fixed, keys, left=None, right=None) -> dict:
    """Least squares on columns found by probing the node one parameter at a
    time (E(e_k) - E(0)), through the Gram matrix when they would not fit."""
    shapes = {k: node.param_shapes()[k] for k in keys}
    p = sum(math.prod(s) for s in shapes.values())
    cost = p * max(node.build_cost(), math.prod(node.shape)) * 2
    if cost > PROBE_LIMIT:
        raise DecompError(f"least squares over {p} parameters of this expression would take ~{cost:.1e} "
                          "FLOPs", hint="train this stage instead of approximating it, or use fewer parameters")
    zero = {**values, **{k: np.zeros(s) for k, s in shapes.items()}}
    wrap = lambda M: M if left is None and right is None else _wrapped(M, left, right)  # noqa: E731
    offset = wrap(dense(node, zero, fixed))
    rhs = (target - offset).ravel()
    column = _column_maker(node, zero, fixed, shapes, offset, wrap)
    if p * rhs.size <= DESIGN_LIMIT:
        theta = lstsq(np.stack([column(j) for j in range(p)], axis=1), rhs)
    else:  # the Gram system, built block by block: p x p, never (size x p)
        theta = _gram_solve(column, p, rhs)
    out, start = {}, 0
    for k, s in shapes.items():
        size = math.prod(s)
        out[k] = theta[start:start + size].reshape(s)
        start += size
    return out


def _gram_solve(column, p: int, rhs) -> np.ndarray:
    """argmin ||A theta - rhs|| from A's Gram matrix, A's columns made on demand,
    at most about DESIGN_LIMIT entries of A held at once.

    The normal equations square A's condition number, so the columns are first
    scaled to unit norm (bases of very different sizes then cost nothing) and
    the scaled Gram matrix is solved by eigendecomposition, dropping what it
    cannot resolve: eigenvalues below p * eps of the largest, i.e. directions
    where A's singular values fall below ~sqrt(p * eps) of its largest.  The
    values stay finite; for nearly parallel columns the fit is that of a
    truncated solve, which lstsq on the design matrix itself could beat.
    """
    chunk = max(1, int(DESIGN_LIMIT // (2 * rhs.size)))
    spans = [range(a, min(a + chunk, p)) for a in range(0, p, chunk)]
    gram, proj = np.zeros((p, p)), np.zeros(p)
    for i, rows in enumerate(spans):
        A = np.stack([column(j) for j in rows], axis=1)
        proj[rows.start:rows.stop] = A.T @ rhs
        for cols in spans[i:]:
            B = A if cols == rows else np.stack([column(j) for j in cols], axis=1)
            block = A.T @ B
            gram[rows.start:rows.stop, cols.start:cols.stop] = block
            gram[cols.start:cols.stop, rows.start:rows.stop] = block.T
    norms = np.sqrt(np.diagonal(gram).copy())
    norms[norms == 0] = 1.0  # an all-zero column: its coefficient stays 0
    gram /= np.outer(norms, norms)
    eigenvalues, vectors = np.linalg.eigh(gram)
    keep = eigenvalues > max(eigenvalues[-1], 0.0) * p * np.finfo(np.float64).eps
    scaled = vectors[:, keep] @ ((vectors[:, keep].T @ (proj / norms)) / eigenvalues[keep])
    return scaled / norms


def _wrapped(M, left, right):
    if left is not None:
        M = left @ M
    if right is not None:
        M = M @ right
    return M


def _column_maker(node, zero, fixed, shapes, offset, wrap):
    """j -> the j-th column of the design matrix, computed on demand."""
    if isinstance(node, SumOf) and list(shapes) == [node.key] and node.mode == "linear":
        first = node.draws[0]
        stack = {s: fixed[node.fixed_key + s] for s in first.array_shapes()}
        return lambda j: wrap(np.asarray(first.from_arrays({s: a[j] for s, a in stack.items()}, np))).ravel()
    slots = [(k, s, i) for k, s in shapes.items() for i in range(math.prod(s))]

    def column(j):
        key, shape, index = slots[j]
        probe = np.zeros(math.prod(shape))
        probe[index] = 1.0
        return (wrap(dense(node, {**zero, key: probe.reshape(shape)}, fixed)) - offset).ravel()
    return column


# ---- alternating least squares ------------------------------------------------------

def _als(W, node, values, fixed, keys, sweeps: int = 100, tol: float = 1e-10) -> Approximation:
    """Each block solve is exact, so a sweep can only lower the error, up to
    rounding and the small-singular-value cutoff of ``lstsq``; a sweep that
    raises it anyway is undone and ends the iteration, so the history never
    increases."""
    history = [rel_error(W, node, values, fixed)]
    bar = progress.Bar(f"ALS {W.shape[0]}x{W.shape[1]}", total=sweeps)
    for sweep in range(sweeps):
        trial = values
        for key in keys:
            trial = {**trial, **solve_block(W, node, trial, fixed, key)}
        error = rel_error(W, node, trial, fixed)
        if not error <= history[-1]:  # also catches NaN
            break
        values = trial
        history.append(error)
        bar.update(sweep + 1, error=error)
        if history[-2] - history[-1] <= tol * max(history[-2], 1e-300):
            break
    bar.close()
    return Approximation(values, history[-1], "alternating least squares", history)
