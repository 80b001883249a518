"""``kron(A, B)``: the Kronecker product A (x) B, applied as x reshaped to (rows of A,
rows of B) and multiplied by both factors, never by the (n, m) matrix.

A factor's shape comes from the factor when it knows it (``DCT2(h=4, w=4)``), else
from ``rows=`` and ``cols=`` (the first factor's), else from a near-square split of
each side: ``kron(dense, dense)`` on 4096 x 4096 is two trainable 64 x 64 factors.

>>> from keras_decomp import parse
>>> node = parse("kron(dense, dense)", 4096, 1024).stages[0]
>>> node.a.shape, node.b.shape, node.num_params
((64, 32), (64, 32), 4096)
>>> parse("kron(dense, dense, rows=16)", 4096, 1024).stages[0].a.shape
(16, 32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import ShapeError
from ..cost import Cost
from ..ir import Node, matmul_cost
from .registry import Hint, Structure, register


@dataclass(frozen=True)
class Kron(Node):
    """Kronecker product A (x) B."""

    a: Node | None = None
    b: Node | None = None

    def children(self):
        return (self.a, self.b)

    def materialize(self, v, xp):
        (ra, ca), (rb, cb) = self.a.shape, self.b.shape
        w = xp.einsum("ij,kl->ikjl", self.a.materialize(v, xp), self.b.materialize(v, xp))
        return xp.reshape(w, (ra * rb, ca * cb))

    def apply(self, x, v, xp):
        (ra, ca), (rb, cb) = self.a.shape, self.b.shape
        x3 = xp.reshape(x, (-1, ra, rb))
        y = xp.einsum("bik,ij,kl->bjl", x3, self.a.materialize(v, xp), self.b.materialize(v, xp))
        return xp.reshape(y, (-1, ca * cb))

    def apply_cost(self, batch):
        (ra, ca), (rb, cb) = self.a.shape, self.b.shape
        return (self.a.build_cost() + self.b.build_cost()
                + matmul_cost(batch * ra, rb, cb) + matmul_cost(batch * cb, ra, ca))

    def build_cost(self):
        return self.a.build_cost() + self.b.build_cost() + math.prod(self.shape)

    def apply_work(self, batch):
        rows, cols = self.shape
        factors = self.a.build_work() + self.b.build_work()
        return factors + Cost(self.apply_cost(batch) - factors.flops,
                              self.stored() + 2 * batch * (rows + cols), 3)

    def label(self):
        return "kron"



# ---- the language ------------------------------------------------------------------

def _kron(low, call, args, rows, cols, key):
    a, b = call.args
    (ra, ca), (rb, cb) = _kron_shapes(low, call, args, rows, cols)
    return Kron((rows, cols), a=low.lower(a, ra, ca, key + (low.index(call), 0)),
                   b=low.lower(b, rb, cb, key + (low.index(call), 1)))


def _kron_shapes(low, call, args, rows, cols):
    """The factors' shapes: from a factor whose shape is known, else from rows= and
    cols= (the first factor's), else a near-square split of each side (4096 = 64 x 64;
    a square factor such as DCT gets a size dividing both sides)."""
    ha, hb = low.hint(call.args[0]), low.hint(call.args[1])
    kw = {k.name: k.pos for k in call.kwargs}
    ra = _kron_side(call, rows, "rows", ha.rows, hb.rows, args["rows"], kw.get("rows"))
    ca = _kron_side(call, cols, "cols", ha.cols, hb.cols, args["cols"], kw.get("cols"))
    _divides(call, kw, rows, cols, ra, ca)  # before a square factor divides by them
    for square, first in ((ha.square, True), (hb.square, False)):
        if not square:
            continue
        common = math.gcd(rows, cols)
        if ra is None and ca is None:
            size = _near_square(common)
            ra, ca = (size, size) if first else (rows // size, cols // size)
        elif ra is None:
            ra = ca if first else rows // (cols // ca)
        elif ca is None:
            ca = ra if first else cols // (rows // ra)
    ra = _near_square(rows) if ra is None else ra
    ca = _near_square(cols) if ca is None else ca
    _divides(call, kw, rows, cols, ra, ca)
    return (ra, ca), (rows // ra, cols // ca)


def _divides(call, kw, rows, cols, ra, ca):
    for size, total, what in ((ra, rows, "rows"), (ca, cols, "cols")):
        if size is not None and (size < 1 or total % size):
            raise ShapeError(f"kron: the first factor's {size} {what} do not divide the operator's {total}",
                             pos=kw.get(what, call.pos), hint=f"use a divisor of {total} for {what}=")


def _kron_side(call, total, what, a, b, given, pos):
    """The first factor's size along one side, or None if nothing fixes it."""
    sizes = {}
    if given:
        sizes[f"{what}={given}"] = given
    if a:
        sizes["the first factor's shape"] = a
    if b:
        if total % b:
            raise ShapeError(f"kron: the operator's {total} {what} are not a multiple of the second "
                             f"factor's {b}", pos=call.pos)
        sizes["the second factor's shape"] = total // b
    if len(set(sizes.values())) > 1:
        raise ShapeError(f"kron: the first factor's {what} disagree: " +
                         ", ".join(f"{v} from {k}" for k, v in sizes.items()), pos=pos or call.pos,
                         hint=f"drop {what}= where a factor's shape fixes it")
    return next(iter(sizes.values()), None)


def _near_square(total: int) -> int:
    """The largest divisor of ``total`` at most its square root (4096 -> 64, 784 -> 28, 12 -> 3)."""
    return max(d for d in range(1, math.isqrt(total) + 1) if total % d == 0)


def _kron_hint(low, call):
    if len(call.args) != 2:
        return Hint()
    ha, hb = low.hint(call.args[0]), low.hint(call.args[1])
    if None in (ha.rows, ha.cols, hb.rows, hb.cols):
        return Hint()
    return Hint(ha.rows * hb.rows, ha.cols * hb.cols)


register(Structure("kron", _kron, optional={"rows": 0, "cols": 0}, positional=2, hint=_kron_hint))
