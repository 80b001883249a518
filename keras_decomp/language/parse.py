"""Text -> lark tree -> syntax tree -> operator IR.

The only module that imports lark.  Every lark error becomes a ``DecompError``
with the expression and a caret under the culprit.

>>> d = parse("W = sum(G, n=8) | dense", 16, 4)
>>> d.shape, len(d.stages), d.num_params
((16, 4), 2, 8)
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import syntax as s
from ..errors import DecompError, ParseError

_TOKEN_WORDS = {
    "NAME": "a name", "FUNC": "a call", "NUMBER": "a number", "LPAR": "'('", "RPAR": "')'",
    "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "AT": "'@'", "VBAR": "'|'", "COMMA": "','",
    "EQUAL": "'='", "COLON": "':'", "LSQB": "'['", "RSQB": "']'", "QUOTE": "a transpose (')",
    "$END": "the end",
}

_COMMENT = re.compile(r"#[^\n]*")

# Lowering, the IR and the layers walk the tree recursively: an expression may nest this deep
# (a sum or a product is one level however long; each call, scaling, transpose and slice is one
# more; hand-written expressions nest fewer than 10).
MAX_DEPTH = 50


def grammar_text() -> str:
    """The grammar, from the installed package or, in a checkout, from grammar/."""
    try:
        return (resources.files("keras_decomp.grammar") / "decomp.lark").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parent.parent / "grammar" / "decomp.lark").read_text()


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_text(), parser="lalr", strict=True, propagate_positions=True,
                maybe_placeholders=True)


def _pos(meta_or_token) -> int:
    return getattr(meta_or_token, "start_pos", 0) or 0


@v_args(inline=True, meta=True)
class _ToSyntax(Transformer_NonRecursive):
    """Maps lark rules straight onto syntax dataclasses; non-recursive, so that a
    long sum (a left-deep lark tree) cannot exhaust Python's stack."""

    def start(self, meta, *items):
        target = str(items[0]) if isinstance(items[0], Token) else None
        stages = items[1:] if target else items
        return target, tuple(stages)

    def stage(self, meta, expr):
        return expr

    def add(self, meta, left, right):
        return _add(meta, left, right, +1)

    def sub(self, meta, left, right):
        return _add(meta, left, right, -1)

    def juxt(self, meta, left, right):
        return _product(meta, left, right)

    def matmul(self, meta, left, right):
        return _product(meta, left, right)

    def mul(self, meta, left, right):
        # A number is always the scalar ("2 * a"); between two names, the right one ("A * a").
        if isinstance(left, s.Number) and not isinstance(right, s.Number):
            return s.Scale(_pos(meta), right, left)
        if s.is_scalar_candidate(right):
            return s.Scale(_pos(meta), left, right)
        if s.is_scalar_candidate(left):
            return s.Scale(_pos(meta), right, left)
        raise ParseError("'*' scales by a number or a trainable scalar, but both sides are matrices",
                         pos=right.pos, hint="write a product as 'A B' or 'A @ B'; "
                                             "a scalar is a number or a lowercase name, as in 'A * a'")

    def transpose(self, meta, child):
        return s.Transpose(_pos(meta), child)

    def slice(self, meta, child, start, stop):
        return s.Slice(_pos(meta), child, start, stop)

    def bound(self, meta, token):
        return s.Bound(_pos(token), _value(token))

    def name(self, meta, token):
        return s.Name(_pos(token), str(token))

    def number(self, meta, token):
        value = _value(token)
        if not math.isfinite(value):
            raise ParseError(f"the number {str(token)} is too large", pos=_pos(token),
                             hint="numbers must be finite floating-point values")
        return s.Number(_pos(token), value)

    def call(self, meta, func, *args):
        args = [a for a in args if a is not None]
        positional = tuple(a for a in args if not isinstance(a, s.Keyword))
        keywords = tuple(a for a in args if isinstance(a, s.Keyword))
        if positional and keywords and args.index(keywords[0]) < args.index(positional[-1]):
            raise ParseError("a positional argument follows a keyword argument", pos=positional[-1].pos,
                             hint=f"put expressions first: {func}(E, n=...)")
        seen = set()
        for kw in keywords:
            if kw.name in seen:
                raise ParseError(f"argument '{kw.name}' is given twice", pos=kw.pos)
            seen.add(kw.name)
        return s.Call(_pos(func), str(func), positional, keywords)

    def positional(self, meta, expr):
        return expr

    def keyword(self, meta, name, value):
        return s.Keyword(_pos(name), str(name), value)

    def value(self, meta, token):
        return _value(token)


def _value(token: Token) -> float | int | str:
    if token.type == "NUMBER":
        text = str(token)
        # a longer run of digits is read as a float (inf past 1e308): Python refuses to convert
        # integers of over 4300 digits, and float() of one of over 308 overflows
        return int(text) if text.isdigit() and len(text) <= 300 else float(text)
    return str(token)


def _add(meta, left, right, sign) -> s.Add:
    if isinstance(left, s.Add):
        return s.Add(left.pos, left.terms + (right,), left.signs + (sign,))
    return s.Add(_pos(meta), (left, right), (1, sign))


def _product(meta, left, right) -> s.Product:
    for side in (left, right):
        if isinstance(side, s.Number):
            raise ParseError("a number cannot be a factor of a product", pos=side.pos,
                             hint=f"scale with '*': {side.value:g} * E")
    factors = left.factors if isinstance(left, s.Product) else (left,)
    return s.Product(factors[0].pos, factors + (right,))


