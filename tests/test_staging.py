"""Tests of staged training, checkpoints and resume, decompose() and `keras-decomp compress`,
on the bundled Fashion-MNIST subset.

The staged spec is specs/staged_sums.yaml: ``sum(G, n=10) | sum(G, n=50) | dense``, two epochs
per stage. The SIGKILL test runs the real command in a child process that a test-only hook
(HOLD) holds at a chosen point (a batch, or just before or after the rename that commits a
file), so each of its six kills lands where it is meant to, every time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras

import keras_decomp
import numpy as np
import pytest
import yaml

from keras_decomp import DecompError
from keras_decomp.training import staging
from keras_decomp.cli.main import main
from keras_decomp.compression.decompose import decompose
from keras_decomp.training.data import load
from keras_decomp.layers import load_model
from keras_decomp.training.staging import fit_staged

from checkpoints import (assert_same_state, check_handovers, keep_checkpoints, read_state, record_train_starts,
                         state_in_file)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "staged_sums.yaml"
EPOCHS = [(stage, epoch) for stage in range(3) for epoch in range(2)]  # the spec's (stage, epoch)

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:`shuffle=True` was passed:UserWarning")


@pytest.fixture(scope="module")
def data():
    return load(source="bundled")


def small_spec(name="staged_small"):
    """The staged spec on 1000 images: for the tests that look at files, not accuracy."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["name"] = name
    spec["data"] = {"name": "fashion_mnist", "limit": 1000}
    return spec


def epochs_of(report):
    return [(h["stage"], h["epoch"]) for h in report["history"]]


# ---- a whole staged run -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The staged spec trained in full; ``kept`` holds a copy of every model file its
    checkpoint committed (the run itself keeps only the last)."""
    out = tmp_path_factory.mktemp("staged")
    with pytest.MonkeyPatch.context() as monkeypatch:
        kept = keep_checkpoints(monkeypatch, out.with_name(out.name + "-kept"))
        report = fit_staged(SPEC, source="bundled", out=out, verbose=0)
    return report, out, kept


@pytest.mark.slow
def test_handover_keeps_what_was_learned(staged, data):
    report, _, kept = staged
    stages = report["stages"]
    check_handovers(stages, kept, data.x_test, data.y_test, last_epochs=[2, 2, 2])
    assert stages[-1]["accuracy_end"] > stages[0]["accuracy_end"]  # training did go on


@pytest.mark.slow
def test_report_gives_every_stage_and_every_epoch_once(staged):
    report, out, _ = staged
    assert epochs_of(report) == EPOCHS
    # trainable parameters per stage: 10, 50 coefficients or the 784x10 kernel, plus the bias
    assert [s["trainable_params"] for s in report["stages"]] == [20, 60, 7850]
    assert report["trainable_params"] == 7850
    assert report["test_accuracy"] == pytest.approx(report["stages"][-1]["accuracy_end"], abs=1e-6)
    on_disk = json.loads((out / "report.json").read_text())
    assert epochs_of(on_disk) == EPOCHS and on_disk["stages"] == report["stages"]


@pytest.mark.slow
def test_checkpoint_folder_holds_one_model_and_its_state(staged):
    _, out, _ = staged
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == ["model-s2-e2.keras", "state.json"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["epoch"], state["model"]) == (2, 2, "model-s2-e2.keras")


# ---- interruptions ------------------------------------------------------------------------------

HOLD = '''\
"""keras-decomp, held at one point until killed: a test hook.

