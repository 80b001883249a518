"""A whole-model parameter budget: each layer's size chosen from its own error curve.

``decompose(model, {"*feedforward*": "lowrank"}, budget=0.25)`` leaves the size
out of the expression; every matched layer gets the size that spends the
budget where the approximation error falls fastest.  The error curve of a layer
is exact for ``lowrank`` (the tail of its kernel's singular values,
Eckart-Young) and measured by fitting a few sizes for any other structure with
a size argument (``sss(p=16)``, ``sketch``, ``monarch``, ``sparse``...).  The
choice minimises the sum over layers of the squared relative errors: starting
from the smallest size everywhere, it takes, among every layer's next point on
the lower convex hull of its curve, the one with the largest error drop per
parameter that still fits, until none fits.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> steep = rng.normal(size=(40, 4)) @ rng.normal(size=(4, 40))  # rank 4
>>> flat = rng.normal(size=(40, 40))                              # full rank
>>> chosen = choose({"a": (steep, "lowrank"), "b": (flat, "lowrank")}, budget=0.25)
>>> chosen["a"].text, chosen["b"].text  # rank 4 is all "a" needs; "b" takes the rest
('lowrank(r=4)', 'lowrank(r=6)')
>>> sum(c.params for c in chosen.values()) <= 0.25 * 2 * 40 * 40
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DecompError
from ..fitting.approximate import fit
from ..language import syntax as s
from ..language.parse import parse, parse_syntax
from ..operators.structures.registry import lookup

MAX_TRIALS = 8  # fitted sizes per layer for a structure without a closed-form error curve


@dataclass(frozen=True)
class Choice:
    text: str      # the expression with its size, e.g. "lowrank(r=12)"
    size: int
    params: int    # trainable parameters of the kernel expression
    error: float   # relative Frobenius error predicted by the curve


def sizeless(text: str):
    """(structure name, its other arguments as text, the size argument's name) of an
    expression that is one structure with its size left out, else a DecompError."""
    syntax = parse_syntax(text)
    root = syntax.stages[-1] if len(syntax.stages) == 1 else None
    if not isinstance(root, (s.Call, s.Name)) or (isinstance(root, s.Name) and not root.name[:1].islower()):
        raise DecompError(f"budget= needs one structure with its size left out, e.g. 'lowrank' or "
                          f"'sss(p=16)', got '{text}'", hint="give the sizes yourself, or drop budget=")
    call = root if isinstance(root, s.Call) else s.Call(root.pos, root.name, (), ())
    structure = lookup(call)
    given = {kw.name for kw in call.kwargs}
    if structure.size is None or call.args:
        raise DecompError(f"budget=: '{call.func}' has no size argument to choose", text=text, pos=root.pos)
    if structure.size in given or "params" in given:
        raise DecompError(f"budget= chooses {call.func}'s {structure.size}: leave it out of '{text}'",
                          text=text, pos=root.pos)
    others = ", ".join(f"{kw.name}={_number(kw.value)}" for kw in call.kwargs)
    return call.func, others, structure.size


def choose(layers: dict, budget: float, seed: int = 0, params: dict | None = None) -> dict:
    """key -> Choice for ``layers`` = {key: (W, sizeless expression)} (or (W, expression,
    symbols)), keeping the total of their trainable parameters at most ``budget`` times
    the total of their dense kernels."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise DecompError(f"budget must be a fraction in (0, 1], got {budget!r}")
    curves = {key: _curve(*item, seed=seed, params=params) for key, item in layers.items()}
    allowed = budget * sum(np.asarray(item[0]).size for item in layers.values())
    at = {key: 0 for key in curves}
    spent = sum(curve[0].params for curve in curves.values())
    if spent > allowed:
        raise DecompError(f"budget={budget:g} allows {int(allowed)} parameters, but the smallest sizes "
                          f"already take {spent}", hint="raise the budget or choose a smaller structure")
    while True:
        best = None
        for key, curve in curves.items():
            if at[key] + 1 < len(curve):
                here, there = curve[at[key]], curve[at[key] + 1]
                cost = there.params - here.params
                if spent + cost <= allowed:
                    gain = (here.error ** 2 - there.error ** 2) / max(cost, 1)
                    if best is None or gain > best[0]:
                        best = (gain, key, cost)
        if best is None:
            break
        at[best[1]] += 1
        spent += best[2]
    return {key: curves[key][at[key]] for key in curves}


def _curve(W, text, symbols=None, seed=0, params=None) -> list[Choice]:
    """The lower convex hull of (parameters, squared error) over the sizes worth trying."""
    W = np.asarray(W, dtype=np.float64)
    n, m = W.shape
    func, others, size_arg = sizeless(text)
    bound = {**(symbols or {}), **(params or {})}

    def expression(size):
        return f"{func}({others + ', ' if others else ''}{size_arg}={size})"

    def node(size):
        return parse(expression(size), n, m, params=bound, seed=seed).stages[0]

    if func == "lowrank":
        sv = np.linalg.svd(W, compute_uv=False)
        energy = float(np.sum(sv ** 2)) or 1.0
        tail = np.concatenate([np.cumsum((sv ** 2)[::-1])[::-1], [0.0]])
        points = [Choice(expression(r), r, r * (n + m), float(np.sqrt(max(tail[r], 0.0) / energy)))
                  for r in range(1, len(sv) + 1) if r * (n + m) <= n * m]
    else:
        points = []
        for size in _trial_sizes(node, n * m):
            candidate = node(size)
            points.append(Choice(expression(size), size, candidate.num_params,
                                 float(fit(W, candidate, seed=seed).rel_error)))
    if not points:
        raise DecompError(f"budget=: even the smallest {func} has more parameters than the dense "
                          f"{n}x{m} kernel")
    return _hull(points)


def _trial_sizes(node, dense: int) -> list[int]:
    """Up to MAX_TRIALS sizes, about evenly spaced in parameters, from 1 to the dense count."""
    sizes, size = [], 1
    while True:
        try:
            count = node(size).num_params
        except DecompError:
            break
        if count > dense:
            break
        sizes.append(size)
        size = size + 1 if size < 4 else int(size * 1.5)
    if len(sizes) > MAX_TRIALS:
        keep = np.unique(np.round(np.geomspace(1, len(sizes), MAX_TRIALS)).astype(int) - 1)
        sizes = [sizes[i] for i in keep]
    return sizes


def _hull(points: list[Choice]) -> list[Choice]:
    """Points by parameters, dominated ones dropped, then the lower convex hull of
    (params, error^2): a step is worth taking only if the ones after it gain less."""
    points = sorted(points, key=lambda c: (c.params, c.error))
    kept = []
    for point in points:
        if kept and point.error >= kept[-1].error:
            continue
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            # drop b if it lies above the segment a -> point
            lhs = (b.error ** 2 - a.error ** 2) * (point.params - a.params)
            rhs = (point.error ** 2 - a.error ** 2) * (b.params - a.params)
            if lhs >= rhs:
                kept.pop()
            else:
                break
        kept.append(point)
    return kept


def _number(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value
