"""sum(F, n=): n draws of the fast random basis with one trainable coefficient each, kept
in the compact form of ``operators/fast_random.py``: the F's seeded arrays (rows*cols signs
and small orthogonal factors) whatever n, never n stacked matrices.

>>> from keras_decomp import parse
>>> node = parse("sum(F, n=20000)", 4096, 4096).stages[0]
>>> node.num_params, node.num_fixed == 4096 * 4096 + 2 * (2 * 64 * 64)
(20000, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import fast_random
from ..fixed import FastRandom
from ..ir import Node


@dataclass(frozen=True)
class FastSum(Node):
    """sum_j c_j B_j over draws B_j of ``leaf`` (an F), c trainable (key)."""

    key: str = ""
    leaf: FastRandom | None = None
    n: int = 1

    def own_params(self):
        return {self.key: (self.n,)}

    def own_fixed(self):
        return self.leaf.own_fixed()

    def generate_fixed(self):
        return self.leaf.generate_fixed()

    def own_init(self, rng):
        rows, cols = self.shape  # as SumOf: each draw's mean square is 1/rows
        std = math.sqrt(2.0 / (rows + cols) / (self.n / rows))
        return {self.key: rng.normal(0.0, std, self.n)}

    def materialize(self, v, xp):
        return fast_random.matrix(v[self.key], self.leaf._mine(v), self.n, xp)

    def apply(self, x, v, xp):
        return fast_random.apply(x, v[self.key], self.leaf._mine(v), self.n, xp)

    def apply_cost(self, batch):
        return fast_random.apply_cost(self.shape, batch)

    def build_cost(self):
        return fast_random.build_cost(self.shape)

    def gram_diagonal(self) -> np.ndarray:
        """||B_j||_F^2: the draws are orthogonal, so this diagonal is the whole Gram matrix."""
        rows, cols = self.shape
        return fast_random.bucket_sizes(rows, cols, self.n) * fast_random.bucket_count(rows, cols, self.n) / rows

    def solve_block(self, target, key: str, values) -> dict:
        """Exact least squares min ||target - sum_j c_j B_j||_F: c_j = <B_j, target> / ||B_j||^2."""
        arrays = self.leaf._mine(self.leaf.generate_fixed())
        return {key: fast_random.adjoint(target, arrays, self.n) / self.gram_diagonal()}

    def label(self):
        return f"sum(F, n={self.n})"
