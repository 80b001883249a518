"""The operator tree: frozen dataclasses, numpy only.

Every node denotes a linear operator W of shape (rows, cols) acting on row
vectors, y = x W.  One implementation serves numpy and Keras: ``materialize``
and ``apply`` take an array namespace ``xp`` (``numpy`` or ``keras.ops``) and a
mapping ``v`` from keys to arrays holding both the trainable values and the
fixed arrays.  Costs (``flops``) come from shapes alone.  Combinators live here;
fixed bases in ``fixed.py``; trainable structures in ``structures/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .cost import Cost

Shape = tuple[int, int]


@dataclass(frozen=True)
class Node:
    """Base class of every operator node."""

    shape: Shape

    # ---- structure -------------------------------------------------------
    def children(self) -> tuple["Node", ...]:
        return ()

    def own_params(self) -> dict[str, tuple[int, ...]]:
        """Trainable arrays this node itself owns: key -> shape."""
        return {}

    def own_fixed(self) -> dict[str, tuple[int, ...]]:
        """Fixed arrays this node itself owns: key -> shape (nothing generated)."""
        return {}

    def generate_fixed(self) -> dict[str, np.ndarray]:
        """This node's own fixed arrays, generated from their seeds."""
        return {}

    def walk(self):
        """This node and all below it, pre-order."""
        yield self
        for child in self.children():
            yield from child.walk()

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """All trainable arrays below this node (a tied name appears once)."""
        out: dict[str, tuple[int, ...]] = {}
        for node in self.walk():
            for key, shape in node.own_params().items():
                if out.setdefault(key, shape) != shape:
                    raise ValueError(f"'{key}' is used with shapes {out[key]} and {shape}")
        return out

    def fixed_shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for node in self.walk():
            out.update(node.own_fixed())
        return out

    def fixed_arrays(self) -> dict[str, np.ndarray]:
        """All fixed arrays below this node, generated from their seeds."""
        out: dict[str, np.ndarray] = {}
        for node in self.walk():
            for key, arr in node.generate_fixed().items():
                out.setdefault(key, arr)
        return out

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    @property
    def num_fixed(self) -> int:
        return sum(math.prod(s) for s in self.fixed_shapes().values())

    # ---- values ----------------------------------------------------------
    def init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Initial trainable values (Keras-style scale), for every key below."""
        out: dict[str, np.ndarray] = {}
        for node in self.walk():
            for key, value in node.own_init(rng).items():
                out.setdefault(key, value)
        return out

    def own_init(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {}

    def materialize(self, v: Mapping[str, Any], xp) -> Any:
        raise NotImplementedError(type(self).__name__)

    def apply(self, x, v: Mapping[str, Any], xp):
        """x W factor by factor (default: materialise W, then one matmul)."""
        return xp.matmul(x, self.materialize(v, xp))

    def best_apply(self, x, v, xp, batch: int):
        """x W by whichever of apply and materialise ``choose`` says is faster."""
        if self.choose(batch) == "apply":
            return self.apply(x, v, xp)
        return xp.matmul(x, self.materialize(v, xp))

    def to_dense(self, values: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The dense (rows, cols) matrix for trainable ``values`` (numpy)."""
        v = {**self.fixed_arrays(), **(values or {})}
        missing = set(self.param_shapes()) - set(v)
        if missing:
            raise KeyError(f"no values for {sorted(missing)}")
        return np.asarray(self.materialize(v, np), dtype=np.float64)

    # ---- costs -----------------------------------------------------------
    def apply_cost(self, batch: int) -> int:
        return self.build_cost() + matmul_cost(batch, *self.shape)

    def build_cost(self) -> int:
        return 0

    def best_cost(self, batch: int) -> int:
        return min(self.apply_cost(batch), self.build_cost() + matmul_cost(batch, *self.shape))

    def flops(self, batch: int, mode: str = "apply") -> int:
        """FLOPs of y = x W for ``batch`` rows, factor by factor ("apply") or
        by materialising W first ("materialize")."""
        if mode == "apply":
            return self.apply_cost(batch)
        if mode == "materialize":
            return self.build_cost() + matmul_cost(batch, *self.shape)
        raise ValueError(f"mode must be 'apply' or 'materialize', not {mode!r}")

    # ---- time: FLOPs, memory traffic and ops (operators/cost.py) ---------------
    def cost(self, batch: int, mode: str = "apply") -> Cost:
        """The work of y = x W for ``batch`` rows on one path, each sub-node on its
        own faster path; ``.seconds()`` turns it into time on this machine."""
        rows, cols = self.shape
        if mode == "materialize":
            return self.build_work() + Cost(matmul_cost(batch, rows, cols), rows * cols + batch * (rows + cols), 1)
        if mode != "apply":
            raise ValueError(f"mode must be 'apply' or 'materialize', not {mode!r}")
        return self.apply_work(batch)

    def choose(self, batch: int) -> str:
        """"apply" or "materialize", whichever ``cost`` says takes less time (ties: apply)."""
        return self._faster(batch)[0]

    def best_work(self, batch: int) -> Cost:
        return self._faster(batch)[1]

    def _faster(self, batch: int) -> tuple[str, Cost]:  # each path priced once: O(depth), not 2^depth
        apply, build = self.cost(batch, "apply"), self.cost(batch, "materialize")
        return ("apply", apply) if apply.seconds() <= build.seconds() else ("materialize", build)

    def stored(self) -> int:  # numbers held below this node, trainable and fixed
        return self.num_params + self.num_fixed

    def build_work(self) -> Cost:
        """Building W: a node that only reads its stored matrix (dense, G) costs nothing
        here; any other writes its (rows, cols) result with about one op per node."""
        computing = [n for n in self.walk() if n.children() or len(n.own_params()) + len(n.own_fixed()) > 1
                     or n.build_cost() > 0 or (n.own_fixed() and not n.own_params() and
                                               list(n.own_fixed().values()) != [n.shape])]
        if not computing:
            return Cost()
        return Cost(self.build_cost(), self.stored() + sum(math.prod(n.shape) for n in computing), len(computing))

    def apply_work(self, batch: int) -> Cost:
        """Apply's work; without an apply of its own, materialise's.  A structure's own apply:
        its FLOPs, its arrays read once, one op per trainable array (fixed ones, indices or
        bases, feed the same ops), each moving about a row of activations."""
        if type(self).apply is Node.apply:
            return self.cost(batch, "materialize")
        rows, cols = self.shape
        ops = max(1, len(self.own_params()))
        return Cost(self.apply_cost(batch), self.stored() + ops * batch * (rows + cols), ops)

    def label(self) -> str:
        return type(self).__name__.lower()


