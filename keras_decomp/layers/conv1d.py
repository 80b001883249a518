"""``keras_decomp.layers.Conv1D``: keras.layers.Conv1D's signature plus ``W``, the
kernel reshaped to (kernel_size * cin, filters) (rows in (position, cin) order).

In apply mode a product ``A B ...`` runs as a convolution with A's kernel followed
by products with the rest on the channels, as Conv2D does.

>>> import numpy as np
>>> layer = Conv1D(4, 3, W="lowrank(r=2)", padding="causal")
>>> tuple(layer(np.ones((2, 10, 6), "float32")).shape), layer.count_params()
((2, 10, 4), 48)
"""

from __future__ import annotations

import keras
from keras import ops

from ..errors import DecompError
from .base import _PACKAGE, _Decomposed, _Ops, _known


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Conv1D(_Decomposed):
    """``keras.layers.Conv1D`` whose (kernel_size * cin, filters) kernel matrix is ``W``."""

    def __init__(self, filters, kernel_size, W="dense", strides=1, padding="valid", data_format=None,
                 dilation_rate=1, activation=None, use_bias=True, bias_initializer="zeros",
                 bias_regularizer=None, bias_constraint=None, params=None, seed=0, mode="auto", stage=0,
                 fixed_dtype=None, tied=False, fixed=None, fitted=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
            raise DecompError(f"layer '{self.name}': filters must be a positive integer, got {filters!r}")
        self.filters = filters
        self.kernel_size = _single(kernel_size, "kernel_size", self)
        self.strides = _single(strides, "strides", self)
        self.dilation_rate = _single(dilation_rate, "dilation_rate", self)
        if padding not in ("valid", "same", "causal"):
            raise DecompError(f"layer '{self.name}': padding must be 'valid', 'same' or 'causal', got {padding!r}")
        self.padding = padding
        self.data_format = keras.backend.image_data_format() if data_format is None else data_format
        self._init_output(activation, use_bias, bias_initializer, bias_regularizer, bias_constraint)
        self._init_decomposition(W, params, seed, mode, stage, fixed_dtype, tied, fixed, fitted)

    def _symbols(self) -> dict:
        return {"spatial": self.kernel_size[0]}  # as Conv2D: sketch(...) sketches the channel modes

    def build(self, input_shape):
        cin = input_shape[-1] if self.data_format == "channels_last" else input_shape[1]
        if cin is None:
            raise DecompError(f"layer '{self.name}': the number of input channels must be known")
        self.cin = int(cin)
        self._build_decomposition(self.kernel_size[0] * self.cin, self.filters)
        self._build_bias(self.filters)

    def _conv(self, x, matrix, out_channels):
        kernel = ops.reshape(matrix, (self.kernel_size[0], self.cin, out_channels))
        padding = self.padding
        if padding == "causal":  # pad the start only: output t sees inputs up to t
            pad = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            x = ops.pad(x, [[0, 0], [pad, 0], [0, 0]] if self.data_format == "channels_last"
                        else [[0, 0], [0, 0], [pad, 0]])
            padding = "valid"
        return ops.conv(x, kernel, strides=self.strides, padding=padding, data_format=self.data_format,
                        dilation_rate=self.dilation_rate)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        v, xp = self._values(), _Ops(self.compute_dtype)
        node = self.node
        out_shape = self.compute_output_shape(inputs.shape)
        positions = _known(out_shape[0]) * (out_shape[1 if self.data_format == "channels_last" else 2] or 1)
        factored = self._factored(positions)
        if factored:
            first, rest = factored
            y = self._conv(x, first.materialize(v, xp), first.shape[1])
            if self.data_format == "channels_first":
                y = ops.transpose(y, (0, 2, 1))
            shape = ops.shape(y)
            y = rest.best_apply(ops.reshape(y, (-1, rest.shape[0])), v, xp, positions)
            y = ops.reshape(y, (shape[0], shape[1], self.filters))
            if self.data_format == "channels_first":
                y = ops.transpose(y, (0, 2, 1))
        else:
            y = self._conv(x, node.materialize(v, xp), self.filters)
        if self.bias is not None:
            y = y + (self.bias if self.data_format == "channels_last" else ops.reshape(self.bias, (1, -1, 1)))
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(keras.layers.Conv1D(self.filters, self.kernel_size, strides=self.strides, padding=self.padding,
                                         data_format=self.data_format, dilation_rate=self.dilation_rate
                                         ).compute_output_shape(input_shape))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "data_format": self.data_format,
                "dilation_rate": self.dilation_rate, **self._output_config(), **self._decomposition_config()}


def _single(value, what, layer) -> tuple[int]:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DecompError(f"layer '{layer.name}': {what} must be a positive int, got {value!r}")
    return (value,)
