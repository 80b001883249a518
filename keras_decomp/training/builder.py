"""A checked spec -> an uncompiled ``keras.Model``: each layer made through Keras's
own deserialisation (so any Keras layer works), decomposed ones through ours, and
every failure placed at the spec's file, line and key path.

>>> model = build('''
... input: {shape: [16]}
... layers:
...   - Dense: {units: 8, activation: relu, W: "lowrank(r=2)"}
...   - Dense: {units: 3}
... ''')
>>> model.output_shape, model.count_params()
((None, 3), 83)
"""

from __future__ import annotations

import math
import re

import keras

from .. import layers as kd_layers  # noqa: F401 - registers the decomposed layer classes
from ..errors import DecompError, ShapeError, SpecError
from ..language.parse import parse_syntax
from ..layers.tying import tying
from ..operators.memory import check_memory
from .specs import LayerSpec, Spec, _first_line, _layer_name, _with_path, load_spec


def build(spec, stage: int = 0) -> "keras.Model":
    """A spec (YAML path, YAML text or dict) -> an uncompiled ``keras.Model``.

    Decomposed layers use their ``|`` stage ``stage`` (a layer with fewer
    stages keeps its last).  Named trainable parameters are tied across the
    model's layers.
    """
    spec = load_spec(spec)
    with tying():
        inputs = x = keras.Input(spec.input_shape)
        for index, layer in enumerate(spec.layers):
            made = None
            if "W" not in layer.config:  # an expression's layer checks its own sizes
                _check_plain_size(spec, layer, tuple(x.shape))
            try:
                made = _make_layer(spec, index, layer, stage)
                x = made(x)
            except (ValueError, TypeError, MemoryError) as err:
                raise _layer_error(spec, layer, err, None if made is None else tuple(x.shape)) from None
        model = keras.Model(inputs, x, name=spec.name)
    model.keras_decomp_spec = spec
    return model


def _make_layer(spec: Spec, index: int, layer: LayerSpec, stage: int = 0):
    config = dict(layer.config)
    if "W" in config:
        config["stage"] = min(stage, len(parse_syntax(config["W"]).stages) - 1)
        config["params"] = {**spec.params, **(config.get("params") or {})}
        config.setdefault("seed", spec.seed * 1000 + index)
        if spec.fixed:
            config.setdefault("fixed", spec.fixed)
        cls, module = f"keras_decomp>{layer.class_name}", "keras_decomp.layers"
    else:
        cls, module = layer.class_name, "keras.layers"
    config.setdefault("name", _layer_name(layer.class_name, index))
    return keras.layers.deserialize({"module": module, "class_name": layer.class_name,
                                     "registered_name": cls if "W" in config else None, "config": config})


def _check_plain_size(spec: Spec, layer: LayerSpec, shape: tuple) -> None:
    """Refuse a plain Keras layer whose kernel would not fit in memory, before Keras allocates it:
    (input channels) x units or filters x kernel area, or an embedding's input_dim x output_dim."""
    config = layer.config

    def size(key):
        value = config.get(key)
        values = value if isinstance(value, (list, tuple)) else [value]
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values) and values
        return (key, math.prod(values)) if ok else None

    width = size("units") or size("filters")
    if width is not None:
        channels = shape[-1] if shape and isinstance(shape[-1], int) else 1
        kernel = config.get("kernel_size", 1)  # an int k is k x k (x k): one k per spatial axis
        area = kernel ** max(len(shape) - 2, 1) if isinstance(kernel, int) else (size("kernel_size") or (None, 1))[1]
        key, entries = width[0], channels * width[1] * area
    elif size("input_dim") and size("output_dim"):
        key, entries = "output_dim", size("input_dim")[1] * size("output_dim")[1]
    else:
        return
    try:
        check_memory(entries, f"this {layer.class_name} layer's kernel")
    except ShapeError as err:
        raise spec.error(f"{layer.path}.{key}", err.fact, err.hint) from None


def _layer_error(spec: Spec, layer: LayerSpec, err: Exception, shape) -> SpecError:
    """The error of making a layer (``shape`` None) or of calling it on an input of ``shape``,
    placed at the argument it names, else at W for an expression's, else at the layer."""
    # Keras wraps the error that says what is wrong; ours are already located: take the first.
    while not isinstance(err, DecompError) and (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    ours = isinstance(err, DecompError)
    fact = err.fact if ours else _first_line(err)
    culprit = [] if ours and err.text else [  # an expression's error (it has a caret) is W's
        k for k in layer.config if k not in ("W", "name") and re.search(rf"\b{re.escape(str(k))}\b", fact)]
    path = f"{layer.path}.{culprit[0]}" if culprit else f"{layer.path}.W" if ours else layer.path
    if ours:
        return _with_path(spec, path, err)
    if shape is None:
        return spec.error(path, f"Keras could not make this layer: {fact}")
    return spec.error(path, f"does not fit its input of shape {shape}: {fact}",
                      "check input.shape and the layers before this one (Flatten, Reshape)")
