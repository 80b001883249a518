"""Compress an already-trained Keras model: replace named Dense/Conv2D layers by
decomposed ones initialised from their trained kernels; copy everything else.

>>> import keras, numpy as np
>>> model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(3)])
>>> small = decompose(model, {"hidden": "lowrank(r=8)"})
>>> x = np.ones((2, 12), "float32")
>>> bool(np.allclose(model(x), small(x), atol=1e-5))
True
"""

from __future__ import annotations

import keras

from .errors import DecompError
from .staging import initialize_from, kernel_matrix

_DENSE_KEYS = ("units", "activation", "use_bias", "bias_initializer", "bias_regularizer", "bias_constraint",
               "name", "dtype", "trainable")
_CONV_KEYS = ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "activation",
              "use_bias", "bias_initializer", "bias_regularizer", "bias_constraint", "name", "dtype", "trainable")


def decompose(model, expressions: dict, params: dict | None = None, seed: int = 0, report: dict | None = None):
    """A new model whose layers named in ``expressions`` ({name: expr}) are
    decomposed and initialised from the trained kernels (``approximate``); all
    other weights are copied.  ``report``, if given, receives the relative
    error per replaced layer."""
    from . import layers as kd

    names = {layer.name for layer in model.layers}
    for name in expressions:
        if name not in names:
            raise DecompError(f"the model has no layer '{name}'", hint=_nearest(name, names))
    by_name = {layer.name: layer for layer in model.layers}
    for name in expressions:
        if type(by_name[name]).__name__ not in ("Dense", "Conv2D"):
            raise DecompError(f"layer '{name}' is a {type(by_name[name]).__name__}; only Dense and Conv2D "
                              "layers can be decomposed")
        if getattr(by_name[name], "groups", 1) != 1:
            raise DecompError(f"layer '{name}' is a grouped convolution, which cannot be decomposed yet")

    def clone(layer):
        if layer.name not in expressions:
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        is_conv = type(layer).__name__ == "Conv2D"
        keep = {k: config[k] for k in (_CONV_KEYS if is_conv else _DENSE_KEYS) if k in config}
        cls = kd.Conv2D if is_conv else kd.Dense
        return cls(W=expressions[layer.name], params=params, seed=seed, **keep)

    with kd.tying():
        new = keras.models.clone_model(model, clone_function=clone)
    errors = {}
    for old, layer in zip(model.layers, new.layers):
        if old.name in expressions:
            bias = keras.ops.convert_to_numpy(old.bias) if old.use_bias else None
            errors[old.name] = initialize_from(layer, kernel_matrix(old), bias)
        else:
            layer.set_weights(old.get_weights())
    if report is not None:
        report.update(errors)
    return new


def _nearest(name, names) -> str | None:
    import difflib
    match = difflib.get_close_matches(name, sorted(names), n=1)
    return f"did you mean '{match[0]}'?" if match else "layers: " + ", ".join(sorted(names))
