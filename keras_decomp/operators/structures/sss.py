"""Sequentially semiseparable (SSS) matrices: ``sss(p=, d=)``.

After Kissel and Diepold, "Deep Convolutional Neural Networks with Sequentially
Semiseparable Weight Matrices": W = D + C(I - ZA)^-1 Z B + G(I - Z^T E)^-1 Z^T F,
p stages, state size d.  Written here for row vectors, y = x W, W of shape (n, m):

- x is split into p blocks x_0..x_{p-1} of near-equal size (the first n mod p
  blocks one larger), y likewise into y_0..y_{p-1} (m mod p);
- the causal part couples output block j to the input blocks i < j (block
  (i, j) of W above the block diagonal) through a state h of size d running
  forwards, the anticausal part couples it to i > j (below the diagonal)
  through a state g running backwards:

      h_1 = x_0 B_0,      h_{k+1} = h_k A_k + x_k B_k       (k = 1..p-2)
      g_{p-2} = x_{p-1} F_{p-1},   g_{k-1} = g_k E_k + x_k F_k   (k = p-2..1)
      y_k = x_k D_k + h_k C_k [k > 0] + g_k G_k [k < p-1]

  so that W[i, j] = D_j (i = j), B_i A_{i+1} ... A_{j-1} C_j (i < j) and
  F_i E_{i-1} ... E_{j+1} G_j (i > j).  With T = W^T (the paper's column-vector
  operator) every stage matrix here is the transpose of the paper's: the
  causal part is T's strictly lower block triangle, as in the paper.

Per stage k (n_k inputs, m_k outputs), the trainable arrays are

    D_k (n_k, m_k)  every stage
    B_k (n_k, d)    k < p-1      C_k (d, m_k)   k > 0       A_k (d, d)  0 < k < p-1
    F_k (n_k, d)    k > 0        G_k (d, m_k)   k < p-1     E_k (d, d)  0 < k < p-1

Interior stages carry the transitions A and E.  The open ends carry nothing:
C_0 would read a causal state entering stage 0, F_0 write an anticausal one
leaving it to the left, B_{p-1} write a causal state leaving stage p-1 and
G_{p-1} read an anticausal one entering it from the right, all of size zero.
So

    num_params = sum_k n_k m_k + d (2n - n_0 - n_{p-1}) + d (2m - m_0 - m_{p-1}) + 2 (p - 2) d^2

(the authors' reference code budgets d (n_k + m_k) twice at every stage, these
four empty matrices included as if full).

``approximate`` fits an SSS node to a dense W by a Hankel-block SVD per stage
boundary (balanced, truncated to d); it is exact when d is at least every
Hankel rank.  ``SSS.solve_block`` is the exact least-squares update of one
stage matrix, for alternating least squares over compositions.

>>> import numpy as np
>>> from keras_decomp import parse
>>> node = parse("sss(p=3, d=2)", 7, 5).stages[0]
>>> node.in_sizes, node.out_sizes, node.num_params
((3, 2, 2), (2, 2, 1), 52)
>>> values = node.init(np.random.default_rng(0))
>>> x = np.ones((1, 7))
>>> bool(np.allclose(node.apply(x, values, np), x @ node.to_dense(values)))
True
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ...errors import ShapeError
from ..ir import Node
from .registry import Structure, register


def block_sizes(total: int, p: int) -> tuple[int, ...]:
    """``total`` split into ``p`` near-equal blocks, the first ``total mod p`` one larger.

    >>> block_sizes(10, 4)
    (3, 3, 2, 2)
    """
    base, extra = divmod(total, p)
    return tuple(base + (k < extra) for k in range(p))


def _offsets(sizes) -> tuple[int, ...]:
    return tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)]))


@dataclass(frozen=True)
class SSS(Node):
    """sss(p=, d=): p stages, state size d (see the module docstring)."""

    key: str = ""
    p: int = 1
    d: int = 1

    def __post_init__(self):
        if not 1 <= self.p <= min(self.shape):
            raise ValueError(f"sss needs 1 <= p <= min{self.shape}, got p={self.p}")
        if self.d < 1:
            raise ValueError(f"sss needs a state size d >= 1, got {self.d}")

    # ---- layout -----------------------------------------------------------------
    @property
    def in_sizes(self) -> tuple[int, ...]:
        return block_sizes(self.shape[0], self.p)

    @property
    def out_sizes(self) -> tuple[int, ...]:
        return block_sizes(self.shape[1], self.p)

    def name(self, letter: str, k: int) -> str:
        """The key of stage k's matrix ``letter`` (one of A..G)."""
        return f"{self.key}.{letter}{k}"

    def stage_shapes(self, k: int) -> dict[str, tuple[int, int]]:
        """Stage k's trainable arrays: letter -> shape."""
        n, m, d, last = self.in_sizes[k], self.out_sizes[k], self.d, self.p - 1
        shapes = {"D": (n, m)}
        if k < last:
            shapes.update(B=(n, d), G=(d, m))
        if k > 0:
            shapes.update(C=(d, m), F=(n, d))
        if 0 < k < last:
            shapes.update(A=(d, d), E=(d, d))
        return shapes

    def own_params(self):
        return {self.name(letter, k): shape for k in range(self.p)
                for letter, shape in sorted(self.stage_shapes(k).items())}

    # ---- values -----------------------------------------------------------------
    def own_init(self, rng):
        """D like a glorot-uniform dense kernel; A and E orthogonal (the recurrent
        kernels of a linear RNN: the state keeps its norm from stage to stage);
        B, C, F, G normal with B C of the glorot variance 2 / (n + m), so every
        entry of the dense W has that variance."""
        rows, cols = self.shape
        limit = math.sqrt(6.0 / (rows + cols))
        # only read where p > 1 (a state exists); d may be huge where it is not (sss(p=1, d=1e308))
        std = (2.0 / ((rows + cols) * self.d)) ** 0.25 if self.p > 1 else 0.0
        out = {}
        for k in range(self.p):
            for letter, shape in sorted(self.stage_shapes(k).items()):
                if letter == "D":
                    value = rng.uniform(-limit, limit, shape)
                elif letter in "AE":
                    value = _orthogonal(rng, self.d)
                else:
                    value = rng.normal(0.0, std, shape)
                out[self.name(letter, k)] = value
        return out

    def _get(self, v, letter, k):
        return v[self.name(letter, k)]

    def materialize(self, v, xp):
        """W column block by column block: [R_j C_j; D_j; L_j G_j], where R_j stacks
        B_i A_{i+1}..A_{j-1} over i < j and L_j stacks F_i E_{i-1}..E_{j+1} over i > j."""
        p, get = self.p, functools.partial(self._get, v)
        if p == 1:
            return get("D", 0)
        reach = [None] * p  # reach[j] = R_j, (n_0 + .. + n_{j-1}, d)
        for j in range(1, p):
            reach[j] = get("B", 0) if j == 1 else xp.concatenate(
                [xp.matmul(reach[j - 1], get("A", j - 1)), get("B", j - 1)], axis=0)
        back = [None] * p  # back[j] = L_j, (n_{j+1} + .. + n_{p-1}, d)
        for j in range(p - 2, -1, -1):
            back[j] = get("F", p - 1) if j == p - 2 else xp.concatenate(
                [get("F", j + 1), xp.matmul(back[j + 1], get("E", j + 1))], axis=0)
        columns = []
        for j in range(p):
            parts = [get("D", j)]
            if j > 0:
                parts.insert(0, xp.matmul(reach[j], get("C", j)))
            if j < p - 1:
                parts.append(xp.matmul(back[j], get("G", j)))
            columns.append(xp.concatenate(parts, axis=0))
        return xp.concatenate(columns, axis=1)

    def apply(self, x, v, xp):
        """x W by the causal forward and the anticausal backward recursion."""
        p, get = self.p, functools.partial(self._get, v)
        offsets = _offsets(self.in_sizes)
        xs = [x[:, offsets[k]:offsets[k + 1]] for k in range(p)]
        ys = [xp.matmul(xs[k], get("D", k)) for k in range(p)]
        h = None
        for k in range(p - 1):  # h leaves stage k towards stage k + 1
            ys[k] = ys[k] if h is None else ys[k] + xp.matmul(h, get("C", k))
            step = xp.matmul(xs[k], get("B", k))
            h = step if h is None else xp.matmul(h, get("A", k)) + step
        if p > 1:
            ys[p - 1] = ys[p - 1] + xp.matmul(h, get("C", p - 1))
        g = None
        for k in range(p - 1, 0, -1):  # g leaves stage k towards stage k - 1
            ys[k] = ys[k] if g is None else ys[k] + xp.matmul(g, get("G", k))
            step = xp.matmul(xs[k], get("F", k))
            g = step if g is None else xp.matmul(g, get("E", k)) + step
        if p > 1:
            ys[0] = ys[0] + xp.matmul(g, get("G", 0))
        return ys[0] if p == 1 else xp.concatenate(ys, axis=1)

    # ---- structure and costs ------------------------------------------------------
    def degree(self, keys) -> int:
        """Degree of W in the parameters ``keys``: the most of them one block's
        product B_i A..A C_j (or F_i E..E G_j, or D_j) holds."""
        has = {(letter, k): self.name(letter, k) in keys
               for k in range(self.p) for letter in self.stage_shapes(k)}
        best = max(int(has["D", k]) for k in range(self.p))
        for i in range(self.p):
            for j in range(i + 1, self.p):  # blocks (i, j) and (j, i)
                causal = has["B", i] + has["C", j] + sum(has["A", k] for k in range(i + 1, j))
                anti = has["F", j] + has["G", i] + sum(has["E", k] for k in range(i + 1, j))
                best = max(best, causal, anti)
        return best

    def solve_block(self, target, key: str, values) -> dict:
        """argmin ||target - W||_F over the one stage matrix ``key``, the others
        fixed (numpy): each appears in W between two stacks, so the
        least-squares problem is small; alternating least squares over the
        stage matrices needs nothing else."""
        letter, k = key[len(self.key) + 1], int(key[len(self.key) + 2:])
        ri, ro = _offsets(self.in_sizes), _offsets(self.out_sizes)
        reach, observe, back, observe_back = _stacks(self, values)
        rows, cols = slice(ri[k], ri[k + 1]), slice(ro[k], ro[k + 1])
        if letter == "D":
            return {key: target[rows, cols].copy()}
        if letter == "B":  # W[k, >k] = B_k O_{k+1}
            return {key: _solve(None, target[rows, ro[k + 1]:], observe[k + 1])}
        if letter == "C":  # W[<k, k] = R_k C_k
            return {key: _solve(reach[k], target[:ri[k], cols], None)}
        if letter == "A":  # W[<k, >k] = R_k A_k O_{k+1}
            return {key: _solve(reach[k], target[:ri[k], ro[k + 1]:], observe[k + 1])}
        if letter == "F":  # W[k, <k] = F_k P_{k-1}
            return {key: _solve(None, target[rows, :ro[k]], observe_back[k - 1])}
        if letter == "G":  # W[>k, k] = L_k G_k
            return {key: _solve(back[k], target[ri[k + 1]:, cols], None)}
        # E: W[>k, <k] = L_k E_k P_{k-1}
        return {key: _solve(back[k], target[ri[k + 1]:, :ro[k]], observe_back[k - 1])}

    def apply_cost(self, batch):
        """Every parameter takes part in one multiply-add per row, plus the
        additions that merge states and output parts."""
        p, d = self.p, self.d
        adds = 2 * max(p - 2, 0) * d + (2 * self.shape[1] - self.out_sizes[0] - self.out_sizes[-1] if p > 1 else 0)
        return 2 * batch * self.num_params + batch * adds

    def build_cost(self):
        d, n, outs, ri = self.d, self.shape[0], self.out_sizes, _offsets(self.in_sizes)
        cost = 0
        for j in range(1, self.p):  # R_j (inputs before stage j) and R_j C_j
            cost += (2 * ri[j - 1] * d * d if j > 1 else 0) + 2 * ri[j] * d * outs[j]
        for j in range(self.p - 1):  # L_j (inputs after stage j) and L_j G_j
            cost += (2 * (n - ri[j + 2]) * d * d if j < self.p - 2 else 0) + 2 * (n - ri[j + 1]) * d * outs[j]
        return cost

    def label(self):
        return f"sss(p={self.p}, d={self.d})"


