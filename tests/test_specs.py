"""YAML specs: every file in specs/ builds and takes a training step; the linear DCT spec
learns; `keras-decomp train` writes its model and report; bad specs fail with the file,
line and key path of the culprit and a suggestion, messages pinned."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from keras_decomp.errors import DecompError, SpecError
from keras_decomp.training.builder import build
from keras_decomp.training.specs import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
CASES = [(path, stage) for path in SPECS for stage in sorted({0, load_spec(path).num_stages - 1})]


def test_the_paper_models_are_there():
    names = {path.stem for path in SPECS}
    assert {"linear_dct", "linear_dense", "linear_gaussian", "linear_subsample", "linear_prodsum",
            "lenet", "lenet_conv_sums", "lenet_prodsum", "mlp", "mlp_decomposed", "freq_net"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_says_what_it_is_and_gives_every_stage_its_epochs(path):
    assert path.read_text().startswith("# "), "a spec starts with a comment: what it is, which paper"
    spec = load_spec(path)
    assert spec.name == path.stem
    if spec.num_stages > 1:
        assert len(spec.stages) == spec.num_stages


@pytest.mark.parametrize("path, stage", CASES, ids=lambda c: c.stem if isinstance(c, Path) else f"stage{c}")
def test_spec_builds_and_takes_a_training_step(path, stage):
    from keras_decomp.training.run import compile_model

    spec = load_spec(path)
    model = build(spec, stage=stage)
    compile_model(model, spec.train)
    model.run_eagerly = True  # one step: tracing a tf.function would cost more than the step
    rng = np.random.default_rng(0)
    x = rng.random((2, *spec.input_shape), dtype=np.float32)
    y = np.array([1, 7])
    assert tuple(model(x).shape) == (2, 10)
    before = [np.array(v) for v in model.trainable_variables]
    loss = model.train_on_batch(x, y)[0]
    assert math.isfinite(loss)
    assert any(not np.array_equal(b, np.array(v)) for b, v in zip(before, model.trainable_variables))


def test_linear_dct_beats_70_percent_after_one_epoch(tmp_path):
    from keras_decomp.training.staging import fit_staged

    report = fit_staged(ROOT / "specs" / "linear_dct.yaml", source="bundled", out=tmp_path, epochs=1, verbose=0)
    assert report["data_source"].startswith("bundled subset")
    assert report["test_accuracy"] > 0.70, report["test_accuracy"]


def test_train_command_writes_model_and_report(tmp_path, capsys):
    from keras_decomp.cli.main import main

    out = tmp_path / "run"
    code = main(["train", str(ROOT / "specs" / "linear_dct.yaml"), "--data", "bundled", "--epochs", "1",
                 "--out", str(out), "--quiet"])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    for field in ("test_accuracy", "test_loss", "trainable_params", "layers", "data_source", "seed",
                  "wall_time_s", "model"):
        assert field in report, field
    # the report's figures are the saved model's on the test split, computed here: accuracy by
    # argmax, loss as the mean cross-entropy of the logits (the last layer has no softmax)
    from keras_decomp.layers import load_model
    from keras_decomp.training.data import load
    data = load(source="bundled")
    logits = np.asarray(load_model(out / "model.keras").predict(
        data.x_test.reshape(-1, 28, 28, 1).astype("float32") / 255.0, verbose=0), np.float64)
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    labels = data.y_test.astype(int)
    assert report["test_accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == labels), abs=1e-6)
    assert report["test_loss"] == pytest.approx(-np.mean(log_p[np.arange(len(labels)), labels]), rel=1e-4)
    assert report["test_accuracy"] > 0.5
    assert report["trainable_params"] == 1010 and report["seed"] == 0 and report["wall_time_s"] > 0
    assert report["data_source"].startswith("bundled subset")
    dense = [row for row in report["layers"] if row["expression"] == "DCT2[:k] dense"]
    assert dense and dense[0]["params"] == 1010 and dense[0]["dense_params"] == 7850
    assert Path(report["model"]) == out / "model.keras" and (out / "model.keras").is_file()


def test_train_command_reports_a_bad_spec_and_exits_2(tmp_path, capsys):
    from keras_decomp.cli.main import main

    path = tmp_path / "bad.yaml"
    path.write_text("input: {shape: [784]}\nlayers:\n  - Dens: {units: 10}\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"error: {path}:3 layers[0].Dens: unknown layer class 'Dens'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- bad specs --------------------------------------------------------------------------------
# Each case is a spec file written to tmp_path/specs/bad.yaml: (text, "line key.path", message).
# The error must start with "<file>:<line> <key path>: " and match the message.

GOOD = """\
name: bad
input: {shape: [28, 28, 1]}
params: {k: 20}
layers:
  - Flatten: {}
  - Dense: {units: 10, W: "DCT2[:k] dense"}
