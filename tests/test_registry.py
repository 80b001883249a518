"""A structure registered from outside the package becomes part of the language."""

from dataclasses import dataclass

import numpy as np
import pytest

from keras_decomp import DecompError, parse
from keras_decomp.operators import names
from keras_decomp.operators.ir import Node
from keras_decomp.operators.structures import registry


@dataclass(frozen=True)
class Scaled(Node):
    """c * I on a square shape: one trainable scalar."""

    key: str = ""

    def own_params(self):
        return {self.key: ()}

    def own_init(self, rng):
        return {self.key: np.ones(())}

    def materialize(self, v, xp):
        return xp.eye(*self.shape) * v[self.key]


def _build(low, call, args, rows, cols, key):
    return Scaled((rows, cols), key=low.keys(call, "scaledeye", key)[0])


@pytest.fixture
def scaledeye(monkeypatch):
    """Register 'scaledeye' for one test; the table and the reserved names are restored after."""
    monkeypatch.setattr(registry, "_TABLE", dict(registry._TABLE))
    monkeypatch.setattr(names, "_structures", list(names._structures))
    registry.register(registry.Structure("scaledeye", _build))


def test_unregistered_name_is_unknown():
    with pytest.raises(DecompError, match="unknown structure 'scaledeye'"):
        parse("scaledeye()", 4, 4)


@pytest.mark.parametrize("text", ["scaledeye", "scaledeye()", "2 * scaledeye + dense", "scaledeye dense"])
def test_registered_structure_parses(scaledeye, text):
    node = parse(text, 4, 4).stages[0]
    assert node.to_dense(node.init(np.random.default_rng(0))).shape == (4, 4)
    assert any(isinstance(sub, Scaled) for sub in node.walk())


def test_registered_structure_is_reserved(scaledeye):
    assert "scaledeye" in names.structures()
    with pytest.raises(DecompError, match="did you mean scaledeye"):
        parse("scaledeyes", 4, 4)
    with pytest.raises(DecompError, match="scaledeye has no argument 'r'"):
        parse("scaledeye(r=2)", 4, 4)


@pytest.mark.parametrize("name", ["Toeplitz", "2d", "", "a-b"])
def test_register_rejects_bad_names(name):
    with pytest.raises(ValueError, match="structure name"):
        registry.register(registry.Structure(name, _build))