def matmul_cost(a: int, b: int, c: int) -> int:
    """FLOPs of an (a, b) @ (b, c) product (multiply and add counted)."""
    return 2 * a * b * c


# ---- combinators -----------------------------------------------------------

@dataclass(frozen=True)
class Add(Node):
    """sum_i sign_i * term_i."""

    terms: tuple[Node, ...] = ()
    signs: tuple[int, ...] = ()

    def children(self):
        return self.terms

    def materialize(self, v, xp):
        out = None
        for sign, term in zip(self.signs, self.terms):
            w = term.materialize(v, xp)
            out = (w if sign > 0 else -w) if out is None else (out + w if sign > 0 else out - w)
        return out

    def apply(self, x, v, xp):
        batch = _static_batch(x)
        out = None
        for sign, term in zip(self.signs, self.terms):
            y = term.best_apply(x, v, xp, batch)
            out = (y if sign > 0 else -y) if out is None else (out + y if sign > 0 else out - y)
        return out

    def apply_cost(self, batch):
        return sum(t.best_cost(batch) for t in self.terms) + batch * self.shape[1] * (len(self.terms) - 1)

    def build_cost(self):
        return sum(t.build_cost() for t in self.terms) + math.prod(self.shape) * (len(self.terms) - 1)

    def apply_work(self, batch):
        merges = len(self.terms) - 1
        out = batch * self.shape[1]
        return sum((t.best_work(batch) for t in self.terms), Cost(out * merges, 3 * out * merges, merges))

    def label(self):
        return "+"