"""


def _edit(old, new, text=GOOD):
    assert old in text
    return text.replace(old, new)


BAD = {
    # top level
    "unknown key, suggestion": (_edit("layers:", "layer:"), "4 layer", r"unknown key 'layer'\ndid you mean 'layers'\?"),
    "unknown key, no neighbour": (GOOD + "colour: red\n", "7 colour", r"unknown key 'colour'\nvalid keys: name, "),
    "seed not an integer": (GOOD + "seed: zero\n", "7 seed", r"must be an integer, got str 'zero'"),
    "seed a boolean": (GOOD + "seed: true\n", "7 seed", r"must be an integer, got bool True"),
    "name not a string": (_edit("name: bad", "name: [a, b]"), "1 name", r"must be a string, got list"),
    "params not a mapping": (_edit("params: {k: 20}", "params: [20]"), "3 params", r"must be a mapping, got list"),
    "param not a number": (_edit("{k: 20}", "{k: many}"), "3 params.k", r"a parameter must be a number, got 'many'"),
    # layers
    "missing layers": ("name: bad\ninput: {shape: [4]}\n", "1 layers", r"a spec needs a non-empty list of layers"),
    "layers not a list": ("input: {shape: [4]}\nlayers: {Dense: {units: 2}}\n", "2 layers",
                          r"a spec needs a non-empty list of layers"),
    "layer not a one-key mapping": (_edit("  - Flatten: {}", "  - Flatten"), "5 layers[0]",
                                    r"each layer is a one-key mapping: \{ClassName: \{arguments\}\}"),
    "unknown layer class": (_edit("- Dense:", "- Dens:"), "6 layers[1].Dens",
                            r"unknown layer class 'Dens'\ndid you mean 'Dense'\?"),
    "layer class in the wrong case": (_edit("- Flatten:", "- flatten:"), "5 layers[0].flatten",
                                      r"unknown layer class 'flatten'\ndid you mean 'Flatten'\?"),
    "arguments not a mapping": (_edit("- Flatten: {}", "- Flatten: 3"), "5 layers[0].Flatten",
                                r"the arguments of Flatten must be a mapping, got 3"),
    "unknown layer argument": (_edit("{units: 10,", "{unit: 10,"), "6 layers[1].Dense.unit",
                               r"Dense has no argument 'unit'\ndid you mean 'units'\?"),
    "unknown argument of a plain layer": (_edit("- Flatten: {}", "- Flatten: {data_fromat: channels_last}"),
                                          "5 layers[0].Flatten.data_fromat",
                                          r"Flatten has no argument 'data_fromat'\ndid you mean 'data_format'\?"),
    "bad argument value": (_edit("{units: 10,", "{units: 10, activation: relux,"), "6 layers[1].Dense.activation",
                           r"Keras could not make this layer: Could not interpret activation function identifier: relux"),
    "bad units of a decomposed layer": (_edit("{units: 10,", "{units: ten,"), "6 layers[1].Dense.units",
                                        r"units must be a positive integer, got 'ten'"),
    # found by tests/test_fuzz.py: Keras would try to allocate 12 TiB (ResourceExhaustedError)
    "plain layer too big for memory": ("input: {shape: [784]}\nlayers:\n  - Dense: {units: 4294967296}\n",
                                       "3 layers[0].Dense.units",
                                       r"this Dense layer's kernel would need 3,367,254,360,064 numbers"),
    "plain conv too big for memory": ("input: {shape: [8, 8, 3]}\nlayers:\n"
                                      "  - Conv2D: {filters: 100000000000, kernel_size: 3}\n",
                                      "3 layers[0].Conv2D.filters", r"kernel would need 2,700,000,000,000 numbers"),
    "two layers with one name": (GOOD + "  - Dense: {units: 10, name: out}\n  - Dense: {units: 10, name: out}\n",
                                 "8 layers[3].Dense.name", r"a second layer named 'out'\nlayer names must be unique"),
    "a name taken from another layer": (_edit("- Flatten: {}", "- Flatten: {name: dense_1}"), "6 layers[1].Dense.name",
                                        r"a second layer named 'dense_1'"),
    "W on a layer without a kernel": (_edit("  - Flatten: {}", "  - Flatten: {W: dense}"), "5 layers[0].Flatten.W",
                                      r"only Dense, EinsumDense, Conv1D and Conv2D layers take 'W'"),
    # expressions
    "expression syntax": (_edit('"DCT2[:k] dense"', '"sum(G, n=8"'), "6 layers[1].Dense.W",
                          r"the expression ends too early\n  sum\(G, n=8\n            \^"),
    "expression near-miss": (_edit('"DCT2[:k] dense"', '"DTC2[:k] dense"'), "6 layers[1].Dense.W",
                             r"unknown name 'DTC2'\n  DTC2\[:k\] dense\n  \^\ndid you mean DCT2\?"),
    "expression unbound symbol": (_edit('"DCT2[:k] dense"', '"DCT2[:q] dense"'), "6 layers[1].Dense.W",
                                  r"the symbol 'q' in a slice bound is not bound[\s\S]*params: \{q: \.\.\.\}"),
    "expression not a string": (_edit('"DCT2[:k] dense"', "5"), "6 layers[1].Dense.W",
                                r"an expression must be a string, got int 5"),
    "expression shape": (_edit('"DCT2[:k] dense"', '"DCT2[:1000] dense"'), "6 layers[1].Dense.W",
                         r"the slice \[0:1000\] does not fit 784 columns"),
    "structure argument": (_edit('"DCT2[:k] dense"', '"sum(G, m=8)"'), "6 layers[1].Dense.W",
                           r"sum has no argument 'm'"),
    # stages
    "more stage entries than stages": (GOOD + "stages: [{epochs: 1}, {epochs: 1}]\n", "7 stages",
                                       r"2 stage entries, but the layers have 1 '\|' stage\(s\)"),
    "fewer stage entries than stages": (_edit('"DCT2[:k] dense"', '"sum(G, n=4) | dense"') + "stages: [{epochs: 1}]\n",
                                        "7 stages", r"1 stage entries, but the layers have 2 '\|' stage\(s\)"),
    "stage not a mapping": (GOOD + "stages: [3]\n", "7 stages[0]", r"a stage is a mapping such as \{epochs: 3\}"),
    "unknown stage key": (GOOD + "stages: [{epoch: 3}]\n", "7 stages[0].epoch",
                          r"unknown key 'epoch'\ndid you mean 'epochs'\?"),
    "stage epochs negative": (GOOD + "stages: [{epochs: -1}]\n", "7 stages[0].epochs",
                              r"must be a positive integer, got -1"),
    # input
    "missing input shape": (_edit("input: {shape: [28, 28, 1]}\n", ""), "1 input",
                            r"the spec needs an input shape\nadd: input: \{shape: \[28, 28, 1\]\}"),
    "input shape not positive": (_edit("[28, 28, 1]", "[28, 0, 1]"), "2 input.shape",
                                 r"must be a list of positive integers, got \[28, 0, 1\]"),
    "input key misspelt": (_edit("{shape:", "{shap:"), "2 input.shap",
                           r"input must be a mapping with the one key 'shape'\ndid you mean 'shape'\?"),
    "input shape does not fit": ("input: {shape: [784]}\nlayers:\n  - Conv2D: {filters: 4, kernel_size: 3}\n",
                                 "3 layers[0].Conv2D",
                                 r"does not fit its input of shape \(None, 784\): .*expected min_ndim=4, found ndim=2.*"
                                 r"\ncheck input.shape"),
    # fixed declarations
    "fixed name lowercase": (GOOD + "fixed: {a1: {basis: R}}\n", "7 fixed.a1",
                             r"a fixed matrix name starts with an uppercase letter, got 'a1'"),
    "fixed unknown form": (GOOD + "fixed: {A1: {bases: R}}\n", "7 fixed.A1",
                           r"declare a fixed matrix as \{basis: R\} or \{file: basis.npy\}\ndid you mean 'basis'\?"),
    "fixed unknown basis": (GOOD + "fixed: {A1: {basis: Q}}\n", "7 fixed.A1.basis",
                            r"unknown basis 'Q'\na declared basis is one of G, S, R, D, P"),
    "fixed file outside the spec folder": (GOOD + "fixed: {C: {file: ../outside.npy}}\n", "7 fixed.C.file",
                                           r"the file \.\./outside\.npy lies outside the spec's folder"),
    "fixed file missing": (GOOD + "fixed: {C: {file: missing.npy}}\n", "7 fixed.C.file", r"no such file: .*missing\.npy"),
    "fixed file not a matrix": (GOOD + "fixed: {C: {file: vector.npy}}\n", "7 fixed.C.file",
                                r"vector\.npy holds an array of shape \(5,\), not a matrix"),
    "fixed file not numpy": (GOOD + "fixed: {C: {file: notes.npy}}\n", "7 fixed.C.file",
                             r"notes\.npy is not a \.npy array file"),
    # data and train
    "unknown data key": (GOOD + "data: {nme: fashion_mnist}\n", "7 data.nme", r"unknown key 'nme'\ndid you mean 'name'\?"),
    "unknown data set": (GOOD + "data: {name: fashion_mnst}\n", "7 data.name",
                         r"unknown name 'fashion_mnst'\ndid you mean 'fashion_mnist'\?"),
    "unknown data source": (GOOD + "data: {source: cloud}\n", "7 data.source",
                            r"unknown source 'cloud'\none of: auto, full, tfds, idx, bundled"),
    "unknown train key": (GOOD + "train:\n  batch_size: 32\n  epoch: 3\n", "9 train.epoch",
                          r"unknown key 'epoch'\ndid you mean 'epochs'\?"),
    "train epochs not a number": (GOOD + "train: {epochs: three}\n", "7 train.epochs",
                                  r"must be a positive integer, got 'three'"),
    "learning rate read as text": (GOOD + "train: {learning_rate: 1e-3}\n", "7 train.learning_rate",
                                   r"must be a positive number or a schedule \{ClassName: \{argument: value\}\}, got '1e-3'\n"
                                   r"YAML reads 1e-3 as text: write 1\.0e-3"),
    "unknown optimizer": (GOOD + "train: {optimizer: adamm}\n", "7 train.optimizer",
                          r"unknown optimizer 'adamm'\ndid you mean 'adam'\?"),
    # the YAML itself
    "YAML syntax": ("input: {shape: [4]\nlayers:\n  - Dense: {units: 2}\n", "2", r"not valid YAML: expected ',' or '}'"),
    "not a mapping": ("- Dense: {units: 10}\n", "1", r"a spec must be a mapping of keys, got list"),
    "python tag": ("!!python/object/apply:os.mkdir [PWNED]\n", "1",
                   r"not valid YAML: could not determine a constructor for the tag "
                   r"'tag:yaml\.org,2002:python/object/apply:os\.mkdir'"),
    "python tag inside": (_edit("[28, 28, 1]", "!!python/tuple [28, 28, 1]"), "2",
                          r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python/tuple'"),
    # found by the fuzz suite (tests/test_fuzz.py, RELIABILITY.md): each crashed or lost its line
    "alias into its own anchor": ("input: {shape: [4]}\nlayers: &L\n  - Dense: {units: 2, W: [*L]}\n", "2",
                                  r"not valid YAML: an alias refers to a node that contains it"),
    "aliases expanding a billion-fold": (GOOD + "\n".join(["l0: &l0 [a, a, a, a, a, a, a, a, a]"] + [
        f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]) + "\n", "12",
        r"not valid YAML: its aliases expand it to more than 100,000 values"),
    "YAML nested too deeply": ("input: {shape: [4]}\nlayers: " + "[" * 5000 + "]" * 5000 + "\n", "1",
                               r"not valid YAML: it nests too deeply"),
    "a character YAML refuses": (_edit("params:", "\x00params:"), "3",
                                 r"not valid YAML: unacceptable character #x0000: special characters are not allowed"),
    "bytes that are not UTF-8": (_edit("name: bad", "name: b\udcedad"), "1",
                                 r"not UTF-8 text: byte 0xed at offset 7"),
    "an empty file": ("", "1", r"a spec must be a mapping of keys, got NoneType"),
    "a list where a name is chosen": (GOOD + "data: {name: [fashion_mnist]}\n", "7 data.name",
                                      r"unknown name \['fashion_mnist'\]"),
}


def test_at_least_25_bad_specs():
    assert len(BAD) >= 25


@pytest.mark.parametrize("text, where, message", BAD.values(), ids=BAD.keys())
def test_bad_spec_names_file_line_and_key(tmp_path, text, where, message):
    folder = tmp_path / "specs"
    folder.mkdir()
    np.save(tmp_path / "outside.npy", np.eye(784))
    np.save(folder / "vector.npy", np.ones(5))
    (folder / "notes.npy").write_text("not numpy\n")
    path = folder / "bad.yaml"
    # a lone surrogate (\udced) is written as the byte it stands for: a file that is not UTF-8
    path.write_bytes(text.replace("PWNED", str(tmp_path / "pwned")).encode("utf-8", "surrogateescape"))
    with pytest.raises(DecompError) as caught:
        build(path)
    assert isinstance(caught.value, SpecError)
    line, _, key = where.partition(" ")
    prefix = f"{path}:{line} {key}: " if key else f"{path}:{line}: "
    assert str(caught.value).startswith(prefix), str(caught.value)
    assert re.search(message, str(caught.value)[len(prefix):]), str(caught.value)
    assert not (tmp_path / "pwned").exists()


def test_text_and_dict_specs_are_located_too():
    text = _edit("{units: 10,", "{unit: 10,")
    with pytest.raises(SpecError, match=r"^<spec>:6 layers\[1\]\.Dense\.unit: Dense has no argument 'unit'"):
        build(text)
    with pytest.raises(SpecError, match=r"^<spec> layers\[0\]\.Dense\.unit: Dense has no argument 'unit'"):
        build({"input": {"shape": [4]}, "layers": [{"Dense": {"unit": 2}}]})


def test_a_spec_file_that_does_not_exist(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: no such spec file$"):
        build(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=r"linear_dtc\.yaml: no such spec file\ndid you mean 'linear_dct\.yaml'\?"):
        load_spec(str(ROOT / "specs" / "linear_dtc.yaml"))
    with pytest.raises(SpecError, match=r"a spec must be a mapping of keys, got str\na path must exist"):
        load_spec("specs/linear_dct")
    with pytest.raises(SpecError, match=r"a spec is a YAML path, YAML text or a dict, not int"):
        build(5)


def test_safe_load_constructs_no_python_objects(tmp_path):
    marker = tmp_path / "made"
    with pytest.raises(SpecError, match="could not determine a constructor"):
        load_spec(f"!!python/object/apply:pathlib.Path.mkdir ['{marker}']\n")
    assert not marker.exists()


def test_a_fixed_file_beside_the_spec_builds(tmp_path):
    np.save(tmp_path / "basis.npy", np.random.default_rng(0).standard_normal((784, 10)))
    path = tmp_path / "ok.yaml"
    path.write_text(_edit('"DCT2[:k] dense"', '"C*a"') + "fixed: {C: {file: basis.npy}}\n")
    assert build(path).count_params() == 1 + 10
