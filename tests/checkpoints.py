"""What the resume and hand-over tests compare, read independently of the code under test.

Resume: a model's weights and optimizer state, taken from the live model a resumed run trains
on, against the same read from the checkpoint file by Keras alone (``keras.saving.load_model``,
not the package's resume code). A resume that rebuilt fresh weights, or loaded the weights but
started a fresh optimizer (Adam moments and step count at zero), shows as a difference.

Hand-over: the committed model files of the end of a stage and of the start of the next one,
loaded and evaluated here, against the accuracies the run reports.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

import keras_decomp  # registers the layer classes that keras.saving.load_model needs


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


def logits_and_accuracy(path: Path, x: np.ndarray, y: np.ndarray, limit: int | None = None):
    """The model in the file ``path`` on the test images, evaluated here: its logits and the
    share of images whose largest logit is the label."""
    logits = keras_decomp.load_model(path).predict(x[:limit].astype("float32") / 255.0, batch_size=256, verbose=0)
    return logits, float(np.mean(np.argmax(logits, axis=1) == y[:limit]))


def check_handovers(stages, kept: Path, x, y, last_epochs, limit=None) -> None:
    """Each hand-over s -> s+1 against the committed model files: the accuracy the report gives
    before it is that of the file of stage s's last epoch, evaluated here, and the accuracy
    after it that of the file of stage s+1 at epoch 0 (the hand-over's result), which gives the
    same logits: for specs whose hand-overs are exact (nested draws, then dense)."""
    assert [s["stage"] for s in stages] == list(range(len(last_epochs)))
    for s, (previous, current) in enumerate(zip(stages, stages[1:])):
        end, end_accuracy = logits_and_accuracy(kept / f"model-s{s}-e{last_epochs[s]}.keras", x, y, limit)
        start, start_accuracy = logits_and_accuracy(kept / f"model-s{s + 1}-e0.keras", x, y, limit)
        # a count of images over their number, in float32 in Keras: equal up to float32 rounding
        assert current["accuracy_before_handover"] == pytest.approx(end_accuracy, abs=1e-6), s
        assert previous["accuracy_end"] == pytest.approx(end_accuracy, abs=1e-6), s
        assert current["accuracy_after_handover"] == pytest.approx(start_accuracy, abs=1e-6), s
        # float32 logits of sums of 784 products, about 1e-6 relative each: 1e-5 of their scale
        np.testing.assert_allclose(start, end, rtol=0, atol=1e-5 * np.max(np.abs(end)), err_msg=f"hand-over {s}")
        (error,) = current["handover_error"].values()
        assert error < 1e-6  # nested draws, then dense: exact up to float32
