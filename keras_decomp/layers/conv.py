"""``keras_decomp.layers.Conv2D``: keras.layers.Conv2D's signature plus ``W``, the
kernel reshaped to (kh * kw * cin, cout) as an expression."""

from __future__ import annotations

import math

import keras
from keras import ops

from ..errors import DecompError
from .base import _PACKAGE, _Decomposed, _Ops


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Conv2D(_Decomposed):
    """``keras.layers.Conv2D`` whose kernel, as a (kh*kw*cin, filters) matrix
    (rows in (kh, kw, cin) order), is the expression ``W``.

    In apply mode a product ``A B ...`` runs as a convolution with A's kernel
    followed by 1x1 products with the rest (channels only).  The layer binds the
    symbol ``spatial`` to kh*kw, so ``sketch(...)`` sketches the channel modes only
    (SK-CONV).
    """

    def __init__(self, filters, kernel_size, W="dense", strides=(1, 1), padding="valid",
                 data_format=None, dilation_rate=(1, 1), activation=None, use_bias=True,
                 bias_initializer="zeros", bias_regularizer=None, bias_constraint=None, params=None,
                 seed=0, mode="auto", stage=0, fixed_dtype=None, tied=False, fixed=None, fitted=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
            raise DecompError(f"layer '{self.name}': filters must be a positive integer, got {filters!r}")
        self.filters = filters
        self.kernel_size = _pair(kernel_size, "kernel_size", self)
        self.strides = _pair(strides, "strides", self)
        self.dilation_rate = _pair(dilation_rate, "dilation_rate", self)
        if padding not in ("valid", "same"):
            raise DecompError(f"layer '{self.name}': padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding
        self.data_format = keras.backend.image_data_format() if data_format is None else data_format
        self._init_output(activation, use_bias, bias_initializer, bias_regularizer, bias_constraint)
        self._init_decomposition(W, params, seed, mode, stage, fixed_dtype, tied, fixed, fitted)

    def _channels(self, input_shape) -> int:
        cin = input_shape[-1] if self.data_format == "channels_last" else input_shape[1]
        if cin is None:
            raise DecompError(f"layer '{self.name}': the number of input channels must be known")
        return int(cin)

    def _symbols(self) -> dict:
        # ``spatial`` = kh*kw tells sketch(...) which rows are kernel positions (SK-CONV)
        return {"spatial": self.kernel_size[0] * self.kernel_size[1]}

    def build(self, input_shape):
        self.cin = self._channels(input_shape)
        kh, kw = self.kernel_size
        self._build_decomposition(kh * kw * self.cin, self.filters)
        self._build_bias(self.filters)

    def _conv(self, x, matrix, out_channels):
        kernel = ops.reshape(matrix, self.kernel_size + (self.cin, out_channels))
        return ops.conv(x, kernel, strides=self.strides, padding=self.padding,
                        data_format=self.data_format, dilation_rate=self.dilation_rate)

    def _channel_apply(self, y, node, v, batch):
        """Apply ``node`` to the channel axis of a feature map."""
        channels_first = self.data_format == "channels_first"
        if channels_first:
            y = ops.transpose(y, (0, 2, 3, 1))
        shape = ops.shape(y)
        flat = node.best_apply(ops.reshape(y, (-1, node.shape[0])), v, _Ops(self.compute_dtype), batch)
        y = ops.reshape(flat, (shape[0], shape[1], shape[2], node.shape[1]))
        return ops.transpose(y, (0, 3, 1, 2)) if channels_first else y

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        v, xp = self._values(), _Ops(self.compute_dtype)
        node = self.node
        positions = _positions(self.compute_output_shape(inputs.shape), self.data_format)
        factored = self._factored(positions)
        if factored:
            first, rest = factored
            y = self._conv(x, first.materialize(v, xp), first.shape[1])
            y = self._channel_apply(y, rest, v, positions)
        else:
            y = self._conv(x, node.materialize(v, xp), self.filters)
        if self.bias is not None and self.data_format == "channels_last":
            y = ops.add(y, self.bias)  # BiasAdd on TensorFlow, as in Dense.call
        elif self.bias is not None:
            # not ops.add: its BiasAdd guesses the layout from the shape, NHWC when width == filters
            y = y + ops.reshape(self.bias, (1, -1, 1, 1))
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        shape = keras.layers.Conv2D(self.filters, self.kernel_size, strides=self.strides, padding=self.padding,
                                    data_format=self.data_format, dilation_rate=self.dilation_rate
                                    ).compute_output_shape(input_shape)
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding, "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                **self._output_config(),
                **self._decomposition_config()}


def _pair(value, what, layer) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(value) != 2 or not all(isinstance(v, int) and v >= 1 for v in value):
        raise DecompError(f"layer '{layer.name}': {what} must be a positive int or a pair of them")
    return value


def _positions(output_shape, data_format) -> int:
    """Output pixels times batch: the 'batch' of the kernel matrix product."""
    dims = output_shape[1:3] if data_format == "channels_last" else output_shape[2:4]
    batch = output_shape[0] if output_shape[0] is not None else 128
    return batch * math.prod(d if d is not None else 1 for d in dims)
