"""Training recipes in specs: schedules, AdamW, label smoothing, EMA, callbacks, a
validation split, per-stage overrides, augmentation layers, and resume mid-schedule."""

import math

import keras
import numpy as np
import pytest

from keras_decomp.errors import SpecError
from keras_decomp.training import recipe
from keras_decomp.training.builder import build
from keras_decomp.training.specs import load_spec

BASE = """\
name: recipe
input: {shape: [28, 28, 1]}
layers:
  - Flatten: {}
  - Dense: {units: 10, W: "lowrank(r=4)"}
data: {name: fashion_mnist, limit: 256}
"""


def spec_with(extra: str):
    return load_spec(BASE + extra)


# ---- each key builds the right Keras object -------------------------------------------

def test_optimizer_by_class_and_arguments():
    opt = recipe.optimizer({"optimizer": {"AdamW": {"weight_decay": 1e-4, "beta_2": 0.99}},
                            "learning_rate": 3e-3}, steps=10)
    assert type(opt) is keras.optimizers.AdamW
    assert (opt.weight_decay, opt.beta_2, float(opt.learning_rate)) == pytest.approx((1e-4, 0.99, 3e-3))


def test_optimizer_by_name_in_either_case():
    assert type(recipe.optimizer({"optimizer": "sgd"}, 10)) is keras.optimizers.SGD
    assert type(recipe.optimizer({"optimizer": "RMSprop"}, 10)) is keras.optimizers.RMSprop


def test_cosine_schedule_with_auto_steps_follows_the_closed_form():
    settings = {"learning_rate": {"CosineDecay": {"initial_learning_rate": 0.02, "decay_steps": "auto",
                                                  "alpha": 0.1}}}
    schedule = recipe.optimizer(settings, steps=80)._learning_rate
    assert schedule.decay_steps == 80
    for step in (0, 20, 40, 79, 80, 120):
        t = min(step, 80) / 80
        expected = 0.02 * ((1 - 0.1) * 0.5 * (1 + math.cos(math.pi * t)) + 0.1)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step


def test_auto_leaves_room_for_the_warm_up():
    settings = {"learning_rate": {"CosineDecay": {"initial_learning_rate": 0.0, "warmup_target": 0.01,
                                                  "warmup_steps": 20, "decay_steps": "auto"}}}
    schedule = recipe.optimizer(settings, steps=100)._learning_rate
    assert schedule.decay_steps == 80  # warm-up and decay end together, with the stage
    assert float(schedule(10)) == pytest.approx(0.005, rel=1e-6)  # half-way up the linear warm-up
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_use_ema_turns_on_the_optimizers_average():
    assert recipe.optimizer({"use_ema": True}, 10).use_ema is True
    assert recipe.optimizer({}, 10).use_ema is False


def test_callbacks_are_built_with_their_arguments():
    made = recipe.callbacks({"callbacks": [{"EarlyStopping": {"monitor": "loss", "patience": 2}},
                                           {"ReduceLROnPlateau": {"factor": 0.5}}, "TerminateOnNaN"]})
    assert [type(c).__name__ for c in made] == ["EarlyStopping", "ReduceLROnPlateau", "TerminateOnNaN"]
    assert (made[0].monitor, made[0].patience, made[1].factor) == ("loss", 2, 0.5)


def test_label_smoothing_matches_hand_computed_cross_entropy():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], dtype=np.float32)
    labels = np.array([0, 1])
    eps = 0.2
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    target = (1 - eps) * np.eye(3)[labels] + eps / 3
    expected = float(np.mean(-(target * log_softmax).sum(axis=1)))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])  # ends without softmax: logits
    loss = recipe.loss(model, {"label_smoothing": eps})
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-6)
    plain = recipe.loss(model, {})
    assert float(plain(labels, logits)) == pytest.approx(float(np.mean(-log_softmax[[0, 1], labels])), rel=1e-6)


def test_a_smoothed_loss_survives_a_save(tmp_path):
    from keras_decomp.training.run import compile_model
    model = build(spec_with("train: {label_smoothing: 0.1}\n"))
    compile_model(model, {"label_smoothing": 0.1})
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.loss).__name__ == "SmoothedSparseCrossentropy" and loaded.loss.smoothing == 0.1


# ---- bad keys and values: located errors with suggestions -----------------------------

