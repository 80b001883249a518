"""``keras_decomp.layers.EinsumDense``: keras.layers.EinsumDense's signature plus ``W``.

An EinsumDense equation ``"abc,cde->abde"`` multiplies the input by a kernel whose
axes are either contracted (in the input, not in the output: ``c``) or free (in
the output, not in the input: ``d``, ``e``).  Flattening the contracted axes into
rows and the free axes into columns (each in kernel order) gives the (n, m) matrix
W that an expression decomposes; the input's other axes are batch axes.  So the
query projection of a MultiHeadAttention is a (dim, heads * head_dim) matrix and
its output projection a (heads * head_dim, dim) one.

>>> import numpy as np
>>> layer = EinsumDense("abc,cde->abde", (None, 2, 4), W="lowrank(r=2)", bias_axes="de")
>>> tuple(layer(np.ones((3, 5, 6), "float32")).shape), layer.count_params()
((3, 5, 2, 4), 36)
>>> spec = einsum_spec("abc,cde->abde", (None, 6, 16), (None, 2, 8), "de")
>>> spec.kernel_shape, spec.matrix_shape, spec.output_shape, spec.bias_shape
((16, 2, 8), (16, 16), (None, 6, 2, 8), (2, 8))
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import keras
from keras import ops

from ..errors import DecompError
from .base import _PACKAGE, _Decomposed


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EinsumDense(_Decomposed):
    """``keras.layers.EinsumDense`` (equation, output_shape, bias_axes) plus ``W``."""

    def __init__(self, equation, output_shape, W="dense", activation=None, bias_axes=None,
                 bias_initializer="zeros", bias_regularizer=None, bias_constraint=None, params=None, seed=0,
                 mode="auto", stage=0, fixed_dtype=None, tied=False, fixed=None, fitted=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(equation, str):
            raise DecompError(f"layer '{self.name}': equation must be a string, got {equation!r}")
        self.equation = equation
        self.partial_output_shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
        self.bias_axes = bias_axes
        self._init_output(activation, bool(bias_axes), bias_initializer, bias_regularizer, bias_constraint)
        self._init_decomposition(W, params, seed, mode, stage, fixed_dtype, tied, fixed, fitted)
        self.spec = None

    def _spec(self, input_shape):
        try:
            return einsum_spec(self.equation, input_shape, self.partial_output_shape, self.bias_axes)
        except DecompError as err:
            raise DecompError(f"layer '{self.name}': {err.fact}") from None

    def build(self, input_shape):
        self.spec = self._spec(input_shape)
        n, m = self.spec.matrix_shape
        self._build_decomposition(n, m)
        self.bias = None
        if self.spec.bias_shape is not None:
            self.bias = self.add_weight(name="bias", shape=self.spec.bias_shape, initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer, constraint=self.bias_constraint)

    @property
    def kernel(self):
        """The kernel in Keras's EinsumDense shape, materialised."""
        return self.spec.matrix_to_kernel(self.materialize(), ops)

    def call(self, inputs):
        spec = self.spec
        x = _permuted(ops.cast(inputs, self.compute_dtype), spec.input_perm)
        batch_rank = len(x.shape) - spec.num_contracted
        lead = ops.shape(x)[:batch_rank]
        rows = math.prod(d if d is not None else 128 for d in x.shape[:batch_rank])  # for the cost model
        y = self._matrix_apply(ops.reshape(x, (-1, spec.matrix_shape[0])), rows)
        y = _permuted(ops.reshape(y, tuple(lead) + spec.free_shape), spec.output_perm)
        if self.bias is not None:
            y = y + ops.cast(self.bias, y.dtype)
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        return self._spec(input_shape).output_shape

    def get_config(self):
        config = {**super().get_config(), "equation": self.equation, "output_shape": self.partial_output_shape,
                  "bias_axes": self.bias_axes, **self._output_config(), **self._decomposition_config()}
        config.pop("use_bias")
        return config


def _permuted(x, perm):
    return x if tuple(perm) == tuple(range(len(perm))) else ops.transpose(x, perm)


_EQUATION = re.compile(r"^(\.\.\.)?([a-z]+),([a-z]+)->(\.\.\.)?([a-z]+)$")


