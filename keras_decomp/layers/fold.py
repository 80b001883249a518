"""``fold``: every decomposed layer back into a plain Keras layer with W materialised.

The folded model holds no keras_decomp layer and no plan: any exporter, and
``keras.saving.load_model`` itself, take it.  ``forms`` folds some layers only
and forces the others to their apply form (what ``export`` writes as
"factored").

>>> import keras, numpy as np
>>> from keras_decomp.layers import Dense
>>> model = keras.Sequential([keras.Input((6,)), Dense(3, W="lowrank(r=2)")])
>>> plain = fold(model)
>>> type(plain.layers[0]).__module__.startswith("keras.")
True
>>> x = np.ones((2, 6), "float32")
>>> bool(np.allclose(plain(x), model(x), atol=1e-6))
True
"""

from __future__ import annotations

import numpy as np
from keras import ops

from . import plan, surgery
from .base import _Decomposed
from .convert import bias_of, kernel_for, plain_from
from .saving import copy_model


def fold(model, forms: dict | None = None, inplace: bool = False):
    """A model like ``model`` whose decomposed layers, at any depth, are plain Keras
    layers (Dense, EinsumDense, Conv1D, Conv2D) holding the materialised kernel.
    ``forms``: {relative layer path: "folded" | "factored"}; a factored layer stays
    decomposed, forced to mode="apply"; layers not in ``forms`` are folded."""
    target = model if inplace else copy_model(model)
    for layer, parents, _ in surgery.walk(target):
        if not isinstance(layer, _Decomposed):
            continue
        path = surgery.relative_path(target, layer)
        if forms is not None and forms.get(path, "folded") == "factored":
            layer.mode = "apply"
            continue
        plain = plain_from(layer)
        surgery.build_like(plain, layer)
        plain.kernel.assign(kernel_for(plain, folded_kernel(layer)).astype(plain.kernel.dtype))
        bias = bias_of(layer)
        if bias is not None:
            plain.bias.assign(np.reshape(bias, tuple(plain.bias.shape)).astype(plain.bias.dtype))
        surgery.replace(parents, layer, plain)
        plan.forget(target, path)
    if not plan.entries_of(target):
        plan.forget(target)
    surgery.forget_traces(target)
    return target


def folded_kernel(layer) -> np.ndarray:
    """The layer's W, multiplied out in float64 from the very values its Keras
    forward pass uses, then rounded once: a folded layer differs from the
    decomposed one by the rounding of one float32 matmul, not of a chain of them."""
    values = {}
    for key, value in layer._values().items():
        value = ops.convert_to_numpy(value)
        values[key] = value if np.issubdtype(value.dtype, np.integer) else value.astype(np.float64)
    return np.asarray(layer.node.materialize(values, np), dtype=layer.compute_dtype)
