"""Reverse-mode automatic differentiation in numpy, for the gradient fallback of the fit.

``materialize(v, xp)`` is written against an array namespace, so it runs unchanged on
``xp`` below: the trainable values are traced leaves, the fixed arrays stay numpy
constants, and every operation on a traced array records how to pass a cotangent back
to its inputs.  ``value_and_pullback`` runs a function once forward and returns its
value with the function that maps a cotangent of the output to the gradients of the
inputs: one backward pass, whatever the number of parameters.

Only what ``materialize`` uses is supported: +, -, *, / (scalars and numpy
broadcasting), unary -, basic indexing (ints, slices, None), ``.shape``/``.ndim``, and
xp.matmul, reshape, concatenate, eye, einsum, transpose, take, tensordot, sum, pad,
stack, unstack, tile, flip, scatter.  Anything else fails loudly, naming what is missing:
``AttributeError`` for a function or attribute that is not there, ``NotImplementedError``
for an unsupported form of one that is (advanced indexing, ``einsum`` with '...', a traced
index), and numpy itself refuses to run on a traced array (``np.matmul(traced, ...)``).

>>> import numpy as np
>>> a = np.array([[1.0, 2.0], [3.0, 4.0]])
>>> value, pullback = value_and_pullback(lambda p: xp.matmul(p["g"], xp.transpose(p["g"])), {"g": a})
>>> bool(np.allclose(value, a @ a.T))
True
>>> grads = pullback(np.ones((2, 2)))  # d sum(g g^T) / dg = (1 1^T + 1 1^T) g
>>> bool(np.allclose(grads["g"], 2 * np.ones((2, 2)) @ a))
True
"""

from __future__ import annotations

import string

import numpy as np

SUPPORTED = ("arange", "concatenate", "einsum", "eye", "flip", "matmul", "ones", "pad", "reshape", "scatter",
             "stack", "sum", "take", "tensordot", "tile", "transpose", "unstack")


