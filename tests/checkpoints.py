"""What the resume tests compare: a model's weights and optimizer state, taken from the live
model a resumed run trains on, and the same read from a checkpoint file by Keras alone
(``keras.saving.load_model``, not the package's resume code).

A resume that rebuilt fresh weights, or loaded the weights but started a fresh optimizer
(Adam moments and step count at zero), shows here as a difference.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

import keras_decomp  # noqa: F401 - registers the layer classes that keras.saving.load_model needs


def state_of(model) -> dict[str, np.ndarray]:
    """Every weight (trainable or not) and every optimizer variable (step count, learning rate,
    moments) of ``model``, by path: "weight dense_1/bias", "optimizer iteration" (without the
    optimizer's name, which Keras numbers per process)."""
    state = {f"weight {v.path}": np.array(v) for v in model.weights}
    state.update({f"optimizer {v.path.split('/', 1)[-1]}": np.array(v) for v in model.optimizer.variables})
    return state


def state_in_file(path: Path) -> dict[str, np.ndarray]:
    """``state_of`` the model in the .keras file ``path``, loaded by Keras."""
    return state_of(keras.saving.load_model(path, safe_mode=True))


def save_state(model, path: Path) -> None:
    """Write ``state_of(model)`` to the .npz file ``path`` (for a child process)."""
    state = state_of(model)
    np.savez(path, names=np.array(list(state)), **{f"v{i}": a for i, a in enumerate(state.values())})


def read_state(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {str(name): f[f"v{i}"] for i, name in enumerate(f["names"])}


def assert_same_state(resumed: dict, checkpoint: dict, learning_rate: float, what: str = "") -> dict:
    """The resumed state equals the checkpoint's, variable for variable and bit for bit, except
    the learning rate, which a resume takes from the spec (``learning_rate``). Returns the count
    of what was compared: weights, optimizer moments (slots of a variable), and the step count."""
    missing, extra = sorted(set(checkpoint) - set(resumed)), sorted(set(resumed) - set(checkpoint))
    assert not missing and not extra, f"{what}: the resumed model lacks {missing} and has {extra} in addition"
    counts = {"weights": 0, "slots": 0, "iterations": None}
    for name, value in checkpoint.items():
        if name == "optimizer learning_rate":
            assert resumed[name] == np.float32(learning_rate), (what, name, resumed[name], learning_rate)
            continue
        np.testing.assert_array_equal(resumed[name], value, err_msg=f"{what}: {name}")
        if name.startswith("weight "):
            counts["weights"] += 1
        elif name == "optimizer iteration":
            counts["iterations"] = int(value)
        else:
            counts["slots"] += 1
    return counts


def record_train_starts(monkeypatch) -> list:
    """Record ``(stage, epoch, state_of(model))`` each time a run of ``fit_staged`` comes to a
    stage's training, before it trains (also when the stage has no epoch left): in a resumed
    run, the first record is the model it goes on with, right after the resume."""
    from keras_decomp.training import staging

    records = []
    real = staging._Runner.train_stage

    def train_stage(self, model, stage):
        records.append((stage, self.state.data["epoch"], state_of(model)))
        return real(self, model, stage)
    monkeypatch.setattr(staging._Runner, "train_stage", train_stage)
    return records


def keep_checkpoints(monkeypatch, keep: Path) -> Path:
    """Copy every model file a run commits to its checkpoint into ``keep`` (the run removes
    the older ones), so a test can read the model of any stage and epoch afterwards."""
    import shutil

    from keras_decomp.training import staging

    keep.mkdir(parents=True, exist_ok=True)
    real = staging._State.save

    def save(self, out, model):
        real(self, out, model)
        shutil.copy(out / "checkpoint" / self.data["model"], keep / self.data["model"])
    monkeypatch.setattr(staging._State, "save", save)
    return keep
