"""butterfly(): log2(N) sparse factors on the butterfly supports, applied by
reshapes, flips and small batched products, never by gathers.

The IR is the one of ``sparse.py`` (``SparseFactor`` s with pattern
"butterfly": output c of factor k reads inputs c and c xor 2^k with weights
``values[c, 0]`` and ``values[c, 1]``), so palm4MSA fits it on the fixed
supports (fitting/sparse.py) and saved models keep their keys.  Only the way
the product runs differs, two paths picked by the batch size:

- flips (small batches): factor k reshapes x to (batch, N / 2^(k+1), 2, 2^k);
  the partner c xor 2^k of every entry is then the same entry with the size-2
  axis flipped, so the factor is x * w0 + flip(x) * w1 with w0, w1 the two
  value columns in that shape: 4 elementwise ops on batch x N numbers;
- blocks (large batches): factors 0..h-1 (strides below 2^h) mix entries
  inside contiguous blocks of 2^h, factors h..L-1 mix entries with the same
  index mod 2^h, so the product is block-diagonal (N / 2^h blocks of
  2^h x 2^h), a transpose, block-diagonal (2^h blocks of N/2^h x N/2^h), a
  transpose back: a Monarch matrix.  The blocks are multiplied out from the
  values by doubling (each factor doubles the block size: one broadcast
  product of N 2^k numbers), then x meets them in two batched matmuls:
  2 batch N (2^h + 2^(L-h)) FLOPs instead of 4 batch N L elementwise reads
  and writes, and a few large ops instead of 4 L small ones.

Padding: inputs are zero-padded to N (padded inputs read zeros, as the
support's padding index does); the last factor's values for outputs past m
are zero and the outputs are cut to m.

>>> import numpy as np
>>> from keras_decomp import parse
>>> node = parse("butterfly", 12, 8).stages[0]
>>> values = node.init(np.random.default_rng(0))
>>> x = np.random.default_rng(1).normal(size=(3, 12))
>>> v = {**node.fixed_arrays(), **values}
>>> by_gathers = x @ node.to_dense(values)
>>> bool(np.allclose(node.apply_flips(x, v, np), by_gathers)), bool(np.allclose(node.apply_blocks(x, v, np), by_gathers))
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cost import Cost
from ..ir import _static_batch, matmul_cost
from .registry import Structure, register
from .sparse import SparseFactor, SparseProduct, _product

ELEMENTWISE = 8  # FLOPs one elementwise read-and-write of a number costs, against a matmul's multiply-add


@dataclass(frozen=True)
class ButterflyProduct(SparseProduct):
    """The butterfly factors of ``sparse.py``, run by flips or by two block products."""

    @property
    def size(self) -> int:
        return 1 << len(self.factors)

    @property
    def split(self) -> int:
        """h: the factors below it make the first block-diagonal factor (blocks of 2^h)."""
        return len(self.factors) // 2

    def _columns(self, v, xp):
        """Per factor, (w0, w1): the weights of the entry itself and of its partner, length N."""
        size, out = self.size, []
        for factor in self.factors:
            w = factor._weights(v)
            if factor.shape[1] < size:
                w = xp.pad(w, [[0, size - factor.shape[1]], [0, 0]])
            out.append((w[:, 0], w[:, 1]))
        return out

    def _padded(self, x, xp):
        rows = self.shape[0]
        return xp.pad(x, [[0, 0], [0, self.size - rows]]) if rows < self.size else x

    def _cut(self, y):
        return y[:, :self.shape[1]] if self.shape[1] < self.size else y

    def apply(self, x, v, xp):
        if self._blocks_cheaper(_static_batch(x)):
            return self.apply_blocks(x, v, xp)
        return self.apply_flips(x, v, xp)

    def apply_flips(self, x, v, xp):
        """x F_1 ... F_L by flips: 4 elementwise ops per factor."""
        size = self.size
        x = self._padded(x, xp)
        for k, (w0, w1) in enumerate(self._columns(v, xp)):
            shape = (size >> (k + 1), 2, 1 << k)
            x4 = xp.reshape(x, (-1,) + shape)
            x = xp.reshape(x4 * xp.reshape(w0, shape) + xp.flip(x4, axis=2) * xp.reshape(w1, shape), (-1, size))
        return self._cut(x)

    def apply_blocks(self, x, v, xp):
        """x F_1 ... F_L as two block-diagonal products with a transpose between them."""
        size, h = self.size, self.split
        low, high = 1 << h, size >> h
        columns = self._columns(v, xp)
        first = xp.reshape(_blocks(columns[:h], 1, xp, size), (high, low, low))  # [a, t, u]
        second = xp.transpose(xp.reshape(_blocks(columns[h:], low, xp, size), (high, high, low)), (2, 0, 1))
        x = self._padded(x, xp)
        z = xp.matmul(xp.transpose(xp.reshape(x, (-1, high, low)), (1, 0, 2)), first)  # (a, batch, u)
        y = xp.matmul(xp.transpose(z, (2, 1, 0)), second)  # (u, batch, A')
        return self._cut(xp.reshape(xp.transpose(y, (1, 2, 0)), (-1, size)))

    def materialize(self, v, xp):
        return self.apply(xp.eye(self.shape[0]), v, xp)

    def _blocks_cheaper(self, batch: int) -> bool:
        return self._blocks_cost(batch) < self._flips_cost(batch)

    def _flips_cost(self, batch: int) -> int:
        return ELEMENTWISE * 4 * len(self.factors) * batch * self.size

    def _blocks_cost(self, batch: int) -> int:
        size, h = self.size, self.split
        low, high = 1 << h, size >> h
        build = ELEMENTWISE * 2 * size * (low + high)  # doubling: about 2 N 2^h numbers per group
        moves = ELEMENTWISE * 3 * batch * size  # the three transposes
        return build + moves + matmul_cost(batch * high, low, low) + matmul_cost(batch * low, high, high)

    def apply_cost(self, batch):
        return min(self._flips_cost(batch), self._blocks_cost(batch))

    def build_cost(self):
        return self.apply_cost(self.shape[0])

    # Product's work terms would price the factors' gathers, a path this class never runs
    def apply_work(self, batch):
        """The path ``apply`` takes: 4 elementwise ops per factor on a (batch, N) array
        (flips), or the blocks built by doubling (about 3 ops per factor on 2 N 2^h numbers)
        then 3 transposes and 2 batched matmuls of the activations (blocks)."""
        size, levels, moved = self.size, len(self.factors), 2 * batch * self.size  # read + write
        if self._blocks_cheaper(batch):
            low, high = 1 << self.split, size >> self.split
            work = Cost(0, 2 * size * (low + high), 3 * levels) + Cost(0, 5 * moved, 5)
        else:
            work = Cost(0, 4 * levels * moved, 4 * levels)
        return Cost(self.apply_cost(batch), self.stored(), 0) + work

    def build_work(self):
        """``materialize`` applies the factors to the identity: apply's work at N rows."""
        return self.apply_work(self.shape[0])