def _stacks(node: SSS, values):
    """Per stage k (numpy): R_k (inputs < k -> state), O_k (state -> outputs >= k),
    L_k (inputs > k -> backward state) and P_k (backward state -> outputs <= k).
    W[<k, >=k] = R_k O_k and W[>k, <=k] = L_k P_k."""
    p = node.p
    get = functools.partial(node._get, values)
    reach, observe, back, observe_back = [None] * p, [None] * p, [None] * p, [None] * p
    for k in range(1, p):
        reach[k] = get("B", 0) if k == 1 else np.concatenate([reach[k - 1] @ get("A", k - 1), get("B", k - 1)])
    for k in range(p - 1, 0, -1):
        observe[k] = get("C", k) if k == p - 1 else np.concatenate([get("C", k), get("A", k) @ observe[k + 1]], axis=1)
    for k in range(p - 2, -1, -1):
        back[k] = get("F", p - 1) if k == p - 2 else np.concatenate([get("F", k + 1), back[k + 1] @ get("E", k + 1)])
    for k in range(p - 1):
        observe_back[k] = get("G", 0) if k == 0 else np.concatenate(
            [get("E", k) @ observe_back[k - 1], get("G", k)], axis=1)
    return reach, observe, back, observe_back


def _solve(left, target, right):
    """argmin_X ||target - left X right||_F (a missing side is the identity)."""
    def pinv(a):
        return np.linalg.pinv(a, rcond=max(a.shape) * np.finfo(np.float64).eps)
    X = target if left is None else pinv(left) @ target
    return X if right is None else X @ pinv(right)


def _orthogonal(rng, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))


# ---- the language ------------------------------------------------------------------

def _build(low, call, args, rows, cols, key):
    p, d = args["p"], args["d"]
    if p > min(rows, cols):
        raise ShapeError(f"sss(p={p}) splits the ({rows}, {cols}) operator into {p} blocks per side, "
                         f"more than its {min(rows, cols)} {'inputs' if rows <= cols else 'outputs'}",
                         pos=call.pos, hint=f"use p <= {min(rows, cols)}")
    return SSS((rows, cols), key=low.keys(call, "sss", key)[0], p=p, d=d)


register(Structure("sss", _build, required=("p", "d"), size="d"))
