"""The fixed (untrained) matrices of the language: DCT, Gaussian, sign, ...

Numpy only. W of shape (n, m) acts on row vectors, ``y = x @ W``: columns are outputs.
Random bases draw from ``generator(seed, key)``: the same matrix in every process.
Deterministic bases are cached and read-only, so a caller cannot corrupt the cache.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

from keras_decomp.errors import ArgumentError


def _size(name: str, value, least: int = 1) -> int:
    """``value`` as an int of at least ``least``, or an ArgumentError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ArgumentError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def generator(seed: int, key: tuple[int, ...]) -> np.random.Generator:
    """A random stream fixed by ``seed`` and ``key`` (the same in any process).

    >>> bool(generator(0, (1, 2)).integers(100) == generator(0, (1, 2)).integers(100))
    True
    """
    spawn_key = tuple(_size("key entry", k, least=0) for k in key)
    sequence = np.random.SeedSequence(_size("seed", seed, least=0), spawn_key=spawn_key)
    return np.random.Generator(np.random.PCG64(sequence))


def identity(n: int) -> np.ndarray:
    """The (n, n) identity.

    >>> identity(2).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    return np.eye(_size("n", n))


@functools.lru_cache(maxsize=64, typed=True)  # typed: dct(True) must not hit dct(1)
def dct(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis (n, n), column j = frequency j: ``x @ dct(n)`` is the DCT-II of x.

    >>> bool(np.allclose(dct(4)[:, 0], 0.5)), bool(np.allclose(dct(4).T @ dct(4), np.eye(4)))
    (True, True)
    """
    n = _size("n", n)
    basis = np.cos(np.pi * np.outer(2 * np.arange(n) + 1, np.arange(n)) / (2 * n)) * np.sqrt(2.0 / n)
    basis[:, 0] = np.sqrt(1.0 / n)
    basis.flags.writeable = False
    return basis


def zigzag(h: int, w: int) -> list[tuple[int, int]]:
    """JPEG zig-zag order of the (row, col) frequency pairs of an h x w grid.

    As in JPEG's natural order (index row*w + col), row is the vertical frequency.
    Anti-diagonals row+col = 0, 1, ... alternate: even ones go up-right, odd ones down-left.

    >>> zigzag(3, 3)
    [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (1, 2), (2, 1), (2, 2)]
    """
    return list(_zigzag(_size("h", h), _size("w", w)))


@functools.lru_cache(maxsize=64)
def _zigzag(h: int, w: int) -> tuple[tuple[int, int], ...]:  # a tuple: the cache stays intact
    order = []
    for s in range(h + w - 1):
        rows = range(max(0, s - w + 1), min(s, h - 1) + 1)
        order.extend((r, s - r) for r in (rows if s % 2 else reversed(rows)))
    return tuple(order)


@functools.lru_cache(maxsize=64, typed=True)
def dct2(h: int, w: int) -> np.ndarray:
    """Separable 2-D DCT-II of an h x w image flattened row-major, (h*w, h*w).

    Column t is the orthonormal basis image of frequency ``zigzag(h, w)[t]``, so
    ``dct2(h, w)[:, :k]`` keeps the k lowest frequencies in zig-zag order.

    >>> dct2(2, 3).shape, bool(np.allclose(dct2(2, 3).T @ dct2(2, 3), np.eye(6)))
    ((6, 6), True)
    """
    h, w = _size("h", h), _size("w", w)
    # Column u*w + v of the Kronecker product is outer(dct(h)[:, u], dct(w)[:, v]), flattened.
    basis = np.kron(dct(h), dct(w))[:, [u * w + v for u, v in zigzag(h, w)]]
    basis.flags.writeable = False
    return basis


