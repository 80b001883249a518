"""IR -> registered Keras layers whose kernel is an expression, and the model
surgery that puts them at any depth of a model (``fold`` takes them out again).

>>> import numpy as np
>>> from keras_decomp.layers import Dense
>>> tuple(Dense(4, W="lowrank(r=2)")(np.ones((2, 8), "float32")).shape)
(2, 4)
"""

from .base import MODES
from .conv import Conv2D
from .conv1d import Conv1D
from .dense import Dense
from .einsum import EinsumDense
from .fold import fold
from .pruned import PrunedDense
from .saving import load_model
from .tying import tying

__all__ = ["Conv1D", "Conv2D", "Dense", "EinsumDense", "MODES", "PrunedDense", "fold", "load_model", "tying"]
