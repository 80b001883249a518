"""BatchNormalization statistics re-estimated after a model's layers changed.

A decomposed convolution gives outputs a little different from the trained one,
and every BatchNormalization layer after it keeps normalising with the moving
mean and variance of the old outputs: in a deep network (MobileNetV2) the errors
compound until the model predicts one class, although each layer's fit is close.
``recalibrate_batchnorm`` runs the model over a few thousand inputs, no weight
updated, and sets each layer's moving mean and variance to the mean and (biased)
variance of the inputs it saw, per channel, over all the data: what the moving
averages of training tend to.  While it runs, every BatchNormalization layer
normalises with the statistics of its batch (training mode), so each layer sees
inputs normalised by up-to-date statistics of the layers before it; everything
else runs in inference mode (no dropout).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import DecompError


def recalibrate_batchnorm(model, data, batch_size: int = 256) -> int:
    """Set every BatchNormalization layer of ``model`` (at any depth) to the mean
    and variance of its inputs over ``data`` (an array of model inputs, a
    tf.data.Dataset or an iterable of batches; an element may be (inputs, labels));
    returns how many layers were set.  Only the moving statistics change.

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d"),
    ...                           keras.layers.BatchNormalization(name="bn")])
    >>> x = np.random.default_rng(0).normal(size=(500, 3)).astype("float32")
    >>> recalibrate_batchnorm(model, x)
    1
    >>> h = x @ np.asarray(model.get_layer("d").kernel)  # the bias starts at zero
    >>> bool(np.allclose(model.get_layer("bn").moving_mean, h.mean(0), atol=1e-5))
    True
    """
    import keras

    from .calibrate import calibration_batches

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        raise DecompError(f"model '{model.name}' has no BatchNormalization layer",
                          hint="recalibrate_batchnorm re-estimates BatchNormalization statistics only")
    if isinstance(data, np.ndarray):
        data = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    batches = calibration_batches(data)
    kept = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in layers]
    try:
        with contextlib.ExitStack() as stack:
            moments = [stack.enter_context(_observing(layer)) for layer in layers]
            for batch in batches:
                model(np.asarray(batch, "float32"), training=False)
        for layer, (count, mean, squares) in zip(layers, moments):
            if count == 0:
                raise DecompError(f"BatchNormalization layer '{layer.name}' was not called by the model",
                                  hint="is it part of the model's forward pass?")
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign((squares / count).astype(layer.moving_variance.dtype))
    except BaseException:
        for layer, (mean, variance) in zip(layers, kept):  # training-mode calls moved them
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
        raise
    return len(layers)


@contextlib.contextmanager
def _observing(layer):
    """While open, ``layer`` runs in training mode and its inputs' per-channel
    count, mean and sum of squared deviations accumulate (in float64, merged batch
    by batch as Chan et al. do) in the list it yields: [count, mean, squares]."""
    import keras

    moments, original = [0, 0.0, 0.0], layer.call

    def call(inputs, *args, **kwargs):
        x = np.asarray(keras.ops.convert_to_numpy(inputs), np.float64)
        axis = layer.axis % x.ndim
        x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
        count, mean = len(x), x.mean(axis=0)
        squares = ((x - mean) ** 2).sum(axis=0)
        total = moments[0] + count
        delta = mean - moments[1]
        moments[2] = moments[2] + squares + delta ** 2 * moments[0] * count / total
        moments[1] = moments[1] + delta * count / total
        moments[0] = total
        return original(inputs, *args, **{**kwargs, "training": True})
    object.__setattr__(layer, "call", call)
    try:
        yield moments
    finally:
        object.__delattr__(layer, "call")