@dataclass(frozen=True)
class EinsumSpec:
    """Everything a layer needs to apply ``x @ W`` in the equation's layout."""

    equation: str
    elided: int                    # leading input axes standing for "..."
    kernel_shape: tuple[int, ...]
    output_shape: tuple            # full, batch axes included (None where unknown)
    bias_shape: tuple[int, ...] | None
    input_perm: tuple[int, ...]    # input axes -> (batch..., contracted in kernel order)
    kernel_perm: tuple[int, ...]   # kernel axes -> (contracted..., free...)
    output_perm: tuple[int, ...]   # (batch..., free in kernel order) -> output axes
    free_shape: tuple[int, ...]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        rows = math.prod(self.kernel_shape[i] for i in self.kernel_perm[:self.num_contracted])
        return rows, math.prod(self.free_shape)

    @property
    def num_contracted(self) -> int:
        return len(self.kernel_perm) - len(self.free_shape)

    def kernel_to_matrix(self, kernel, xp):
        """(n, m) matrix of a kernel of ``kernel_shape``."""
        return xp.reshape(xp.transpose(kernel, self.kernel_perm), self.matrix_shape)

    def matrix_to_kernel(self, matrix, xp):
        """The kernel of ``kernel_shape`` whose matrix is ``matrix``."""
        permuted = tuple(self.kernel_shape[i] for i in self.kernel_perm)
        inverse = tuple(sorted(range(len(self.kernel_perm)), key=self.kernel_perm.__getitem__))
        return xp.transpose(xp.reshape(matrix, permuted), inverse)


def einsum_spec(equation: str, input_shape, output_shape, bias_axes: str | None = None) -> EinsumSpec:
    """Shapes and axis orders of the equation for this input; ``output_shape`` is
    Keras's: the output without the batch axis and without the axes of "..."."""
    match = _EQUATION.match(equation.replace(" ", ""))
    if not match:
        raise DecompError(f"equation '{equation}' is not of the form 'ab,bc->ac' (an optional leading '...' "
                          "on the input and the output)")
    left, spec_in, spec_w, right, spec_out = match.groups()
    if bool(left) != bool(right):
        raise DecompError(f"equation '{equation}': '...' must lead both the input and the output")
    input_shape = tuple(input_shape)
    elided = len(input_shape) - len(spec_in)
    if elided < 0 or (elided and not left) or (left and elided < 1):
        raise DecompError(f"equation '{equation}' does not fit an input of rank {len(input_shape)}")
    for letter in spec_w:
        if letter in spec_in and letter in spec_out:
            raise DecompError(f"equation '{equation}': axis '{letter}' is in the input, the kernel and the "
                              "output (a per-position kernel), which is no single matrix")
    for letter in spec_in:
        if letter not in spec_w and letter not in spec_out:
            raise DecompError(f"equation '{equation}': input axis '{letter}' is summed away")
    user = [output_shape] if isinstance(output_shape, int) else list(output_shape)
    if left:
        full_out = list(input_shape[:elided]) + user
        out_dims = dict(zip(spec_out, user))
    else:
        full_out = [input_shape[0]] + user
        out_dims = dict(zip(spec_out, full_out))
    if len(full_out) != elided + len(spec_out):
        raise DecompError(f"equation '{equation}': output_shape {tuple(user)} has the wrong rank")
    in_dims = {letter: input_shape[elided + i] for i, letter in enumerate(spec_in)}
    for letter in spec_out:
        if letter in in_dims:
            out_dims[letter] = in_dims[letter]
        elif letter not in spec_w:
            raise DecompError(f"equation '{equation}': output axis '{letter}' is in neither input nor kernel")
    kernel_shape = tuple(in_dims[c] if c in spec_in else out_dims[c] for c in spec_w)
    if any(d is None for d in kernel_shape):
        raise DecompError(f"equation '{equation}': the kernel axes must have known sizes, got {kernel_shape}")
    contracted = [i for i, c in enumerate(spec_w) if c in spec_in]
    free = [i for i, c in enumerate(spec_w) if c in spec_out]
    batch = [c for c in spec_in if c not in spec_w]
    input_perm = tuple(range(elided)) + tuple(elided + spec_in.index(c) for c in batch) + tuple(
        elided + spec_in.index(spec_w[i]) for i in contracted)
    staged = batch + [spec_w[i] for i in free]  # the layout after the matrix product
    output_perm = tuple(range(elided)) + tuple(elided + staged.index(c) for c in spec_out)
    full_output = tuple(full_out[:elided]) + tuple(out_dims[c] for c in spec_out)
    return EinsumSpec(equation=equation, elided=elided, kernel_shape=kernel_shape, output_shape=full_output,
                      bias_shape=_bias_shape(equation, spec_out, out_dims, bias_axes, elided, bool(left)),
                      input_perm=input_perm, kernel_perm=tuple(contracted + free), output_perm=output_perm,
                      free_shape=tuple(kernel_shape[i] for i in free))


def _bias_shape(equation, spec_out, out_dims, bias_axes, elided, left):
    """Keras's bias layout: from the first biased output axis to the end, 1 where not biased."""
    if not bias_axes:
        return None
    for letter in bias_axes:
        if letter not in spec_out:
            raise DecompError(f"equation '{equation}': bias axis '{letter}' is not an output axis")
    first = min(spec_out.index(c) for c in bias_axes)
    shape = [out_dims[c] if c in bias_axes else 1 for c in spec_out[first:]]
    return tuple(shape)