argv: MARKER POINT STATE COMMAND...; POINT is batch:S.E.B (before batch B of epoch E of stage S,
all 0-based), before:NAME or after:NAME (around the rename that commits the file NAME; the
state.json of stage S, epoch E is named state.json@S.E).  At the point it creates MARKER and
sleeps until killed.  When the run first comes to a stage's training (for a resumed run: the
model it goes on with), the model's weights and optimizer state are written to STATE (.npz).
"""
import json
import sys
import time
from pathlib import Path

import keras

sys.path.insert(0, str(Path.cwd() / "tests"))  # run from the repository's root
from checkpoints import save_state
from keras_decomp.training import atomic, staging
from keras_decomp.cli.main import main

marker, point, state_file, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
kind, _, where = point.partition(":")
train_stage = staging._Runner.train_stage


def dump_then_train(self, model, stage):
    if not Path(state_file).exists():
        save_state(model, Path(state_file))
    return train_stage(self, model, stage)


staging._Runner.train_stage = dump_then_train


def hold():
    open(marker, "w").close()
    time.sleep(600)


if kind == "batch":
    at_stage, at_epoch, at_batch = map(int, where.split("."))

    class Hold(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if (self.epoch, batch) == (at_epoch, at_batch):
                hold()

    original = staging._Runner.callbacks
    staging._Runner.callbacks = lambda self, stage: original(self, stage) + ([Hold()] if stage == at_stage else [])
else:
    real = atomic.replace

    def replace(tmp, path):
        name = Path(path).name
        if name == "state.json":
            state = json.loads(Path(tmp).read_text())
            name += f"@{state['stage']}.{state['epoch']}"
        if kind == "before" and name == where:
            hold()
        real(tmp, path)
        if kind == "after" and name == where:
            hold()

    atomic.replace = replace
sys.exit(main(argv))
'''

# Where the crash-recovery test kills the run, in the order the run gets there, and the
# (stage, epoch) that state.json records then. The spec: 3 stages of 2 epochs of 6 batches.
KILLS = [
    ("batch:0.1.2", (0, 1)),                # training, in the middle of stage 0's second epoch
    ("before:model-s1-e0.keras", (0, 2)),   # hand-over 0 -> 1: its model file written, not renamed
    ("before:state.json@1.1", (1, 0)),      # model-s1-e1.keras renamed in, state.json still at (1, 0)
    ("after:state.json@2.0", (2, 0)),       # hand-over 1 -> 2 committed, the old model not yet removed
    ("batch:2.1.3", (2, 1)),                # training, in the middle of the last epoch
    ("before:model.keras", (2, 2)),         # the final model.keras written, not renamed
]


def command():
    script = Path(sys.executable).with_name("keras-decomp")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "keras_decomp.cli"]


def learning_rate(spec: dict, stage: int) -> float:
    return spec["stages"][stage].get("learning_rate", spec["train"]["learning_rate"])


def check_checkpoint(folder: Path) -> dict:
    """state.json parses and names a model file; every committed model file loads and is finite."""
    state = json.loads((folder / "state.json").read_text())
    assert (folder / state["model"]).is_file()
    committed = sorted(p for p in folder.glob("model-s*-e*.keras"))
    assert folder / state["model"] in committed
    for path in committed:
        assert all_finite(load_model(path)), path
    return state


def all_finite(model) -> bool:
    """Every weight of ``model`` finite (checked here, not by the guard's own helper)."""
    weights = model.get_weights()
    return len(weights) > 0 and all(np.isfinite(w).all() for w in weights)


@pytest.mark.slow
def test_sigkill_at_six_points_then_resume(tmp_path):
    """The train command in a child process, SIGKILLed at each point of KILLS (mid-epoch, during
    a checkpoint's model write, between a model's rename and state.json's, after a commit, during
    the final write), resumed each time: state.json always parses, every checkpoint loads, each
    resume goes on with the weights and optimizer state of the checkpoint that state.json named
    when the process died, and the finished report lists every epoch of every stage once, in
    order, its hand-overs made from the stages' last checkpoints."""
    spec = yaml.safe_load(SPEC.read_text())
    spec.update(name="killed", data={"name": "fashion_mnist", "limit": 300}, train={**spec["train"], "batch_size": 50})
    spec_file, out = tmp_path / "killed.yaml", tmp_path / "run"
    spec_file.write_text(yaml.safe_dump(spec))
    hook = tmp_path / "hold.py"
    hook.write_text(HOLD)
    train = ["train", str(spec_file), "--data", "bundled", "--out", str(out), "--quiet"]
    folder, kept = out / "checkpoint", tmp_path / "kept"
    kept.mkdir()
    compared = []  # the optimizer's step count and moments in each checkpoint a resume went on from
    started = time.monotonic()
    for i, (point, (stage, epoch)) in enumerate(KILLS):
        marker, log_path, resumed = tmp_path / f"held-{i}", tmp_path / f"run-{i}.log", tmp_path / f"resumed-{i}.npz"
        with log_path.open("w") as log:
            child = subprocess.Popen([sys.executable, str(hook), str(marker), point, str(resumed), *train,
                                      *(["--resume"] if i else [])], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 240
                while not marker.exists():
                    assert child.poll() is None, f"{point}: the run ended early:\n{log_path.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, f"{point}: the run did not get there in time"
                    time.sleep(0.1)
                child.send_signal(signal.SIGKILL)
                assert child.wait(timeout=60) == -signal.SIGKILL
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        if i:  # the resume went on with the checkpoint that state.json named at the last kill
            counts = assert_same_state(read_state(resumed), state_in_file(kept / f"committed-{i - 1}.keras"),
                                       learning_rate(spec, KILLS[i - 1][1][0]), what=point)
            compared.append((counts["iterations"], counts["slots"]))
        state = check_checkpoint(folder)
        assert (state["stage"], state["epoch"]) == (stage, epoch), point
        assert epochs_of(state) == EPOCHS[:2 * stage + epoch], point
        assert not (out / "report.json").exists()
        for path in folder.glob("model-s*-e*.keras"):  # the next resume removes them
            shutil.copy(path, kept / path.name)
        shutil.copy(folder / state["model"], kept / f"committed-{i}.keras")
    assert (out / "tmp-model.keras").is_file()  # the last kill left its part behind
    # 6 Adam steps an epoch (none yet after a hand-over); a momentum and a velocity for each of the
    # two trainable variables
    assert compared == [(6, 4), (12, 4), (0, 4), (0, 4), (6, 4)], compared

    resumed = subprocess.run([*command(), *train, "--resume"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    elapsed = time.monotonic() - started
    report = json.loads((out / "report.json").read_text())
    assert epochs_of(report) == EPOCHS  # every (stage, epoch) once, in order
    stages = report["stages"]
    assert all(s["accuracy_end"] is not None for s in stages)
    test = load(source="bundled")
    check_handovers(stages, kept, test.x_test, test.y_test, last_epochs=[2, 2, 2], limit=300)
    # the last resume found the run complete: the model it wrote is the last checkpoint's
    assert_same_state(state_in_file(out / "model.keras"), state_in_file(kept / f"committed-{len(KILLS) - 1}.keras"),
                      learning_rate(spec, 2), what="final")
    assert "stage 2: hand-over error" in resumed.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["model-s2-e2.keras", "state.json"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "model.keras", "report.json"]
    check_checkpoint(folder)
    assert all_finite(load_model(out / "model.keras"))
    print(f"{len(KILLS)} kills, {len(KILLS)} resumes then a finishing one, all complete; {elapsed:.0f} s")


class Interrupted(Exception):
    """Stands for the process dying at this point."""


def interrupt_once(monkeypatch, target, name, when):
    real = getattr(target, name)
    fired = []

    def wrapper(*args, **kwargs):
        if not fired and when(*args, **kwargs):
            fired.append(True)
            raise Interrupted
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapper)
    return fired


@pytest.mark.slow
def test_interrupted_between_stages_resumes(tmp_path, monkeypatch, data):
    """Two deaths between stages: before the hand-over 0 -> 1, and after stage 2's model file
    was written but before state.json pointed at it. Each resume goes on from the last
    recorded epoch with the weights and optimizer state of the model file state.json names
    (read here by Keras); a finished run resumed changes nothing."""
    spec = small_spec()
    out = tmp_path / "run"
    run = dict(source="bundled", out=out, epochs=1, verbose=0)
    state_file = out / "checkpoint" / "state.json"
    kept = keep_checkpoints(monkeypatch, tmp_path / "kept")
    starts = record_train_starts(monkeypatch)

    def resumed_from_checkpoint(committed: dict, stage: int, epoch: int) -> dict:
        """The model the last run went on with is the checkpoint's, weight for weight and
        optimizer slot for slot."""
        assert starts[0][:2] == (stage, epoch)
        counts = assert_same_state(starts[0][2], committed, learning_rate(spec, stage))
        starts.clear()
        return counts

    fired = interrupt_once(monkeypatch, staging, "hand_over", lambda old, new: True)
    with pytest.raises(Interrupted):
        fit_staged(spec, **run)
    assert fired
    state = json.loads(state_file.read_text())
    assert (state["stage"], state["epoch"], epochs_of(state)) == (0, 1, [(0, 0)])
    committed = state_in_file(out / "checkpoint" / state["model"])
    starts.clear()

    fired = interrupt_once(monkeypatch, staging, "_write_json", lambda path, data: data["stage"] == 2)
    with pytest.raises(Interrupted):
        fit_staged(spec, resume=True, **run)
    assert fired
    # 8 Adam steps of 128 of the 1000 images; a momentum and a velocity for both trainable variables
    counts = resumed_from_checkpoint(committed, 0, 1)
    assert (counts["weights"], counts["slots"], counts["iterations"]) == (2, 4, 8)
    state = json.loads(state_file.read_text())
    assert (state["stage"], state["epoch"], epochs_of(state)) == (1, 1, [(0, 0), (1, 0)])
    committed = state_in_file(out / "checkpoint" / state["model"])

    report = fit_staged(spec, resume=True, **run)
    assert resumed_from_checkpoint(committed, 1, 1)["iterations"] == 8
    assert epochs_of(report) == [(0, 0), (1, 0), (2, 0)]
    check_handovers(report["stages"], kept, data.x_test, data.y_test, last_epochs=[1, 1, 1], limit=1000)

    again = fit_staged(spec, resume=True, **run)
    assert resumed_from_checkpoint(state_in_file(kept / "model-s2-e1.keras"), 2, 1)["iterations"] == 8
    assert epochs_of(again) == epochs_of(report)
    assert again["test_accuracy"] == report["test_accuracy"]
    assert again["stages"] == report["stages"]


def test_resume_errors(tmp_path):
    with pytest.raises(DecompError, match=r"^nothing to resume in .*: no checkpoint was written there\n"
                                          r"run without --resume to start$"):
        fit_staged(small_spec(), source="bundled", out=tmp_path / "empty", resume=True, verbose=0)
    folder = tmp_path / "other" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"spec": "mlp", "stage": 0, "epoch": 1, "model": "m.keras"}))
    (folder / "m.keras").write_bytes(b"")
    with pytest.raises(DecompError, match=r"the checkpoint in .* is of spec 'mlp', not 'staged_small'"):
        fit_staged(small_spec(), source="bundled", out=tmp_path / "other", resume=True, verbose=0)
    # the same name, another model (a changed seed here): refused, the checkpoint is not reused
    from keras_decomp.training.staging import fingerprint
    from keras_decomp.training.specs import load_spec
    spec = load_spec(small_spec())
    other = dataclasses.replace(spec, seed=spec.seed + 1)
    (folder / "state.json").write_text(json.dumps({"spec": spec.name, "model_fingerprint": fingerprint(other),
                                                   "stage": 0, "epoch": 1, "model": "m.keras"}))
    with pytest.raises(DecompError, match=r"the spec 'staged_small' describes another model than the one "
                                          r"checkpointed in .*: its seed, input, params"):
        fit_staged(spec, source="bundled", out=tmp_path / "other", resume=True, verbose=0)
    (folder / "m.keras").unlink()
    with pytest.raises(DecompError, match=r"names the model file 'm.keras', which is not there"):
        fit_staged(small_spec(), source="bundled", out=tmp_path / "other", resume=True, verbose=0)


