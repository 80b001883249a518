"""``PrunedDense``: a ``keras.layers.Dense`` whose kernel is held at exactly zero
where its 0/1 mask is 0 (``keras_decomp.prune`` makes them; ``strip`` turns
them back into plain Dense layers)."""

from __future__ import annotations

import keras
from keras import ops

from ..errors import DecompError
from .base import _PACKAGE


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PrunedDense(keras.layers.Dense):
    """``keras.layers.Dense`` whose kernel is held at exactly zero where its
    0/1 ``prune_mask`` weight is 0 (see the module).  Same config as Dense."""

    def build(self, input_shape):
        super().build(input_shape)
        self.prune_mask = self.add_weight(name="prune_mask", shape=tuple(self._kernel.shape),
                                          initializer="ones", trainable=False)
        # Not the config's kernel_constraint: the mask is a weight, not a setting.
        self._kernel.constraint = _KeepMasked(self.prune_mask, self.kernel_constraint)

    def call(self, inputs, training=None):
        y = ops.matmul(inputs, ops.multiply(self.kernel, ops.cast(self.prune_mask, self.compute_dtype)))
        if self.bias is not None:
            y = ops.add(y, self.bias)
        return self.activation(y) if self.activation is not None else y

    def save_own_variables(self, store):
        super().save_own_variables(store)  # kernel and bias, as Dense numbers them
        if self.built:
            store["prune_mask"] = self.prune_mask

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built:
            self.prune_mask.assign(store["prune_mask"])

    def quantize(self, *args, **kwargs):
        raise DecompError(f"layer '{self.name}' is pruned with a mask; strip the masks first "
                          "(keras_decomp.strip) and quantize the plain model")


class _KeepMasked:
    """The kernel's constraint: the user's own, then zero where the mask is."""

    def __init__(self, mask, inner=None):
        self.mask, self.inner = mask, inner

    def __call__(self, w):
        w = self.inner(w) if self.inner is not None else w
        return ops.multiply(w, ops.cast(self.mask, w.dtype))
