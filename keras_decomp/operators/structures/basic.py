"""The small trainable structures: dense, diag, lowrank, named matrices and
sum(E, n=) with its collapse of independent fixed draws into one tensordot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..fixed import FixedLeaf
from ..cost import Cost
from ..ir import Node, matmul_cost, _static_batch


def glorot(rng, shape, fan_in: int, fan_out: int) -> np.ndarray:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape)


@dataclass(frozen=True)
class Dense(Node):
    """A full trainable matrix (``dense``, or a named factor such as ``g1``)."""

    key: str = ""

    def own_params(self):
        return {self.key: self.shape}

    def own_init(self, rng):
        return {self.key: glorot(rng, self.shape, *self.shape)}

    def materialize(self, v, xp):
        return v[self.key]

    def label(self):
        return self.key if "." not in self.key else "dense"


@dataclass(frozen=True)
class Diag(Node):
    """A trainable diagonal; rectangular shapes keep min(rows, cols) entries."""

    key: str = ""

    def own_params(self):
        return {self.key: (min(self.shape),)}

    def own_init(self, rng):
        return {self.key: np.ones(min(self.shape))}

    def materialize(self, v, xp):
        rows, cols = self.shape
        return xp.eye(rows, cols) * (v[self.key][None, :] if cols <= rows else v[self.key][:, None])

    def apply(self, x, v, xp):
        rows, cols = self.shape
        if cols <= rows:
            return x[:, :cols] * v[self.key]
        return xp.pad(x * v[self.key], [[0, 0], [0, cols - rows]])

    def apply_cost(self, batch):
        return batch * min(self.shape)

    def label(self):
        return "diag"


@dataclass(frozen=True)
class LowRank(Node):
    """lowrank(r=): u (rows, r) then v (r, cols)."""

    key: str = ""
    rank: int = 1

    def own_params(self):
        return {self.key + ".u": (self.shape[0], self.rank), self.key + ".v": (self.rank, self.shape[1])}

    def own_init(self, rng):
        rows, cols = self.shape
        std = (2.0 / ((rows + cols) * self.rank)) ** 0.25
        return {self.key + ".u": rng.normal(0, std, (rows, self.rank)),
                self.key + ".v": rng.normal(0, std, (self.rank, cols))}

    def halves(self) -> tuple[Dense, Dense]:
        """u and v as two dense nodes over the same values: the factors that a convolution
        applies one after the other (the first as its kernel, the second on the channels)."""
        rows, cols = self.shape
        return Dense((rows, self.rank), key=self.key + ".u"), Dense((self.rank, cols), key=self.key + ".v")

    def materialize(self, v, xp):
        return xp.matmul(v[self.key + ".u"], v[self.key + ".v"])

    def apply(self, x, v, xp):
        return xp.matmul(xp.matmul(x, v[self.key + ".u"]), v[self.key + ".v"])

    def apply_cost(self, batch):
        return matmul_cost(batch, self.shape[0], self.rank) + matmul_cost(batch, self.rank, self.shape[1])

    def build_cost(self):
        return matmul_cost(self.shape[0], self.rank, self.shape[1])

    def apply_work(self, batch):
        """x u, then (x u) v: x read once, the (batch, r) middle written and read, y written
        (the generic count moves x and y once per op, twice here)."""
        rows, cols = self.shape
        return Cost(self.apply_cost(batch), self.stored() + batch * (rows + 2 * self.rank + cols), 2)

    def label(self):
        return f"lowrank(r={self.rank})"


@dataclass(frozen=True)
class SumOf(Node):
    """sum(E, n=): sum_j c_j E_j over n independent draws E_j, c trainable.

    Draws of one fixed leaf collapse: the stacked arrays are contracted with c
    by one tensordot (a sum of diagonals stays a diagonal, a sum of rank-1
    terms stays U diag(c) V^T); anything else is summed draw by draw.
    """

    key: str = ""
    draws: tuple[Node, ...] = ()

    @property
    def fixed_key(self) -> str:
        """Where the stacked fixed arrays of collapsed draws live."""
        return self.key.replace("sum", "SUM", 1)

    @property
    def mode(self) -> str | None:
        first = self.draws[0]
        return first.stack if isinstance(first, FixedLeaf) else None

    def children(self):
        return () if self.mode else self.draws

    def own_params(self):
        return {self.key: (len(self.draws),)}

    def own_fixed(self):
        first = self.draws[0]
        if self.mode in ("linear", "rank1"):
            return {self.fixed_key + s: (len(self.draws),) + shape for s, shape in first.array_shapes().items()}
        if self.mode == "shared":
            return first.own_fixed()
        return {}

    def generate_fixed(self):
        first = self.draws[0]
        if self.mode == "shared":
            return first.generate_fixed()
        if self.mode in ("linear", "rank1"):
            per_draw = [d.generate_fixed() for d in self.draws]
            return {self.fixed_key + s: np.stack([a[d.key + s] for a, d in zip(per_draw, self.draws)])
                    for s in first.array_shapes()}
        return {}

    def own_init(self, rng):
        rows, cols = self.shape
        first = self.draws[0]
        mean_square = 1.0
        if not first.param_shapes():
            mean_square = float(np.mean(first.to_dense() ** 2)) or 1.0
        std = math.sqrt(2.0 / (rows + cols) / (len(self.draws) * mean_square))
        return {self.key: rng.normal(0.0, std, len(self.draws))}

    def _combined(self, v, xp):
        """The arrays of one virtual draw: sum_j c_j (arrays of draw j)."""
        first, c = self.draws[0], v[self.key]
        return {s: xp.tensordot(c, v[self.fixed_key + s], axes=1) for s in first.array_shapes()}

    def materialize(self, v, xp):
        first, c, mode = self.draws[0], v[self.key], self.mode
        if mode == "linear":
            return first.from_arrays(self._combined(v, xp), xp)
        if mode == "rank1":
            return xp.tensordot(v[self.fixed_key + ".u"] * c[:, None], v[self.fixed_key + ".v"], axes=[[0], [0]])
        if mode == "shared":
            return first.materialize(v, xp) * xp.sum(c)
        return sum_terms([d.materialize(v, xp) for d in self.draws], c, xp)

    def apply(self, x, v, xp):
        first, c, mode = self.draws[0], v[self.key], self.mode
        if mode == "linear":
            return first.apply_arrays(x, self._combined(v, xp), xp)
        if mode == "rank1":
            return xp.matmul(xp.matmul(x, xp.transpose(v[self.fixed_key + ".u"])) * c, v[self.fixed_key + ".v"])
        if mode == "shared":
            return first.apply(x, v, xp) * xp.sum(c)
        batch = _static_batch(x)
        return sum_terms([d.best_apply(x, v, xp, batch) for d in self.draws], c, xp)

    def _combine_cost(self) -> int:
        sizes = self.draws[0].array_shapes().values() if self.mode else ()
        return 2 * len(self.draws) * sum(math.prod(s) for s in sizes)

    def apply_cost(self, batch):
        n, (rows, cols) = len(self.draws), self.shape
        if self.mode == "linear":
            return self._combine_cost() + self.draws[0].apply_arrays_cost(batch)
        if self.mode == "rank1":
            return 2 * batch * n * (rows + cols) + batch * n
        if self.mode == "shared":
            return self.draws[0].apply_cost(batch) + batch * cols + n
        return sum(d.best_cost(batch) for d in self.draws) + 2 * n * batch * cols

    def build_cost(self):
        n, size = len(self.draws), math.prod(self.shape)
        if self.mode == "linear":
            return self._combine_cost() + self.draws[0].build_cost()
        if self.mode == "rank1":
            return 2 * n * size
        if self.mode == "shared":
            return self.draws[0].build_cost() + size + n
        return sum(d.build_cost() for d in self.draws) + 2 * n * size

    def apply_work(self, batch):
        if self.mode is None:  # draw by draw, then one tensordot with c
            n, out = len(self.draws), batch * self.shape[1]
            return sum((d.best_work(batch) for d in self.draws), Cost(2 * n * out, (n + 2) * out, 2))
        return super().apply_work(batch)

    def label(self):
        return f"sum({self.draws[0].label()}, n={len(self.draws)})"


def sum_terms(terms, c, xp):
    """sum_j c_j terms_j by one tensordot of c with the stacked terms."""
    return xp.tensordot(c, xp.stack(terms), axes=1)
