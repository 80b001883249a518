"""Loading saved models: every layer class of the package registered, named
parameters tied again, decomposed nested layers put back by their plan, and
Keras's safe mode always on."""

from __future__ import annotations

import os
import tempfile

import keras

from ..errors import DecompError
from . import plan
from . import pruned  # noqa: F401 - registers PrunedDense
from .tying import tying


def load_model(path, **kwargs):
    """``keras.saving.load_model`` that keeps named parameters tied across layers,
    knows every layer class of the package (pruned layers included) and puts
    decomposed layers back inside composite layers (keras_hub blocks,
    MultiHeadAttention, subclassed models) from the plan saved with the weights.

    Always in Keras's safe mode: a file holding Python code (a ``Lambda`` layer's
    bytecode) is refused with a DecompError, never run.
    """
    if kwargs.pop("safe_mode", True) is not True:
        raise DecompError("keras_decomp.load_model loads in Keras's safe mode only",
                          hint="a model file you trust and that holds Python code can be loaded with "
                               "keras.saving.load_model directly")
    with tying():
        try:
            config, entries = plan.read(path) if str(path).endswith(".keras") else ({}, {})
            if not entries:
                return keras.saving.load_model(path, safe_mode=True, **kwargs)
            return _load_planned(path, config, entries, **kwargs)
        except ValueError as err:
            if isinstance(err, DecompError) or "safe_mode" not in str(err):
                raise
            raise DecompError(f"{path}: refused: the model file holds Python code (e.g. the bytecode of a "
                              "Lambda layer), which could run anything; keras_decomp loads in safe mode only",
                              hint="rebuild the model without Lambda layers (a registered layer class "
                                   "instead), or load it with keras.saving.load_model if you trust it") from None


def _load_planned(path, config, entries, custom_objects=None, compile=True):
    # the optimizer is built for the trainable variables: compile after the surgery
    compile_config = config.pop("compile_config", None)
    model = keras.saving.deserialize_keras_object(config, custom_objects=custom_objects, safe_mode=True)
    plan.apply(model, entries)
    if compile and compile_config:
        model.compile_from_config(compile_config)
    model.load_weights(path)
    return model


def copy_model(model):
    """An independent copy of ``model`` (structure, weights, plan), by a round trip
    through a ``.keras`` file."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "copy.keras")
        try:
            model.save(path)
        except (TypeError, NotImplementedError, ValueError) as err:
            if isinstance(err, DecompError):
                raise
            raise DecompError(f"cannot copy the model '{model.name}' through a .keras file: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
                              hint="give its class a get_config() (Keras's serialization), or change it in "
                                   "place: decompose(..., inplace=True)") from None
        return load_model(path)
