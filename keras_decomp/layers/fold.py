"""``fold``: every decomposed layer back into a plain Keras layer with W materialised.

The folded model holds no keras_decomp layer and no plan: any exporter, and
``keras.saving.load_model`` itself, take it.

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

from . import plan, surgery
from .base import _Decomposed
from .convert import bias_of, kernel_for, kernel_matrix, plain_from
from .saving import copy_model


def fold(model, inplace: bool = False):
    """A model like ``model`` whose decomposed layers, at any depth, are plain Keras
    layers (Dense, EinsumDense, Conv1D, Conv2D) holding the materialised kernel."""
    target = model if inplace else copy_model(model)
    for layer, parents, _ in surgery.walk(target):
        if not isinstance(layer, _Decomposed):
            continue
        plain = plain_from(layer)
        surgery.build_like(plain, layer)
        plain.kernel.assign(kernel_for(plain, kernel_matrix(layer)).astype(plain.kernel.dtype))
        bias = bias_of(layer)
        if bias is not None:
            plain.bias.assign(np.reshape(bias, tuple(plain.bias.shape)).astype(plain.bias.dtype))
        surgery.replace(parents, layer, plain)
    plan.forget(target)
    surgery.forget_traces(target)
    return target