def _blocks(columns, stride: int, xp, size: int):
    """The product of consecutive butterfly factors with strides stride * 2^k (k < g), as
    an array (A, 2^g, 2^g, stride): A = size / (stride 2^g) groups, one 2^g x 2^g block
    (input bit pattern, output bit pattern) per group and per index mod ``stride``.

    Doubling: with T the blocks over the lowest k bits, factor k joins pairs of blocks:
    T'[(b_in, i), (b_out, o)] = T_{b_in}[i, o] * (w0 if b_in == b_out else w1)[b_out, o]."""
    g = len(columns)
    groups = size // (stride << g)
    same = xp.reshape(xp.eye(2), (1, 2, 2, 1))
    blocks = xp.ones((groups << g, 1, 1, stride))  # (groups * 2^(g-k), 2^k in, 2^k out, stride)
    for k, (w0, w1) in enumerate(columns):
        rest, lo = groups << (g - k - 1), 1 << k
        w0 = xp.reshape(w0, (rest, 1, 2, lo * stride))
        w1 = xp.reshape(w1, (rest, 1, 2, lo * stride))
        weights = w0 * same + w1 * (1.0 - same)  # (rest, 2 b_in, 2 b_out, lo * stride)
        blocks = xp.reshape(blocks, (rest, 2, lo, 1, lo * stride)) * xp.reshape(weights, (rest, 2, 1, 2, lo * stride))
        blocks = xp.reshape(blocks, (rest, 2 * lo, 2 * lo, stride))
    return blocks


# ---- the language ----------------------------------------------------------------------------

def _butterfly(low, call, args, rows, cols, key):
    node_key = low.keys(call, "butterfly", key)[0]
    size = max(2, 1 << (max(rows, cols) - 1).bit_length())
    levels = size.bit_length() - 1
    gain = math.sqrt(2.0 * rows / (rows + cols))
    factors = []
    for k in range(levels):
        shape = (rows if k == 0 else size, cols if k == levels - 1 else size)
        factors.append(SparseFactor(shape, key=f"{node_key}.f{k}", support_key=f"{node_key}.support{k}", s=2,
                                    pattern="butterfly", stride=1 << k, padded=k == 0 and rows < size,
                                    scale_key=f"{node_key}.scale" if k == 0 else None,
                                    gain=gain if k == 0 else 1.0))
    if len(factors) == 1:
        return _product(tuple(factors), (rows, cols), node_key, "butterfly", 2)
    return ButterflyProduct((rows, cols), factors=tuple(factors), key=node_key, kind="butterfly", s=2)


register(Structure("butterfly", _butterfly))
