"""sparse(q=, s=) and butterfly(): W = scale * F_1 F_2 ... F_q with sparse factors
(the FAuST family: Le Magoarou and Gribonval; Giffon, "Expressing Neural Network
layers as Fast-Transforms").

Storage.  Every output (column) of a factor reads exactly s of its inputs: in
the papers' column-vector convention (A = W^T, y = A x) that is s non-zeros per
row of each factor.  A factor holds two (cols, s) arrays: the trainable
``values`` and the fixed ``support``, the input index each value reads.  Entries
off the support are not variables at all, so they are exactly zero before,
during and after training, they take no gradient and count as no parameter;
``apply`` is a gather of x's columns by the support (y[:, c] = sum_j
x[:, support[c, j]] * values[c, j]), ``materialize`` scatters the values into
a dense factor (one ``scatter``).  Both use only what numpy and keras.ops
share.  The cost model prices a gathered or scattered number at ``GATHER``
matmul FLOPs, so a factor runs by gathers for a few rows and is materialised
then multiplied for a batch (at 4096 x 4096, s=204: gathers at batch 1, the
scatter at 128); ``tf.sparse`` and CSR kernels were measured slower than both
(benchmarks/structured_speed_sparse.py --kernels).  butterfly() has its own
apply (butterfly.py): reshapes and flips, or two block products.

Where the support lives.  It is a fixed array of the IR, so the layer keeps it
out of the saved weights:
- butterfly(): the supports are the butterfly pattern (output c of factor k
  reads inputs c and c xor 2^k), a function of the shape alone;
- sparse(q, s) before any fitting: a random support drawn from the model seed
  and the node's position (like a Gaussian basis), regenerated at every build;
- sparse(q, s) initialised from a trained W (``approximate``, so ``decompose``
  and stage hand-overs): palm4MSA chooses the support from the data, so no seed
  can regenerate it.  ``approximate`` returns it under the support's key along
  with the values; the node's ``fitted_fixed()`` names these keys, so
  ``staging.initialize_from`` hands them to the layer (``set_fitted``), which
  keeps them in its config (``"fitted"``: small int lists, s per output) and
  uses them instead of the seeded ones at every build.  A ``.keras`` file then
  round-trips: config (support) + weights (values).

Sizes.  q factors (n, n) ... (n, n) (n, m) (inner sizes n, as everywhere in the
language); s is capped at a factor's input count.  Parameters: (q-1) n s + m s,
plus the trainable scale (on the first factor).  butterfly() on (n, m) uses
N = the power of two >= max(n, m): log2(N) factors, the first (n, N), the last
(N, m); W is the top-left (n, m) block of the N x N butterfly product (inputs
padded with zeros, outputs cut).  Values that would read a padded input are
kept (they count as parameters) but never matter.

>>> from keras_decomp import parse
>>> node = parse("sparse(q=3, s=4)", 64, 64).stages[0]
>>> node.num_params == 3 * 64 * 4 + 1
True
>>> parse("butterfly", 32, 32).stages[0].num_params == 5 * 32 * 2 + 1
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import bases
from ..ir import Node, Product
from .registry import Structure, register



# What one gathered or scattered number costs, in FLOPs of a dense matmul: gathers and scatters
# are memory-bound and (on the TensorFlow CPU kernels) far from a matmul's speed, so a sparse
# factor is applied by gathers at small batches and materialised (one scatter, then a dense
# matmul) at large ones; benchmarks/structured_speed_sparse.py measures both.
GATHER = 128


def _scatter(xp, flat, values, size: int):
    """A length-``size`` vector holding ``values`` at the distinct positions ``flat``, zero elsewhere."""
    if xp is np:
        out = np.zeros(size, dtype=np.result_type(values, np.float32))
        out[flat] = values
        return out
    return xp.scatter(xp.reshape(flat, (-1, 1)), values, (size,))


@dataclass(frozen=True)
class SparseFactor(Node):
    """One (rows, cols) factor: output c reads inputs support[c, :] with weights values[c, :].

    ``pattern`` "random" draws the support from ``seed``/``rng_key`` (distinct
    inputs per output); "butterfly" pairs output c with inputs c and c xor
    ``stride``.  A support index equal to ``rows`` reads a zero (padding).
    """

    key: str = ""
    support_key: str = ""
    s: int = 1
    pattern: str = "random"
    stride: int = 1
    seed: int = 0
    rng_key: tuple = ()
    scale_key: str | None = None
    gain: float = 1.0
    padded: bool = False

    def own_params(self):
        own = {self.key: (self.shape[1], self.s)}
        return {**own, self.scale_key: ()} if self.scale_key else own

    def own_fixed(self):
        return {self.support_key: (self.shape[1], self.s)}

    def fitted_fixed(self) -> dict:
        """The fixed arrays that ``approximate`` derives from data (see the module doc)."""
        return self.own_fixed() if self.pattern == "random" else {}

    def generate_fixed(self):
        rows, cols = self.shape
        if self.pattern == "butterfly":
            c = np.arange(cols)
            support = np.stack([c, c ^ self.stride], axis=1)
            return {self.support_key: np.where(support < rows, support, rows).astype(np.int64)}
        rng = bases.generator(self.seed, self.rng_key)
        picks = np.argpartition(rng.random((cols, rows)), self.s - 1, axis=1)[:, :self.s]
        return {self.support_key: np.sort(picks, axis=1).astype(np.int64)}

    def own_init(self, rng):
        rows = self.shape[0]
        reads = min(self.s, rows)
        out = {self.key: rng.normal(0.0, self.gain / math.sqrt(reads), (self.shape[1], self.s))}
        return {**out, self.scale_key: np.ones(())} if self.scale_key else out

    def degree(self, keys) -> int:
        return int(self.key in keys) + int(self.scale_key in keys if self.scale_key else 0)

    def _weights(self, v):
        return v[self.key] * v[self.scale_key] if self.scale_key else v[self.key]

    def materialize(self, v, xp):
        """The dense factor by one scatter of the values (not s one-hot products of N^2 each)."""
        rows, cols = self.shape
        support = v[self.support_key]
        flat = xp.reshape(support * cols + xp.reshape(xp.arange(cols), (cols, 1)), (-1,))
        dense = _scatter(xp, flat, xp.reshape(self._weights(v), (-1,)), (rows + 1) * cols)
        return xp.reshape(dense, (rows + 1, cols))[:rows]  # row ``rows``: what the padding index read

    def apply(self, x, v, xp):
        cols = self.shape[1]
        if self.padded:
            x = xp.pad(x, [[0, 0], [0, 1]])
        gathered = xp.take(x, xp.reshape(v[self.support_key], (-1,)), axis=1)
        return xp.einsum("bcs,cs->bc", xp.reshape(gathered, (-1, cols, self.s)), self._weights(v))

    def apply_cost(self, batch):
        return GATHER * batch * self.shape[1] * self.s

    def build_cost(self):
        return 2 * math.prod(self.shape) + GATHER * self.shape[1] * self.s

    def label(self):
        return f"{self.pattern} factor (s={self.s})"


@dataclass(frozen=True)
class SparseProduct(Product):
    """scale * F_1 ... F_q of ``SparseFactor`` s (the scale lives on F_1)."""

    key: str = ""
    kind: str = "sparse"
    s: int = 1

    def degree(self, keys) -> int:
        return sum(f.degree(keys) for f in self.factors)

    def label(self):
        if self.kind == "butterfly":
            return f"butterfly({len(self.factors)} factors)"
        return f"sparse(q={len(self.factors)}, s={self.s})"


# ---- the language ----------------------------------------------------------------------------

def _sparse(low, call, args, rows, cols, key):
    node_key, rng_key = low.keys(call, "sparse", key)
    q, s = args["q"], args["s"]
    # q factors of (value, index) pairs, checked before the list of q shapes is made
    low.check_draws(q, 2 * rows * min(s, max(rows, cols)), f"sparse(q={q}) of {rows}x{cols}", call.pos)
    shapes = [(rows, rows)] * (q - 1) + [(rows, cols)]
    gain = math.sqrt(2.0 * rows / (rows + cols))  # Glorot's output variance for the whole product
    factors = tuple(
        SparseFactor(shape, key=f"{node_key}.f{i}", support_key=f"{node_key}.support{i}", s=min(s, shape[0]),
                     seed=low.seed, rng_key=rng_key + (i,), scale_key=f"{node_key}.scale" if i == 0 else None,
                     gain=gain if i == 0 else 1.0)
        for i, shape in enumerate(shapes))
    return _product(factors, (rows, cols), node_key, "sparse", s)


def _product(factors, shape, key, kind, s):
    # One factor is a node by itself (a product of one would give the Conv2D
    # apply path an empty rest); ``fit`` wraps it again.
    if len(factors) == 1:
        return factors[0]
    return SparseProduct(shape, factors=factors, key=key, kind=kind, s=s)


register(Structure("sparse", _sparse, required=("s",), optional={"q": 2}, size="s"))


