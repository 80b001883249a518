"""The table of trainable structures: name -> how to check its arguments, guess
its shape and build its IR node.  Families with their own module (sss, sketch,
sparse, tri) add themselves with ``register``; until then the parser knows the
name and says it is not available yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from .. import fixed as fx
from .. import ir
from .. import names
from ..memory import draw_entries
from ...errors import ArgumentError, ShapeError, UnknownNameError
from .basic import Dense, Diag, LowRank, SumOf
from .fast_random import FastSum


@dataclass(frozen=True)
class Structure:
    """How to build one structure.

    ``build(low, call, args, rows, cols, key)`` gets the checked keyword
    arguments as ``args`` (ints or floats, symbols resolved).  ``size`` is
    the argument that ``params=`` replaces.  ``count(rows, cols, size)``, where
    given, is the trainable count without building a node (None: no such
    node): ``params=`` then picks, among sizes 1..min(rows, cols), the one with
    the largest count within budget, for structures whose count falls as the
    size grows (monarch's b blocks).
    """

    name: str
    build: Callable
    required: tuple[str, ...] = ()
    optional: dict = field(default_factory=dict)
    positional: int = 0
    size: str | None = None
    hint: Callable | None = None
    count: Callable | None = None


@dataclass(frozen=True)
class Hint:
    """What a sub-expression knows of its own shape before placement."""

    rows: int | None = None
    cols: int | None = None
    square: bool = False


_TABLE: dict[str, Structure] = {}


def register(structure: Structure) -> None:
    """Add a structure to the language (or replace the one of that name).  Its name
    must be a lowercase identifier that is not a basis; from now on ``name`` and
    ``name(...)`` in an expression build it (tutorials/04_new_structure.py)."""
    name = structure.name
    if not re.fullmatch(r"[a-z][A-Za-z0-9_]*", name or ""):
        raise ValueError(f"a structure name must start with a lowercase letter (trainable) and be an "
                         f"identifier, got {name!r}")
    _TABLE[name] = structure
    names.reserve_structure(name)


def lookup(call) -> Structure:
    if call.func not in _TABLE:
        raise UnknownNameError(f"the structure '{call.func}' is not available in this version yet",
                               pos=call.pos, hint="available: " + ", ".join(sorted(_TABLE)))
    return _TABLE[call.func]


def hint(low, call):
    structure = _TABLE.get(call.func)
    if structure is None or structure.hint is None:
        return _basis_hint(low, call)
    return structure.hint(low, call)


def _basis_hint(low, call):
    if call.func == "DCT2":
        kw = {k.name: k for k in call.kwargs}
        if "h" in kw and "w" in kw:
            h, w = (low.integer(kw[a].value, kw[a].pos, f"DCT2's {a}") for a in ("h", "w"))
            return Hint(h * w, h * w, True)
        return Hint(square=True)
    return Hint(square=call.func in names.SQUARE_BASES)


def build(low, call, rows: int, cols: int, key: tuple) -> ir.Node:
    structure = lookup(call)
    if len(call.args) != structure.positional:
        where = call.args[structure.positional].pos if len(call.args) > structure.positional else call.pos
        raise ArgumentError(f"{call.func} takes {structure.positional} expression argument(s), "
                            f"got {len(call.args)}", pos=where, hint=_usage(structure))
    args = {}
    budget = None
    for kw in call.kwargs:
        if kw.name == "params" and structure.size:
            budget = (low.resolve(kw.value, kw.pos, "params="), kw.pos)
            continue
        if kw.name not in structure.required and kw.name not in structure.optional:
            raise ArgumentError(f"{call.func} has no argument '{kw.name}'", pos=kw.pos, hint=_usage(structure))
        least = 0 if kw.name == "seed" else 1
        args[kw.name] = low.integer(kw.value, kw.pos, f"{call.func}'s {kw.name}", least=least)
    if budget and structure.size in args:
        raise ArgumentError(f"give {call.func} either {structure.size}= or params=, not both", pos=budget[1])
    missing = [a for a in structure.required if a not in args and not (budget and a == structure.size)]
    if missing:
        raise ArgumentError(f"{call.func} needs the argument '{missing[0]}'", pos=call.pos, hint=_usage(structure))
    for name, default in structure.optional.items():
        args.setdefault(name, default)
    if budget:
        return _within_budget(low, structure, call, args, budget, rows, cols, key)
    return structure.build(low, call, args, rows, cols, key)


def _usage(structure: Structure) -> str:
    parts = ["E"] * structure.positional + [f"{a}=..." for a in structure.required]
    parts += [f"{a}={d}" for a, d in structure.optional.items()]
    if structure.size:
        parts.append(f"or params=<fraction> instead of {structure.size}=")
    return f"usage: {structure.name}(" + ", ".join(parts) + ")"


def _within_budget(low, structure, call, args, budget, rows, cols, key):
    """The largest size whose trainable count is at most the fraction of dense."""
    fraction, pos = budget
    if isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise ArgumentError(f"params= must be a fraction in (0, 1], got {fraction!r}", pos=pos)
    allowed = fraction * rows * cols
    if structure.count:
        return _best_count(low, structure, call, args, (fraction, pos), rows, cols, key)

    def node(size):
        return structure.build(low, call, {**args, structure.size: size}, rows, cols, key)

    smallest = node(1)
    if smallest.num_params > allowed:
        raise ArgumentError(f"impossible budget: the smallest {call.func} ({structure.size}=1) has "
                            f"{smallest.num_params} trainable parameters, more than params={fraction:g} "
                            f"of {rows}x{cols} ({int(allowed)})", pos=pos,
                            hint="raise the fraction or choose a smaller structure")
    cap = rows * cols  # no size needs more than one per dense entry
    lo, hi = 1, 2
    while hi <= cap and node(hi).num_params <= allowed:
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)  # hi is over budget or past the cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if node(mid).num_params <= allowed else (lo, mid)
    return node(lo)


def _best_count(low, structure, call, args, budget, rows, cols, key):
    """params= for a structure with ``count``: the size whose count is the largest within budget."""
    fraction, pos = budget
    allowed = fraction * rows * cols
    counts = {size: structure.count(rows, cols, size) for size in range(1, min(rows, cols) + 1)}
    fits = [(count, -size) for size, count in counts.items() if count is not None and count <= allowed]
    if not fits:
        smallest = min(c for c in counts.values() if c is not None)
        raise ArgumentError(f"impossible budget: the smallest {call.func} has {smallest} trainable parameters, "
                            f"more than params={fraction:g} of {rows}x{cols} ({int(allowed)})", pos=pos,
                            hint="raise the fraction or choose a smaller structure")
    size = -max(fits)[1]
    return structure.build(low, call, {**args, structure.size: size}, rows, cols, key)


# ---- the built-in structures ------------------------------------------------

def _auto_key(low, call, key):
    return low.keys(call, call.func, key)[0]


def _dense(low, call, args, rows, cols, key):
    return Dense((rows, cols), key=_auto_key(low, call, key))


def _diag(low, call, args, rows, cols, key):
    return Diag((rows, cols), key=_auto_key(low, call, key))


def _lowrank(low, call, args, rows, cols, key):
    return LowRank((rows, cols), key=_auto_key(low, call, key), rank=args["r"])


def _sum(low, call, args, rows, cols, key):
    if _is_fast_basis(low, call.args[0]):
        return _fast_sum(low, call, args, rows, cols, key)
    n = args["n"]
    draws = _draws(low, call, n, rows, cols, key, f"sum(n={n}) of {rows}x{cols} terms")
    return SumOf((rows, cols), key=_auto_key(low, call, key), draws=draws)


def _draws(low, call, n, rows, cols, key, what):
    """n independent draws of the call's expression, each (rows, cols).  The memory
    guard counts what a draw keeps once the first is made and before the others
    are: a rank-1 draw its two vectors, a diagonal its one, a generic draw its
    dense matrix (summed draw by draw, each may be materialised)."""
    with low.draws(n, 0, what, call.pos):
        first = low.lower(call.args[0], rows, cols, key + (low.index(call), 0))
    with low.draws(n, draw_entries(first), what, call.pos):
        rest = tuple(low.lower(call.args[0], rows, cols, key + (low.index(call), j)) for j in range(1, n))
    return (first,) + rest


def _is_fast_basis(low, arg) -> bool:
    """Whether ``arg`` is the reserved basis F (``F`` or ``F(seed=...)``), not a declared name."""
    name = arg.func if hasattr(arg, "func") else getattr(arg, "name", None)
    return name == "F" and "F" not in low.declared


def _fast_sum(low, call, args, rows, cols, key):
    """sum(F, n): one F's arrays (rows*cols signs and small factors) serve all n draws."""
    n, size = args["n"], rows * cols
    if n > size:
        pos = next((kw.pos for kw in call.kwargs if kw.name == "n"), call.pos)
        raise ShapeError(f"sum(F, n={n}) needs at most {size} draws on a {rows}x{cols} matrix "
                         f"(its draws are orthogonal)", pos=pos,
                         hint=f"use n <= {size}, or G for more draws than entries")
    with low.draws(1, size, f"sum(F, n={n}) of {rows}x{cols} terms", call.pos):
        leaf = low.lower(call.args[0], rows, cols, key + (low.index(call), 0))
    return FastSum((rows, cols), key=_auto_key(low, call, key), leaf=leaf, n=n)


def _tile(low, call, args, rows, cols, key):
    n = args["n"]
    if n > cols:
        raise ShapeError(f"tile(n={n}) needs at least {n} columns, got {cols}", pos=call.pos)
    if cols % n:
        raise ShapeError(f"tile(n={n}) needs a number of columns divisible by {n}, got {cols}",
                         pos=call.pos, hint=f"use {cols - cols % n} or {cols - cols % n + n} outputs")
    draws = _draws(low, call, n, rows, cols // n, key, f"tile(n={n}) of {rows}x{cols // n} terms")
    if isinstance(draws[0], fx.FixedLeaf) and draws[0].stack == "linear" and not isinstance(draws[0], fx.TiledLeaf):
        return fx.TiledLeaf((rows, cols), kind="tile", key=_auto_key(low, call, key).replace("tile", "T"),
                            draws=draws)
    return ir.Tile((rows, cols), draws=draws)


def _tile_hint(low, call):
    h = low.hint(call.args[0]) if call.args else Hint()
    n = next((low.integer(k.value, k.pos, "tile's n") for k in call.kwargs if k.name == "n"), None)
    cols = h.cols * n if h.cols is not None and n else None
    return Hint(h.rows, cols)


def _sum_hint(low, call):
    return low.hint(call.args[0]) if call.args else Hint()


for _s in (
    Structure("dense", _dense),
    Structure("diag", _diag),
    Structure("lowrank", _lowrank, required=("r",), size="r"),
    Structure("sum", _sum, required=("n",), positional=1, size="n", hint=_sum_hint),
    Structure("tile", _tile, required=("n",), positional=1, hint=_tile_hint),
):
    register(_s)
