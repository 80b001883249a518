"""Calibration data -> the Gram matrix X^T X of one layer's inputs, as its kernel sees them.

``decompose(model, ..., data=...)`` fits each decomposed layer in the data
norm ||X (W - E)||_F (``fitting/data_norm.py``), X the layer's recorded inputs
laid out as rows of the (n, m) kernel matrix: a Dense layer's inputs
(leading axes flattened), a Conv2D layer's im2col patches in (kh, kw, cin)
order, an EinsumDense layer's contracted axes flattened.  Only X^T X is kept,
summed batch by batch, so memory is n^2 whatever the number of samples.

Layers are calibrated in model order, each on the activations of the model
being built, whose earlier layers are already compressed (``sequential``, as
GPTQ does), or on the original model's (``original``), or ``asymmetric``: on
the compressed model's inputs Z but towards the original's outputs X W
(||X W - Z E||_F, ``fitting.data_norm.CrossGram``), so that each layer also
undoes part of the error of the layers before it.  A layer's inputs are
recorded by wrapping its ``call`` while the whole model runs eagerly on a
batch, so a layer nested in a composite layer or a subclassed model is reached
the same way as a top-level one.

>>> import keras, numpy as np
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
>>> gram = layer_gram(model, model.get_layer("d"), np.eye(4, dtype="float32"))
>>> bool(np.allclose(gram.matrix, np.eye(4))), gram.count
(True, 4)
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import DecompError
from ..fitting.data_norm import DAMPING, CrossGram, Gram

BATCH = 256  # rows of an array cut into calibration batches
MODES = ("sequential", "original", "asymmetric")


def calibration_batches(data) -> list:
    """``data`` (an array, a tf.data.Dataset, or an iterable of batches; an
    element may be (inputs, labels)) as a list of input batches, read once:
    every layer goes over them again.

    >>> [b.shape for b in calibration_batches(np.zeros((600, 3)))]
    [(256, 3), (256, 3), (88, 3)]
    """
    if isinstance(data, np.ndarray):
        return [data[i:i + BATCH] for i in range(0, len(data), BATCH)]
    try:
        items = list(data)
    except TypeError:
        raise DecompError(f"calibration data must be an array, a tf.data.Dataset or an iterable of batches, "
                          f"got {type(data).__name__}") from None
    batches = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
    if not batches:
        raise DecompError("the calibration data is empty")
    return batches


def layer_gram(model, layer, batches, name: str | None = None) -> Gram:
    """X^T X of ``layer``'s inputs in ``model`` (float64, (n, n)) over ``batches``,
    with their sum and count.

    A batch of the wrong shape, or with NaN or infinite values (in the data or
    in the activations it gives), is a DecompError naming the layer and the batch.
    """
    gram = None
    for where, X in _layer_rows(model, layer, batches, name or layer.name):
        gram = gram or Gram(X.shape[-1])
        _guarded(where, gram.add, X)
    return gram


def paired_gram(built, layer, model, original, batches, name: str | None = None) -> CrossGram:
    """The paired statistics (``CrossGram``) of ``layer``'s inputs in ``built``
    (the model being compressed) and ``original``'s in ``model``, batch by
    batch on the same samples, for the ``asymmetric`` calibration."""
    cross, name = None, name or layer.name
    pairs = zip(_layer_rows(built, layer, batches, name), _layer_rows(model, original, batches, name))
    for (where, Z), (_, X) in pairs:
        cross = cross or CrossGram(Z.shape[-1])
        _guarded(where, cross.add, Z, X)
    return cross


def _guarded(where, add, *arrays):
    try:
        add(*arrays)
    except DecompError as err:
        raise DecompError(f"{where}: the layer's {err.fact}", hint="the model before it overflows "
                          "on this batch") from None


def _layer_rows(model, layer, batches, name):
    """(where, X) per batch: the rows ``layer``'s kernel matrix multiplies in that
    batch (every call of the layer, stacked), batches checked first."""
    if isinstance(batches, np.ndarray):
        batches = calibration_batches(batches)
    inputs = getattr(model, "inputs", None)
    expected = tuple(inputs[0].shape[1:]) if inputs and len(inputs) == 1 else None
    rows = _rows_of(layer)
    with _recording(layer) as seen:
        for i, batch in enumerate(batches):
            batch = np.asarray(batch)
            where = f"layer '{name}': calibration batch {i}"
            if batch.ndim < 1 or (expected is not None and tuple(batch.shape[1:]) != expected):
                raise DecompError(f"{where} has shape {batch.shape}, the model takes "
                                  f"(batch, {', '.join(map(str, expected))})")
            if not np.all(np.isfinite(batch)):
                raise DecompError(f"{where} has {int(batch.size - np.count_nonzero(np.isfinite(batch)))} NaN or "
                                  "infinite values", hint="clean the calibration data")
            seen.clear()
            model(batch.astype("float32"), training=False)
            if not seen:
                raise DecompError(f"{where}: the model did not call the layer", hint="is it part of the model?")
            found = [rows(x) for x in seen]
            yield where, found[0] if len(found) == 1 else np.concatenate(found)


@contextlib.contextmanager
def _recording(layer):
    """While open, every call of ``layer`` appends its input (numpy) to the list
    it yields: the model runs eagerly as it is, at any depth of nesting."""
    import keras

    seen, original = [], layer.call

    def call(inputs, *args, **kwargs):
        seen.append(keras.ops.convert_to_numpy(inputs))
        return original(inputs, *args, **kwargs)
    object.__setattr__(layer, "call", call)
    try:
        yield seen
    finally:
        object.__delattr__(layer, "call")


def fit_to_inputs(layer, W, bias, gram: Gram, center: bool = False, damping: float = DAMPING,
                  data_errors: dict | None = None) -> float:
    """Fit the decomposed ``layer`` to the trained kernel matrix W in the data norm
    of ``gram`` and copy the bias; returns the weight-norm error.

    ``center``: fit in the norm of the centred inputs and move the mean error
    into the bias (b + mean (W - E)): the best affine fit on the calibration
    inputs (up to the damping).  A layer without bias is fitted uncentred.  Off
    by default: on the Fashion-MNIST MLP it did not raise test accuracy."""
    from ..training.staging import initialize_from, kernel_matrix

    if not center or bias is None or getattr(layer, "bias", None) is None:
        return initialize_from(layer, W, bias, gram=gram.matrix, damping=damping, data_errors=data_errors)
    error = initialize_from(layer, W, bias, gram=gram.scatter(), damping=damping, data_errors=data_errors)
    shift = gram.mean @ (np.asarray(W, np.float64) - kernel_matrix(layer))
    corrected = np.asarray(bias, np.float64).reshape(-1) + shift
    layer.bias.assign(corrected.reshape(tuple(layer.bias.shape)).astype(layer.bias.dtype))
    return error


def fit_asymmetric(layer, W, bias, cross: CrossGram, center: bool = False, damping: float = DAMPING):
    """Fit the decomposed ``layer`` so that it gives, on the compressed model's
    inputs Z, what the original kernel W gave on the original inputs X:
    minimise ||X W - Z E||_F (``CrossGram``: E fitted to the corrected target
    W* in the data norm of Z).  With ``center``, the best affine fit: the
    centred statistics, and the bias b + mean(X) W - mean(Z) E.  Returns
    (||W - E|| / ||W||, ||X W - Z E|| / ||X W||)."""
    from ..training.staging import kernel_matrix

    W = np.asarray(W, dtype=np.float64)
    center = center and bias is not None and getattr(layer, "bias", None) is not None
    goal = cross.target(W, damping, center=center)
    if center:
        shift = cross.reference.mean @ W - cross.inputs.mean @ goal  # fit_to_inputs adds mean(Z) (W* - E)
        bias = (np.asarray(bias, np.float64).reshape(-1) + shift).reshape(np.shape(bias))
    fit_to_inputs(layer, goal, bias, cross.inputs, center, damping)
    E = kernel_matrix(layer)
    return float(np.linalg.norm(W - E) / max(np.linalg.norm(W), 1e-300)), cross.error(W, E)


def _rows_of(layer):
    """inputs -> (samples, n): the rows that the layer's kernel matrix multiplies."""
    kind = type(layer).__name__
    if kind == "Conv2D":
        return lambda x: conv_patches(x, layer)
    if kind == "EinsumDense":
        return lambda x: einsum_rows(x, layer)
    return lambda x: x.reshape(-1, x.shape[-1])


