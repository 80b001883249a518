"""Compress an already-trained Keras model: replace its Dense, EinsumDense, Conv1D
and Conv2D layers, at any depth (inside keras_hub blocks, MultiHeadAttention,
Sequential, Functional and subclassed models), by decomposed ones initialised
from their trained kernels; every other weight is kept.

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
and after (before any fine-tuning) when the model fits the data.  The new
model saves to ``.keras`` with the plan of what was decomposed, and
``keras_decomp.load_model`` brings it back (``layers/plan.py``).
"""

from __future__ import annotations

import numpy as np

from ..errors import DecompError
from ..fitting import progress
from ..fitting.data_norm import DAMPING
from ..layers import plan, surgery
from ..layers.convert import bias_of, decomposed_from, kernel_matrix, symbols_of
from ..layers.saving import copy_model
from ..layers.tying import tying
from ..training.staging import initialize_from
from . import budget as budgets
from .select import targets


def decompose(model, expressions: dict, budget: float | None = None, params: dict | None = None, seed: int = 0,
              report: dict | None = None, inplace: bool = False, data=None, calibration: str = "asymmetric",
              center: bool = False, damping: float = DAMPING, data_report: dict | None = None):
    """A model whose layers matched by ``expressions`` ({pattern: expression}) are
    decomposed and initialised from their trained kernels (``approximate``); all
    other weights, biases included, are kept.

    A pattern is a layer name, a path or a glob over paths (``select.py``).  With
    ``budget`` (a fraction), the expressions leave their size out (``"lowrank"``,
    ``"sss(p=16)"``) and each layer's size is chosen so that the matched layers
    keep at most that fraction of their kernel parameters, where the error falls
    fastest (``budget.py``).  The model is copied first unless ``inplace``.  A
    compiled model's compile settings carry over (with a fresh optimizer).
    ``report``, if given, receives the relative error per replaced layer path.
    A progress bar per layer shows on a terminal (``fitting.progress``).

    ``data`` (calibration inputs: an array, a tf.data.Dataset or an iterable of
    batches) fits each layer to its recorded inputs (``calibrate.py``), in
    model order.  ``calibration``: ``"asymmetric"`` (the default) minimises
    ||X W - Z E||_F, Z the layer's inputs in the model being built (the layers
    before it already decomposed), X its inputs in the original: the layer also
    undoes part of the error of the layers before it; ``"sequential"`` fits
    ||Z (W - E)||_F (as GPTQ does); ``"original"`` fits ||X (W - E)||_F.
    ``center`` fits the centred inputs and corrects the bias by the mean error;
    ``damping`` regularises the Gram (a fraction of its mean diagonal,
    ``fitting.data_norm``); ``data_report`` receives each layer's relative
    data-norm error (for ``"asymmetric"``: ||X W - Z E|| / ||X W||).
    """
    from .calibrate import MODES, calibration_batches, fit_asymmetric, fit_to_inputs, layer_gram, paired_gram

    if calibration not in MODES:
        raise DecompError(f"calibration must be one of {', '.join(MODES)}, got '{calibration}'")
    batches = calibration_batches(data) if data is not None else None
    chosen = targets(model, expressions)  # checked on the original: mistakes cost no copy
    texts = [t.expression for t in chosen]
    if budget is not None:
        sizes = budgets.choose({i: (kernel_matrix(t.layer), t.expression, symbols_of(t.layer))
                                for i, t in enumerate(chosen)}, budget, seed=seed, params=params)
        texts = [sizes[i].text for i in range(len(chosen))]
    new = model if inplace else copy_model(model)
    # the original's activations are read all along: in place, from a copy taken before any change
    reference = copy_model(model) if inplace and batches is not None and calibration != "sequential" else model
    errors = {}
    bar = progress.Bar("decompose", total=len(chosen), after=0.0)
    with tying():
        for i, (target, text) in enumerate(zip(chosen, texts)):
            old = surgery.resolve(new, target.chain)  # the copy's layer: same place, maybe another name
            path = surgery.relative_path(new, old)
            bar.update(i, layer=path)
            layer = decomposed_from(old, text, params=params, seed=seed)
            surgery.build_like(layer, old)
            if batches is None:
                errors[path] = fit_layer(layer, kernel_matrix(old), layer.node, bias=bias_of(old))
            elif calibration == "asymmetric":  # inputs from the model built so far, outputs from the original
                cross = paired_gram(new, old, reference, surgery.resolve(reference, target.chain), batches,
                                    name=path)
                errors[path], data_error = fit_asymmetric(layer, kernel_matrix(old),
                                                          _bias_for(layer, bias_of(old)), cross, center, damping)
                if data_report is not None:
                    data_report[path] = data_error
            else:  # the inputs ``old`` sees in the model as built so far, or in the original
                source, seen = (new, old) if calibration == "sequential" else \
                    (reference, surgery.resolve(reference, target.chain))
                gram = layer_gram(source, seen, batches, name=path)
                by_name = {}  # initialize_from keys the data-norm error by layer name; ours by path
                errors[path] = fit_to_inputs(layer, kernel_matrix(old), _bias_for(layer, bias_of(old)), gram,
                                             center, damping, by_name)
                if data_report is not None:
                    data_report.update({path: error for error in by_name.values()})
            surgery.replace(surgery.parents_of(new, old), old, layer)
            plan.record(new, layer, target.chain, type(old).__name__)
            bar.update(i + 1, layer=path, error=errors[path])
    bar.close()
    surgery.forget_traces(new)
    if getattr(model, "compiled", False) and model.get_compile_config():
        new.compile_from_config(model.get_compile_config())  # a fresh optimizer for the new variables
    if report is not None:
        report.update(errors)
    return new