# ---- hand_over ----------------------------------------------------------------------------------

def test_hand_over_copies_other_layers_and_keeps_biases():
    from keras_decomp import build

    spec = {"name": "handover", "input": {"shape": [6, 6, 2]}, "layers": [
        {"Conv2D": {"filters": 4, "kernel_size": 3, "W": "sum(G, n=3) | dense", "activation": "relu"}},
        {"BatchNormalization": {}},
        {"MaxPooling2D": {}},
        {"Flatten": {}},
        {"Dropout": {"rate": 0.5}},
        {"Dense": {"units": 5, "activation": "relu"}},
        {"Dense": {"units": 3, "W": "lowrank(r=2) | lowrank(r=3)"}},
    ]}
    old, new = build(spec, stage=0), build(spec, stage=1)
    rng = np.random.default_rng(0)
    for layer in old.layers:
        layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    x = rng.normal(size=(4, 6, 6, 2)).astype("float32")
    errors = staging.hand_over(old, new)
    assert set(errors) == {"conv2d_0", "dense_6"}
    assert errors["conv2d_0"] < 1e-6 and errors["dense_6"] < 1e-6  # dense and a larger rank: exact
    copied = 0
    for a, b in zip(old.layers, new.layers):
        if a.name in errors:
            np.testing.assert_array_equal(a.bias.numpy(), b.bias.numpy())
            continue
        assert len(a.get_weights()) == len(b.get_weights()), a.name
        for u, v in zip(a.get_weights(), b.get_weights()):  # plain layers: every weight, normalisation statistics too
            np.testing.assert_array_equal(u, v)
            copied += 1
    assert copied == 4 + 2  # BatchNormalization's four, the plain Dense's kernel and bias
    np.testing.assert_allclose(new(x, training=False), old(x, training=False), atol=1e-4)


