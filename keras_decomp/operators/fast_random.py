"""F, the fast random basis: draws with the statistics of G generated from a few seeded arrays.

Draw j of ``sum(F, n)`` on a (rows, cols) matrix is

    B_j = A (s * 1[bucket == j]) B,     bucket(p, q) = (p * cols + q) mod m,

with s a random sign matrix (rows, cols) scaled by sqrt(m / rows), ``1[bucket == j]`` the
positions of bucket j (every m-th entry of the flattened matrix, m >= n buckets, m coprime
with cols when possible so that a bucket runs through every row and column), and A (rows,
rows), B (cols, cols) Kronecker products of small Haar-random orthogonal factors (sizes up
to 64).  So vec(W) = P c with P = (A (x) B^T) diag(s) Hash: a count-sketch-like hashing of
the n coefficients onto the entries followed by a random orthogonal mixing of rows and of
columns.  Facts that follow, and that the tests check against a slow explicit build:

- the draws are exactly orthogonal (disjoint buckets, orthogonal A and B) with squared norm
  cols * (bucket size) * m / (rows * cols) ~ cols, so entries have mean 0 and variance 1/rows;
- W = sum_j c_j B_j = A (s * tile(c)) B costs one elementwise pass over rows*cols numbers
  (tile, multiply; no gather) plus Kronecker transforms, and ``x W`` = ((x A) M) B puts
  those transforms on the activations, so a step costs about one dense kernel whatever n;
- P^T P is diagonal, so least squares is one adjoint pass: c_j = <B_j, W> / ||B_j||^2.

numpy only; ``matrix`` and ``apply`` take an array namespace (numpy or keras.ops).
"""

from __future__ import annotations

import math

import numpy as np

FACTOR = 64  # largest Kronecker factor: a size with a larger prime factor keeps it whole


def kron_factors(n: int, most: int = FACTOR) -> tuple[int, ...]:
    """``n`` as a product of few factors of at most ``most`` (a larger prime stays one factor).

    >>> kron_factors(784), kron_factors(4096), kron_factors(10), kron_factors(1009)
    ((49, 16), (64, 64), (10,), (1009,))
    """
    primes, rest, p = [], n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    out: list[int] = []
    for q in sorted(primes, reverse=True):  # first fit, largest first
        for i, f in enumerate(out):
            if f * q <= most:
                out[i] = f * q
                break
        else:
            out.append(q)
    return tuple(sorted(out, reverse=True)) or (1,)


def bucket_count(rows: int, cols: int, n: int) -> int:
    """m: the smallest m >= n coprime with cols (at most rows*cols), else n.

    >>> bucket_count(784, 1024, 50), bucket_count(100, 256, 600), bucket_count(2, 2, 4)
    (51, 601, 4)
    """
    size, m = rows * cols, n
    while m <= size and math.gcd(m, cols) != 1:
        m += 1
    return m if m <= size else n


