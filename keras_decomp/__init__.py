"""keras_decomp: structured weight decompositions for Keras 3, written in a small language.

>>> import keras_decomp
>>> keras_decomp.parse("W = sum(G, n=8) | dense", 784, 10).shape
(784, 10)
"""

from .errors import DecompError
from .parse import parse

__all__ = ["DecompError", "parse"]
__version__ = "0.1.0"
