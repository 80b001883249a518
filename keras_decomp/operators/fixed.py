"""Fixed (untrained) leaves of the operator tree: I, DCT, DCT2, G, S, P, R, D, H, F,
named Gaussians and matrices loaded from files.

A leaf owns one or two arrays under its ``key``; random ones are generated from
``bases.generator(seed, rng_key)``, so they depend only on the seed and the
leaf's position.  ``stack`` tells ``SumOf`` how a sum of independent draws
collapses: "linear" (the matrix is linear in its one array: sum the arrays),
"rank1" (U diag(c) V^T), "shared" (every draw is the same matrix) or None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import bases, fast_random
from .ir import Node, matmul_cost


@dataclass(frozen=True)
class FixedLeaf(Node):
    kind: str = ""
    key: str = ""
    seed: int = 0
    rng_key: tuple[int, ...] = ()

    stack = "linear"

    def array_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"": self.shape}

    def stores_matrix(self) -> bool:
        """Whether the leaf's one array is its matrix itself (G, S, DCT, DCT2, H, files), so
        that a column slice of the matrix is a column slice of the array."""
        return self.array_shapes() == {"": self.shape}

    def arrays(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def from_arrays(self, a, xp):
        """The dense matrix from this leaf's arrays (suffix -> array)."""
        return a[""]

    def apply_arrays(self, x, a, xp):
        return xp.matmul(x, self.from_arrays(a, xp))

    def apply_arrays_cost(self, batch: int) -> int:
        return matmul_cost(batch, *self.shape)

    # Node interface, in terms of the arrays above.
    def own_fixed(self):
        return {self.key + s: shape for s, shape in self.array_shapes().items()}

    def generate_fixed(self):
        arrays = self.arrays(bases.generator(self.seed, self.rng_key))
        return {self.key + s: a for s, a in arrays.items()}

    def _mine(self, v):
        return {s: v[self.key + s] for s in self.array_shapes()}

    def materialize(self, v, xp):
        return self.from_arrays(self._mine(v), xp)

    def apply(self, x, v, xp):
        return self.apply_arrays(x, self._mine(v), xp)

    def apply_cost(self, batch):
        return self.apply_arrays_cost(batch)

    def label(self):
        return self.kind


@dataclass(frozen=True)
class Gaussian(FixedLeaf):
    """G (or an undeclared uppercase name): N(0, 1) / sqrt(rows)."""

    def arrays(self, rng):
        return {"": bases.gaussian(rng, *self.shape)}


@dataclass(frozen=True)
class Sign(FixedLeaf):
    """S: entries +-1/sqrt(cols)."""

    def arrays(self, rng):
        return {"": bases.sign(rng, *self.shape)}


@dataclass(frozen=True)
class FastRandom(FixedLeaf):
    """F: one draw of the fast random basis (``fast_random``): a rotated random sign matrix,
    A (s / sqrt(rows)) B.  ``sum(F, n)`` does not stack draws: it becomes one ``FastSum``
    over these same arrays (structures/fast_random.py)."""

    stack = None

    def array_shapes(self):
        return fast_random.array_shapes(*self.shape)

    def arrays(self, rng):
        return fast_random.arrays(rng, *self.shape)

    def from_arrays(self, a, xp):
        return fast_random.matrix(None, a, 1, xp)

    def apply_arrays(self, x, a, xp):
        return fast_random.apply(x, None, a, 1, xp)

    def apply_arrays_cost(self, batch):
        return fast_random.apply_cost(self.shape, batch)

    def build_cost(self):
        return fast_random.build_cost(self.shape)


@dataclass(frozen=True)
class Loaded(FixedLeaf):
    """A matrix given by the user (the spec's ``fixed: {C: {file: ...}}``)."""

    matrix: np.ndarray | None = field(default=None, compare=False, repr=False)

    def arrays(self, rng):
        return {"": np.asarray(self.matrix, dtype=np.float64)}


