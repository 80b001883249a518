"""IR -> registered Keras layers whose kernel is an expression.

>>> import numpy as np
>>> from keras_decomp.layers import Dense
>>> tuple(Dense(4, W="lowrank(r=2)")(np.ones((2, 8), "float32")).shape)
(2, 4)
"""

from .base import MODES
from .conv import Conv2D
from .dense import Dense
from .pruned import PrunedDense
from .saving import load_model
from .tying import tying

__all__ = ["Conv2D", "Dense", "MODES", "PrunedDense", "load_model", "tying"]
