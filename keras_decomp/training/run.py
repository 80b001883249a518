"""What training a spec needs besides the stages: compiling from the spec's
``train:`` section, its data, and writing the model and report atomically."""

from __future__ import annotations

import json
from pathlib import Path


def compile_model(model, train: dict, learning_rate=None, steps: int = 1000):
    """Compile with a ``train:`` section (optimizer, learning rate or schedule, loss,
    label smoothing, metrics; recipe.py).  ``learning_rate`` overrides the section's;
    ``steps`` is what ``auto`` in a schedule stands for."""
    from . import recipe

    optimizer = recipe.optimizer(train, steps, learning_rate)
    model.compile(optimizer=optimizer, loss=recipe.loss(model, train), metrics=train.get("metrics", ["accuracy"]))
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