BAD = [
    ("train: {optimizer: {AdamX: {}}}", r"recipe\.yaml|<text>",
     r"train\.optimizer: unknown optimizer 'AdamX'", r"did you mean 'Adam'"),
    ("train: {optimizer: {AdamW: {weight_decy: 0.1}}}", None,
     r"train\.optimizer\.AdamW\.weight_decy: AdamW has no argument 'weight_decy'", r"did you mean 'weight_decay'"),
    ("train: {learning_rate: {CosineDecay: {initial_learning_rate: 0.1, decay_step: auto}}}", None,
     r"train\.learning_rate\.CosineDecay\.decay_step: CosineDecay has no argument 'decay_step'",
     r"did you mean 'decay_steps'"),
    ("train: {learning_rate: {CosinDecay: {}}}", None, r"train\.learning_rate: unknown learning rate 'CosinDecay'",
     r"did you mean 'CosineDecay'"),
    ("train: {optimizer: {Adam: {learning_rate: 0.1}}}", None,
     r"train\.optimizer: give the learning rate as train\.learning_rate", None),
    ("train: {label_smoothing: 1.5}", None, r"train\.label_smoothing: must be a number in \[0, 1\), got 1\.5", None),
    ("train: {use_ema: 1}", None, r"train\.use_ema: must be true or false, got 1", None),
    ("train: {callbacks: [{ModelCheckpoint: {filepath: x}}]}", None,
     r"train\.callbacks\[0\]: 'ModelCheckpoint' is not a callback a spec may name", None),
    ("train: {callbacks: [{EarlyStoping: {}}]}", None, r"not a callback a spec may name",
     r"did you mean 'EarlyStopping'"),
    ("train: {callbacks: [{EarlyStopping: {patience: 2}}]}", None,
     r"train\.callbacks: a callback watches a validation metric, but the spec has no validation split",
     r"data\.validation"),
    ("train: {learning_rate: {CosineDecay: {initial_learning_rate: 0.1, decay_steps: auto}},\n"
     "        callbacks: [{ReduceLROnPlateau: {monitor: loss}}]}", None,
     r"ReduceLROnPlateau changes the learning rate, which a schedule", None),
    ("train: {sheduler: 1}", None, r"train\.sheduler: unknown key 'sheduler'", None),
    ("stages: [{optimizer: {Adamm: {}}}]", None, r"stages\[0\]\.optimizer: unknown optimizer 'Adamm'",
     r"did you mean 'Adam'"),
]


@pytest.mark.parametrize("extra, where, message, hint", BAD)
def test_bad_train_settings_are_located(extra, where, message, hint):
    with pytest.raises(SpecError, match=message) as caught:
        spec_with(extra + "\n")
    text = str(caught.value)
    key = "callbacks" if "ReduceLROnPlateau" in extra else extra.split(":")[0]  # the key the error is about
    line = (BASE + extra).count("\n", 0, (BASE + extra).index(key, len(BASE))) + 1
    assert f":{line} " in text, text  # the line of the offending section
    if hint:
        assert caught.value.hint and __import__("re").search(hint, caught.value.hint), caught.value.hint


def test_a_validation_split_allows_callbacks_on_it():
    text = BASE.replace("limit: 256}", "limit: 256, validation: 64}") + \
        "train: {callbacks: [{EarlyStopping: {patience: 2}}]}\n"
    spec = load_spec(text)
    assert spec.data["validation"] == 64 and spec.train["callbacks"][0]["EarlyStopping"]["patience"] == 2


# ---- per-stage overrides, the validation split and resume, on real runs ------------------

STAGED = """\
name: staged_recipe
seed: 3
input: {shape: [28, 28, 1]}
layers:
  - Flatten: {}
  - Dense: {units: 10, W: "lowrank(r=4) | dense"}
data: {name: fashion_mnist, limit: 256, validation: 64}
train: {batch_size: 64, epochs: 2, optimizer: adam,
        learning_rate: {CosineDecay: {initial_learning_rate: 1.0e-2, decay_steps: auto}}}
stages:
  - {epochs: 2}
  - {epochs: 1, optimizer: {SGD: {momentum: 0.5}}, learning_rate: 0.05, label_smoothing: 0.1}
"""


def test_per_stage_overrides_apply_to_their_stage(tmp_path, monkeypatch):
    from keras_decomp.training import run, staging
    compiled = []
    original = run.compile_model

    def recording(model, train, learning_rate=None, steps=1000):
        made = original(model, train, learning_rate, steps)
        compiled.append((type(made.optimizer).__name__, made.optimizer, made.loss, steps))
        return made

    monkeypatch.setattr(run, "compile_model", recording)
    report = staging.fit_staged(load_spec(STAGED), source="bundled", out=tmp_path, verbose=0)
    (name0, opt0, loss0, steps0), (name1, opt1, loss1, steps1) = compiled
    # 64 held out for validation, then the first 256 of the rest in batches of 64: 4 steps per epoch
    assert (name0, steps0) == ("Adam", 4 * 2)
    assert opt0._learning_rate.decay_steps == 8 and type(loss0).__name__ == "SparseCategoricalCrossentropy"
    assert (name1, steps1) == ("SGD", 4 * 1)
    assert float(opt1.learning_rate) == pytest.approx(0.05) and opt1.momentum == 0.5
    assert type(loss1).__name__ == "SmoothedSparseCrossentropy" and loss1.smoothing == 0.1
    assert [h["stage"] for h in report["history"]] == [0, 0, 1]


