"""``keras_decomp.layers.Dense``: keras.layers.Dense's signature plus ``W``, the
kernel's expression.

>>> import numpy as np
>>> layer = Dense(4, W="sum(G, n=3)")
>>> tuple(layer(np.ones((2, 8), "float32")).shape), layer.count_params()
((2, 4), 7)
"""

from __future__ import annotations

import math

import keras
from keras import ops

from ..errors import DecompError
from .base import _PACKAGE, _Decomposed, _known


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Dense(_Decomposed):
    """``keras.layers.Dense`` whose (in, units) kernel is the expression ``W``.

    ``params`` binds symbols, ``seed`` fixes the random bases, ``mode`` forces
    "apply" (factor by factor) or "materialize" (W, then one matmul); "auto"
    picks the faster by the cost model (FLOPs, memory traffic and ops; operators/cost.py).
    ``stage`` selects a ``|`` stage.
    """

    def __init__(self, units, W="dense", activation=None, use_bias=True, bias_initializer="zeros",
                 bias_regularizer=None, bias_constraint=None, params=None, seed=0, mode="auto",
                 stage=0, fixed_dtype=None, tied=False, fixed=None, fitted=None,
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(units, int) or isinstance(units, bool) or units < 1:
            raise DecompError(f"layer '{self.name}': units must be a positive integer, got {units!r}")
        self.units = units
        self._init_output(activation, use_bias, bias_initializer, bias_regularizer, bias_constraint)
        self._init_decomposition(W, params, seed, mode, stage, fixed_dtype, tied, fixed, fitted)

    def build(self, input_shape):
        n = input_shape[-1]
        if n is None:
            raise DecompError(f"layer '{self.name}': the last input dimension must be known")
        self._build_decomposition(int(n), self.units)
        self._build_bias(self.units)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if len(x.shape) == 2:
            y = self._matrix_apply(x, _known(x.shape[0]))
        else:  # (batch, ..., n): apply on the last axis
            lead = ops.shape(x)[:-1]
            y = self._matrix_apply(ops.reshape(x, (-1, x.shape[-1])), _known(math.prod(
                d if d is not None else 128 for d in x.shape[:-1])))
            y = ops.reshape(y, tuple(lead) + (self.units,))
        if self.bias is not None:
            # ops.add (not +) lowers to BiasAdd on TensorFlow, as in keras.layers.Dense: fused with the
            # MatMul and differentiated by BiasAddGrad, not by a broadcasting Sum and Reshape
            y = ops.add(y, self.bias)
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                **self._output_config(),
                **self._decomposition_config()}
