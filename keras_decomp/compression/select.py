"""Which layers a ``decompose`` pattern means.

A pattern is a layer name, a layer path (``"encoder/self_attention_layer/query"``)
or a glob over paths (``"*feedforward*"``, ``"transformer_layer_*/self_attention/*"``;
``*`` crosses ``/``).  A name or path must name a layer that can be decomposed; a
glob takes the Dense, EinsumDense, Conv1D and Conv2D layers among its matches
(a keras_hub block's layer norms and dropouts match ``*feedforward*`` too) and
must take at least one.  Mistakes are DecompErrors naming the nearest paths.

>>> import keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
...                           keras.layers.Dense(2, name="out")])
>>> [(t.path, t.expression) for t in targets(model, {"h*": "lowrank(r=1)"})]
[('hidden', 'lowrank(r=1)')]
>>> targets(model, {"hiden": "lowrank(r=1)"})
Traceback (most recent call last):
...
keras_decomp.errors.DecompError: the pattern 'hiden' matches no layer of the model
nearest layer paths: hidden
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import DecompError
from ..layers.convert import decomposable
from ..layers.surgery import matches, relative_path, walk

_GLOB = set("*?[")


@dataclass
class Target:
    layer: object
    parents: list
    chain: tuple
    path: str
    pattern: str
    expression: str


def targets(model, expressions: dict) -> list[Target]:
    """The layers ``expressions`` ({pattern: expression}) decompose, in model order."""
    if not isinstance(expressions, dict) or not expressions:
        raise DecompError("decompose needs {pattern: expression, ...}, e.g. {'*feedforward*': 'lowrank(r=16)'}")
    found = walk(model)
    paths = [relative_path(model, layer) for layer, _, _ in found]
    chosen: dict[int, Target] = {}
    for pattern, expression in expressions.items():
        if not isinstance(expression, str):
            raise DecompError(f"the expression for '{pattern}' must be a string, got {expression!r}")
        hits = [(entry, path) for entry, path in zip(found, paths) if matches(model, entry[0], pattern)]
        if not hits:
            raise DecompError(f"the pattern '{pattern}' matches no layer of the model",
                              hint=_nearest(pattern, paths, _usable(found, paths)))
        glob = bool(_GLOB & set(pattern))
        usable = [(entry, path) for entry, path in hits if decomposable(entry[0]) is None]
        if not glob:
            for (layer, _, _), path in hits:
                why = decomposable(layer)
                if why is not None:
                    raise DecompError(f"layer '{path}' is {why}", hint=_inside(model, layer, found, paths))
        elif not usable:
            (layer, _, _), path = hits[0]
            raise DecompError(f"the pattern '{pattern}' matches {len(hits)} layer(s), none of which can be "
                              f"decomposed: '{path}' is {decomposable(layer)}",
                              hint=_inside(model, layer, found, paths) or _nearest(pattern, [], _usable(found, paths)))
        for (layer, parents, chain), path in usable:
            earlier = chosen.get(id(layer))
            if earlier is not None and earlier.expression != expression:
                raise DecompError(f"layer '{path}' is matched by '{earlier.pattern}' ({earlier.expression}) and by "
                                  f"'{pattern}' ({expression})", hint="make the patterns disjoint")
            chosen[id(layer)] = Target(layer, parents, chain, path, pattern, expression)
    order = {id(layer): i for i, (layer, _, _) in enumerate(found)}
    return sorted(chosen.values(), key=lambda t: order[id(t.layer)])


def _usable(found, paths) -> list[str]:
    return [path for (layer, _, _), path in zip(found, paths) if decomposable(layer) is None]


def _inside(model, layer, found, paths) -> str | None:
    """For a composite layer: the decomposable paths below it, as patterns to use."""
    prefix = relative_path(model, layer) + "/"
    below = [p for p in _usable(found, paths) if p.startswith(prefix)]
    if not below:
        return None
    shown = ", ".join(below[:6]) + (", ..." if len(below) > 6 else "")
    return f"it holds {len(below)} layer(s) that can be: {shown}; e.g. the pattern '{prefix}*'"


def _nearest(pattern: str, paths: list[str], usable: list[str]) -> str:
    """The paths closest to ``pattern`` (whole, or its last part), else the decomposable ones."""
    names = {p.rpartition("/")[2]: p for p in paths}
    close = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.5)
    close += [names[n] for n in difflib.get_close_matches(pattern.rpartition("/")[2], list(names), n=3, cutoff=0.6)
              if names[n] not in close]
    if close:
        return "nearest layer paths: " + ", ".join(close[:3])
    if not usable:
        return "the model has no layer that can be decomposed"
    return "nearest layer paths: " + ", ".join(usable[:6]) + (", ..." if len(usable) > 6 else "")