def bucket_sizes(rows: int, cols: int, n: int) -> np.ndarray:
    """How many entries each of the n used buckets holds (the squared norm of draw j is
    ``bucket_sizes[j] * m / rows``)."""
    size, m = rows * cols, bucket_count(rows, cols, n)
    return np.array([size // m + (j < size % m) for j in range(n)], dtype=np.float64)


def haar(rng: np.random.Generator, f: int) -> np.ndarray:
    """A Haar-random (f, f) orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((f, f)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def array_shapes(rows: int, cols: int) -> dict[str, tuple[int, ...]]:
    """The arrays one F holds: the sign matrix and the Kronecker factors of A and B."""
    out = {".s": (rows, cols)}
    out.update({f".a{i}": (f, f) for i, f in enumerate(kron_factors(rows))})
    out.update({f".b{i}": (f, f) for i, f in enumerate(kron_factors(cols))})
    return out


def arrays(rng: np.random.Generator, rows: int, cols: int) -> dict[str, np.ndarray]:
    """The seeded arrays of one F of shape (rows, cols); they do not depend on n."""
    out = {".s": 2.0 * rng.integers(0, 2, size=(rows, cols)) - 1.0}
    out.update({f".a{i}": haar(rng, f) for i, f in enumerate(kron_factors(rows))})
    out.update({f".b{i}": haar(rng, f) for i, f in enumerate(kron_factors(cols))})
    return out


def _factors(a, letter: str) -> list:
    return [a[k] for k in sorted((k for k in a if k.startswith("." + letter)), key=lambda k: int(k[2:]))]


def kron_apply(x, factors, xp):
    """x (batch, prod f) @ kron(factors): one matmul per factor, the factor on the left of a
    (f, rest) view for all but the last axis, so no transpose of x is ever made.

    >>> rng = np.random.default_rng(0)
    >>> f, g, x = rng.normal(size=(3, 3)), rng.normal(size=(4, 4)), rng.normal(size=(2, 12))
    >>> bool(np.allclose(kron_apply(x, [f, g], np), x @ np.kron(f, g)))
    True
    """
    sizes = tuple(int(f.shape[0]) for f in factors)
    y = x
    for i, f in enumerate(factors):
        after = math.prod(sizes[i + 1:])
        if after == 1:
            y = xp.matmul(xp.reshape(y, (-1, sizes[i])), f)
        else:
            y = xp.matmul(xp.transpose(f), xp.reshape(y, (-1, sizes[i], after)))
    return xp.reshape(y, (-1, math.prod(sizes)))


def core(c, a, n: int, xp):
    """M = scale * s * tile(c): the (rows, cols) matrix between A and B (c None: one draw)."""
    s = a[".s"]
    rows, cols = (int(d) for d in s.shape)
    size, m = rows * cols, bucket_count(rows, cols, n)
    scale = math.sqrt(m / rows)
    if c is None:
        return s * scale
    u = c * scale  # scaled before tiling: no pass over rows*cols for it
    u = xp.pad(u, [[0, m - n]]) if m > n else u
    times = -(-size // m)
    flat = xp.tile(u, [times])
    if times * m != size:
        flat = flat[:size]
    return s * xp.reshape(flat, (rows, cols))


def matrix(c, a, n: int, xp):
    """W = sum_j c_j B_j = A M B, materialised (A M by transforming M's columns).

    >>> a = arrays(np.random.default_rng(0), 6, 4)
    >>> draws = [matrix(np.eye(3)[j], a, 3, np) for j in range(3)]
    >>> W = matrix(np.array([1.0, 2.0, 3.0]), a, 3, np)
    >>> bool(np.allclose(W, draws[0] + 2 * draws[1] + 3 * draws[2]))
    True
    >>> gram = np.array([[np.sum(p * q) for q in draws] for p in draws])  # orthogonal, norms^2 ~ cols
    >>> bool(np.allclose(gram, np.diag(np.diag(gram)))), np.diag(gram).round(6).tolist()
    (True, [4.0, 4.0, 4.0])
    """
    M = core(c, a, n, xp)
    AM = xp.transpose(kron_apply(xp.transpose(M), [xp.transpose(f) for f in _factors(a, "a")], xp))
    return kron_apply(AM, _factors(a, "b"), xp)


def apply(x, c, a, n: int, xp):
    """x W = ((x A) M) B for a 2-D x: the transforms act on the activations.

    >>> a = arrays(np.random.default_rng(0), 6, 4)
    >>> x, c = np.ones((2, 6)), np.array([0.5, -1.0])
    >>> bool(np.allclose(apply(x, c, a, 2, np), x @ matrix(c, a, 2, np)))
    True
    """
    return kron_apply(xp.matmul(kron_apply(x, _factors(a, "a"), xp), core(c, a, n, xp)), _factors(a, "b"), xp)


def adjoint(G, a, n: int) -> np.ndarray:
    """P^T vec(G) = (<B_j, G>)_j for a (rows, cols) G (numpy), in one pass.

    >>> rng = np.random.default_rng(0)
    >>> a = arrays(rng, 6, 4)
    >>> G = rng.normal(size=(6, 4))
    >>> bool(np.allclose(adjoint(G, a, 5), [np.sum(matrix(np.eye(5)[j], a, 5, np) * G) for j in range(5)]))
    True
    """
    s = a[".s"]
    rows, cols = s.shape
    size, m = rows * cols, bucket_count(rows, cols, n)
    at_g = kron_apply(np.asarray(G, dtype=np.float64).T, _factors(a, "a"), np).T  # A^T G
    Mg = kron_apply(at_g, [f.T for f in _factors(a, "b")], np)  # A^T G B^T
    flat = (s * Mg).ravel() * math.sqrt(m / rows)
    times = -(-size // m)
    return np.pad(flat, (0, times * m - size)).reshape(times, m).sum(axis=0)[:n]


def transform_cost(size: int, factors: tuple[int, ...], batch: int) -> int:
    """FLOPs of ``kron_apply`` on a (batch, size) array."""
    return 2 * batch * size * sum(factors) if len(factors) > 1 else 2 * batch * size * factors[0]


def apply_cost(shape: tuple[int, int], batch: int) -> int:
    """FLOPs of ``apply`` on a (batch, rows) input: both transforms and the matmul."""
    rows, cols = shape
    return (transform_cost(rows, kron_factors(rows), batch) + 2 * rows * cols + 2 * batch * rows * cols
            + transform_cost(cols, kron_factors(cols), batch))


def build_cost(shape: tuple[int, int]) -> int:
    """FLOPs of ``matrix``: the core pass and both transforms over the whole matrix."""
    rows, cols = shape
    return 2 * rows * cols + transform_cost(rows, kron_factors(rows), cols) + transform_cost(
        cols, kron_factors(cols), rows)