def parse_syntax(text: str) -> s.Expression:
    """Text -> syntax tree; raises DecompError with a caret on bad input."""
    if not isinstance(text, str):
        raise ParseError(f"an expression must be a string, not {type(text).__name__}")
    if not _COMMENT.sub("", text).strip():
        raise ParseError("the expression is empty", text=text.strip("\n"), pos=0,
                         hint="write an expression such as 'W = sum(G, n=8)'")
    try:
        tree = _parser().parse(text)
        target, stages = _ToSyntax().transform(tree)
    except VisitError as err:
        inner = err.orig_exc
        if isinstance(inner, DecompError):
            raise inner.located(_line(text, inner.pos), _col(text, inner.pos)) from None
        raise
    except UnexpectedInput as err:
        raise _syntax_error(text, err) from None
    for stage in stages:
        _check_depth(text, stage)
        if isinstance(stage, s.Number):
            raise ParseError("a stage cannot be just a number", text=text, pos=stage.pos,
                             hint="write a matrix expression, e.g. '2 * dense'")
    return s.Expression(text, target, stages)


def _check_depth(text: str, stage: s.Ast) -> None:
    """Refuse a tree nested deeper than MAX_DEPTH, with a caret under the first node too deep
    (walked with an explicit stack: the check itself must not recurse)."""
    todo = [(stage, 1)]
    while todo:
        ast, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise ParseError(f"the expression nests more than {MAX_DEPTH} levels deep", text=_line(text, ast.pos),
                             pos=_col(text, ast.pos), hint="write it flatter: long sums and products are fine, "
                                                           "deeply nested calls, transposes and slices are not")
        todo.extend((child, depth + 1) for child in s.children(ast))


def _syntax_error(text: str, err: UnexpectedInput) -> ParseError:
    pos = err.pos_in_stream if err.pos_in_stream is not None else len(text)
    if isinstance(err, UnexpectedCharacters):
        char = text[pos] if pos < len(text) else ""
        return ParseError(f"unexpected character {char!r}", text=_line(text, pos), pos=_col(text, pos),
                          hint="names are letters, digits and '_'; operators are + - * @ ' | and ( ) [ : ] , =")
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        pos = len(text.rstrip())
        expected = _expected(err)
        return ParseError("the expression ends too early", text=_line(text, pos), pos=_col(text, pos),
                          hint=f"expected {expected}" if expected else None)
    token = err.token
    expected = _expected(err)
    wanted = set(getattr(err, "expected", ()) or ())
    if token.type in ("MINUS", "PLUS") and "NUMBER" in wanted and "LPAR" not in wanted:
        return ParseError(f"an argument value or slice bound cannot start with '{token}'",
                          text=_line(text, pos), pos=_col(text, pos),
                          hint="sizes, seeds and bounds are plain numbers >= 0 (or symbols), e.g. seed=1")
    spaced = _spaced_call(text, pos) if token.type in ("COMMA", "EQUAL") else None
    if spaced:
        expected = f"{expected}; a call has no space before its '(': write {spaced}(...)"
    return ParseError(f"unexpected {_describe(token)}", text=_line(text, pos), pos=_col(text, pos),
                      hint=f"expected {expected}" if expected else None)


def _spaced_call(text: str, pos: int) -> str | None:
    """The name in ``sum (G, n=2)``: a call written with a space, which parses as a
    product with a parenthesised group until its ',' or '='."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(" and depth:
            depth -= 1
        elif text[i] == "(":
            match = re.search(r"([A-Za-z][A-Za-z0-9_]*)[ \t]+$", text[:i])
            return match.group(1) if match else None
    return None


def _describe(token: Token) -> str:
    """'the name 'x'' for tokens with content, just ')' for punctuation."""
    kind = {"NAME": "the name", "FUNC": "the call", "NUMBER": "the number"}.get(token.type)
    if kind:
        return f"{kind} {str(token)!r}"
    if token.type == "QUOTE":
        return "transpose mark (')"
    return repr(str(token))


def _expected(err) -> str:
    names = sorted({_TOKEN_WORDS.get(t, t) for t in getattr(err, "expected", ()) or ()
                    if not t.startswith("__")})
    if not names:
        return ""
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1]


def _line(text: str, pos: int | None) -> str:
    """The line of ``text`` holding ``pos`` (expressions are usually one line)."""
    if pos is None:
        return text.strip("\n")
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return text[start:end if end >= 0 else len(text)]


def _col(text: str, pos: int | None) -> int | None:
    return None if pos is None else pos - (text.rfind("\n", 0, pos) + 1)


def parse(text: str, n: int, m: int, params: Mapping[str, float] | None = None, seed: int = 0,
          fixed: Mapping[str, Mapping] | None = None):
    """Parse ``text`` for an operator of shape (n, m) -> ``Decomposition``.

    ``params`` binds symbols such as ``k``; ``fixed`` declares uppercase names
    (``{"A1": {"basis": "R"}}``); ``seed`` fixes every random basis.

    >>> parse("DCT[:k] dense", 64, 10, params={"k": 8}).num_params
    80
    """
    from .decomposition import Decomposition
    from .lower import lower_expression

    expression = parse_syntax(text)
    try:
        stages = lower_expression(expression, n, m, params or {}, seed, fixed or {})
    except DecompError as err:
        raise err.located(_line(text, err.pos), _col(text, err.pos)) from None
    return Decomposition(text=text, stages=tuple(stages), n=n, m=m)
