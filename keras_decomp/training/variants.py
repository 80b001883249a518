"""Variants of a spec for sweeps: its ``params:`` symbols and its training settings
(``train.KEY`` paths) set to other values, checked again."""

from __future__ import annotations

import copy
import dataclasses
import difflib

from ..errors import DecompError
from . import recipe
from .specs import TRAIN_KEYS

TRAIN_PREFIX = "train."


def check_train_key(name: str) -> None:
    """``train.KEY`` (or a path into it, ``train.learning_rate.CosineDecay.initial_learning_rate``)
    names a training setting; KEY must be one the spec's train: section takes."""
    first = name[len(TRAIN_PREFIX):].split(".")[0]
    if first not in TRAIN_KEYS:
        near = difflib.get_close_matches(first, TRAIN_KEYS, n=1, cutoff=0.6)
        raise DecompError(f"--param {name}: train: has no setting '{first}'",
                          hint=f"did you mean 'train.{near[0]}'?" if near else "one of: " + ", ".join(TRAIN_KEYS))


def with_setting(spec, setting: dict):
    """``spec`` with the swept values: ``params:`` symbols, and ``train.`` paths set in a copy
    of its train: section (checked again, so a value Keras refuses fails before training).

    >>> from keras_decomp.training.specs import load_spec
    >>> spec = load_spec({"input": {"shape": [4]}, "layers": [{"Dense": {"units": 2}}],
    ...                   "train": {"learning_rate": {"CosineDecay": {"initial_learning_rate": 0.1,
    ...                                                               "decay_steps": "auto"}}}})
    >>> changed = with_setting(spec, {"train.learning_rate.CosineDecay.initial_learning_rate": 0.03})
    >>> changed.train["learning_rate"]["CosineDecay"]
    {'initial_learning_rate': 0.03, 'decay_steps': 'auto'}
    """
    train = copy.deepcopy(spec.train)
    params = dict(spec.params)
    for name, value in setting.items():
        if not name.startswith(TRAIN_PREFIX):
            params[name] = value
            continue
        *path, last = name[len(TRAIN_PREFIX):].split(".")
        place = train
        for part in path:
            if not isinstance(place.get(part), dict):
                raise DecompError(f"--param {name}: the spec's train: section has no mapping at '{part}'")
            place = place[part]
        place[last] = value
    try:
        recipe.check(train, "train")
    except DecompError as err:
        raise DecompError(f"--param {', '.join(setting)}: {err.fact}", hint=err.hint) from None
    return dataclasses.replace(spec, params=params, train=train)
