"""Reliability and security (RELIABILITY.md): numerical guards, safe loading of specs, basis
files and models, and a scan of the package source for unsafe calls.

The crash-recovery test (SIGKILL at six points, resumed each time) is in test_staging.py.
"""

from __future__ import annotations

import io
import json
import tokenize
import tracemalloc
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from keras_decomp import DecompError
from keras_decomp.training import staging
from keras_decomp import layers as kd
from keras_decomp.cli.main import main
from keras_decomp.compression.decompose import decompose
from keras_decomp.training.data import Data, load, write_idx
from keras_decomp.errors import ShapeError, SpecError
from keras_decomp.layers import load_model
from keras_decomp.language.parse import parse
from keras_decomp.training.builder import build
from keras_decomp.training.specs import load_spec
from keras_decomp.training.staging import fit_staged

from checkpoints import assert_same_state, record_train_starts, state_in_file

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:`shuffle=True` was passed:UserWarning")


def tiny_spec(name="tiny", **changes):
    """Flatten, a decomposed hidden layer, a staged output layer; 300 images."""
    spec = {"name": name, "seed": 0, "input": {"shape": [28, 28, 1]},
            "layers": [{"Flatten": {}},
                       {"Dense": {"units": 16, "activation": "relu", "W": "lowrank(r=4)"}},
                       {"Dense": {"units": 10, "W": "sum(G, n=10) | dense"}}],
            "data": {"name": "fashion_mnist", "limit": 300},
            "train": {"batch_size": 50, "optimizer": "sgd", "learning_rate": 0.01},
            "stages": [{"epochs": 1}, {"epochs": 2}]}
    spec.update(changes)
    return spec


# ---- numerical guards: data ---------------------------------------------------------------------

def float_data(x_train, x_test):
    y = np.zeros(len(x_train), np.int64)
    return Data("fashion_mnist", "test arrays", x_train, y, x_test, np.zeros(len(x_test), np.int64),
                tuple(str(i) for i in range(10)))


def test_images_with_nan_or_inf_are_refused():
    x = np.random.default_rng(0).random((8, 28, 28, 1)).astype("float32")
    bad = x.copy()
    bad[3, 5, 5, 0], bad[6, 0, 0, 0] = np.nan, np.inf
    with pytest.raises(DecompError, match=r"^fashion_mnist \(test arrays\): x_train holds NaN or infinite values "
                                          r"in 2 image\(s\), the first at index 3\n"):
        float_data(bad, x).pipelines(batch_size=4)
    with pytest.raises(DecompError, match=r"x_test holds NaN or infinite values in 1 image\(s\), the first at index 2"):
        float_data(x, bad[4:]).pipelines(batch_size=4)  # the inf of bad[6]
    float_data(x, x).pipelines(batch_size=4)  # finite floats pass
    float_data(bad, x).pipelines(batch_size=4, limit=3)  # the images a limit leaves out are not looked at


def test_fit_staged_refuses_nan_data_before_training(tmp_path, monkeypatch):
    real = load(source="bundled")
    x = real.x_train[:300].astype("float32")
    x[120] = np.nan
    data = float_data(x, real.x_test[:100].astype("float32"))
    monkeypatch.setattr("keras_decomp.training.run.load_data", lambda spec, source=None: data)
    with pytest.raises(DecompError, match=r"x_train holds NaN or infinite values in 1 image\(s\), the first at "
                                          r"index 120"):
        fit_staged(tiny_spec(), out=tmp_path, verbose=0)
    assert not (tmp_path / "checkpoint").exists()  # nothing trained, nothing saved


