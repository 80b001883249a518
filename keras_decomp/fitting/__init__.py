"""Dense W (numpy) -> the parameters of an expression that fit it best: least
squares, SVD, ALS, palm4MSA, Hankel SVD, tri-factorisation, and a gradient
fallback.  numpy and scipy only."""

from .approximate import Approximation, approximate, fit
from .methods import register

__all__ = ["Approximation", "approximate", "fit", "register"]
