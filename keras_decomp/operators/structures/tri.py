"""tri(k=, h=): one layer's tri-factorised kernel W = G_in S G_out^T.

From the data-fusion view of a network (Zitnik and Zupan's DFMF, applied to
pruning by Rostan): the layer of n input neurons gets a factor G_in (n, k), the
layer of m output neurons a factor G_out (m, h), and S (k, h) couples them, so
x W = ((x G_in) S) G_out^T goes through a k-wide and an h-wide bottleneck.
``h`` defaults to ``k``; ``params=`` replaces ``k`` (with h = k unless given).

Factors shared between neighbouring layers are written with named matrices,
which are one variable per model (``W1 = g0 s1 g1'``, ``W2 = g1 s2 g2'``); the
simultaneous fit of a whole chain of trained kernels is ``keras_decomp.trifactor``.

Rank: W has rank at most min(k, h), so ``approximate`` fits it by a truncated
SVD (Eckart-Young optimal); columns of G beyond that rank are filled with
orthonormal directions and their rows of S with zeros, so they are free to
learn when training goes on.

>>> from keras_decomp import parse
>>> node = parse("tri(k=4, h=3)", 20, 10).stages[0]
>>> node.num_params == 20 * 4 + 4 * 3 + 10 * 3
True
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Node, matmul_cost
from .registry import Structure, register


@dataclass(frozen=True)
class Tri(Node):
    """W = G_in S G_out^T with G_in (n, k), S (k, h), G_out (m, h)."""

    key: str = ""
    k: int = 1
    h: int = 1

    @property
    def keys(self) -> dict[str, str]:
        return {"g_in": self.key + ".g_in", "s": self.key + ".s", "g_out": self.key + ".g_out"}

    def own_params(self):
        (rows, cols), keys = self.shape, self.keys
        return {keys["g_in"]: (rows, self.k), keys["s"]: (self.k, self.h), keys["g_out"]: (cols, self.h)}

    def own_init(self, rng):
        # Three factors of equal spread whose product has Glorot's variance
        # 2 / (n + m): each entry of W sums k*h products of three entries.
        rows, cols = self.shape
        std = (2.0 / ((rows + cols) * self.k * self.h)) ** (1.0 / 6.0)
        return {key: rng.normal(0.0, std, shape) for key, shape in self.own_params().items()}

    def degree(self, keys) -> int:
        return len(set(self.keys.values()) & set(keys))

    def _factors(self, v):
        return v[self.keys["g_in"]], v[self.keys["s"]], v[self.keys["g_out"]]

    def materialize(self, v, xp):
        g_in, s, g_out = self._factors(v)
        return xp.matmul(xp.matmul(g_in, s), xp.transpose(g_out))

    def apply(self, x, v, xp):
        g_in, s, g_out = self._factors(v)
        return xp.matmul(xp.matmul(xp.matmul(x, g_in), s), xp.transpose(g_out))

    def apply_cost(self, batch):
        (rows, cols), k, h = self.shape, self.k, self.h
        return matmul_cost(batch, rows, k) + matmul_cost(batch, k, h) + matmul_cost(batch, h, cols)

    def build_cost(self):
        (rows, cols), k, h = self.shape, self.k, self.h
        return matmul_cost(rows, k, h) + matmul_cost(rows, h, cols)

    def label(self):
        return f"tri(k={self.k}, h={self.h})"


def _build(low, call, args, rows, cols, key):
    k = args["k"]
    h = k if args["h"] == "k" else args["h"]  # not given: as wide as k
    return Tri((rows, cols), key=low.keys(call, "tri", key)[0], k=k, h=h)


register(Structure("tri", _build, required=("k",), optional={"h": "k"}, size="k"))

