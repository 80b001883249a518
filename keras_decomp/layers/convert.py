"""Plain Keras layers <-> decomposed ones: which kinds can be decomposed, their
kernels read as (n, m) matrices, and a layer of the other family with the same
signature (name, activation, bias, strides ...).

>>> import keras, numpy as np
>>> plain = keras.layers.EinsumDense("abc,cde->abde", (None, 2, 4), bias_axes="de")
>>> _ = plain(np.ones((1, 3, 6), "float32"))
>>> kernel_matrix(plain).shape, decomposable(plain)
((6, 8), None)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from .base import _Decomposed
from .conv import Conv2D
from .conv1d import Conv1D
from .dense import Dense
from .einsum import EinsumDense, einsum_spec

# the Keras kind -> (its class, ours, the config keys both share)
_COMMON = ("activation", "bias_initializer", "bias_regularizer", "bias_constraint", "name", "dtype", "trainable")
_CONV = ("filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate", "use_bias") + _COMMON
KINDS = {
    "Dense": (keras.layers.Dense, Dense, ("units", "use_bias") + _COMMON),
    "EinsumDense": (keras.layers.EinsumDense, EinsumDense, ("equation", "output_shape", "bias_axes") + _COMMON),
    "Conv1D": (keras.layers.Conv1D, Conv1D, _CONV),
    "Conv2D": (keras.layers.Conv2D, Conv2D, _CONV),
}


def kind_of(layer) -> str | None:
    """"Dense", "EinsumDense", "Conv1D" or "Conv2D" for a plain or decomposed layer of
    exactly that kind; None for anything else (a subclass may use its kernel otherwise)."""
    for kind, (plain, ours, _) in KINDS.items():
        if type(layer) in (plain, ours):
            return kind
    return None


def decomposable(layer) -> str | None:
    """None if ``layer`` can be decomposed, else why not (a short fact)."""
    kind = kind_of(layer)
    name = type(layer).__name__
    if kind is None:
        for base, (plain, _, _) in KINDS.items():
            if isinstance(layer, plain):
                return f"a {name}, a subclass of {base} whose call may use its kernel in its own way"
        return f"a {name}; only Dense, EinsumDense, Conv1D and Conv2D layers can be decomposed"
    if isinstance(layer, _Decomposed):
        return f"already decomposed (W = {layer.W})"
    if not layer.built:
        return "not built yet (call the model once, or build it, first)"
    if getattr(layer, "quantization_mode", None):
        return f"quantized ({layer.quantization_mode}); decompose the float model, then quantize"
    if getattr(layer, "groups", 1) != 1:
        return "a grouped convolution, which cannot be decomposed yet"
    if kind == "EinsumDense":
        try:
            _spec(layer)
        except ValueError as err:
            return str(getattr(err, "fact", err))
    return None


def input_shape_of(layer) -> tuple:
    """The input shape ``layer`` was built with."""
    config = layer.get_build_config() or {}
    shape = config.get("input_shape")
    if shape is None:
        raise ValueError(f"layer '{layer.name}' has no recorded input shape")
    return tuple(shape)


def _spec(layer):
    config = layer.get_config()
    return einsum_spec(config["equation"], input_shape_of(layer), config["output_shape"], config.get("bias_axes"))


def kernel_matrix(layer) -> np.ndarray:
    """The (n, m) kernel matrix, float64, of a plain or decomposed layer of any kind:
    Dense (in, units); EinsumDense (contracted axes, free axes); Conv (positions * cin, filters)."""
    if isinstance(layer, _Decomposed):
        return np.asarray(ops.convert_to_numpy(layer.materialize()), dtype=np.float64)
    kernel = np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float64)
    if kind_of(layer) == "EinsumDense":
        return _spec(layer).kernel_to_matrix(kernel, np)
    return kernel.reshape(-1, kernel.shape[-1])


def bias_of(layer):
    bias = getattr(layer, "bias", None)
    return None if bias is None else np.asarray(ops.convert_to_numpy(bias))


def decomposed_from(layer, W: str, **options):
    """An unbuilt decomposed layer with ``layer``'s signature and the expression ``W``."""
    _, ours, keys = KINDS[kind_of(layer)]
    config = layer.get_config()
    kept = {key: config[key] for key in keys if key in config}
    kept["dtype"] = layer.dtype_policy
    return ours(W=W, **kept, **options)


def symbols_of(layer) -> dict:
    """The symbols a decomposed layer of ``layer``'s kind binds (Conv's ``spatial``)."""
    return decomposed_from(layer, "dense")._symbols()


def plain_from(layer):
    """An unbuilt plain Keras layer with the decomposed ``layer``'s signature."""
    plain, _, keys = KINDS[kind_of(layer)]
    config = layer.get_config()
    kept = {key: config[key] for key in keys if key in config}
    kept["dtype"] = layer.dtype_policy
    return plain(**kept)


def kernel_for(plain, matrix: np.ndarray) -> np.ndarray:
    """The kernel array of the built plain layer ``plain`` whose matrix is ``matrix``."""
    if kind_of(plain) == "EinsumDense":
        return _spec(plain).matrix_to_kernel(matrix, np)
    return matrix.reshape(tuple(plain.kernel.shape))
