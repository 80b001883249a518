"""The syntax tree of an expression, before shapes are known.

``parse.py`` builds it from the lark tree; ``lower.py`` turns it into the
operator IR.  Every node keeps ``pos``, its character offset in the text, so
errors can put a caret under the culprit.  This module also knows the reserved
names and finds near-misses of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..operators import names


@dataclass(frozen=True)
class Ast:
    pos: int


@dataclass(frozen=True)
class Name(Ast):
    name: str


@dataclass(frozen=True)
class Number(Ast):
    value: float


@dataclass(frozen=True)
class Keyword(Ast):
    name: str
    value: float | str  # a number or a symbol


@dataclass(frozen=True)
class Call(Ast):
    func: str
    args: tuple[Ast, ...]
    kwargs: tuple[Keyword, ...]


@dataclass(frozen=True)
class Add(Ast):
    terms: tuple[Ast, ...]
    signs: tuple[int, ...]


@dataclass(frozen=True)
class Product(Ast):
    factors: tuple[Ast, ...]


@dataclass(frozen=True)
class Scale(Ast):
    child: Ast
    factor: Ast  # Number or a lowercase Name


@dataclass(frozen=True)
class Transpose(Ast):
    child: Ast


@dataclass(frozen=True)
class Bound(Ast):
    value: float | str  # a number or a symbol


@dataclass(frozen=True)
class Slice(Ast):
    child: Ast
    start: Bound | None
    stop: Bound | None


@dataclass(frozen=True)
class Expression:
    """A whole parsed text: ``W = E1 | E2 | ...``."""

    text: str
    target: str | None
    stages: tuple[Ast, ...]


def children(ast: Ast) -> tuple[Ast, ...]:
    """The sub-trees of a node (a call's expression arguments, a sum's terms, ...)."""
    if isinstance(ast, Call):
        return ast.args
    if isinstance(ast, Add):
        return ast.terms
    if isinstance(ast, Product):
        return ast.factors
    if isinstance(ast, Scale):
        return (ast.child, ast.factor)
    if isinstance(ast, (Transpose, Slice)):
        return (ast.child,)
    return ()


def is_fixed_name(name: str) -> bool:
    return name[0].isupper()


def is_scalar_candidate(ast: Ast) -> bool:
    """Can this operand of ``*`` be the scalar?  Numbers and lowercase names that
    are not structures."""
    if isinstance(ast, Number):
        return True
    return isinstance(ast, Name) and not is_fixed_name(ast.name) and ast.name not in names.structures()


def near_miss(name: str) -> str | None:
    """The reserved name that ``name`` is probably a typo of, or None.

    >>> near_miss("DTC"), near_miss("lowrnk"), near_miss("Dense"), near_miss("A1"), near_miss("dense1"), near_miss("g")
    ('DCT', 'lowrank', 'dense', None, None, None)
    """
    reserved_names = names.reserved()
    if name in reserved_names:
        return None
    for reserved in reserved_names:
        if re.fullmatch(re.escape(reserved) + r"\d+", name):
            return None  # dense1, DCT3: a deliberate new name
    for reserved in reserved_names:  # one-letter names (a, g, s) are ordinary parameter names
        if len(reserved) >= 3 and name.lower() == reserved.lower():
            return reserved
    for reserved in reserved_names:
        if len(reserved) >= 3 and _one_edit(name, reserved):
            return reserved
    return None


def _one_edit(a: str, b: str) -> bool:
    """Damerau distance exactly one (substitution, insertion, deletion, swap)."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        i, j = diff[0], diff[-1]
        return len(diff) == 2 and j == i + 1 and a[i] == b[j] and a[j] == b[i]
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))