def test_train_command_refuses_float_idx_files_with_nan(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "idx"
    folder.mkdir()
    images = np.zeros((20, 28, 28), np.float32)
    images[2, 3, 4] = np.nan
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "t10k-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(20, np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(20, np.uint8))
    monkeypatch.setenv("KERAS_DECOMP_DATA", str(folder))
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec()))
    assert main(["train", str(spec), "--data", "idx", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder}: the train files do not fit together: images float32 (20, 28, 28)")
    assert "expected uint8 images" in err
    assert not (tmp_path / "run" / "checkpoint").exists()


# ---- numerical guards: weights during training --------------------------------------------------

def poisoned_fit(tmp_path, at_batch: int):
    """Fit a two-layer model whose layer 'second' gets NaN weights after batch ``at_batch``
    (10 batches an epoch), with the guard of stage 1; returns the batches that ended."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="first"),
                              keras.layers.Dense(3, name="second")])
    model.compile(optimizer="sgd", loss="mse")
    seen = []

    class Poison(keras.callbacks.Callback):  # stands for a step that overflowed
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)
            if batch == at_batch:
                kernel = self.model.get_layer("second").kernel
                kernel.assign(np.where(np.eye(5, 3) > 0, np.nan, kernel.numpy()))

    x, y = np.ones((40, 6), "float32"), np.zeros((40, 3), "float32")
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[Poison(), staging.finite_guard(1, tmp_path / "ckpt")])
    return seen, model


def test_guard_names_the_layer_whose_weights_went_nan(tmp_path):
    # NaN after the epoch's last step: found by the check at the epoch's end, before its checkpoint
    with pytest.raises(DecompError, match=r"^training diverged \(stage 1, epoch 0, numbered from 0 as in "
                                          r"report\.json\): the weights of layer 'second' became NaN or infinite, "
                                          r"at the end of the epoch; stopped, the checkpoint in .*ckpt "
                                          r"keeps the last good epoch\nlower the learning rate"):
        poisoned_fit(tmp_path, at_batch=9)
    # NaN in the middle: the next step's loss is NaN and its update spreads it to 'first'; the
    # guard stops at that batch and names every layer that is no longer finite
    seen = []
    with pytest.raises(DecompError, match=r"\): the weights of layer 'first' became NaN or infinite \(also "
                                          r"'second'\), the loss became nan at batch 2; stopped"):
        seen, _ = poisoned_fit(tmp_path, at_batch=1)


def test_non_finite_layers():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="a"), keras.layers.Dense(2, name="b")])
    assert staging.non_finite_layers(model) == []
    model.get_layer("b").bias.assign([0.0, -np.inf])
    assert staging.non_finite_layers(model) == ["b"]


@pytest.mark.slow
def test_diverging_stage_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Stage 1 at a learning rate of 1e30 diverges in its first batches: the run stops with the
    layers named, state.json still points at the hand-over checkpoint, which is finite; resumed
    with a sane learning rate, the run goes on from that checkpoint's weights and optimizer
    state (read here by Keras) at the new rate, and finishes."""
    spec = tiny_spec("diverge", stages=[{"epochs": 1}, {"epochs": 2, "learning_rate": 1.0e+30}])
    with pytest.raises(DecompError, match=r"^training diverged \(stage 1, epoch 0, .*\): the weights of layer "
                                          r"'dense_1' became NaN or infinite \(also 'dense_2'\), the loss became "
                                          r"nan at batch \d+; stopped"):
        fit_staged(spec, source="bundled", out=tmp_path, verbose=0)
    folder = tmp_path / "checkpoint"
    state = json.loads((folder / "state.json").read_text())
    assert (state["stage"], state["epoch"], state["model"]) == (1, 0, "model-s1-e0.keras")
    assert sorted(p.name for p in folder.iterdir()) == ["model-s1-e0.keras", "state.json"]
    weights = load_model(folder / state["model"]).get_weights()
    assert len(weights) == 5 and all(np.isfinite(w).all() for w in weights)  # checked here, not by the guard's helper
    assert not (tmp_path / "report.json").exists()

    spec["stages"][1]["learning_rate"] = 0.01
    committed = state_in_file(folder / state["model"])
    assert committed["optimizer learning_rate"] == np.float32(1e30)  # the rate the file was compiled with
    starts = record_train_starts(monkeypatch)
    report = fit_staged(spec, source="bundled", out=tmp_path, resume=True, verbose=0)
    assert [start[:2] for start in starts] == [(1, 0)]
    counts = assert_same_state(starts[0][2], committed, learning_rate=0.01)
    assert counts["weights"] == 5  # the two low-rank factors and bias of dense_1, kernel and bias of dense_2
    assert [(h["stage"], h["epoch"]) for h in report["history"]] == [(0, 0), (1, 0), (1, 1)]
    assert np.isfinite(report["test_loss"])


# ---- numerical guards: approximation targets and fixed bases ------------------------------------

def test_decompose_names_the_layer_with_a_non_finite_kernel():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, name="hidden"),
                              keras.layers.Dense(3, name="logits")])
    kernel = model.get_layer("hidden").kernel.numpy()
    kernel[4, 2] = np.inf
    model.get_layer("hidden").kernel.assign(kernel)
    assert decompose(model, {"logits": "lowrank(r=2)"})  # a finite layer still decomposes
    with pytest.raises(DecompError, match=r"^layer 'hidden': the matrix to approximate has 1 NaN or infinite "
                                          r"entries\ncheck the trained weights"):
        decompose(model, {"hidden": "lowrank(r=2)", "logits": "lowrank(r=2)"})


