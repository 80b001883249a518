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

Storage and apply: the stage matrices of one letter and one shape are stacked in
one array ``<key>.<letter><first stage>`` of shape (stages, rows, cols), so a
layer holds 7 variables when p divides n and m (a stack breaks where the blocks
shrink by one otherwise; ``stage(values, letter, k)`` reads one matrix).  ``apply``
lays x out as p equal blocks (blocks.py pads the smaller ones with a zero, exact),
runs one batched product per letter and steps only the d x d state recursions
stage by stage, the causal and the anticausal one side by side: an SSS layer with
p = 16 is about 60 graph ops (forward, TensorFlow), not one op per stage matrix.

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
from ..cost import Cost
from ..ir import Node, _static_batch
from .blocks import block_sizes, from_blocks, offsets as _offsets, padded_stack, to_blocks
from .registry import Structure, register
from .scan import SCANS, scan_costs

LETTERS = "ABCDEFG"


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
        """The key of the stacked array that holds stage k's matrix ``letter`` (A..G)."""
        start = next(a for a, b in self.runs(letter) if a <= k < b)
        return f"{self.key}.{letter}{start}"

    def stage_shapes(self, k: int) -> dict[str, tuple[int, int]]:
        """Stage k's matrices: letter -> shape."""
        n, m, d, last = self.in_sizes[k], self.out_sizes[k], self.d, self.p - 1
        shapes = {"D": (n, m)}
        if k < last:
            shapes.update(B=(n, d), G=(d, m))
        if k > 0:
            shapes.update(C=(d, m), F=(n, d))
        if 0 < k < last:
            shapes.update(A=(d, d), E=(d, d))
        return shapes

    def runs(self, letter: str) -> tuple[tuple[int, int], ...]:
        """The stage ranges [start, stop) whose matrices ``letter`` have one shape and
        are stored stacked, as one array of shape (stop - start, rows, cols): one
        range when p divides n and m, at most three for D otherwise (the first
        n mod p input blocks and m mod p output blocks are one larger)."""
        lo, hi = {"D": (0, self.p), "B": (0, self.p - 1), "G": (0, self.p - 1), "C": (1, self.p),
                  "F": (1, self.p), "A": (1, self.p - 1), "E": (1, self.p - 1)}[letter]
        cuts = {lo, hi}
        if letter in "DBF":
            cuts.add(self.shape[0] % self.p)
        if letter in "DCG":
            cuts.add(self.shape[1] % self.p)
        edges = sorted(c for c in cuts if lo <= c <= hi)
        return tuple((a, b) for a, b in zip(edges, edges[1:]) if a < b)

    def own_params(self):
        # ordered by first stage, then letter: alternating least squares sweeps them in this order
        runs = sorted((a, letter, b) for letter in LETTERS for a, b in self.runs(letter))
        return {f"{self.key}.{letter}{a}": (b - a,) + self.stage_shapes(a)[letter] for a, letter, b in runs}

    # ---- values -----------------------------------------------------------------
    def stage(self, values, letter: str, k: int):
        """Stage k's matrix ``letter`` from the stacked ``values``."""
        start = next(a for a, b in self.runs(letter) if a <= k < b)
        return values[f"{self.key}.{letter}{start}"][k - start]

    def stacked(self, stages: dict) -> dict:
        """Stacked values from per-stage matrices {(letter, k): array} (numpy)."""
        return {f"{self.key}.{letter}{a}": np.stack([np.asarray(stages[letter, k]) for k in range(a, b)])
                for letter in LETTERS for a, b in self.runs(letter)}

    def legacy_params(self) -> dict:
        """keras_decomp 0.1's layout, one array per stage matrix (``<key>.<letter><k>``),
        in its order: files saved by it load through ``from_legacy``."""
        return {f"{self.key}.{letter}{k}": shape for k in range(self.p)
                for letter, shape in sorted(self.stage_shapes(k).items())}

    def from_legacy(self, arrays) -> dict:
        return self.stacked({(k[len(self.key) + 1], int(k[len(self.key) + 2:])): arrays[k] for k in self.legacy_params()})

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
                out[letter, k] = value
        return self.stacked(out)

    def materialize(self, v, xp):
        """W column block by column block: [R_j C_j; D_j; L_j G_j], where R_j stacks
        B_i A_{i+1}..A_{j-1} over i < j and L_j stacks F_i E_{i-1}..E_{j+1} over i > j."""
        p, get = self.p, functools.partial(self.stage, v)
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
        """x W with every stage product batched: x cut into p equal blocks (the
        smaller ones padded with a zero), one batched product per kind of stage
        matrix, and only the d x d state recursions stage by stage (the causal
        and the anticausal one side by side, one batched product per step)."""
        p = self.p
        xs = to_blocks(x, p, xp)  # (p, batch, n_k)
        y = xp.matmul(xs, self._equal(v, "D", xp))  # (p, batch, m_k)
        if p > 1:
            forward = xp.matmul(xs[:-1], self._equal(v, "B", xp))  # x_k B_k, k < p-1
            backward = xp.matmul(xs[1:], self._equal(v, "F", xp))  # x_k F_k, k > 0
            # step t carries h_{t+1} (causal) and g_{p-2-t} (anticausal) together
            A, E = (self._equal(v, "A", xp), xp.flip(self._equal(v, "E", xp), axis=0)) if p > 2 else (None, None)
            d = self.d
            if p > 2 and self.scan(_static_batch(x)) == "doubling":
                states = SCANS["doubling"](xp.stack([forward, xp.flip(backward, axis=0)], axis=1),
                                           None if A is None else xp.stack([A, E], axis=1), xp)
                h, g = states[:, 0], states[:, 1]  # (p-1, batch, d) each
            else:  # one (batch, 2d) state, block-diagonal moves: plain 2-D products, far cheaper per
                # op in TensorFlow than tiny batched ones
                moves = None if A is None else xp.concatenate(
                    [xp.pad(A, [[0, 0], [0, 0], [0, d]]), xp.pad(E, [[0, 0], [0, 0], [d, 0]])], axis=1)
                states = SCANS["steps"](xp.concatenate([forward, xp.flip(backward, axis=0)], axis=-1), moves, xp)
                h, g = states[:, :, :d], states[:, :, d:]
            causal = xp.matmul(h, self._equal(v, "C", xp))  # into stages 1..p-1
            anti = xp.matmul(xp.flip(g, axis=0), self._equal(v, "G", xp))  # into 0..p-2
            y = y + xp.pad(causal, [[1, 0], [0, 0], [0, 0]]) + xp.pad(anti, [[0, 1], [0, 0], [0, 0]])
        return from_blocks(y, self.shape[1], xp)

    def _equal(self, v, letter, xp):
        """Stage matrices ``letter`` as one (stages, rows, cols) stack, the smaller padded."""
        rows = -(-self.shape[0] // self.p) if letter in "DBF" else self.d
        cols = -(-self.shape[1] // self.p) if letter in "DCG" else self.d
        return padded_stack([v[f"{self.key}.{letter}{a}"] for a, _ in self.runs(letter)], rows, cols, xp)

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
        """argmin ||target - W||_F over the stage matrices stacked under ``key``, the
        others fixed (numpy), one stage after the other (a sweep of alternating
        least squares): each appears in W between two stacks, so every
        least-squares problem is small."""
        letter, start = key[len(self.key) + 1], int(key[len(self.key) + 2:])
        stack = np.array(values[key], dtype=np.float64)
        current = {**values, key: stack}
        for k in range(start, start + len(stack)):
            stack[k - start] = self._solve_stage(target, letter, k, current)
        return {key: stack}

    def _solve_stage(self, target, letter: str, k: int, values):
        ri, ro = _offsets(self.in_sizes), _offsets(self.out_sizes)
        reach, observe, back, observe_back = _stacks(self, values)
        rows, cols = slice(ri[k], ri[k + 1]), slice(ro[k], ro[k + 1])
        if letter == "D":
            return target[rows, cols]
        if letter == "B":  # W[k, >k] = B_k O_{k+1}
            return _solve(None, target[rows, ro[k + 1]:], observe[k + 1])
        if letter == "C":  # W[<k, k] = R_k C_k
            return _solve(reach[k], target[:ri[k], cols], None)
        if letter == "A":  # W[<k, >k] = R_k A_k O_{k+1}
            return _solve(reach[k], target[:ri[k], ro[k + 1]:], observe[k + 1])
        if letter == "F":  # W[k, <k] = F_k P_{k-1}
            return _solve(None, target[rows, :ro[k]], observe_back[k - 1])
        if letter == "G":  # W[>k, k] = L_k G_k
            return _solve(back[k], target[ri[k + 1]:, cols], None)
        # E: W[>k, <k] = L_k E_k P_{k-1}
        return _solve(back[k], target[ri[k + 1]:, :ro[k]], observe_back[k - 1])

    def apply_cost(self, batch):
        """The batched apply: every padded stage matrix takes part in one
        multiply-add per row, plus the additions that merge states and outputs,
        plus the state recursion by the scan ``scan`` picks."""
        p, d = self.p, self.d
        rows, cols = -(-self.shape[0] // p), -(-self.shape[1] // p)
        macs, adds = p * rows * cols, 0
        if p > 1:
            macs += 2 * (p - 1) * d * (rows + cols)
            adds = 2 * p * cols
        return batch * (2 * macs + adds) + (self.scans(batch)[self.scan(batch)].flops if p > 2 else 0)

    def scans(self, batch: int) -> dict:
        """The work of the state recursions (p - 1 steps, both directions) by each way
        of running them (scan.py): "steps" or "doubling"."""
        return scan_costs(self.p - 1, self.d, batch, directions=2)

    def scan(self, batch: int) -> str:
        """"steps" or "doubling", whichever ``scans`` says takes less time (ties: steps)."""
        if self.p <= 3:
            return "steps"
        work = self.scans(batch)
        return "doubling" if work["doubling"].seconds() < work["steps"].seconds() else "steps"

    def apply_work(self, batch):
        """The batched apply's ops: a fixed handful, the recursion's (``scans``) and a few
        more to pad uneven blocks."""
        p, d, (n, m) = self.p, self.d, self.shape
        ops = 5 if p == 1 else 20 + (self.scans(batch)[self.scan(batch)].ops if p > 2 else 0)
        ops += 4 * bool(n % p) + 3 * bool(m % p)
        return Cost(self.apply_cost(batch), self.stored() + batch * (2 * n + 4 * m + 8 * p * d), ops)

    def build_work(self):
        """materialize's ops: a few per stage (products, stacks), one concatenation per column."""
        return Cost(self.build_cost(), self.stored() + 3 * math.prod(self.shape), 8 * self.p)

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
    get = functools.partial(node.stage, values)
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