def gaussian(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) Gaussian matrix, N(0, 1) / sqrt(rows).

    >>> gaussian(generator(0, ()), 3, 2).shape
    (3, 2)
    """
    return rng.standard_normal((_size("rows", rows), _size("cols", cols))) / np.sqrt(rows)


def sign(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) random sign matrix, entries +-1/sqrt(cols) with equal odds.

    >>> sorted(set(np.abs(sign(generator(0, ()), 3, 4)).ravel().tolist()))
    [0.5]
    """
    signs = 2.0 * rng.integers(0, 2, size=(_size("rows", rows), _size("cols", cols))) - 1.0
    return signs / np.sqrt(cols)


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random permutation as an int64 index vector: its P has ``(x @ P)[:, j] = x[:, perm[j]]``.

    >>> sorted(permutation(generator(0, ()), 5).tolist())
    [0, 1, 2, 3, 4]
    """
    return rng.permutation(_size("n", n)).astype(np.int64)


def permutation_matrix(perm: np.ndarray) -> np.ndarray:
    """The dense (n, n) matrix P of an index vector: ``P[perm[j], j] = 1``.

    >>> permutation_matrix(np.array([2, 0, 1])).tolist()
    [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    perm = np.asarray(perm)
    n = perm.shape[0] if perm.ndim == 1 and np.issubdtype(perm.dtype, np.integer) else 0
    if n < 1 or not np.array_equal(np.sort(perm), np.arange(n)):
        raise ArgumentError(f"not a permutation index vector: {perm!r}")
    return np.eye(n)[:, perm]


def rank1(rng: np.random.Generator, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A random rank-1 matrix ``np.outer(u, v)``, as (u, v): u ~ N(0, 1), v ~ N(0, 1) / sqrt(rows).

    >>> [a.shape for a in rank1(generator(0, ()), 3, 2)]
    [(3,), (2,)]
    """
    rows, cols = _size("rows", rows), _size("cols", cols)
    return rng.standard_normal(rows), rng.standard_normal(cols) / np.sqrt(rows)


def diagonal(rng: np.random.Generator, n: int) -> np.ndarray:
    """The diagonal d (length n, N(0, 1)) of a random diagonal matrix ``np.diag(d)``.

    >>> diagonal(generator(0, ()), 4).shape
    (4,)
    """
    return rng.standard_normal(_size("n", n))


def _power_of_two(n: int) -> int:
    n = _size("n", n)
    if n & (n - 1):
        lower = 1 << (n.bit_length() - 1)
        raise ArgumentError(f"H needs a power-of-2 size, got {n}", hint=f"use a size of {lower} or "
                            f"{2 * lower} (e.g. slice or pad the input), or another basis")
    return n


@functools.lru_cache(maxsize=64, typed=True)
def hadamard(n: int) -> np.ndarray:
    """Normalised Sylvester-order Walsh-Hadamard matrix, entries +-1/sqrt(n); symmetric, orthogonal.

    >>> (hadamard(2) * np.sqrt(2)).round(12).tolist()
    [[1.0, 1.0], [1.0, -1.0]]
    """
    n = _power_of_two(n)
    matrix = np.ones((1, 1)) / np.sqrt(n)  # scaled first, so every entry is exactly +-1/sqrt(n)
    while matrix.shape[0] < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    matrix.flags.writeable = False
    return matrix


def fwht(x: np.ndarray) -> np.ndarray:
    """Fast normalised Walsh-Hadamard transform along the last axis, ``x @ hadamard(n)`` in O(n log n).

    >>> fwht(np.array([1.0, 0.0, 0.0, 0.0])).tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise ArgumentError("fwht needs at least one axis, got a scalar")
    n = _power_of_two(x.shape[-1])
    dtype = x.dtype if np.issubdtype(x.dtype, np.inexact) else np.float64
    y = x.astype(dtype).reshape(-1, n)
    for level in range(n.bit_length() - 1):
        half = 1 << level  # butterflies on pairs (i, i + half) in blocks of 2*half: Sylvester order
        pairs = y.reshape(-1, n // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = np.stack([a + b, a - b], axis=2).reshape(-1, n)
    return (y / np.sqrt(n).astype(dtype)).reshape(x.shape)
