"""The plan of a decomposed model: which layers, by path, are decomposed and how.

A composite layer (keras_hub's TransformerEncoder, MultiHeadAttention, a
subclassed model) rebuilds its children from its own arguments when it is
loaded, so the ``.keras`` config alone brings plain layers back.  The plan
says what to put in their place: per layer path (as Keras keys nested dtype
policies, ``DTypePolicyMap``), the decomposed layer's config and the chain of
``_layers`` indices that reaches it (used when a path differs after loading,
e.g. an unnamed layer numbered differently in a fresh process).

It travels inside the weights file: the model holds an untracked
``_keras_decomp_plan`` object that Keras's saver visits like any attribute and
that writes the plan (JSON bytes) as its one entry.  So ``model.save`` and
``model.save_weights`` keep it, and ``keras_decomp.load_model`` reads it back
before loading the weights, which then find every factor where it was saved.
"""

from __future__ import annotations

import io
import json
import zipfile

import keras
import numpy as np

from ..errors import DecompError
from . import surgery

ATTRIBUTE = "_keras_decomp_plan"
_ENTRY = ATTRIBUTE + "/vars/plan"
VERSION = 1


class PlanHolder(keras.layers.Layer):
    """Carries the plan through Keras's saver (``save_own_variables``); not a model layer."""

    def __init__(self, entries=None, **kwargs):
        super().__init__(**kwargs)
        self.entries = dict(entries or {})

    def save_own_variables(self, store):
        text = json.dumps({"version": VERSION, "layers": self.entries})
        store["plan"] = np.frombuffer(text.encode(), dtype=np.uint8)

    def load_own_variables(self, store):
        pass  # read before the model is rebuilt (read_plan)


def entries_of(model) -> dict:
    """The model's plan: relative layer path -> {"chain", "kind", "config"} (empty if none)."""
    holder = vars(model).get(ATTRIBUTE)
    return dict(holder.entries) if holder is not None else {}


def record(model, layer, chain, kind: str) -> None:
    """Add ``layer`` (decomposed, in place of a ``kind`` layer at ``chain``) to ``model``'s plan."""
    holder = vars(model).get(ATTRIBUTE)
    if holder is None:
        holder = PlanHolder(name="keras_decomp_plan")
        object.__setattr__(model, ATTRIBUTE, holder)  # untracked: no weights, not in model.layers
    config = keras.saving.serialize_keras_object(layer)
    config.pop("build_config", None)  # built in place by apply(), in its parent's name scope
    holder.entries[surgery.relative_path(model, layer)] = {"chain": list(chain), "kind": kind, "config": config}


def forget(model, path: str | None = None) -> None:
    """Drop one entry (or the whole plan, ``path=None``)."""
    holder = vars(model).get(ATTRIBUTE)
    if holder is None:
        return
    if path is None:
        object.__delattr__(model, ATTRIBUTE)
    else:
        holder.entries.pop(path, None)


def read(path) -> tuple[dict, dict]:
    """(config.json, plan entries) of a ``.keras`` file; no entries for a plain model."""
    import h5py

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        if "model.weights.h5" not in archive.namelist():
            return config, {}
        weights = archive.read("model.weights.h5")
    found = {}
    with h5py.File(io.BytesIO(weights), "r") as store:
        def visit(name, item):
            if isinstance(item, h5py.Dataset) and name.endswith(_ENTRY):
                plan = json.loads(bytes(item[()]).decode())
                if plan.get("version", 0) > VERSION:
                    raise DecompError(f"{path}: the decomposition plan is of a newer keras_decomp (version "
                                      f"{plan['version']})", hint="upgrade keras_decomp to load it")
                found.update(plan["layers"])
        store.visititems(visit)
    return config, found


def apply(model, entries: dict) -> None:
    """Put the decomposed layers of ``entries`` in place in the freshly loaded ``model``."""
    from .convert import kind_of

    found = surgery.walk(model)
    by_path = {}
    for layer, parents, chain in found:
        by_path.setdefault(surgery.relative_path(model, layer), []).append((layer, parents, chain))
    for path, entry in entries.items():
        candidates = by_path.get(path, [])
        if len(candidates) == 1:
            layer, parents, chain = candidates[0]
        else:
            layer = surgery.resolve(model, entry["chain"])
            parents = surgery.parents_of(model, layer) if layer is not None else []
            chain = entry["chain"]
        if layer is None or kind_of(layer) != entry["kind"]:
            raise DecompError(f"the saved plan decomposes the {entry['kind']} layer '{path}', which the loaded "
                              "model does not have", hint="was the model's code changed since it was saved?")
        new = keras.saving.deserialize_keras_object(entry["config"], safe_mode=True)
        if type(layer) is not type(new):  # a Functional's own config may hold it already
            surgery.build_like(new, layer)
            surgery.replace(parents, layer, new)
        record(model, new, chain, entry["kind"])
