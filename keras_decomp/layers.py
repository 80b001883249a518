"""IR -> registered Keras layers: ``Dense`` and ``Conv2D`` whose kernel is an
expression.  ``call`` uses ``keras.ops`` only, so the layers run on the
TensorFlow and JAX backends.

The config keeps the expression text; ``build`` re-parses it for the input
size, creates one variable per trainable array of the IR and regenerates the
fixed arrays from their seeds.  Fixed arrays are held outside Keras's tracking,
so a ``.keras`` file stores the trainable values and the config only.

>>> import keras, numpy as np
>>> layer = Dense(4, W="sum(G, n=3)")
>>> tuple(layer(np.ones((2, 8), "float32")).shape), layer.count_params()
((2, 4), 7)
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings

import keras
import numpy as np
from keras import ops

from .errors import DecompError
from .fixed import FixedLeaf
from .ir import Slice
from .parse import parse, parse_syntax

MODES = ("auto", "apply", "materialize")
_PACKAGE = "keras_decomp"  # part of the saved file format: never change it
_tying = threading.local()


@contextlib.contextmanager
def tying():
    """Layers built inside share their named trainable parameters: the same
    lowercase name (``g1`` in ``g0 s1 g1'`` and ``g1 s2 g2'``) is one variable.

    >>> with tying():
    ...     a, b = Dense(3, W="g s"), Dense(3, W="g t")
    ...     _ = b(a(np.ones((1, 3), "float32")))
    >>> a.tied_variables["g"] is b.tied_variables["g"]
    True
    """
    previous = getattr(_tying, "scope", None)
    _tying.scope = {}
    try:
        yield _tying.scope
    finally:
        _tying.scope = previous


def load_model(path, **kwargs):
    """``keras.saving.load_model`` that keeps named parameters tied across layers
    and knows every layer class of the package (pruned layers included).

    Always in Keras's safe mode: a file holding Python code (a ``Lambda`` layer's
    bytecode) is refused with a DecompError, never run.
    """
    from . import prune  # noqa: F401 - registers PrunedDense
    if kwargs.pop("safe_mode", True) is not True:
        raise DecompError("keras_decomp.load_model loads in Keras's safe mode only",
                          hint="a model file you trust and that holds Python code can be loaded with "
                               "keras.saving.load_model directly")
    with tying():
        try:
            return keras.saving.load_model(path, safe_mode=True, **kwargs)
        except ValueError as err:
            if isinstance(err, DecompError) or "safe_mode" not in str(err):
                raise
            raise DecompError(f"{path}: refused: the model file holds Python code (e.g. the bytecode of a "
                              "Lambda layer), which could run anything; keras_decomp loads in safe mode only",
                              hint="rebuild the model without Lambda layers (a registered layer class "
                                   "instead), or load it with keras.saving.load_model if you trust it") from None


class _Fixed:
    """Holds the fixed arrays out of Keras's tracking: not weights, not saved."""

    def __init__(self, arrays: dict):
        self.arrays = arrays


