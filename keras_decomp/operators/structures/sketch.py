"""sketch(k=, l=): the tensor-sketched layers SK-FC and SK-CONV of Kasiviswanathan,
Narodytska and Jin, "Deep Neural Network Approximation using Tensor Sketching".

W (n, m) is replaced by 2l sketches of it, W = 1/(2l) sum_i (S1_i U1_i + U2_i S2_i):
U1_i (k, m) and U2_i (n, k) are fixed random sign matrices (entries +-1/sqrt(k), so
E[U1^T U1] = I and E[U2 U2^T] = I), S1_i (n, k) and S2_i (k, m) are trained.

Storage: the l draws are laid side by side so that every product is one matmul.
``s1`` is (n, l*k) with S1_i in columns i*k..(i+1)*k, ``U1`` (l*k, m) stacks U1_i
by rows, ``U2`` (n, l*k) and ``s2`` (l*k, m) likewise; then
W = (s1 U1 + U2 s2) / (2l) and x W = ((x s1) U1 + (x U2) s2) / (2l).

Conv2D (SK-CONV).  The kernel tensor (kh, kw, cin, cout) is the (kh*kw*cin, cout)
matrix W with rows in (kh, kw, cin) order.  The sketches act on the channel modes
only: U1_i maps the k sketched output channels to cout, exactly as for a dense W,
so S1_i is (kh*kw*cin, k); U2_i (cin, k) acts on the input-channel mode alone, which
on the matrix is the Kronecker product I_{kh*kw} (x) U2_i, and S2_i is the
(kh, kw, k, cout) tensor as a (kh*kw*k, cout) matrix.  ``spatial=`` gives kh*kw;
it defaults to the symbol ``spatial``, which ``layers.Conv2D`` binds to its kernel's
kh*kw (so ``sketch(k=8)`` in a Conv2D is SK-CONV; ``spatial=1`` there sketches the
reshaped kernel as a plain matrix).  Dense layers bind nothing: spatial is 1.
``s2`` is then (kh*kw*l*k, cout), rows in (position, draw, k) order, and the
trainable count is l*k*(n + kh*kw*m), the number ``params=`` budgets.  ``spatial``
describes the sketch's own rows: where a sketch sits inside a product or a transpose
in a Conv2D its rows are no longer the kernel's, so write ``spatial=1`` there.
Dense layers apply x W factor by factor when that is cheaper; Conv2D materialises
the (small) kernel and convolves once.

Initialisation from a trained W (``approximate``): the paper's unbiased estimator
S1_i = W U1_i^T, S2_i = U2_i^T W, and the exact least-squares fit (the form is
linear in the S); ``compare`` returns both and their errors, the registered
method uses least squares, which is never worse.

>>> from keras_decomp import parse
>>> node = parse("sketch(k=4, l=2)", 20, 10).stages[0]
>>> node.num_params == 2 * 4 * (20 + 10), node.num_fixed == 2 * 4 * (20 + 10)
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import bases
from ...errors import ShapeError
from ..ir import Node, matmul_cost
from .registry import Structure, register

SPATIAL = "spatial"  # the symbol that Conv2D binds to kh*kw


@dataclass(frozen=True)
class Sketch(Node):
    """W = 1/(2l) sum_i (S1_i U1_i + (I_spatial (x) U2_i) S2_i), see the module."""

    key: str = ""
    seed: int = 0
    rng_key: tuple[int, ...] = ()
    k: int = 1
    l: int = 1  # the paper's name for the number of sketch pairs
    spatial: int = 1

    # ---- sizes and keys ----------------------------------------------------
    @property
    def width(self) -> int:
        """l*k: the sketched dimension of all draws together."""
        return self.l * self.k

    @property
    def channels(self) -> int:
        """The size of the mode U2 acts on: n / spatial (cin for a conv kernel)."""
        return self.shape[0] // self.spatial

    @property
    def keys(self) -> dict[str, str]:
        fixed = self.key.replace("sketch", "SKETCH", 1)
        return {"s1": self.key + ".s1", "s2": self.key + ".s2", "U1": fixed + ".U1", "U2": fixed + ".U2"}

    def own_params(self):
        rows, cols = self.shape
        return {self.keys["s1"]: (rows, self.width), self.keys["s2"]: (self.spatial * self.width, cols)}

    def own_fixed(self):
        return {self.keys["U1"]: (self.width, self.shape[1]), self.keys["U2"]: (self.channels, self.width)}

    def generate_fixed(self):
        # One stream per draw and side: sketch(k, l=2) starts with sketch(k, l=1)'s draw.
        def draw(side, i):
            return bases.generator(self.seed, self.rng_key + (side, i))
        cols, k = self.shape[1], self.k
        u1 = [bases.sign(draw(1, i), cols, k).T for i in range(self.l)]  # (k, m), +-1/sqrt(k)
        u2 = [bases.sign(draw(2, i), self.channels, k) for i in range(self.l)]  # (cin, k)
        return {self.keys["U1"]: np.concatenate(u1, axis=0), self.keys["U2"]: np.concatenate(u2, axis=1)}

    def own_init(self, rng):
        # Each of the 2l terms has entries of variance std^2; their mean over 2l terms
        # has std^2 / (2l): pick std so that this is Glorot's 2 / (n + m).
        rows, cols = self.shape
        std = math.sqrt(4.0 * self.l / (rows + cols))
        return {key: rng.normal(0.0, std, shape) for key, shape in self.own_params().items()}

    def degree(self, keys) -> int:
        return int(bool({self.keys["s1"], self.keys["s2"]} & set(keys)))

    # ---- values ----------------------------------------------------------
    def _arrays(self, v):
        return tuple(v[self.keys[name]] for name in ("s1", "s2", "U1", "U2"))

    def materialize(self, v, xp):
        s1, s2, u1, u2 = self._arrays(v)
        first = xp.matmul(s1, u1)
        if self.spatial == 1:
            second = xp.matmul(u2, s2)
        else:  # (I (x) U2) s2: U2 on the channel mode of each kernel position
            blocks = xp.reshape(s2, (self.spatial, self.width, self.shape[1]))
            second = xp.reshape(xp.einsum("cj,ajm->acm", u2, blocks), self.shape)
        return (first + second) * (0.5 / self.l)

    def apply(self, x, v, xp):
        s1, s2, u1, u2 = self._arrays(v)
        first = xp.matmul(xp.matmul(x, s1), u1)
        if self.spatial == 1:
            sketched = xp.matmul(x, u2)
        else:
            pixels = xp.reshape(x, (-1, self.spatial, self.channels))
            sketched = xp.reshape(xp.einsum("bac,cj->baj", pixels, u2), (-1, self.spatial * self.width))
        return (first + xp.matmul(sketched, s2)) * (0.5 / self.l)

    # ---- costs -----------------------------------------------------------
    def apply_cost(self, batch):
        (rows, cols), w = self.shape, self.width
        first = matmul_cost(batch, rows, w) + matmul_cost(batch, w, cols)
        second = matmul_cost(batch, rows, w) + matmul_cost(batch, self.spatial * w, cols)
        return first + second + 2 * batch * cols

    def build_cost(self):
        (rows, cols), w = self.shape, self.width
        return matmul_cost(rows, w, cols) + self.spatial * matmul_cost(self.channels, w, cols) + 2 * rows * cols

    def label(self):
        return f"sketch(k={self.k}, l={self.l}" + (f", spatial={self.spatial})" if self.spatial > 1 else ")")

    # ---- the Kronecker factor I (x) U2 on dense matrices (numpy) --------------
    def spread(self, u2, X):
        """(I_spatial (x) u2) X for X of (spatial * u2.shape[1], m) rows."""
        blocks = X.reshape(self.spatial, u2.shape[1], X.shape[1])
        return np.einsum("cj,ajm->acm", u2, blocks).reshape(self.spatial * u2.shape[0], X.shape[1])

    def gather(self, u2, W):
        """(I_spatial (x) u2)^T W for W of (spatial * u2.shape[0], m) rows."""
        return self.spread(u2.T, W)


# ---- the structure -------------------------------------------------------------

def _build(low, call, args, rows, cols, key):
    spatial = args["spatial"]
    if spatial == SPATIAL:  # not given: the layer's kernel geometry, if it bound one
        spatial = low.integer(low.params.get(SPATIAL, 1), call.pos, "sketch's spatial (the symbol 'spatial')")
    if rows % spatial:
        raise ShapeError(f"sketch(spatial={spatial}) needs a number of rows divisible by {spatial}, got {rows}",
                         pos=call.pos, hint="spatial= is the number of kernel positions kh*kw; "
                                            "Conv2D sets it, a Dense layer leaves it at 1")
    array_key, rng_key = low.keys(call, "sketch", key)
    return Sketch((rows, cols), key=array_key, seed=low.seed, rng_key=rng_key,
                  k=args["k"], l=args["l"], spatial=spatial)


register(Structure("sketch", _build, required=("k",), optional={"l": 1, "spatial": SPATIAL}, size="k"))