# ---- decompose ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A small trained CNN: convolution, pooling, dropout, two Dense layers; saved to a file."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(6, 3, activation="relu", name="conv"),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dropout(0.2, name="dropout"),
        keras.layers.Dense(24, activation="relu", name="hidden"),
        keras.layers.Dense(10, name="logits"),
    ], name="cnn")
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    train, _ = data.pipelines(batch_size=64, limit=2000)
    model.fit(train, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "cnn.keras"
    model.save(path)
    return model, path


def images(data, n=64):
    return data.x_test[:n].astype("float32") / 255.0


@pytest.mark.parametrize("layer,expression", [
    ("hidden", "lowrank(r=24)"),  # (288, 24): full rank 24
    ("logits", "lowrank(r=10)"),
    ("conv", "lowrank(r=6)"),  # (3*3*1, 6)
    ("conv2", "lowrank(r=8)"),  # (3*3*6, 8)
])
def test_decompose_at_full_rank_reproduces_the_outputs(trained, data, layer, expression):
    model, _ = trained
    errors = {}
    new = decompose(model, {layer: expression}, report=errors)
    assert errors[layer] < 1e-6
    x = images(data)
    np.testing.assert_allclose(new.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)
    replaced = new.get_layer(layer)
    assert isinstance(replaced, (keras_decomp.layers.Dense, keras_decomp.layers.Conv2D)) and replaced.W == expression
    np.testing.assert_array_equal(replaced.bias.numpy(), model.get_layer(layer).bias.numpy())
    assert new.compiled  # the compile settings carry over, for fine-tuning


def test_decompose_several_layers_and_copy_the_rest(trained, data):
    model, _ = trained
    errors = {}
    new = decompose(model, {"hidden": "lowrank(r=4)", "conv2": "sum(G, n=20)"}, report=errors)
    assert set(errors) == {"hidden", "conv2"}
    # the truncated SVD's error, from the trained kernel
    kernel = model.get_layer("hidden").kernel.numpy().astype(np.float64)
    s = np.linalg.svd(kernel, compute_uv=False)
    assert errors["hidden"] == pytest.approx(np.sqrt(np.sum(s[4:] ** 2)) / np.linalg.norm(kernel), rel=1e-5)
    # sum(G, n=20) of conv2's (3*3*6, 8) kernel: the least-squares combination of the layer's 20
    # Gaussian draws, solved here by numpy in float64
    target = model.get_layer("conv2").kernel.numpy().astype(np.float64).reshape(-1, 8)
    replaced = new.get_layer("conv2")
    (draws,) = replaced._fixed.arrays.values()
    basis = np.asarray(draws, np.float64).reshape(20, -1).T
    coefficients = np.linalg.lstsq(basis, target.ravel(), rcond=None)[0]
    best = basis @ coefficients
    assert errors["conv2"] == pytest.approx(np.linalg.norm(best - target.ravel()) / np.linalg.norm(target), rel=1e-6)
    # the layer's kernel is that combination, in float32 (20 terms: a few 1e-7 of the kernel's scale)
    np.testing.assert_allclose(replaced.materialize(), best.reshape(target.shape), rtol=0,
                               atol=1e-6 * np.max(np.abs(best)))
    for name in ("conv", "logits"):
        for u, v in zip(model.get_layer(name).get_weights(), new.get_layer(name).get_weights()):
            np.testing.assert_array_equal(u, v)
    assert new.count_params() < model.count_params()
    assert np.isfinite(new.predict(images(data), verbose=0)).all()


def test_decompose_errors(trained):
    model, _ = trained
    with pytest.raises(DecompError, match=r"^the pattern 'hiden' matches no layer of the model\n"
                                          r"nearest layer paths: hidden$"):
        decompose(model, {"hiden": "lowrank(r=4)"})
    with pytest.raises(DecompError, match=r"^the pattern 'zzz' matches no layer of the model\n"
                                          r"nearest layer paths: conv, conv2, hidden, logits$"):
        decompose(model, {"zzz": "lowrank(r=4)"})
    with pytest.raises(DecompError, match=r"^layer 'pool' is a MaxPooling2D; only Dense, EinsumDense, Conv1D and "
                                          r"Conv2D layers can be decomposed$"):
        decompose(model, {"pool": "dense"})
    with pytest.raises(DecompError, match=r"layer 'hidden': .*lowrank"):
        decompose(model, {"hidden": "lowrank(r=0)"})


# ---- keras-decomp compress ----------------------------------------------------------------------

def test_compress_command(trained, tmp_path, capsys):
    model, path = trained
    out = tmp_path / "small.keras"
    code = main(["compress", str(path), "--layer", "hidden=lowrank(r=k)", "--layer", "conv2=lowrank(r=8)",
                 "--param", "k=24", "--out", str(out), "--data", "bundled"])
    text = capsys.readouterr().out
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0] == "data: fashion_mnist, bundled subset (5000 train / 1000 test)"
    assert lines[1].split() == ["layer", "expression", "params", "before", "params", "after",
                                "approximation", "error"]
    conv2, hidden = lines[2].split(), lines[3].split()  # in the model's order
    assert conv2[:4] == ["conv2", "lowrank(r=8)", str(3 * 3 * 6 * 8 + 8), str(3 * 3 * 6 * 8 + 8 * 8 + 8)]
    n = model.get_layer("hidden").kernel.shape[0]  # 6 * 6 * 8 after the pooling
    assert hidden[:4] == ["hidden", "lowrank(r=k)", str(n * 24 + 24), str(n * 24 + 24 * 24 + 24)]
    assert float(conv2[4]) < 1e-6 and float(hidden[4]) < 1e-6
    small = load_model(out)
    assert lines[4].split() == ["model", str(model.count_params()), str(small.count_params())]
    before, after = lines[5].removeprefix("test accuracy before fine-tuning: ").split(" -> ")
    expected = model.evaluate(load(source="bundled").pipelines(shuffle=False)[1], verbose=0)[1]
    assert float(before) == pytest.approx(expected, abs=1e-4)
    assert abs(float(after) - float(before)) <= 0.002  # full rank: the same model
    assert lines[6] == f"wrote {out}"
    x = np.random.default_rng(0).random((8, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(small.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-4)


def test_compress_says_when_it_cannot_evaluate(tmp_path, capsys):
    keras.utils.set_random_seed(1)
    flat = keras.Sequential([keras.Input((784,)), keras.layers.Dense(16, name="hidden"),
                             keras.layers.Dense(10, name="logits")])
    path = tmp_path / "flat.keras"
    flat.save(path)
    code = main(["compress", str(path), "--layer", "hidden=sum(G, n=8)", "--out", str(tmp_path / "n.keras"),
                 "--data", "bundled"])
    text = capsys.readouterr().out
    assert code == 0
    assert ("test accuracy: not evaluated (the model takes inputs of shape (784,), fashion_mnist images "
            "are (28, 28, 1))") in text
    code = main(["compress", str(path), "--layer", "hidden=sum(G, n=8)", "--out", str(tmp_path / "n.keras"),
                 "--data", "none"])
    text = capsys.readouterr().out
    assert code == 0 and "data:" not in text and "test accuracy: not evaluated (--data none)" in text


def test_compress_errors(trained, tmp_path, capsys):
    _, path = trained
    out = str(tmp_path / "n.keras")
    assert main(["compress", str(path), "--layer", "hiden=dense", "--out", out, "--data", "none"]) == 2
    assert capsys.readouterr().err == ("error: the pattern 'hiden' matches no layer of the model\n"
                                       "nearest layer paths: hidden\n")
    assert main(["compress", str(tmp_path / "missing.keras"), "--layer", "hidden=dense", "--out", out]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.keras'}: no such model file\n"
    assert main(["compress", str(path), "--layer", "hidden=dense", "--out", str(tmp_path / "n.h5")]) == 2
    assert "the new model is saved as a .keras file" in capsys.readouterr().err
    assert main(["compress", str(path), "--layer", "hidden=dense", "--layer", "hidden=diag", "--out", out]) == 2
    assert capsys.readouterr().err == "error: --layer hidden is given twice\n"
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(path), "--layer", "lowrank(r=4)", "--out", out])
    assert exit_.value.code == 2
    assert 'expected NAME="EXPR"' in capsys.readouterr().err
    assert not os.path.exists(out)