class _Ops:
    """``keras.ops`` as the IR's array namespace, with ``eye`` in the layer's compute
    dtype: I, D, P and diag are built from ``xp.eye(n)``, which ``keras.ops`` makes
    float32 even under ``mixed_float16`` (numpy's float64 default is right for to_dense)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def eye(self, *args, dtype=None, **kwargs):
        return ops.eye(*args, dtype=dtype or self.dtype, **kwargs)

    def __getattr__(self, name):
        return getattr(ops, name)


class _Decomposed(keras.layers.Layer):
    """What Dense and Conv2D share: the expression, its variables, its apply."""

    def _init_decomposition(self, W, params, seed, mode, stage, fixed_dtype, tied, fixed=None, fitted=None):
        if mode not in MODES:
            raise DecompError(f"layer '{self.name}': mode must be one of {MODES}, got {mode!r}")
        if not isinstance(W, str):
            raise DecompError(f"layer '{self.name}': W must be an expression string, got {type(W).__name__}")
        try:
            syntax = parse_syntax(W)
        except DecompError as err:
            raise _in_layer(err, self) from None
        if not 0 <= stage < len(syntax.stages):
            raise DecompError(f"layer '{self.name}': stage {stage} does not exist; "
                              f"'{W}' has {len(syntax.stages)} stage(s)")
        self.W = W
        self.params = dict(params or {})
        self.seed = int(seed)
        self.mode = mode
        self.stage = int(stage)
        self.fixed_dtype = fixed_dtype
        self.tied = bool(tied)
        self.fixed = dict(fixed or {})
        # fixed arrays found from data (a sparse support chosen by palm4MSA): no seed regenerates
        # them, so the config keeps them, as int lists
        self.fitted = {key: np.asarray(a).tolist() for key, a in (fitted or {}).items()}
        self.node = None

    def _init_output(self, activation, use_bias, bias_initializer, bias_regularizer, bias_constraint):
        """The activation and bias arguments both layers share with Keras's own."""
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def _build_bias(self, size: int) -> None:
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(size,), initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer, constraint=self.bias_constraint)

    def _output_config(self) -> dict:
        return {"activation": keras.activations.serialize(self.activation), "use_bias": self.use_bias,
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint)}

    def _symbols(self) -> dict:
        """Symbols the layer binds for its expression (the user's params win)."""
        return {}

    def _decompose(self, n: int, m: int):
        try:
            return parse(self.W, n, m, params={**self._symbols(), **self.params}, seed=self.seed,
                         fixed=_declarations(self.fixed)).stages[self.stage]
        except DecompError as err:
            raise _in_layer(err, self) from None

    def _build_decomposition(self, n: int, m: int):
        self.node = self._decompose(n, m)
        scope = getattr(_tying, "scope", None)
        self.tied = self.tied or scope is not None
        if self.tied and scope is None and any("." not in k for k in self.node.param_shapes()):
            warnings.warn(f"layer '{self.name}' was saved with parameters tied to other layers, but is "
                          "built outside keras_decomp.layers.tying(): they are not shared now; load "
                          "models with keras_decomp.load_model to keep them tied", stacklevel=3)
        rng = np.random.default_rng(self.seed)
        initial = self.node.init(rng)
        self.decomposition_variables = {}
        self.tied_variables = {}
        for key, shape in self.node.param_shapes().items():
            tied = "." not in key  # a user-named parameter
            if tied and scope is not None and key in scope:
                if tuple(scope[key].shape) != tuple(shape):
                    raise DecompError(f"layer '{self.name}': the tied parameter '{key}' has shape "
                                      f"{tuple(scope[key].shape)} in another layer but {shape} here")
                variable = scope[key]
            else:
                variable = self.add_weight(name=key, shape=shape, initializer="zeros")
                variable.assign(np.asarray(initial[key], dtype=variable.dtype))
                if tied and scope is not None:
                    scope[key] = variable
            self.decomposition_variables[key] = variable
            if tied:
                self.tied_variables[key] = variable
        arrays = _fixed_arrays(self.node)
        arrays.update(self._checked_fitted(self.fitted, arrays))
        self._fixed = _Fixed({key: self._fixed_variable(key, a) for key, a in arrays.items()})

    def _checked_fitted(self, fitted: dict, arrays: dict) -> dict:
        out = {}
        for key, value in fitted.items():
            value = np.asarray(value)
            if key not in arrays or value.shape != arrays[key].shape:
                raise DecompError(f"layer '{self.name}': the fitted array '{key}' {value.shape} does not "
                                  f"belong to '{self.W}'", hint="fitted arrays come from approximate() for "
                                  "this expression and input size; drop them to start from seeded ones")
            out[key] = value.astype(arrays[key].dtype)
        return out

    def set_fitted(self, arrays: dict) -> None:
        """Use fixed arrays found from data (``approximate`` of a sparse() support) from now on,
        and keep them in the config so that a saved model rebuilds with them."""
        current = {key: ops.convert_to_numpy(v) for key, v in self._fixed.arrays.items()}
        checked = self._checked_fitted(arrays, current)
        for key, value in checked.items():
            self._fixed.arrays[key].assign(value)
        self.fitted.update({key: value.tolist() for key, value in checked.items()})

    def _fixed_variable(self, key: str, array: np.ndarray):
        """A fixed array, stored as ``fixed_dtype`` if given, else cast once here to the
        compute dtype (the values ``_values`` would otherwise cast to at every step)."""
        if np.issubdtype(array.dtype, np.integer):
            value = array.astype(np.int32)  # indices; JAX without x64 would truncate int64, warning
        elif self.fixed_dtype:
            value = np.asarray(array, dtype=self.fixed_dtype)
        else:
            value = ops.cast(np.asarray(array, dtype=self.variable_dtype), self.compute_dtype)
        return keras.Variable(value, dtype=value.dtype, trainable=False, name=key.replace(".", "_"))

    def _values(self) -> dict:
        dtype = self.compute_dtype
        values = {k: ops.cast(v, dtype) if "float" in str(v.dtype) else v
                  for k, v in self._fixed.arrays.items()}
        values.update({k: ops.cast(v, dtype) for k, v in self.decomposition_variables.items()})
        return values

    def materialize(self):
        """The dense kernel matrix W, shape (n, m), as a tensor."""
        return self.node.materialize(self._values(), _Ops(self.compute_dtype))

    def _matrix_apply(self, x2d, batch: int):
        """x2d @ W for a 2-D input, by the forced or the cheaper mode."""
        v, xp = self._values(), _Ops(self.compute_dtype)
        mode = self.mode
        if mode == "auto":
            cheaper = self.node.flops(batch, "apply") < self.node.flops(batch, "materialize")
            mode = "apply" if cheaper else "materialize"
        if mode == "apply":
            return self.node.apply(x2d, v, xp)
        return ops.matmul(x2d, self.node.materialize(v, xp))

    def _decomposition_config(self) -> dict:
        return {"W": self.W, "params": self.params, "seed": self.seed, "mode": self.mode,
                "stage": self.stage, "fixed_dtype": self.fixed_dtype, "tied": self.tied, "fixed": self.fixed,
                "fitted": self.fitted}


