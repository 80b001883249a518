"""Model surgery: find layers at any depth by path, swap one for another in place.

Keras holds a sub-layer in several places: the parent's attribute
(``self._query_dense``), lists and dicts the parent keeps, the parent's tracker
(``_layers``, which ``_flatten_layers`` and the weights follow) and, in a
Functional graph (a Functional or Sequential model, a keras_hub backbone), the
nodes that call it.  ``replace`` swaps every one, so the parent's own ``call``
runs the new layer and saving finds it under the same attribute path.  This is
what Keras's ``enable_lora`` and ``quantize`` avoid needing by changing a layer's
own variables; a decomposition changes the layer's class, so it swaps the object.

>>> import keras
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")], name="m")
>>> [relative_path(model, layer) for layer, _, _ in walk(model)]
['d']
"""

from __future__ import annotations

import contextlib
import fnmatch

import keras


def walk(model):
    """(layer, parents, chain) for each layer below ``model``, in tracking order; ``chain``
    holds the indices into ``_layers`` from ``model`` down to the layer."""
    out, seen = [], {}
    queue = [(model, ())]
    while queue:
        parent, chain = queue.pop(0)
        for i, child in enumerate(parent._layers):
            if id(child) in seen:  # a layer shared by two parents
                seen[id(child)][1].append(parent)
                continue
            entry = (child, [parent], chain + (i,))
            seen[id(child)] = entry
            out.append(entry)
            queue.append((child, chain + (i,)))
    return [entry for entry in out if not isinstance(entry[0], keras.layers.InputLayer)]


def relative_path(model, layer) -> str:
    """``layer.path`` without the model's own name in front (a Sequential or subclassed
    model puts it there, a Functional one does not; a reloaded Sequential may not)."""
    path = layer.path or layer.name
    prefix = f"{model.name}/"
    return path[len(prefix):] if path.startswith(prefix) else path


def matches(model, layer, pattern: str) -> bool:
    """A pattern is a layer name, a path or a glob over the path (``*`` crosses ``/``)."""
    path = relative_path(model, layer)
    if pattern in (layer.name, path, layer.path):
        return True
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(layer.path or "", pattern)


def resolve(model, chain):
    """The layer at ``chain`` (indices into ``_layers``) below ``model``, or None."""
    layer = model
    for i in chain:
        children = getattr(layer, "_layers", [])
        if i >= len(children):
            return None
        layer = children[i]
    return layer


def parents_of(model, target) -> list:
    return next((parents for layer, parents, _ in walk(model) if layer is target), [])


def build_like(new, old) -> None:
    """Build ``new`` with ``old``'s input shape, in ``old``'s name scope (same ``path``)."""
    from .convert import input_shape_of

    with contextlib.ExitStack() as stack:
        for part in filter(None, (old.path or "").split("/")[:-1]):
            stack.enter_context(keras.name_scope(part))
        new.build(input_shape_of(old))
    new._path = old.path  # names of unnamed layers may differ in a scope; the path must not


def replace(parents, old, new) -> None:
    """Put ``new`` wherever ``old`` is held by each of ``parents``."""
    # a Sequential runs through the Functional it builds, which holds the layer too
    holders = list(parents) + [p._functional for p in parents if getattr(p, "_functional", None) is not None]
    for parent in holders:
        tracker = getattr(parent, "_tracker", None)
        if tracker is not None and tracker.is_in_store("layers", old):
            tracker.replace_tracked_value("layers", old, new)
        for name, value in list(vars(parent).items()):
            if value is old:
                setattr(parent, name, new)
            elif name != "_tracker":
                _replace_in(value, old, new, depth=2)
        keys = getattr(parent, "_nodes", None)
        if isinstance(keys, set):  # a Functional's node keys hold id(operation)
            prefix = f"{id(old)}_ib-"
            for key in [k for k in keys if isinstance(k, str) and k.startswith(prefix)]:
                keys.discard(key)
                keys.add(f"{id(new)}_ib-{key[len(prefix):]}")
    for node in old._inbound_nodes:
        node.operation = new
        for tensor in node.outputs:
            history = tensor._keras_history
            tensor._keras_history = type(history)(new, *history[1:])
    new._inbound_nodes = old._inbound_nodes
    new._outbound_nodes = old._outbound_nodes


def forget_traces(model) -> None:
    """Drop the model's compiled train/test/predict functions, which still call the old layers."""
    for name in ("train_function", "test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)


def _replace_in(value, old, new, depth):
    if depth == 0:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            if item is old:
                value[i] = new
            else:
                _replace_in(item, old, new, depth - 1)
        if hasattr(value, "_update_snapshot"):
            # TensorFlow's ListWrapper refuses to be saved (a SavedModel, for TFLite) once an element
            # is replaced, here or in the list it wraps, for the sake of restoring checkpoints by
            # position; the position keeps its meaning (the same layer's place), so it may be saved
            value._non_append_mutation = False
            value._external_modification = False
            value._update_snapshot()
    elif isinstance(value, dict):
        for key, item in list(value.items()):
            if item is old:
                value[key] = new
            else:
                _replace_in(item, old, new, depth - 1)