def test_hand_over_names_the_layer_with_a_non_finite_kernel():
    spec = {"input": {"shape": [6]}, "layers": [{"Dense": {"units": 4, "W": "sum(G, n=3) | dense"}},
                                                 {"Dense": {"units": 2, "W": "diag | dense", "name": "out"}}]}
    old, new = build(spec, stage=0), build(spec, stage=1)
    layer = old.get_layer("out")
    layer.decomposition_variables[next(iter(layer.decomposition_variables))].assign([np.nan, 1.0])
    with pytest.raises(DecompError, match=r"^layer 'out': the matrix to approximate has 4 NaN or infinite entries"):
        staging.hand_over(old, new)  # diag materialised: NaN * 0 is NaN, the whole column


def spec_with_file(folder: Path, file: str) -> Path:
    spec = {"input": {"shape": [6]}, "fixed": {"C": {"file": file}},
            "layers": [{"Dense": {"units": 3, "W": "C*a"}}]}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_basis_file_with_nan_is_refused(tmp_path):
    basis = np.ones((6, 3))
    basis[1, 2] = np.nan
    np.save(tmp_path / "basis.npy", basis)
    path = spec_with_file(tmp_path, "basis.npy")
    with pytest.raises(SpecError, match=rf"^{path}:\d+ fixed\.C\.file: basis\.npy holds 1 NaN or infinite entries\n"
                                        r"a basis must be finite$"):
        build(path)
    # a layer given the file directly (or a saved model whose config names it) names the layer
    with pytest.raises(DecompError, match=r"^layer 'proj': the fixed matrix C \(.*basis\.npy\) holds 1 NaN or "
                                          r"infinite entries"):
        kd.Dense(3, W="C*a", fixed={"C": {"file": str(tmp_path / "basis.npy")}}, name="proj")(np.ones((1, 6)))


