"""recalibrate_batchnorm sets each BatchNormalization layer's moving statistics to the
mean and variance of its inputs; references are numpy forward passes written by hand."""

import keras
import numpy as np
import pytest

from keras_decomp import DecompError, recalibrate_batchnorm

EPS = 1e-3  # Keras's BatchNormalization epsilon


def conv_bn_model():
    """1x1 Conv2D -> BN -> 1x1 Conv2D -> BN, random weights; moving statistics still 0 and 1,
    stale for inputs that the biases shift away from zero."""
    model = keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 1, name="conv1"),
                              keras.layers.BatchNormalization(name="bn1"), keras.layers.Conv2D(2, 1, name="conv2"),
                              keras.layers.BatchNormalization(name="bn2")])
    rng = np.random.default_rng(0)
    for layer in model.layers:
        for variable in layer.trainable_weights:  # kernels, biases, gammas, betas
            variable.assign(rng.normal(loc=1.0, scale=0.5, size=variable.shape))
    return model


def by_hand(model, x):
    """(per-layer (mean, variance) of the BN inputs, the inference output), with each BN
    normalising by the statistics of all of x: numpy, channel by channel."""
    weights = {layer.name: [np.asarray(w, np.float64) for w in layer.get_weights()] for layer in model.layers}
    h, stats = x.reshape(-1, x.shape[-1]).astype(np.float64), []
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        kernel, bias = weights[conv]
        h = h @ kernel.reshape(kernel.shape[-2:]) + bias
        mean, variance = h.mean(axis=0), h.var(axis=0)
        stats.append((mean, variance))
        gamma, beta = weights[bn][:2]
        h = gamma * (h - mean) / np.sqrt(variance + EPS) + beta
    return stats, h.reshape(x.shape[:-1] + (-1,))


def test_statistics_and_outputs_equal_the_numpy_reference():
    model = conv_bn_model()
    x = np.random.default_rng(1).normal(size=(40, 5, 5, 2)).astype("float32")
    stats, expected = by_hand(model, x)
    assert np.abs(np.asarray(model(x)) - expected).max() > 0.5  # stale statistics: far off
    weights = [w.copy() for layer in model.layers for w in layer.get_weights()[:2]]
    # one batch of all 40 images: training-mode statistics of bn1 are its population statistics,
    # so bn2's inputs are those of the inference model and its reference is exact too
    assert recalibrate_batchnorm(model, x, batch_size=40) == 2
    for name, (mean, variance) in zip(("bn1", "bn2"), stats):
        bn = model.get_layer(name)
        np.testing.assert_allclose(np.asarray(bn.moving_mean), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(bn.moving_variance), variance, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-4)
    after = [w for layer in model.layers for w in layer.get_weights()[:2]]
    assert all(np.array_equal(a, b) for a, b in zip(weights, after)) and len(after) == 8  # nothing else moved


def test_uneven_batches_merge_into_the_statistics_of_all_the_data():
    model = conv_bn_model()
    x = np.random.default_rng(2).normal(size=(40, 5, 5, 2)).astype("float32")
    ((mean, variance), _), _ = by_hand(model, x)
    # batches of 16, 16 and 8 images, as an iterable of (inputs, labels): bn1's inputs do not
    # depend on the mode, so its statistics are those of all 40 images
    recalibrate_batchnorm(model, [(x[:16], 0), (x[16:32], 0), (x[32:], 0)])
    np.testing.assert_allclose(np.asarray(model.get_layer("bn1").moving_mean), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.get_layer("bn1").moving_variance), variance, rtol=1e-5)


def test_a_model_without_batch_normalization_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(DecompError, match="has no BatchNormalization layer"):
        recalibrate_batchnorm(model, np.ones((4, 3), "float32"))


def test_a_failed_run_leaves_the_statistics_as_they_were():
    model = conv_bn_model()
    before = [np.asarray(v).copy() for v in model.non_trainable_weights]
    good = np.ones((8, 5, 5, 2), "float32")
    with pytest.raises(ValueError):
        recalibrate_batchnorm(model, [good, np.ones((8, 4, 4, 3), "float32")])  # the second batch cannot run
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, model.non_trainable_weights))