def conv_patches(x, layer) -> np.ndarray:
    """A Conv2D layer's im2col patches, rows in the kernel's (kh, kw, cin) order."""
    import keras

    if layer.data_format == "channels_first":
        x = np.moveaxis(x, 1, -1)
    patches = keras.ops.image.extract_patches(x, tuple(layer.kernel_size), strides=tuple(layer.strides),
                                             dilation_rate=tuple(layer.dilation_rate),
                                             padding=layer.padding, data_format="channels_last")
    patches = keras.ops.convert_to_numpy(patches)
    return patches.reshape(-1, patches.shape[-1])


def einsum_rows(x, layer) -> np.ndarray:
    """An EinsumDense layer's inputs with its contracted axes flattened last, in the
    kernel's order (the rows of its kernel read as (contracted, free)); a leading
    "..." and the input's other axes are batch axes.

    >>> class Layer: equation = "...bc,cd->...bd"
    >>> einsum_rows(np.zeros((2, 3, 5, 4)), Layer()).shape
    (30, 4)
    """
    inputs, rest = layer.equation.replace(" ", "").split(",")
    kernel = rest.split("->")[0]
    inputs = inputs.removeprefix("...")
    elided = x.ndim - len(inputs)
    contracted = [c for c in kernel if c in inputs]
    batch = list(range(elided)) + [elided + i for i, c in enumerate(inputs) if c not in kernel]
    x = np.transpose(x, batch + [elided + inputs.index(c) for c in contracted])
    size = int(np.prod([x.shape[len(batch) + j] for j in range(len(contracted))]))
    return x.reshape(-1, size)
