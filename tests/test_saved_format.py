"""Files written by an earlier version load in this one with identical outputs.

tests/data/v1_*.keras were saved by the package before its stage-per-package layout
(version 0.1.0 at commit c940c80, flat modules); the outputs beside them were
computed then, by that code.  The registered class names and config keys are the
file format: a move or a rename that breaks them fails here.
"""

from pathlib import Path

import numpy as np
import pytest

import keras_decomp

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name, kinds", [
    ("v1_model", {"Conv2D", "Dense"}),
    ("v1_pruned", {"PrunedDense"}),
])
def test_a_file_of_the_previous_layout_loads_and_predicts_the_same(name, kinds):
    model = keras_decomp.load_model(DATA / f"{name}.keras")
    saved = np.load(DATA / f"{name}_io.npz")
    ours = {type(layer).__name__ for layer in model.layers if type(layer).__module__.startswith("keras_decomp")}
    assert ours == kinds
    np.testing.assert_allclose(model.predict(saved["x"], verbose=0), saved["y"], rtol=1e-5, atol=1e-6)


def test_the_decomposed_layers_keep_their_expressions():
    model = keras_decomp.load_model(DATA / "v1_model.keras")
    expressions = {layer.name: layer.W for layer in model.layers if hasattr(layer, "W")}
    assert expressions == {"conv": "sum(G, n=3) + lowrank(r=2)", "sss": "sss(p=4, d=2)",
                           "sketch": "sketch(k=4, l=2)", "prodsum": "(A1*a + B1*b)(DCT[:16]) | dense",
                           "butterfly": "butterfly()", "tri": "tri(k=4)"}
