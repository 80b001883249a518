"""Syntax tree + the operator's shape -> operator IR.

Shapes flow both ways: the layer fixes the outer (rows, cols); inside a
product, factors that know a size (``DCT2(h=28, w=28)``, ``DCT[:k]``, a square
basis next to a known size) fix the inner sizes, and those nothing fixes
default to n, the input size.  Fixed matrices get their seed from the model
seed and their position (stage, pre-order index), so they are the same in any
process.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import zlib
from dataclasses import fields
from typing import Mapping

from ..operators import fixed as fx
from ..operators import ir, names
from . import syntax as s
from ..errors import ArgumentError, ShapeError, UnknownNameError
from ..operators.memory import MAX_DRAWS, check_memory
from ..operators.structures import registry
from ..operators.structures.registry import Hint


def lower_expression(expr: s.Expression, n: int, m: int, params: Mapping, seed: int,
                     declared: Mapping) -> list[ir.Node]:
    for name, size in (("n", n), ("m", m)):
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
            raise ShapeError(f"the operator's size {name} must be a positive integer, got {size!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ArgumentError(f"the seed must be an integer >= 0, got {seed!r}")
    n, m, seed = int(n), int(m), int(seed)
    for stage in expr.stages:
        check_names(stage, declared)
    roots = [Lowering(n, params, seed, declared, index, atom_order(stage)).lower(stage, n, m, ())
             for index, stage in enumerate(expr.stages)]
    for index, root in enumerate(roots):
        check_memory(root.num_params + root.num_fixed, f"stage {index}" if len(roots) > 1 else "this expression",
                     pos=expr.stages[index].pos)
    return roots


def atom_order(stage: s.Ast) -> dict[int, int]:
    """Text offset of each name or call -> its pre-order index in the stage.

    Keys use the index, not the offset, so spacing, comments, a ``W =`` target,
    ``(E')'`` for ``E`` or ``E * a`` for ``a * E`` do not change any matrix.
    """
    order: dict[int, int] = {}

    def visit(ast):
        if isinstance(ast, (s.Name, s.Call)):
            order.setdefault(ast.pos, len(order))
        for f in fields(ast):
            value = getattr(ast, f.name)
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, s.Ast):
                    visit(item)

    visit(stage)
    return order


def check_names(ast: s.Ast, declared: Mapping) -> None:
    """Near-misses of reserved names fail first, before any shape is worked out."""
    name = ast.name if isinstance(ast, s.Name) else ast.func if isinstance(ast, s.Call) else None
    if name is not None and name not in declared:
        suggestion = s.near_miss(name)
        if suggestion:
            raise UnknownNameError(f"unknown name '{name}'", pos=ast.pos, hint=f"did you mean {suggestion}?")
    for child in _syntax_children(ast):
        check_names(child, declared)


_syntax_children = s.children


class Lowering:
    """Lowers one stage.  ``key`` tuples extend the stage's position into draws."""

    def __init__(self, n: int, params: Mapping, seed: int, declared: Mapping, stage: int,
                 order: Mapping[int, int] | None = None):
        self.n = n
        self.order = order or {}
        self.params = params
        self.seed = seed
        self.declared = declared
        self.stage = stage
        self.names: dict[str, tuple] = {}  # name -> (use, shape): one name, one shape
        self.multiplicity = 1  # how many times the sub-expression being lowered is drawn

    @contextlib.contextmanager
    def draws(self, count: int, entries: int, what: str, pos: int):
        """Lower ``count`` draws of a sub-expression of ``entries`` numbers each; refused before
        anything is made if all the draws so far would not fit (``sum`` in ``sum`` multiplies)."""
        total = self.check_draws(count, entries, what, pos)
        outer, self.multiplicity = self.multiplicity, total
        try:
            yield
        finally:
            self.multiplicity = outer

    def check_draws(self, count: int, entries: int, what: str, pos: int) -> int:
        """The draws in all if ``count`` more of ``entries`` numbers each fit, else an error."""
        total = self.multiplicity * count
        if total > MAX_DRAWS:
            raise ShapeError(f"{what} would make {total:,} draws in all, more than {MAX_DRAWS:,}", pos=pos,
                             hint="use fewer draws, or nest sum(), tile() and sparse() less deeply")
        check_memory(total * entries, what, pos=pos)
        return total

    # ---- keys --------------------------------------------------------------
    def index(self, ast: s.Ast) -> int:
        """The pre-order index of the name or call at ``ast`` (see ``atom_order``);
        a node made up outside the text falls back to an index past every atom."""
        return self.order.get(ast.pos, (1 << 24) + ast.pos)

    def keys(self, ast: s.Ast, kind: str, key: tuple) -> tuple[str, tuple[int, ...]]:
        """(array key, rng key) for a node at ``ast`` inside draw path ``key``.

        The rng key is the node's pre-order index (and its draw number), so the
        same expression gives the same matrices in any process however it is
        spaced.  It leaves out the stage on purpose: in ``sum(G, n=10) |
        sum(G, n=50)`` the first 10 draws of stage 2 are stage 1's, so the
        least-squares hand-over loses nothing."""
        path = (self.index(ast),) + key
        return kind + "." + ".".join(map(str, (self.stage,) + path)), path

    # ---- symbols and arguments --------------------------------------------
    def resolve(self, value, pos: int, what: str):
        if isinstance(value, str):
            if value not in self.params:
                raise UnknownNameError(f"the symbol '{value}' in {what} is not bound", pos=pos,
                                       hint=f"bind it: params={{'{value}': ...}} in Python, "
                                            f"'params: {{{value}: ...}}' in a spec, or --param {value}=...")
            symbol, value = value, self.params[value]
            if not isinstance(value, numbers.Real):
                raise ArgumentError(f"the symbol '{symbol}' is bound to {value!r}, which is not a number",
                                    pos=pos, hint=f"bind it to a number: params={{'{symbol}': 8}}")
        return value

    def integer(self, value, pos: int, what: str, least: int = 1) -> int:
        value = self.resolve(value, pos, what)
        whole = isinstance(value, numbers.Integral) or math.isfinite(value) and float(value).is_integer()
        if isinstance(value, bool) or not whole or value < least:
            raise ArgumentError(f"{what} must be an integer >= {least}, got {value!r}", pos=pos)
        return int(value)

    # ---- hints -------------------------------------------------------------
    def hint(self, ast: s.Ast) -> Hint:
        if isinstance(ast, s.Name):
            if ast.name in names.SQUARE_BASES or ast.name == "DCT2":
                return Hint(square=True)
            if ast.name in self.declared and "shape" in self.declared[ast.name]:
                return Hint(*self.declared[ast.name]["shape"])
            return Hint()
        if isinstance(ast, s.Call):
            return registry.hint(self, ast)
        if isinstance(ast, s.Scale):
            return self.hint(ast.child)
        if isinstance(ast, s.Transpose):
            h = self.hint(ast.child)
            return Hint(h.cols, h.rows, h.square)
        if isinstance(ast, s.Slice):
            h = self.hint(ast.child)
            rows = h.rows
            cols = None
            start = self.bound(ast.start, 0)
            stop = self.bound(ast.stop, None)
            if stop is None:
                inner = h.cols if h.cols is not None else (h.rows if h.square else None)
                stop = inner
            if stop is not None and stop > start:  # an empty slice fails in lower_slice
                cols = stop - start
            return Hint(rows, cols)
        if isinstance(ast, s.Add):
            hints = [self.hint(t) for t in ast.terms]
            rows = next((h.rows for h in hints if h.rows is not None), None)
            cols = next((h.cols for h in hints if h.cols is not None), None)
            return Hint(rows, cols, any(h.square for h in hints))
        if isinstance(ast, s.Product):
            return Hint(self.hint(ast.factors[0]).rows, self.hint(ast.factors[-1]).cols)
        return Hint()

    def bound(self, bound: s.Bound | None, default):
        if bound is None:
            return default
        return self.integer(bound.value, bound.pos, "a slice bound", least=0)

    # ---- lowering ----------------------------------------------------------
    def lower(self, ast: s.Ast, rows: int, cols: int, key: tuple) -> ir.Node:
        method = getattr(self, "lower_" + type(ast).__name__.lower())
        return method(ast, rows, cols, key)

    def lower_name(self, ast: s.Name, rows, cols, key):
        name = ast.name
        if name in names.structures():
            return registry.build(self, s.Call(ast.pos, name, (), ()), rows, cols, key)
        return self.leaf(ast, name, {}, rows, cols, key)

    def lower_call(self, ast: s.Call, rows, cols, key):
        if ast.func in names.structures():
            return registry.build(self, ast, rows, cols, key)
        if not s.is_fixed_name(ast.func):
            suggestion = s.near_miss(ast.func)
            raise UnknownNameError(f"unknown structure '{ast.func}'", pos=ast.pos,
                                   hint=f"did you mean {suggestion}?" if suggestion else
                                   "structures are " + ", ".join(names.structures()))
        kwargs = {kw.name: kw for kw in ast.kwargs}
        if ast.args:
            raise ArgumentError(f"the fixed matrix {ast.func} takes no expression arguments", pos=ast.args[0].pos,
                                hint=f"for a product, put a space before the parenthesis: {ast.func} (...)")
        return self.leaf(ast, ast.func, kwargs, rows, cols, key)

    def leaf(self, ast, name: str, kwargs: dict, rows: int, cols: int, key: tuple) -> ir.Node:
        if name in self.declared:
            return self.declared_leaf(ast, name, kwargs, rows, cols)
        suggestion = s.near_miss(name)
        if suggestion:
            raise UnknownNameError(f"unknown name '{name}'", pos=ast.pos, hint=f"did you mean {suggestion}?")
        if not s.is_fixed_name(name):
            if kwargs:
                raise ArgumentError(f"'{name}' is a trainable matrix and takes no arguments", pos=ast.pos)
            return self.named_matrix(ast, name, rows, cols)
        allowed = {"DCT2": ("h", "w")}.get(name, ("seed",) if name not in ("I", "DCT", "H") else ())
        if name not in names.BASES and kwargs:  # one name, one matrix: a seed here would be ignored
            raise ArgumentError(f"'{name}' is a named fixed matrix and takes no arguments",
                                pos=next(iter(kwargs.values())).pos,
                                hint="one name is one matrix; for a seeded Gaussian write G(seed=...)")
        for kw in kwargs.values():
            if kw.name not in allowed:
                raise ArgumentError(f"{name} has no argument '{kw.name}'", pos=kw.pos,
                                    hint=f"{name} takes " + (", ".join(f"{a}=" for a in allowed) or "no arguments"))
        if name in names.SQUARE_BASES or name == "DCT2":
            return self.square_basis(ast, name, kwargs, rows, cols, key)
        array_key, rng_key = self.keys(ast, name, key)
        if "seed" in kwargs:
            kw = kwargs["seed"]
            rng_key = (1 << 20, self.integer(kw.value, kw.pos, "seed", least=0))
            array_key = f"{name}.seed{rng_key[1]}.{rows}x{cols}"  # one seed, one matrix per shape
        if name not in names.BASES:  # an undeclared uppercase name: one Gaussian per name
            array_key, rng_key = name, (1 << 21, zlib.crc32(name.encode()))
            self.check_named(ast, name, ("fixed", (rows, cols)))
        kind = {"G": fx.Gaussian, "S": fx.Sign, "R": fx.RankOne, "F": fx.FastRandom}.get(name, fx.Gaussian)
        return kind((rows, cols), kind=name, key=array_key, seed=self.seed, rng_key=rng_key)

    def square_basis(self, ast, name, kwargs, rows, cols, key):
        h = w = 0
        if name == "DCT2":
            h, w = self.image_size(ast, kwargs, rows)
            if h * w != rows:
                raise ShapeError(f"DCT2(h={h}, w={w}) is ({h * w}, {h * w}) but here {rows} rows are needed",
                                 pos=ast.pos, hint="set h and w so that h*w is the input size")
        if rows != cols:
            raise ShapeError(f"{name} is square, but here it would be ({rows}, {cols})", pos=ast.pos,
                             hint=f"keep some of its columns with a slice: {name}[:{cols}]")
        array_key, rng_key = self.keys(ast, name, key)
        if "seed" in kwargs:
            kw = kwargs["seed"]
            rng_key = (1 << 20, self.integer(kw.value, kw.pos, "seed", least=0))
            array_key = f"{name}.seed{rng_key[1]}.{rows}"  # one seed, one matrix per size
        shape = (rows, rows)
        if name == "I":
            return fx.Identity(shape, kind=name, key=array_key)
        if name == "D":
            return fx.Diagonal(shape, kind=name, key=array_key, seed=self.seed, rng_key=rng_key)
        if name == "P":
            return fx.Permutation(shape, kind=name, key=array_key, seed=self.seed, rng_key=rng_key)
        if name == "H" and rows & (rows - 1):
            lower_, upper = 1 << (rows.bit_length() - 1), 1 << rows.bit_length()
            raise ArgumentError(f"H needs a power-of-2 size, got {rows}", pos=ast.pos,
                                hint=f"use a size of {lower_} or {upper}, or another basis")
        size_key = f"{name}.{h}x{w}" if name == "DCT2" else f"{name}.{rows}"
        return fx.Deterministic(shape, kind=name, key=size_key, h=h, w=w)

    def image_size(self, ast, kwargs, rows) -> tuple[int, int]:
        if "h" in kwargs or "w" in kwargs:
            if not ("h" in kwargs and "w" in kwargs):
                raise ArgumentError("DCT2 needs both h= and w=", pos=ast.pos)
            return tuple(self.integer(kwargs[a].value, kwargs[a].pos, f"DCT2's {a}") for a in ("h", "w"))
        side = int(round(rows ** 0.5))
        if side * side != rows:
            raise ArgumentError(f"DCT2 cannot guess the image size of {rows} inputs", pos=ast.pos,
                                hint="give it: DCT2(h=..., w=...)")
        return side, side

    def declared_leaf(self, ast, name, kwargs, rows, cols):
        decl = self.declared[name]
        rng_key = (1 << 21, zlib.crc32(name.encode()))
        if "file" in decl or "matrix" in decl:
            matrix = decl["matrix"]
            if tuple(matrix.shape) != (rows, cols):
                raise ShapeError(f"{name} is {tuple(matrix.shape)} but here it would be ({rows}, {cols})",
                                 pos=ast.pos)
            return fx.Loaded((rows, cols), kind=name, key=name, matrix=matrix)
        basis = decl.get("basis", "G")
        kind = {"G": fx.Gaussian, "S": fx.Sign, "R": fx.RankOne, "D": fx.Diagonal,
                "P": fx.Permutation, "F": fx.FastRandom}.get(basis)
        if kind is None:
            raise ArgumentError(f"{name} is declared with the unknown basis {basis!r}", pos=ast.pos,
                                hint="a declared basis is one of G, S, R, D, P, F, or a file")
        if kind in (fx.Diagonal, fx.Permutation) and rows != cols:
            raise ShapeError(f"{name} ({basis}) is square, but here it would be ({rows}, {cols})", pos=ast.pos)
        self.check_named(ast, name, ("fixed", (rows, cols)))
        return kind((rows, cols), kind=name, key=name, seed=self.seed, rng_key=rng_key)

    def named_matrix(self, ast, name, rows, cols):
        from ..operators.structures.basic import Dense
        self.check_named(ast, name, ("matrix", (rows, cols)))
        return Dense((rows, cols), key=name)

    def check_named(self, ast, name, use):
        known = self.names.setdefault(name, use)
        if known != use:
            if known[0] != use[0]:
                raise ShapeError(f"'{name}' is used both as a {known[0]} and as a {use[0]}", pos=ast.pos)
            raise ShapeError(f"'{name}' is used with shapes {known[1]} and {use[1]}", pos=ast.pos,
                             hint="one name is one variable; give different uses different names")

    def lower_number(self, ast: s.Number, rows, cols, key):
        raise ShapeError(f"the number {ast.value:g} is not a matrix", pos=ast.pos,
                         hint=f"scale a matrix with it: {ast.value:g} * E")

    def lower_scale(self, ast: s.Scale, rows, cols, key):
        child = self.lower(ast.child, rows, cols, key)
        if isinstance(ast.factor, s.Number):
            return ir.Scale(child.shape, child=child, constant=float(ast.factor.value))
        name = ast.factor.name
        suggestion = s.near_miss(name)
        if suggestion:
            raise UnknownNameError(f"unknown name '{name}'", pos=ast.factor.pos, hint=f"did you mean {suggestion}?")
        self.check_named(ast.factor, name, ("scalar", ()))
        return ir.Scale(child.shape, child=child, key=name)

    def lower_transpose(self, ast: s.Transpose, rows, cols, key):
        child = self.lower(ast.child, cols, rows, key)
        return ir.Transpose((rows, cols), child=child)

    def lower_slice(self, ast: s.Slice, rows, cols, key):
        h = self.hint(ast.child)
        start = self.bound(ast.start, 0)
        inner = h.cols if h.cols is not None else (rows if h.square else None)
        stop = self.bound(ast.stop, None)
        if inner is None:
            inner = stop if stop is not None else start + cols
        if stop is None:
            stop = inner
        where = ast.stop.pos if ast.stop else ast.pos
        if ast.stop is not None and stop <= start:
            raise ShapeError(f"the slice [{start}:{stop}] keeps no columns", pos=where,
                             hint=f"its stop must be above its start: [{start}:{start + cols}]")
        if not start < stop <= inner:
            raise ShapeError(f"the slice [{start}:{stop}] does not fit {inner} columns", pos=where,
                             hint=f"keep columns within 0..{inner}")
        if stop - start != cols:
            raise ShapeError(f"the slice keeps {stop - start} columns but here {cols} are needed",
                             pos=where, hint=f"make it [{start}:{start + cols}]")
        child = self.lower(ast.child, rows, inner, key)
        return ir.Slice((rows, cols), child=child, start=start, stop=stop)

    def lower_add(self, ast: s.Add, rows, cols, key):
        terms = tuple(self.lower(t, rows, cols, key) for t in ast.terms)
        return ir.Add((rows, cols), terms=terms, signs=ast.signs)

    def lower_product(self, ast: s.Product, rows, cols, key):
        dims = self.product_dims(ast, rows, cols)
        factors = tuple(self.lower(f, dims[i], dims[i + 1], key) for i, f in enumerate(ast.factors))
        return ir.Product((rows, cols), factors=factors)

    def product_dims(self, ast: s.Product, rows, cols) -> list[int]:
        k = len(ast.factors)
        dims: list[int | None] = [rows] + [None] * (k - 1) + [cols]
        hints = [self.hint(f) for f in ast.factors]
        changed = True
        while changed:
            changed = False
            for i, (f, h) in enumerate(zip(ast.factors, hints)):
                for side, size, what in ((i, h.rows, "rows"), (i + 1, h.cols, "columns")):
                    if size is None:
                        continue
                    if dims[side] is None:
                        dims[side], changed = size, True
                    elif dims[side] != size:
                        raise ShapeError(f"this factor has {size} {what}, but {dims[side]} are needed here",
                                         pos=f.pos, hint=_mismatch_hint(what, dims[side]))
                if h.square and (dims[i] is None) != (dims[i + 1] is None):
                    dims[i] = dims[i + 1] = dims[i] if dims[i] is not None else dims[i + 1]
                    changed = True
        return [d if d is not None else self.n for d in dims]


def _mismatch_hint(what: str, needed: int) -> str:
    if what == "columns":
        return f"slice it to {needed} columns ([:{needed}]) or change the neighbouring factor"
    return "the inner sizes of a product must agree; check the neighbouring factors"