@dataclass(frozen=True)
class Diagonal(FixedLeaf):
    """D: a random diagonal, stored as its vector."""

    def array_shapes(self):
        return {"": (self.shape[0],)}

    def arrays(self, rng):
        return {"": bases.diagonal(rng, self.shape[0])}

    def from_arrays(self, a, xp):
        return xp.eye(self.shape[0]) * a[""][None, :]

    def apply_arrays(self, x, a, xp):
        return x * a[""]

    def apply_arrays_cost(self, batch):
        return batch * self.shape[0]


@dataclass(frozen=True)
class RankOne(FixedLeaf):
    """R: u v^T, stored as u and v."""

    stack = "rank1"

    def array_shapes(self):
        return {".u": (self.shape[0],), ".v": (self.shape[1],)}

    def arrays(self, rng):
        u, v = bases.rank1(rng, *self.shape)
        return {".u": u, ".v": v}

    def from_arrays(self, a, xp):
        return a[".u"][:, None] * a[".v"][None, :]

    def apply_arrays(self, x, a, xp):
        return xp.matmul(x, a[".u"][:, None]) * a[".v"][None, :]

    def apply_arrays_cost(self, batch):
        return 2 * batch * sum(self.shape)

    def build_cost(self):
        return math.prod(self.shape)


@dataclass(frozen=True)
class Permutation(FixedLeaf):
    """P: a random permutation, stored as its index vector; x P = x[:, perm]."""

    stack = None

    def array_shapes(self):
        return {"": (self.shape[0],)}

    def arrays(self, rng):
        return {"": bases.permutation(rng, self.shape[0])}

    def from_arrays(self, a, xp):
        return xp.take(xp.eye(self.shape[0]), a[""], axis=1)

    def apply_arrays(self, x, a, xp):
        return xp.take(x, a[""], axis=1)

    def apply_arrays_cost(self, batch):
        return 0


@dataclass(frozen=True)
class Deterministic(FixedLeaf):
    """I, DCT, DCT2, H: the same matrix in every draw; keyed by kind and size so
    several uses share one array."""

    stack = "shared"
    h: int = 0
    w: int = 0

    def arrays(self, rng):
        n = self.shape[0]
        if self.kind == "DCT":
            return {"": bases.dct(n)}
        if self.kind == "DCT2":
            return {"": bases.dct2(self.h, self.w)}
        if self.kind == "H":
            return {"": bases.hadamard(n)}
        raise ValueError(self.kind)


@dataclass(frozen=True)
class Identity(FixedLeaf):
    stack = "shared"

    def array_shapes(self):
        return {}

    def arrays(self, rng):
        return {}

    def from_arrays(self, a, xp):
        return xp.eye(self.shape[0])

    def apply_arrays(self, x, a, xp):
        return x

    def apply_arrays_cost(self, batch):
        return 0


@dataclass(frozen=True)
class TiledLeaf(FixedLeaf):
    """tile(E, n) of a linear leaf E: n draws side by side, stored stacked."""

    draws: tuple[FixedLeaf, ...] = ()

    def array_shapes(self):
        return {"": (len(self.draws),) + self.draws[0].array_shapes()[""]}

    def arrays(self, rng):
        return {"": np.stack([d.arrays(bases.generator(d.seed, d.rng_key))[""] for d in self.draws])}

    def from_arrays(self, a, xp):
        t = self.draws[0]
        return xp.concatenate([t.from_arrays({"": a[""][j]}, xp) for j in range(len(self.draws))], axis=1)

    def apply_arrays(self, x, a, xp):
        t = self.draws[0]
        return xp.concatenate([t.apply_arrays(x, {"": a[""][j]}, xp) for j in range(len(self.draws))],
                              axis=1)

    def apply_arrays_cost(self, batch):
        return len(self.draws) * self.draws[0].apply_arrays_cost(batch)

    def label(self):
        return f"tile({self.draws[0].kind}, n={len(self.draws)})"
