"""Loading saved models: every layer class of the package registered, named
parameters tied again, and Keras's safe mode always on."""

from __future__ import annotations

import keras

from ..errors import DecompError
from . import pruned  # noqa: F401 - registers PrunedDense
from .tying import tying


def load_model(path, **kwargs):
    """``keras.saving.load_model`` that keeps named parameters tied across layers
    and knows every layer class of the package (pruned layers included).

    Always in Keras's safe mode: a file holding Python code (a ``Lambda`` layer's
    bytecode) is refused with a DecompError, never run.
    """
    if kwargs.pop("safe_mode", True) is not True:
        raise DecompError("keras_decomp.load_model loads in Keras's safe mode only",
                          hint="a model file you trust and that holds Python code can be loaded with "
                               "keras.saving.load_model directly")
    with tying():
        try:
            return keras.saving.load_model(path, safe_mode=True, **kwargs)
        except ValueError as err:
            if isinstance(err, DecompError) or "safe_mode" not in str(err):
                raise
            raise DecompError(f"{path}: refused: the model file holds Python code (e.g. the bytecode of a "
                              "Lambda layer), which could run anything; keras_decomp loads in safe mode only",
                              hint="rebuild the model without Lambda layers (a registered layer class "
                                   "instead), or load it with keras.saving.load_model if you trust it") from None