@dataclass(frozen=True)
class Product(Node):
    """factor_0 factor_1 ... : x is multiplied by factor_0 first."""

    factors: tuple[Node, ...] = ()

    def children(self):
        return self.factors

    def materialize(self, v, xp):
        out = self.factors[0].materialize(v, xp)
        for f in self.factors[1:]:
            out = xp.matmul(out, f.materialize(v, xp))
        return out

    def apply(self, x, v, xp):
        batch = _static_batch(x)
        for f in self.factors:
            x = f.best_apply(x, v, xp, batch)
        return x

    def apply_cost(self, batch):
        return sum(f.best_cost(batch) for f in self.factors)

    def build_cost(self):
        cost = sum(f.build_cost() for f in self.factors)
        rows = self.factors[0].shape[0]
        for f in self.factors[1:]:
            cost += matmul_cost(rows, *f.shape)
        return cost

    def apply_work(self, batch):
        return sum((f.best_work(batch) for f in self.factors), Cost())

    def label(self):
        return "product"


@dataclass(frozen=True)
class Scale(Node):
    """child * factor, the factor a constant or a trainable scalar ``key``."""

    child: Node | None = None
    constant: float = 1.0
    key: str | None = None

    def children(self):
        return (self.child,)

    def own_params(self):
        return {self.key: ()} if self.key else {}

    def own_init(self, rng):
        return {self.key: np.ones(())} if self.key else {}

    def _factor(self, v):
        return v[self.key] * self.constant if self.key else self.constant

    def materialize(self, v, xp):
        return self.child.materialize(v, xp) * self._factor(v)

    def apply(self, x, v, xp):
        return self.child.best_apply(x, v, xp, _static_batch(x)) * self._factor(v)

    def apply_cost(self, batch):
        return self.child.best_cost(batch) + batch * self.shape[1]

    def build_cost(self):
        return self.child.build_cost() + math.prod(self.shape)

    def apply_work(self, batch):
        out = batch * self.shape[1]
        return self.child.best_work(batch) + Cost(out, 2 * out, 1)

    def label(self):
        return f"* {self.key or self.constant:g}" if not self.key else f"* {self.key}"


@dataclass(frozen=True)
class Transpose(Node):
    child: Node | None = None

    def children(self):
        return (self.child,)

    def materialize(self, v, xp):
        return xp.transpose(self.child.materialize(v, xp))

    def build_cost(self):
        return self.child.build_cost()

    def label(self):
        return "'"


@dataclass(frozen=True)
class Slice(Node):
    """child[:, start:stop]: keep output columns start..stop-1."""

    child: Node | None = None
    start: int = 0
    stop: int = 0

    def children(self):
        return (self.child,)

    @property
    def fixed_key(self) -> str:
        """Where a layer keeps this slice of a fixed matrix cut once, ahead of time."""
        return f"{getattr(self.child, 'key', '')}.cols{self.start}_{self.stop}"

    def materialize(self, v, xp):
        if self.fixed_key in v:  # DCT2[:k]: read (n, k) instead of cutting it out of (n, n) each step
            return v[self.fixed_key]
        return self.child.materialize(v, xp)[:, self.start:self.stop]

    def apply(self, x, v, xp):
        return self.child.best_apply(x, v, xp, _static_batch(x))[:, self.start:self.stop]

    def apply_cost(self, batch):
        return self.child.best_cost(batch)

    def build_cost(self):
        return self.child.build_cost()

    def build_work(self):
        stores = getattr(self.child, "stores_matrix", None)  # DCT2[:k]: cut once by the layer, then read
        return Cost() if stores is not None and stores() else super().build_work()

    def apply_work(self, batch):
        return self.child.best_work(batch) + Cost(0, 2 * batch * self.shape[1], 1)

    def label(self):
        return f"[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class Tile(Node):
    """Independent draws side by side: [E_1 E_2 ... E_n]."""

    draws: tuple[Node, ...] = ()

    def children(self):
        return self.draws

    def materialize(self, v, xp):
        return xp.concatenate([d.materialize(v, xp) for d in self.draws], axis=1)

    def apply(self, x, v, xp):
        batch = _static_batch(x)
        return xp.concatenate([d.best_apply(x, v, xp, batch) for d in self.draws], axis=1)

    def apply_cost(self, batch):
        return sum(d.best_cost(batch) for d in self.draws)

    def build_cost(self):
        return sum(d.build_cost() for d in self.draws)

    def apply_work(self, batch):
        return sum((d.best_work(batch) for d in self.draws), Cost(0, 2 * batch * self.shape[1], 1))

    def label(self):
        return f"tile(n={len(self.draws)})"


def _static_batch(x) -> int:
    """The batch size if known when tracing, else a typical training batch."""
    batch = x.shape[0]
    return batch if isinstance(batch, int) else 128