def _declarations(fixed: dict) -> dict:
    """Spec-style declarations ({"basis": "R"} or {"file": path}) -> parse's form."""
    out = {}
    for name, decl in fixed.items():
        if "file" in decl:
            try:
                matrix = np.load(decl["file"], allow_pickle=False)
            except (ValueError, OSError) as err:
                raise DecompError(f"the fixed matrix {name} ({decl['file']}) is not a .npy array file: "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
            bad = int(matrix.size - np.count_nonzero(np.isfinite(matrix)))
            if bad:
                raise DecompError(f"the fixed matrix {name} ({decl['file']}) holds {bad} NaN or infinite entries",
                                  hint="a fixed basis must be finite")
            out[name] = {"matrix": matrix}
        else:
            out[name] = dict(decl)
    return out


def _fixed_arrays(node) -> dict:
    """The node's fixed arrays plus the column slices of fixed matrices (``DCT2[:k]``), cut
    once here so that a step reads the (n, k) slice instead of copying it out of (n, n)."""
    arrays = node.fixed_arrays()
    for sub in node.walk():
        leaf = getattr(sub, "child", None)
        if isinstance(sub, Slice) and isinstance(leaf, FixedLeaf) and leaf.stores_matrix() and leaf.key in arrays:
            arrays[sub.fixed_key] = np.ascontiguousarray(arrays[leaf.key][:, sub.start:sub.stop])
    return arrays


def _in_layer(err: DecompError, layer) -> DecompError:
    return type(err)(f"layer '{layer.name}': {err.fact}", text=err.text, pos=err.pos, hint=err.hint)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Dense(_Decomposed):
    """``keras.layers.Dense`` whose (in, units) kernel is the expression ``W``.

    ``params`` binds symbols, ``seed`` fixes the random bases, ``mode`` forces
    "apply" (factor by factor) or "materialize" (W, then one matmul); "auto"
    picks the one with fewer FLOPs.  ``stage`` selects a ``|`` stage.
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
        mode = self.mode
        factors = getattr(node, "factors", None)
        if mode == "auto":
            cheaper = node.flops(positions, "apply") < node.flops(positions, "materialize")
            mode = "apply" if cheaper else "materialize"
        if mode == "apply" and factors:
            first = factors[0]
            y = self._conv(x, first.materialize(v, xp), first.shape[1])
            from .ir import Product
            rest = factors[1] if len(factors) == 2 else Product((first.shape[1], node.shape[1]), factors=factors[1:])
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


def _known(batch) -> int:
    """A batch size for the cost model: the static one, or a typical 128."""
    return batch if isinstance(batch, int) else 128


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
