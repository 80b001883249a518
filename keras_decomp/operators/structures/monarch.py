"""monarch(b=): two block-diagonal factors with b blocks and the transpose
permutation between them (Dao et al., "Monarch: Expressive Structured Matrices
for Efficient and Accurate Training", 2022; our own code).

In the row-vector convention, y = x W with W of shape (n, m):

- the input is cut into b blocks of p = ceil(n/b) entries (zero-padded to b p);
- the first factor L (b, p, q) maps input block i to q intermediate entries,
  so the intermediate vector, in order (block i, entry t), has b q entries;
- the permutation reads that vector as a (q, b) array and transposes it: the
  entry at flat position f = i q + t goes to block f mod b of the second
  factor, at position f div b (for q = b this is the plain transpose (i, t) ->
  (t, i));
- the second factor R (b, q, s) maps each of its b blocks of q entries to
  s = ceil(m/b) outputs; the b s outputs are cut to m.

q = min(p, s), so the intermediate holds about min(n, m) entries (full rank is
reachable).  Trainable parameters: b q (p + s); for n = m divisible by b that
is 2 n^2 / b (4096 x 4096 with b=64: 524,288 = 1/32 of dense); for n != m
divisible by b it is min(n, m) (n + m) / b.

Apply: two batched matmuls (b blocks each) and two transposes, the same in
numpy and keras.ops; no gathers.  Every (first block i, second block j) pair
shares the intermediate entries {t : (i q + t) mod b = j}, so W's (i, j) block
(p x s) is a product of rank at most that count, and the pairs own disjoint
parameters: the best fit to a dense W is a truncated SVD per block pair
(fitting/monarch.py).

A b that leaves a whole block of padding (b > n, or ceil(n/b) (b - 1) >= n) is
an error with a caret: such a block would hold parameters that read or write
nothing.

>>> from keras_decomp import parse
>>> node = parse("monarch(b=4)", 16, 16).stages[0]
>>> node.num_params == 2 * 16 * 16 // 4, node.blocks
(True, 4)
>>> parse("monarch(b=64)", 4096, 4096).stages[0].num_params
524288
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import ShapeError
from ..ir import Node, matmul_cost
from .registry import Structure, register


def block_sizes(n: int, m: int, b: int) -> tuple[int, int, int]:
    """(p, q, s): input block, intermediate block and output block sizes of monarch(b=) on (n, m).

    >>> block_sizes(4096, 4096, 64), block_sizes(10, 6, 3)
    ((64, 64, 64), (4, 2, 2))
    """
    p, s = -(-n // b), -(-m // b)
    return p, min(p, s), s


def monarch_count(n: int, m: int, b: int) -> int:
    """Trainable parameters of monarch(b=) on (n, m): b q (p + s)."""
    p, q, s = block_sizes(n, m, b)
    return b * q * (p + s)


def valid_blocks(n: int, m: int, b: int) -> bool:
    """Whether b blocks leave no block made of padding only, on either side."""
    if b < 1 or b > min(n, m):
        return False
    p, _, s = block_sizes(n, m, b)
    return (b - 1) * p < n and (b - 1) * s < m


@dataclass(frozen=True)
class Monarch(Node):
    """W = BlockDiag(L) P BlockDiag(R), cut to (n, m); see the module doc."""

    key: str = ""
    blocks: int = 1

    @property
    def sizes(self) -> tuple[int, int, int]:
        return block_sizes(*self.shape, self.blocks)

    def own_params(self):
        b, (p, q, s) = self.blocks, self.sizes
        return {self.key + ".l": (b, p, q), self.key + ".r": (b, q, s)}

    def own_init(self, rng):
        # Glorot's output variance for the whole product: var(y) = p q var(L) var(R) var(x)
        n, m = self.shape
        b, (p, q, s) = self.blocks, self.sizes
        gain = 2.0 * n / (n + m)
        return {self.key + ".l": rng.normal(0.0, math.sqrt(1.0 / p), (b, p, q)),
                self.key + ".r": rng.normal(0.0, math.sqrt(gain / q), (b, q, s))}

    def apply(self, x, v, xp):
        n, m = self.shape
        b, (p, q, s) = self.blocks, self.sizes
        if b * p > n:
            x = xp.pad(x, [[0, 0], [0, b * p - n]])
        z = xp.matmul(xp.transpose(xp.reshape(x, (-1, b, p)), (1, 0, 2)), v[self.key + ".l"])  # (b, B, q)
        if q == b:  # flat (i, t) read as (t', j) with t' = i, j = t: one transpose
            z = xp.transpose(z, (2, 1, 0))
        else:
            z = xp.transpose(xp.reshape(xp.transpose(z, (1, 0, 2)), (-1, q, b)), (2, 0, 1))
        y = xp.matmul(z, v[self.key + ".r"])  # (b, B, s)
        y = xp.reshape(xp.transpose(y, (1, 0, 2)), (-1, b * s))
        return y[:, :m] if b * s > m else y

    def materialize(self, v, xp):
        return self.apply(xp.eye(self.shape[0]), v, xp)

    def apply_cost(self, batch):
        b, (p, q, s) = self.blocks, self.sizes
        return matmul_cost(batch * b, p, q) + matmul_cost(batch * b, q, s)

    def build_cost(self):
        return self.apply_cost(self.shape[0])

    def label(self):
        p, q, s = self.sizes
        return f"monarch(b={self.blocks}: {p}x{q} then {q}x{s} blocks)"


# ---- the language ----------------------------------------------------------------------------

def _monarch(low, call, args, rows, cols, key):
    b = args["b"]
    if not valid_blocks(rows, cols, b):
        raise ShapeError(_why_not(rows, cols, b), pos=call.pos, hint=_nearby(rows, cols, b))
    return Monarch((rows, cols), key=low.keys(call, "monarch", key)[0], blocks=b)


def _why_not(n: int, m: int, b: int) -> str:
    if b > min(n, m):
        return f"monarch(b={b}) needs at least {b} inputs and {b} outputs, got {n}x{m}"
    p, _, s = block_sizes(n, m, b)
    side, size, block = ("inputs", n, p) if (b - 1) * p >= n else ("outputs", m, s)
    return (f"monarch(b={b}) cannot pad {size} {side}: blocks of ceil({size}/{b}) = {block} "
            f"leave block {b} with padding only")


def _nearby(n: int, m: int, b: int) -> str:
    below = next((c for c in range(min(b, min(n, m)), 0, -1) if valid_blocks(n, m, c)), None)
    above = next((c for c in range(b + 1, min(n, m) + 1) if valid_blocks(n, m, c)), None)
    options = [f"b={c}" for c in (below, above) if c]
    return "use " + " or ".join(options) if options else "use fewer blocks"


def _count(rows: int, cols: int, b: int) -> int:
    """params= sizing: the count of b blocks, or none where b is not valid."""
    return monarch_count(rows, cols, b) if valid_blocks(rows, cols, b) else None


register(Structure("monarch", _monarch, required=("b",), size="b", count=_count))
