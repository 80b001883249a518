"""What the decomposed layers share: ``_Decomposed`` holds the expression, its
variables and its apply path; ``Dense`` and ``Conv2D`` (their own modules) add
the Keras signatures.  ``call`` uses ``keras.ops`` only, so the layers run on
the TensorFlow and JAX backends.

The config keeps the expression text; ``build`` re-parses it for the input
size, creates one variable per trainable array of the IR and regenerates the
fixed arrays from their seeds.  Fixed arrays are held outside Keras's tracking,
so a ``.keras`` file stores the trainable values and the config only.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import ops

from ..errors import DecompError
from ..operators.fixed import FixedLeaf
from ..operators.ir import Product, Slice
from ..operators.structures.basic import LowRank
from ..language.parse import parse, parse_syntax
from .tying import current_scope

MODES = ("auto", "apply", "materialize")
_WARNED = {"untied": False}  # the advice on tying() is given once per process
_PACKAGE = "keras_decomp"  # part of the saved file format: never change it


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
        scope = current_scope()
        self.tied = self.tied or scope is not None
        if self.tied and scope is None and any("." not in k for k in self.node.param_shapes()):
            warnings.warn(f"layer '{self.name}' was saved with parameters tied to other layers, but is "
                          "built outside keras_decomp.layers.tying(): they are not shared now; load "
                          "models with keras_decomp.load_model to keep them tied", stacklevel=3)
        named = [k for k in self.node.param_shapes() if "." not in k]
        if named and scope is None and not self.tied and not _WARNED["untied"]:
            _WARNED["untied"] = True
            warnings.warn(f"layer '{self.name}' names the parameter(s) {', '.join(named)}, built outside "
                          "keras_decomp.layers.tying(): each layer gets its own variable. To share a name "
                          "between layers, build (or call) them inside `with keras_decomp.layers.tying():` "
                          "(specs, decompose and load_model do it for you)", stacklevel=3)
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

    def _factored(self, positions: int):
        """(first factor, the rest as one node) where a convolution applies its kernel factor
        by factor (``mode``, or the cost model at ``positions`` rows), else None: the kernel
        is materialised and convolved once."""
        node, mode = self.node, self.mode
        factors = conv_factors(node)
        if mode == "auto":  # the faster path by the cost model (operators/cost.py)
            mode = node.choose(positions)
        if mode != "apply" or not factors:
            return None
        first = factors[0]
        rest = factors[1] if len(factors) == 2 else Product((first.shape[1], node.shape[1]), factors=factors[1:])
        return first, rest

    def _matrix_apply(self, x2d, batch: int):
        """x2d @ W for a 2-D input, by the forced or the cheaper mode."""
        v, xp = self._values(), _Ops(self.compute_dtype)
        mode = self.mode
        if mode == "auto":  # the faster path by the cost model (operators/cost.py)
            mode = self.node.choose(batch)
        if mode == "apply":
            return self.node.apply(x2d, v, xp)
        return ops.matmul(x2d, self.node.materialize(v, xp))

    def load_own_variables(self, store):
        """The saved weights; a file of keras_decomp 0.1, which kept one SSS variable per
        stage matrix, is read into the stacks of this version."""
        legacy = _legacy_keys(self)
        if legacy is None or [tuple(store[str(i)].shape) for i in range(len(store.keys()))] != \
                list(legacy.values()) + [tuple(self.bias.shape)] * (self.bias is not None):
            return super().load_own_variables(store)
        arrays = {key: np.asarray(store[str(i)]) for i, key in enumerate(legacy)}
        for node in self.node.walk():
            if hasattr(node, "from_legacy"):
                arrays.update(node.from_legacy(arrays))
        for key, variable in self.decomposition_variables.items():
            variable.assign(arrays[key])
        if self.bias is not None:
            self.bias.assign(store[str(len(legacy))])

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


def _legacy_keys(layer) -> dict | None:
    """keras_decomp 0.1's variables (key -> shape, in its order) of a layer holding an SSS
    node, else None."""
    if not any(hasattr(node, "legacy_params") for node in layer.node.walk()):
        return None
    owned = {id(w) for w in layer.weights}
    keys = {}
    for node in layer.node.walk():
        legacy = hasattr(node, "legacy_params")
        for k, shape in (node.legacy_params() if legacy else node.own_params()).items():
            if legacy or id(layer.decomposition_variables[k]) in owned:
                keys.setdefault(k, tuple(shape))
    return keys


def _in_layer(err: DecompError, layer) -> DecompError:
    return type(err)(f"layer '{layer.name}': {err.fact}", text=err.text, pos=err.pos, hint=err.hint)


def _known(batch) -> int:
    """A batch size for the cost model: the static one, or a typical 128."""
    return batch if isinstance(batch, int) else 128


def conv_factors(node) -> tuple | None:
    """The factors that a convolution applies one after the other, the first as its kernel:
    a product's, or lowrank's u and v; None for any other node (its W is materialised).

    >>> from keras_decomp import parse
    >>> [f.shape for f in conv_factors(parse("lowrank(r=2)", 9, 4).stages[0])]
    [(9, 2), (2, 4)]
    """
    if isinstance(node, LowRank):
        return node.halves()
    return getattr(node, "factors", None)
