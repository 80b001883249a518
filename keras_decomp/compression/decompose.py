"""Compress an already-trained Keras model: replace named Dense/Conv2D layers by
decomposed ones initialised from their trained kernels; copy everything else.

>>> import keras, numpy as np
>>> model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(3)])
>>> errors = {}
>>> small = decompose(model, {"hidden": "lowrank(r=8)"}, report=errors)
>>> x = np.ones((2, 12), "float32")
>>> bool(np.allclose(model(x), small(x), atol=1e-5))
True
>>> print(comparison(model, small, errors))  # doctest: +ELLIPSIS
layer   expression    params before  params after  approximation error
hidden  lowrank(r=8)  104            168           ...
model                 131            195
test accuracy: not evaluated

``keras-decomp compress`` prints that table, with the test accuracy before
and after (before any fine-tuning) when the model fits the data.
"""

from __future__ import annotations

import keras

from ..errors import DecompError
from ..fitting.data_norm import DAMPING
from ..training.staging import initialize_from, kernel_matrix

_DENSE_KEYS = ("units", "activation", "use_bias", "bias_initializer", "bias_regularizer", "bias_constraint",
               "name", "dtype", "trainable")
_CONV_KEYS = ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "activation",
              "use_bias", "bias_initializer", "bias_regularizer", "bias_constraint", "name", "dtype", "trainable")


def decompose(model, expressions: dict, params: dict | None = None, seed: int = 0, report: dict | None = None,
              data=None, calibration: str = "sequential", center: bool = False, damping: float = DAMPING,
              data_report: dict | None = None):
    """A new model whose layers named in ``expressions`` ({name: expr}) are
    decomposed and initialised from the trained kernels (``approximate``); all
    other weights, biases included, are copied.  A compiled model's compile
    settings carry over (with a fresh optimizer), ready for fine-tuning.
    ``report``, if given, receives the relative error per replaced layer.

    ``data`` (calibration inputs: an array, a tf.data.Dataset or an iterable of
    batches) fits each layer in the data norm ||X (W - E)||_F over its inputs X
    (``calibrate.py``), in model order, X taken from the model being built
    (``calibration="sequential"``) or from the original (``"original"``);
    ``center`` fits the centred inputs and corrects the bias by the mean error
    (``calibrate.fit_to_inputs``); ``damping`` regularises X^T X (a fraction of
    its mean diagonal, ``fitting.data_norm``); ``data_report`` receives each
    layer's relative data-norm error."""
    from .. import layers as kd
    from .calibrate import MODES, calibration_batches, fit_to_inputs, layer_gram

    if calibration not in MODES:
        raise DecompError(f"calibration must be one of {', '.join(MODES)}, got '{calibration}'")
    batches = calibration_batches(data) if data is not None else None

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
            if batches is None:
                errors[old.name] = initialize_from(layer, kernel_matrix(old), bias)
                continue
            source, seen = (new, layer) if calibration == "sequential" else (model, old)
            gram = layer_gram(source, seen, batches, name=old.name)
            errors[old.name] = fit_to_inputs(layer, kernel_matrix(old), bias, gram, center, damping, data_report)
        else:
            layer.set_weights(old.get_weights())
    if getattr(model, "compiled", False) and model.get_compile_config():
        new.compile_from_config(model.get_compile_config())
    if report is not None:
        report.update(errors)
    return new


def accuracy_on(model, data) -> tuple[float | None, str]:
    """(accuracy on ``data``'s test split, "") or (None, why it was not evaluated):
    the model must take ``data``'s images and give one output per class."""
    import numpy as np

    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        return None, "the model does not have one input and one output"
    shape = tuple(inputs[0].shape[1:])
    if shape != data.input_shape:
        return None, f"the model takes inputs of shape {shape}, {data.name} images are {data.input_shape}"
    if outputs[0].shape[-1] != data.num_classes:
        return None, f"the model gives {outputs[0].shape[-1]} outputs, {data.name} has {data.num_classes} classes"
    _, test = data.pipelines(batch_size=256, shuffle=False)
    scores = model.predict(test, verbose=0)
    return float(np.mean(np.argmax(scores, axis=-1) == data.y_test)), ""


def comparison(model, new, errors: dict, accuracy=(None, None), why: str = "", data_errors=None) -> str:
    """The before/after table of ``decompose``: per replaced layer its
    parameters and approximation error (and, with calibration data, the error
    on its inputs, ||X (W - E)|| / ||X W||), for the whole model its parameters
    and test accuracy (``why`` says why there is none)."""
    by_name = {layer.name: layer for layer in new.layers}
    old_layers = {layer.name: layer for layer in model.layers}
    data_errors = data_errors or {}
    extra = ["data-norm error"] if data_errors else []
    rows = [["layer", "expression", "params before", "params after", "approximation error"] + extra]
    for name, error in errors.items():
        rows.append([name, by_name[name].W, str(old_layers[name].count_params()),
                     str(by_name[name].count_params()), f"{error:.3e}"]
                    + ([f"{data_errors[name]:.3e}" if name in data_errors else ""] if extra else []))
    rows.append(["model", "", str(model.count_params()), str(new.count_params()), ""] + [""] * len(extra))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    before, after = accuracy
    if before is None:
        lines.append(f"test accuracy: not evaluated ({why})" if why else "test accuracy: not evaluated")
    else:
        lines.append(f"test accuracy before fine-tuning: {before:.4f} -> {after:.4f}")
    return "\n".join(lines)


def _nearest(name, names) -> str | None:
    import difflib
    match = difflib.get_close_matches(name, sorted(names), n=1)
    return f"did you mean '{match[0]}'?" if match else "layers: " + ", ".join(sorted(names))