def test_an_expression_too_big_for_the_machine_is_refused_before_allocating(monkeypatch):
    monkeypatch.delenv("KERAS_DECOMP_MAX_BYTES", raising=False)  # the machine's own limit
    tracemalloc.start()
    try:
        with pytest.raises(ShapeError, match=r"^this expression would need 1,099,511,627,776 numbers "
                                             r"\(8,192\.0 GiB\), more than this machine allows \([\d,.]+ GiB\)\n"
                                             r"  G\n  \^\nuse fewer or smaller terms"):
            parse("G", 2 ** 20, 2 ** 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2 ** 20  # nothing near the matrix's size was allocated
    with pytest.raises(DecompError, match=r"^layer 'huge': this expression would need 1,099,511,627,776 numbers"):
        kd.Dense(2 ** 20, W="G", name="huge").build((None, 2 ** 20))


# ---- security: basis files ----------------------------------------------------------------------

def test_a_basis_file_outside_the_spec_folder_needs_explicit_allowance(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "specs"
    folder.mkdir()
    np.save(tmp_path / "outside.npy", np.eye(6, 3))
    path = spec_with_file(folder, "../outside.npy")
    with pytest.raises(SpecError, match=r"fixed\.C\.file: the file \.\./outside\.npy lies outside the spec's folder"
                                        r".*\n.*load_spec\(path, allow_files_outside=True\)"):
        load_spec(path)
    spec = load_spec(path, allow_files_outside=True)
    assert spec.fixed["C"]["file"] == str(tmp_path / "outside.npy")
    model = build(spec)
    np.testing.assert_allclose(model.layers[-1].materialize(), np.eye(6, 3) * model.layers[-1].decomposition_variables["a"].numpy())

    # the train command: refused without the flag, allowed with it (training itself is stubbed out)
    reached = []
    monkeypatch.setattr(staging, "fit_staged", lambda spec, **kw: reached.append(spec) or (_ for _ in ()).throw(
        DecompError("stub reached")))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "lies outside the spec's folder" in capsys.readouterr().err and not reached
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--allow-files-outside"]) == 2
    assert capsys.readouterr().err == "error: stub reached\n"
    assert reached[0].fixed["C"]["file"] == str(tmp_path / "outside.npy")


class _Payload:
    """Unpickling this would create a file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_basis_file_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    objects = np.empty((6, 3), dtype=object)
    objects[:] = _Payload(str(marker))
    np.save(tmp_path / "basis.npy", objects, allow_pickle=True)
    path = spec_with_file(tmp_path, "basis.npy")
    with pytest.raises(SpecError, match=r"fixed\.C\.file: basis\.npy is not a \.npy array file: Array can't be "
                                        r"memory-mapped: Python objects in dtype"):
        build(path)
    with pytest.raises(DecompError, match=r"^layer 'proj': the fixed matrix C \(.*basis\.npy\) is not a \.npy "
                                          r"array file: Object arrays cannot be loaded when allow_pickle=False"):
        kd.Dense(3, W="C*a", fixed={"C": {"file": str(tmp_path / "basis.npy")}}, name="proj")(np.ones((1, 6)))
    assert not marker.exists()


# ---- security: models ---------------------------------------------------------------------------

def test_a_model_with_lambda_bytecode_is_refused(tmp_path, capsys):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                              keras.layers.Lambda(lambda x: x * 2.0)])  # saved as marshalled bytecode
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(DecompError, match=r"lambda\.keras: refused: the model file holds Python code \(e\.g\. the "
                                          r"bytecode of a Lambda layer\).*safe mode only\nrebuild the model"):
        load_model(path)
    with pytest.raises(DecompError, match=r"^keras_decomp\.load_model loads in Keras's safe mode only"):
        load_model(path, safe_mode=False)
    out = tmp_path / "new.keras"
    assert main(["compress", str(path), "--layer", "hidden=lowrank(r=2)", "--out", str(out), "--data", "none"]) == 2
    assert "refused: the model file holds Python code" in capsys.readouterr().err
    assert not out.exists()


# ---- security: the package source ---------------------------------------------------------------

_SKIP = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
_SAFE_LOADERS = ("SafeLoader", "CSafeLoader")


def unsafe_calls(source: str) -> list[str]:
    """The unsafe calls in Python ``source``, as "line: what"; comments, docstrings and other
    strings do not count (the source is read as tokens, not as text)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in _SKIP]
    text = [t.string for t in tokens] + ["", "", ""]
    found = []
    for i, token in enumerate(tokens):
        if token.type != tokenize.NAME:
            continue
        word, previous, line = token.string, text[i - 1] if i else "", token.start[0]
        if word in ("eval", "exec") and text[i + 1] == "(" and previous != ".":
            found.append(f"{line}: {word}(")
        elif word == "pickle" and text[i + 1] == "." and text[i + 2] in ("load", "loads", "Unpickler"):
            found.append(f"{line}: pickle.{text[i + 2]}")
        elif word == "yaml" and text[i + 1] == "." and text[i + 2] in ("unsafe_load", "full_load", "unsafe_load_all",
                                                                     "full_load_all"):
            found.append(f"{line}: yaml.{text[i + 2]}")
        elif word == "yaml" and text[i + 1] == "." and text[i + 2] in ("load", "load_all") and text[i + 3] == "(":
            depth, j = 0, i + 3
            while j < len(tokens):  # the call's own tokens, up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            if not any(text[k] in _SAFE_LOADERS for k in range(i + 3, j)):
                found.append(f"{line}: yaml.{text[i + 2]} without SafeLoader")
        elif word in ("allow_pickle", "safe_mode") and text[i + 1] == "=" and \
                text[i + 2] == ("True" if word == "allow_pickle" else "False"):
            found.append(f"{line}: {word}={text[i + 2]}")
    return found


def test_the_source_scan_finds_unsafe_calls_and_ignores_comments_and_strings():
    unsafe = '''import pickle, yaml, numpy as np, keras
x = eval("1 + 1")
exec(code)
obj = pickle.load(open(p, "rb"))
data = yaml.load(text)
more = yaml.load(text, Loader=yaml.Loader)
also = yaml.unsafe_load(text)
a = np.load(p, allow_pickle=True)
m = keras.saving.load_model(p, safe_mode=False)
'''
    assert unsafe_calls(unsafe) == ["2: eval(", "3: exec(", "4: pickle.load", "5: yaml.load without SafeLoader",
                                    "6: yaml.load without SafeLoader", "7: yaml.unsafe_load",
                                    "8: allow_pickle=True", "9: safe_mode=False"]
    safe = '''"""Never eval( or exec( text; no pickle.load, no yaml.load(x), no allow_pickle=True."""
# safe_mode=False would run a Lambda's bytecode; eval(...) too
data = yaml.load(text, Loader=yaml.SafeLoader)
data = yaml.safe_load(text)
a = np.load(p, allow_pickle=False)
m = keras.saving.load_model(p, safe_mode=True)
score = model.evaluate(x)
message = f"do not call eval(x) or set safe_mode=False"
'''
    assert unsafe_calls(safe) == []


def test_the_package_source_has_no_unsafe_calls():
    files = sorted(p for folder in ("keras_decomp", "scripts", "benchmarks") for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 30 and ROOT / "keras_decomp" / "training" / "specs.py" in files
    found = {str(p.relative_to(ROOT)): unsafe_calls(p.read_text()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
