"""Weight tying in plain Keras code: layers share a parameter name only inside
``layers.tying()``; outside it each gets its own variable and the first such
layer warns, once, with that advice."""

import warnings

import numpy as np
import pytest

from keras_decomp import layers
from keras_decomp.layers import base


def build(a, b):
    x = np.ones((1, 6), "float32")
    return b(a(x))


def test_outside_tying_each_layer_has_its_own_variable_and_one_warning(monkeypatch):
    monkeypatch.setitem(base._WARNED, "untied", False)
    a, b = layers.Dense(6, W="g1 s1", name="a"), layers.Dense(6, W="g1 s2", name="b")
    with pytest.warns(UserWarning, match=r"layer 'a' names the parameter\(s\) g1, s1, built outside "
                                         r"keras_decomp.layers.tying\(\): each layer gets its own variable") as seen:
        build(a, b)
    assert len([w for w in seen if "names the parameter" in str(w.message)]) == 1  # once, not per layer
    assert a.tied_variables["g1"] is not b.tied_variables["g1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(layers.Dense(6, W="g1 s3"), layers.Dense(6, W="g1 s4"))  # already advised


def test_inside_tying_the_name_is_one_variable(monkeypatch):
    monkeypatch.setitem(base._WARNED, "untied", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with layers.tying():
            a, b = layers.Dense(6, W="g1 s1"), layers.Dense(6, W="g1 s2")
            build(a, b)
    assert a.tied_variables["g1"] is b.tied_variables["g1"]
    assert len({id(v) for v in a.trainable_variables + b.trainable_variables}) == 5  # g1, s1, s2, two biases
