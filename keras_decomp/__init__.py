"""keras_decomp: structured weight decompositions for Keras 3, written in a small language.

The framework-free core (``parse``, the IR) imports no TensorFlow; the Keras
parts load on first use.

>>> import keras_decomp
>>> keras_decomp.parse("W = sum(G, n=8) | dense", 784, 10).shape
(784, 10)
"""

from importlib import import_module

# export shares its name with its module: the function is imported eagerly (numpy
# only), so importing the module later cannot shadow it.
from .errors import DecompError
from .export import export
from .fitting.approximate import approximate
from .language.parse import parse

__version__ = "0.1.0"

# public name -> module that defines it, imported on first access (they load Keras)
_LAZY = {
    "layers": None,
    "Dense": "layers",
    "Conv2D": "layers",
    "Conv1D": "layers",
    "EinsumDense": "layers",
    "fold": "layers",
    "tying": "layers",
    "load_model": "layers",
    "build": "training.builder",
    "load_spec": "training.specs",
    "summarize": "layers.report",
    "fit_staged": "training.staging",
    "decompose": "compression.decompose",
    "fine_tune": "compression.distill",
    "prune": "compression.prune",
    "strip": "compression.prune",
    "recalibrate_batchnorm": "compression.batchnorm",
}

__all__ = ["DecompError", "approximate", "export", "parse", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'keras_decomp' has no attribute {name!r}")
    module = import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value
