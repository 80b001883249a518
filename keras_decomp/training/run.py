"""What training a spec needs besides the stages: compiling from the spec's
``train:`` section, its data, and writing the model and report atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SpecError


def compile_model(model, train: dict, learning_rate: float | None = None):
    """Compile with the spec's ``train:`` section (optimizer, learning_rate, loss)."""
    import keras

    lr = learning_rate if learning_rate is not None else train.get("learning_rate", 1e-3)
    name = train.get("optimizer", "adam")
    try:
        optimizer = keras.optimizers.get({"class_name": name, "config": {"learning_rate": lr}})
    except (ValueError, TypeError) as err:
        raise SpecError(f"train.optimizer: unknown optimizer '{name}' ({err})",
                        hint="e.g. adam, sgd, rmsprop, adamw") from None
    loss = train.get("loss", "sparse_categorical_crossentropy")
    if loss == "sparse_categorical_crossentropy":
        last = model.layers[-1]
        from_logits = train.get("from_logits", getattr(last, "activation", None) is not keras.activations.softmax)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    model.compile(optimizer=optimizer, loss=loss, metrics=train.get("metrics", ["accuracy"]))
    return model


def load_data(spec, source: str | None = None):
    """The spec's data set from ``source`` (default: the spec's, else auto)."""
    from .data import load

    name = spec.data.get("name", "fashion_mnist")
    chosen = source or spec.data.get("source", "auto")
    return load(name, source={"bundled": "bundled", "full": "full"}.get(chosen, chosen))


def write_outputs(model, report: dict, out) -> None:
    """The model as ``model.keras`` and the report as ``report.json`` (atomic writes)."""
    from . import atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.save_model(model, out / "model.keras")
    report = {**report, "model": str(out / "model.keras")}
    atomic.write_text(out / "report.json", json.dumps(report, indent=2))