def _bias_for(layer, bias):
    """The trained bias in the new layer's bias shape (an EinsumDense bias may be 2-D)."""
    if bias is None or getattr(layer, "bias", None) is None:
        return bias
    return np.reshape(bias, tuple(layer.bias.shape))


def fit_layer(layer, kernel_matrix: np.ndarray, node, bias=None) -> float:
    """Set the built decomposed ``layer`` (its IR ``node``) to the best fit of the
    trained (n, m) ``kernel_matrix``; copy the bias.  Returns the relative error.
    The one place where a layer's parameters are fitted (``node`` is ``layer.node``),
    so that a fit in another norm (calibration data) can take its place."""
    if bias is not None and layer.bias is not None:
        bias = np.reshape(bias, tuple(layer.bias.shape))
    return initialize_from(layer, kernel_matrix, bias)


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
    """The before/after table of ``decompose``: per replaced layer (by path) its
    expression with the chosen sizes, parameters and approximation error (and, with
    calibration data, the error on its inputs, ||X (W - E)|| / ||X W||), for the
    whole model its parameters and test accuracy (``why`` says why there is none)."""
    entries = plan.entries_of(new)
    data_errors = data_errors or {}
    extra = ["data-norm error"] if data_errors else []
    rows = [["layer", "expression", "params before", "params after", "approximation error"] + extra]
    for path, error in errors.items():
        chain = entries[path]["chain"] if path in entries else None
        after = surgery.resolve(new, chain) if chain is not None else None
        before = surgery.resolve(model, chain) if chain is not None else None
        rows.append([path, getattr(after, "W", "?"), str(before.count_params()) if before is not None else "?",
                     str(after.count_params()) if after is not None else "?", f"{error:.3e}"]
                    + ([f"{data_errors[path]:.3e}" if path in data_errors else ""] if extra else []))
    rows.append(["model", "", str(model.count_params()), str(new.count_params()), ""] + [""] * len(extra))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    before, after = accuracy
    if before is None:
        lines.append(f"test accuracy: not evaluated ({why})" if why else "test accuracy: not evaluated")
    else:
        lines.append(f"test accuracy before fine-tuning: {before:.4f} -> {after:.4f}")
    return "\n".join(lines)