class Traced:
    """An array that remembers how it was computed: ``value`` (a float64 numpy array),
    the traced ``parents`` it was computed from, and ``pullback``, which maps a
    cotangent of this array to one cotangent per parent."""

    __slots__ = ("parents", "pullback", "value")
    __array_ufunc__ = None  # numpy operators hand over to ours (ndarray * Traced -> __rmul__)

    def __init__(self, value, parents=(), pullback=None):
        self.value = value
        self.parents = parents
        self.pullback = pullback

    @property
    def shape(self):
        return self.value.shape

    @property
    def ndim(self):
        return self.value.ndim

    def __array__(self, *args, **kwargs):
        raise NotImplementedError("a traced array cannot become a numpy array: use autodiff.xp, "
                                  "not numpy, on trainable values")

    def __getattr__(self, name):
        raise AttributeError(f"autodiff does not support '.{name}' on traced arrays; "
                             "supported: +, -, *, /, unary -, [basic index], .shape, .ndim")

    # ---- arithmetic ------------------------------------------------------------
    def __add__(self, other):
        return _binary(self, other, lambda a, b: a + b, lambda g, a, b: (g, g))

    def __radd__(self, other):
        return _binary(other, self, lambda a, b: a + b, lambda g, a, b: (g, g))

    def __sub__(self, other):
        return _binary(self, other, lambda a, b: a - b, lambda g, a, b: (g, -g))

    def __rsub__(self, other):
        return _binary(other, self, lambda a, b: a - b, lambda g, a, b: (g, -g))

    def __mul__(self, other):
        return _binary(self, other, lambda a, b: a * b, lambda g, a, b: (g * b, g * a))

    def __rmul__(self, other):
        return _binary(other, self, lambda a, b: a * b, lambda g, a, b: (g * b, g * a))

    def __truediv__(self, other):
        return _binary(self, other, lambda a, b: a / b, lambda g, a, b: (g / b, -g * a / (b * b)))

    def __rtruediv__(self, other):
        return _binary(other, self, lambda a, b: a / b, lambda g, a, b: (g / b, -g * a / (b * b)))

    def __neg__(self):
        return Traced(-self.value, (self,), lambda g: (-g,))

    def __getitem__(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if not all(p is None or p is Ellipsis or isinstance(p, (int, np.integer, slice)) for p in parts):
            raise NotImplementedError("autodiff supports basic indexing only (ints, slices, None, ...), "
                                      f"not {index!r}; use xp.take to gather")
        shape = self.value.shape

        def pullback(g):
            out = np.zeros(shape)
            out[index] = g  # basic indexing reaches every entry at most once
            return (out,)
        return Traced(self.value[index], (self,), pullback)


def leaf(array) -> Traced:
    """A trainable input: a traced float64 array with no parents."""
    return Traced(np.array(array, dtype=np.float64))


def value_of(x):
    return x.value if isinstance(x, Traced) else x


def value_and_pullback(f, params: dict):
    """(f(params) as numpy, pullback): ``pullback(cotangent)`` is the dict of
    d <cotangent, f> / d params[k], every parameter's gradient in one backward pass."""
    leaves = {k: leaf(v) for k, v in params.items()}
    out = f(leaves)

    def pullback(cotangent):
        grads = backward(out, cotangent)
        return {k: grads.get(id(t), np.zeros(t.value.shape)) for k, t in leaves.items()}
    return value_of(out), pullback


def backward(out, cotangent) -> dict[int, np.ndarray]:
    """Cotangents of every traced array that ``out`` depends on, keyed by ``id``."""
    if not isinstance(out, Traced):
        return {}
    order, seen, stack = [], {id(out)}, [(out, False)]
    while stack:  # post-order depth-first search, without recursion
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        stack.append((node, True))
        for parent in node.parents:
            if id(parent) not in seen:
                seen.add(id(parent))
                stack.append((parent, False))
    grads = {id(out): np.array(np.broadcast_to(cotangent, out.value.shape), dtype=np.float64)}
    for node in reversed(order):  # every consumer of a node comes before it
        g = grads.get(id(node))
        if g is None or not node.parents:
            continue
        for parent, pg in zip(node.parents, node.pullback(g)):
            grads[id(parent)] = pg if id(parent) not in grads else grads[id(parent)] + pg
    return grads


def _binary(a, b, forward, local):
    """A broadcasting binary operation; ``local(g, a, b)`` gives the cotangents of a
    and b before their broadcast is undone."""
    av, bv = value_of(a), value_of(b)
    parents = [x for x in (a, b) if isinstance(x, Traced)]

    def pullback(g):
        ga, gb = local(g, av, bv)
        return tuple(_unbroadcast(c, np.shape(value_of(x)))
                     for x, c in ((a, ga), (b, gb)) if isinstance(x, Traced))
    return Traced(forward(av, bv), tuple(parents), pullback)


def _unbroadcast(g, shape):
    """Sum ``g`` over the axes that broadcasting added to or stretched in ``shape``."""
    g = np.sum(g, axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return np.sum(g, axis=stretched, keepdims=True) if stretched else g


def _op(inputs, value, pullback):
    """A traced result if any input is traced, else the plain numpy ``value``:
    ``pullback(g)`` returns one cotangent per entry of ``inputs`` (None for constants)."""
    traced = [i for i, x in enumerate(inputs) if isinstance(x, Traced)]
    if not traced:
        return value

    def pick(g):
        grads = pullback(g)
        return tuple(grads[i] for i in traced)
    return Traced(value, tuple(inputs[i] for i in traced), pick)


class Namespace:
    """The array namespace ``xp`` for ``materialize``: numpy's signatures, traced."""

    def __getattr__(self, name):
        raise AttributeError(f"autodiff's xp has no '{name}'; supported: {', '.join(SUPPORTED)}")

    @staticmethod
    def eye(n, m=None):
        return np.eye(n, m)

    @staticmethod
    def ones(shape):
        return np.ones(shape)

    @staticmethod
    def arange(*args):
        return np.arange(*args)

    @staticmethod
    def flip(a, axis):
        av = value_of(a)
        return _op([a], np.flip(av, axis=axis), lambda g: (np.flip(g, axis=axis),))

    @staticmethod
    def scatter(indices, values, shape):
        """keras.ops.scatter: zeros of ``shape`` with ``values`` added at ``indices`` (k, rank)."""
        if isinstance(indices, Traced):
            raise NotImplementedError("autodiff's scatter needs constant indices")
        where = tuple(np.asarray(indices).T)
        vv = value_of(values)
        out = np.zeros(shape)
        np.add.at(out, where, vv)
        return _op([indices, values], out, lambda g: (None, g[where]))

    @staticmethod
    def matmul(a, b):
        av, bv = value_of(a), value_of(b)
        if np.ndim(av) < 2 or np.ndim(bv) < 2:
            raise NotImplementedError("autodiff's matmul needs arrays of 2 or more dimensions")
        return _op([a, b], np.matmul(av, bv), lambda g: (
            _unbroadcast(np.matmul(g, np.swapaxes(bv, -1, -2)), av.shape),
            _unbroadcast(np.matmul(np.swapaxes(av, -1, -2), g), bv.shape)))

    @staticmethod
    def reshape(a, shape):
        av = value_of(a)
        return _op([a], np.reshape(av, shape), lambda g: (np.reshape(g, av.shape),))

    @staticmethod
    def transpose(a, axes=None):
        av = value_of(a)
        axes = tuple(range(av.ndim))[::-1] if axes is None else tuple(axes)
        return _op([a], np.transpose(av, axes), lambda g: (np.transpose(g, np.argsort(axes)),))

    @staticmethod
    def concatenate(arrays, axis=0):
        values = [value_of(x) for x in arrays]
        cuts = np.cumsum([v.shape[axis] for v in values])[:-1]
        return _op(list(arrays), np.concatenate(values, axis=axis), lambda g: np.split(g, cuts, axis=axis))

    @staticmethod
    def stack(arrays, axis=0):
        values = [value_of(x) for x in arrays]
        return _op(list(arrays), np.stack(values, axis=axis),
                   lambda g: [np.take(g, i, axis=axis) for i in range(len(values))])

    @staticmethod
    def unstack(a, axis=0):
        """numpy.unstack: the sub-arrays along ``axis``; each passes its cotangent back to its slot."""
        av = value_of(a)
        axis = axis % av.ndim

        def piece(i):
            def pullback(g):
                out = np.zeros(av.shape)
                out[(slice(None),) * axis + (i,)] = g
                return (out,)
            return _op([a], np.take(av, i, axis=axis), pullback)
        return tuple(piece(i) for i in range(av.shape[axis]))

    @staticmethod
    def take(a, indices, axis=None):
        if isinstance(indices, Traced):
            raise NotImplementedError("autodiff's take needs constant indices")
        if axis is None:
            raise NotImplementedError("autodiff's take needs an axis")
        av = value_of(a)
        axis = axis % av.ndim

        def pullback(g):
            out = np.zeros(av.shape)
            np.add.at(out, (slice(None),) * axis + (np.asarray(indices),), g)  # repeated indices add up
            return (out,)
        return _op([a], np.take(av, indices, axis=axis), pullback)

    @staticmethod
    def tile(a, reps):
        """numpy.tile; the gradient sums the copies (the reps as leading pairs of axes)."""
        av = value_of(a)
        reps = (int(reps),) if np.ndim(reps) == 0 else tuple(int(r) for r in reps)
        shape = (1,) * (len(reps) - av.ndim) + av.shape
        reps = (1,) * (len(shape) - len(reps)) + reps

        def pullback(g):
            pairs = np.reshape(g, tuple(x for r, n in zip(reps, shape) for x in (r, n)))
            return (np.reshape(np.sum(pairs, axis=tuple(range(0, 2 * len(shape), 2))), av.shape),)
        return _op([a], np.tile(av, reps), pullback)

    @staticmethod
    def sum(a, axis=None, keepdims=False):
        av = value_of(a)
        axes = tuple(range(av.ndim)) if axis is None else (axis,) if np.ndim(axis) == 0 else tuple(axis)
        axes = tuple(x % av.ndim for x in axes)
        kept = tuple(1 if i in axes else n for i, n in enumerate(av.shape))
        return _op([a], np.sum(av, axis=axis, keepdims=keepdims),
                   lambda g: (np.broadcast_to(np.reshape(g, kept), av.shape).copy(),))

    @staticmethod
    def pad(a, pad_width, mode="constant", constant_values=0):
        if mode != "constant":
            raise NotImplementedError(f"autodiff's pad supports mode='constant' only, not {mode!r}")
        if isinstance(constant_values, Traced):
            raise NotImplementedError("autodiff's pad needs a constant padding value")
        av = value_of(a)
        widths = np.broadcast_to(np.asarray(pad_width), (av.ndim, 2))
        inner = tuple(slice(int(lo), int(lo) + n) for (lo, _), n in zip(widths, av.shape))
        return _op([a], np.pad(av, widths, constant_values=constant_values), lambda g: (g[inner],))

    @staticmethod
    def einsum(subscripts, *operands):
        inputs, arrow, output = subscripts.replace(" ", "").partition("->")
        terms = inputs.split(",")
        if not arrow or "." in subscripts or len(terms) != len(operands) or \
                any(len(set(t)) != len(t) for t in terms):
            raise NotImplementedError("autodiff's einsum needs explicit '->', one subscript per operand, "
                                      f"no '...' and no repeated index in one operand, not {subscripts!r}")
        values = [value_of(x) for x in operands]
        pullback = _einsum_pullback(terms, output, values, [isinstance(x, Traced) for x in operands])
        return _op(list(operands), np.einsum(subscripts, *values), pullback)

    @staticmethod
    def tensordot(a, b, axes=2):
        """Forward by numpy's tensordot, backward as the einsum it is."""
        av, bv = value_of(a), value_of(b)
        if np.ndim(axes) == 0:
            axes = (list(range(av.ndim - axes, av.ndim)), list(range(axes)))
        left, right = ([x] if np.ndim(x) == 0 else list(x) for x in axes)
        left, right = [x % av.ndim for x in left], [x % bv.ndim for x in right]
        letters = iter(string.ascii_letters)
        sa = [next(letters) for _ in range(av.ndim)]
        sb = [next(letters) for _ in range(bv.ndim)]
        for i, j in zip(left, right):
            sb[j] = sa[i]
        out = [c for i, c in enumerate(sa) if i not in left] + [c for j, c in enumerate(sb) if j not in right]
        needed = [isinstance(a, Traced), isinstance(b, Traced)]
        pullback = _einsum_pullback(["".join(sa), "".join(sb)], "".join(out), [av, bv], needed)
        return _op([a, b], np.tensordot(av, bv, axes=(left, right)), pullback)


def _einsum_pullback(terms, output, values, needed):
    """Cotangents of an einsum's ``needed`` operands: the einsum of the output's cotangent
    with the other operands, broadcast over indices that only this operand has."""
    def pullback(g):
        grads = []
        for i, term in enumerate(terms):
            if not needed[i]:
                grads.append(None)
                continue
            others = [t for j, t in enumerate(terms) if j != i]
            present = set(output).union(*others)
            reduced = "".join(c for c in term if c in present)
            gi = np.einsum(",".join([output] + others) + "->" + reduced, g,
                           *[v for j, v in enumerate(values) if j != i])
            expand = tuple(k for k, c in enumerate(term) if c not in present)
            grads.append(np.broadcast_to(np.expand_dims(gi, expand), values[i].shape).copy())
        return grads
    return pullback


xp = Namespace()