def test_resume_continues_the_schedule_where_it_stopped(tmp_path, monkeypatch):
    from keras_decomp.training import staging
    spec = load_spec(STAGED.replace('"lowrank(r=4) | dense"', '"lowrank(r=4)"').split("stages:")[0])

    class Interrupt(Exception):
        pass

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:  # the checkpoint of epoch 0 is written: a kill here loses nothing
                raise Interrupt

    original = recipe.callbacks
    monkeypatch.setattr(recipe, "callbacks", lambda settings: [*original(settings), StopAfterFirstEpoch()])
    with pytest.raises(Interrupt):
        staging.fit_staged(spec, source="bundled", out=tmp_path / "cut", verbose=0)
    monkeypatch.setattr(recipe, "callbacks", original)

    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["iterations"] = int(self.model.optimizer.iterations)
            seen["rate"] = float(self.model.optimizer.learning_rate)

    monkeypatch.setattr(recipe, "callbacks", lambda settings: [*original(settings), Spy()])
    staging.fit_staged(spec, source="bundled", out=tmp_path / "cut", resume=True, verbose=0)
    steps = 4  # per epoch; the schedule spans 2 epochs = 8 steps
    assert seen["iterations"] == steps
    assert seen["rate"] == pytest.approx(0.5 * 1e-2 * (1 + math.cos(math.pi * steps / 8)), rel=1e-5)
    final = keras.saving.load_model(tmp_path / "cut" / "model.keras")
    assert int(final.optimizer.iterations) == 2 * steps


# ---- augmentation: training only ---------------------------------------------------------

AUGMENTED = """\
name: augmented
seed: 1
input: {shape: [28, 28, 1]}
layers:
  - RandomTranslation: {height_factor: 0.2, width_factor: 0.2, seed: 5}
  - RandomZoom: {height_factor: 0.2, seed: 6}
  - Flatten: {}
  - Dense: {units: 10, W: "lowrank(r=4)"}
"""


def test_augmentation_changes_training_batches_but_not_inference(tmp_path):
    from keras_decomp import export
    model = build(load_spec(AUGMENTED))
    plain = build(load_spec(AUGMENTED.replace("  - RandomTranslation: {height_factor: 0.2, width_factor: 0.2, "
                                              "seed: 5}\n", "").replace("  - RandomZoom: {height_factor: 0.2, "
                                                                        "seed: 6}\n", "")))
    plain.set_weights(model.get_weights())
    x = np.random.default_rng(0).random((8, 28, 28, 1)).astype("float32")
    trained = np.asarray(model(x, training=True))
    assert np.max(np.abs(trained - np.asarray(plain(x)))) > 1e-3  # the batch was augmented
    np.testing.assert_array_equal(np.asarray(model(x, training=False)), np.asarray(plain(x)))
    np.testing.assert_array_equal(model.predict(x, verbose=0), plain.predict(x, verbose=0))
    with_aug = export(model, tmp_path / "aug.tflite", sample=x)
    without = export(plain, tmp_path / "plain.tflite", sample=x)
    assert with_aug["max_abs_diff"] < 1e-5 and without["max_abs_diff"] < 1e-5
    from ai_edge_litert.interpreter import Interpreter
    outputs = []
    for path in (tmp_path / "aug.tflite", tmp_path / "plain.tflite"):
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.set_tensor(inp["index"], x[:1])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"]))
        ops = {op["op_name"] for op in interpreter._get_ops_details()}
        assert not any("RANDOM" in name for name in ops), ops
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)


# ---- sweeping training settings -----------------------------------------------------------

def test_sweep_sets_a_training_setting_by_path(tmp_path):
    from keras_decomp.cli.sweep import run_sweep
    spec = load_spec(STAGED.split("stages:")[0].replace('"lowrank(r=4) | dense"', '"lowrank(r=4)"')
                     .replace("epochs: 2,", "epochs: 1,"))
    rows = run_sweep(spec, [("train.learning_rate.CosineDecay.initial_learning_rate", (1e-3, 3e-2))],
                     source="bundled", out=tmp_path, reference="none", print_fn=lambda *_: None)
    assert [(r["train.learning_rate.CosineDecay.initial_learning_rate"], r["error"]) for r in rows] == \
        [("0.001", ""), ("0.03", "")]
    # each run trained with its own value: the saved optimizers hold the schedules that were swept
    rates = sorted(keras.saving.load_model(p).optimizer._learning_rate.initial_learning_rate
                   for p in (tmp_path / "runs").glob("*/model.keras"))
    assert rates == pytest.approx([1e-3, 3e-2])


@pytest.mark.parametrize("name, value, message", [
    ("train.label_smoothin", 0.1, r"train: has no setting 'label_smoothin'"),
    ("train.label_smoothing", 2, r"label_smoothing: must be a number in \[0, 1\), got 2"),
    ("train.learning_rate.CosineDecay.initial_learning_rate", 0.1, r"no mapping at 'learning_rate'"),
])
def test_sweep_refuses_bad_training_settings_before_training(tmp_path, name, value, message):
    from keras_decomp.cli.sweep import run_sweep
    from keras_decomp.errors import DecompError
    with pytest.raises(DecompError, match=message):
        run_sweep(spec_with(""), [(name, (value,))], source="bundled", out=tmp_path, reference="none",
                  print_fn=lambda *_: None)
    assert not (tmp_path / "runs").exists()
