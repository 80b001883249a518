"""Export to TFLite and SavedModel, checked with the LiteRT interpreter and TFSMLayer.

Every structure that parses gets a small classifier, Flatten -> Dense(64, W=expr, relu) ->
Dense(10, softmax), freshly initialised (seed 0), exported folded and factored and compared
with Keras on 500 test images of the bundled Fashion-MNIST subset. The outputs compared are the
class probabilities: on the logits (up to about 5 here) the float32 differences between
TensorFlow's and XNNPACK's summation orders reach 7e-6, too close to 1e-5 to hold on every CPU.
A structure whose module is missing is skipped with the parser's reason ("not available in this
version yet"), so the table grows by itself. Quantisation and the command line use classifiers
trained for one epoch. The size tests guard against the converter folding a factored form back
into a dense kernel, and check that ``stored_entries`` predicts the file.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_decomp import DecompError, export, parse
from keras_decomp.cli.main import main
from keras_decomp.training.data import load
from keras_decomp.errors import UnknownNameError
from keras_decomp.export import choose_forms, stored_entries
from keras_decomp.layers import Conv2D, Dense

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 64
KB = 1024

# structure -> an expression for the (784, 64) hidden layer
STRUCTURES = {
    "dense": "dense",
    "diag": "DCT2[:64] diag",
    "lowrank": "lowrank(r=8)",
    "sum": "sum(R, n=16)",
    "sum of products": "(A1*a + B1*b) DCT2[:64]",
    "tile": "tile(lowrank(r=2), n=4)",
    "kron": "kron(DCT2(h=4, w=4), dense)",
    "fixed basis": "DCT2[:100] dense",
    "sss": "sss(p=4, d=4)",
    "sketch": "sketch(k=16, l=2)",
    "sparse": "sparse(q=2, s=8)",
    "butterfly": "P[:64] butterfly()",
    "tri": "tri(k=16)",
    "transpose": "lowrank(r=8)'",  # no apply of its own: factored stores W^T, and says so
}

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:`shuffle=True` was passed:UserWarning")


def available(expression: str, n: int, m: int, params=None):
    """Skip when the expression names a structure whose module is not there yet."""
    try:
        return parse(expression, n, m, params=params).stages[0]
    except UnknownNameError as err:
        if "not available in this version yet" in err.fact:
            pytest.skip(err.fact)
        raise


@pytest.fixture(scope="module")
def data():
    return load(source="bundled")


@pytest.fixture(scope="module")
def images(data):
    """500 test images, the inputs every float export is compared on."""
    return data.x_test[:500].astype("float32") / 255.0


def classifier(expression: str, data=None):
    """Flatten -> Dense(64, W=expr, relu) -> Dense(10, softmax); trained one epoch if ``data``."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              Dense(HIDDEN, W=expression, activation="relu", name="hidden"),
                              keras.layers.Dense(10, activation="softmax", name="head")])
    if data is not None:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      jit_compile=False)
        model.fit(data.x_train.astype("float32") / 255.0, data.y_train, batch_size=128, epochs=1,
                  verbose=0)
    return model


def cached(build):
    cache = {}

    def get(structure):
        if structure not in cache:
            available(STRUCTURES[structure], 784, HIDDEN)
            cache[structure] = build(STRUCTURES[structure])
        return cache[structure]
    return get


@pytest.fixture(scope="module")
def fresh():
    """structure -> its freshly initialised classifier, built on first use."""
    return cached(classifier)


@pytest.fixture(scope="module")
def trained(data):
    """structure -> its classifier trained for one epoch, built on first use."""
    return cached(lambda expression: classifier(expression, data))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


# ---- float export, every structure ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["folded", "factored"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_float_export_matches_keras(structure, mode, fresh, images, folder):
    model = fresh(structure)
    path = folder / f"{structure.replace(' ', '_')}_{mode}.tflite"
    started = time.perf_counter()
    report = export(model, path, mode=mode, sample=images)
    elapsed = time.perf_counter() - started
    assert report["forms"] == {"hidden": mode}
    assert report["max_abs_diff"] <= 1e-5, report
    assert report["top1_agreement"] == 1.0, report
    assert path.stat().st_size == report["bytes"]
    # the median of 200 timed batch-1 calls, in seconds: at least 100 calls took that long or
    # longer, all of them inside export()
    assert 0 < report["latency_s"] <= elapsed / 100, (report["latency_s"], elapsed)
    # and the same order as a median of batch-1 calls timed here (a shared machine: a factor 10)
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images[:1].astype("float32"))
    times = []
    for _ in range(60):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    assert 0.1 < report["latency_s"] / float(np.median(times[10:])) < 10, (report["latency_s"], times)
    if mode == "factored":
        # stored_entries predicts the file: 4 bytes per number kept, plus the ops' overhead
        # (a little under where the converter drops a multiplication by freshly initialised ones)
        numbers = 4 * report["parameters_stored"]
        assert 0.9 * numbers <= report["bytes"] <= 1.2 * numbers + 100 * KB, report


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["dense", "lowrank", "sss"])
def test_dynamic_range_int8_agrees(structure, trained, images, folder):
    model = trained(structure)
    report = export(model, folder / f"{structure.replace(' ', '_')}_dynamic.tflite", quantize="dynamic",
                    sample=images)
    assert report["top1_agreement"] >= 0.99, report


@pytest.mark.slow
def test_full_int8_with_representative_data(trained, data, images, folder):
    model = trained("lowrank")
    calibration = data.x_train[:300].astype("float32") / 255.0
    float_bytes = export(model, folder / "float.tflite", mode="folded", check=False)["bytes"]
    report = export(model, folder / "int8.tflite", mode="folded", quantize="int8",
                    representative_data=calibration, sample=images)
    print(f"full int8: top-1 agreement {report['top1_agreement']:.3f}, {report['bytes']} bytes "
          f"(float {float_bytes})")  # -s shows it
    assert report["top1_agreement"] >= 0.9, report  # a loose bound: the activations are int8 too
    assert report["bytes"] < 0.5 * float_bytes


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["folded", "factored"])
def test_conv2d_export(mode, images, folder):
    # factored: a convolution with the (9, 4) first factor, then 1x1 products on the channels
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)),
                              Conv2D(8, 3, W="G[:4] dense", activation="relu", name="conv"),
                              keras.layers.MaxPooling2D(4), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax", name="head")])
    report = export(model, folder / f"conv_{mode}.tflite", mode=mode, sample=images)
    assert report["max_abs_diff"] <= 1e-5 and report["top1_agreement"] == 1.0, report
    kernel = 9 * 4 + 4 * 8 if mode == "factored" else 9 * 8
    assert report["parameters_stored"] == kernel + 8 + model.layers[-1].count_params()
    assert choose_forms(model, "auto") == {"conv": "factored"}  # 9*4 + 4*8 = 68 numbers < 9*8 = 72


@pytest.mark.parametrize("size", [1, 3])
def test_lowrank_conv2d_is_exported_factored(size, folder):
    # a k x k convolution with u (k*k*16, 3) as its kernel, then v (3, 24) on the channels
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 16)), Conv2D(24, size, W="lowrank(r=3)", name="conv")])
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
    conv = model.get_layer("conv")
    (u,), (v,) = ([np.asarray(w, np.float64) for k, w in conv.decomposition_variables.items() if k.endswith(end)]
                  for end in (".u", ".v"))
    patches = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))  # valid padding, stride 1
    patches = np.moveaxis(patches, 3, -1).reshape(2, 9 - size, 9 - size, -1)  # (kh, kw, cin) order
    np.testing.assert_allclose(np.asarray(model(x)), patches @ u @ v + np.asarray(conv.bias), atol=1e-5)
    report = export(model, folder / f"lowrank_conv{size}.tflite", mode="factored", sample=x[:1])
    assert report["parameters_stored"] == 3 * (size * size * 16 + 24) + 24, report
    assert report["max_abs_diff"] <= 1e-5, report
    folded = export(model, folder / f"lowrank_conv{size}_folded.tflite", mode="folded", check=False)
    assert folded["parameters_stored"] == size * size * 16 * 24 + 24
    assert report["bytes"] < folded["bytes"] - 4 * (folded["parameters_stored"] - report["parameters_stored"]) // 2
    assert choose_forms(model, "auto") == {"conv": "factored"}


# ---- SavedModel ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["folded", "factored"])
@pytest.mark.parametrize("structure", ["lowrank", "fixed basis"])
def test_saved_model_reloads_and_matches(structure, mode, fresh, images, folder):
    model = fresh(structure)
    path = folder / f"saved_{structure.replace(' ', '_')}_{mode}"
    report = export(model, path, format="saved_model", mode=mode, sample=images)
    assert report["max_abs_diff"] <= 1e-5 and report["top1_agreement"] == 1.0, report
    assert report["bytes"] >= 4 * report["parameters_stored"]  # a SavedModel folds nothing
    reloaded = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
    got = np.asarray(reloaded(images))
    np.testing.assert_allclose(got, np.asarray(model(images)), atol=1e-5, rtol=0)


# ---- factored files stay small -------------------------------------------------------------------

@pytest.fixture(scope="module")
def x2048():
    return np.random.default_rng(0).random((4, 2048)).astype("float32")


def layer_2048(expression):
    available(expression, 2048, 2048)
    return keras.Sequential([keras.Input((2048,)), Dense(2048, W=expression, name="big")])


@pytest.mark.slow
@pytest.mark.parametrize("expression", ["lowrank(r=32)", "sss(p=16, d=8)", "sparse(q=2, s=16)", "butterfly()",
                                        "tri(k=32)"])
def test_factored_2048_file_holds_the_factors_not_the_kernel(expression, x2048, folder):
    model = layer_2048(expression)
    report = export(model, folder / f"{expression.split('(')[0]}_2048_factored.tflite", mode="factored",
                    sample=x2048)
    stored = report["parameters_stored"]
    assert stored == model.layers[0].node.num_params + model.layers[0].node.num_fixed + 2048  # + the bias
    assert report["bytes"] <= 1.2 * 4 * stored + 100 * KB, report
    assert report["bytes"] < 0.2 * 4 * 2048 * 2048, report
    assert report["max_abs_diff"] <= 1e-4, report


@pytest.mark.slow
@pytest.mark.parametrize("expression", ["lowrank(r=32)", "sss(p=16, d=8)"])
def test_folded_2048_file_holds_the_dense_kernel(expression, x2048, folder):
    model = layer_2048(expression)
    report = export(model, folder / f"{expression.split('(')[0]}_2048_folded.tflite", mode="folded",
                    sample=x2048)
    assert report["bytes"] >= 4 * 2048 * 2048, report
    assert report["max_abs_diff"] <= 1e-4, report


@pytest.mark.parametrize("expression, n, m, entries", [
    ("lowrank(r=8)", 512, 512, 8192),
    ("lowrank(r=8)'", 512, 512, 512 * 512),             # no apply of its own: W^T is folded
    ("sss(p=4, d=2)", 64, 64, None),                     # its own arrays
    ("sum(G, n=8)", 64, 32, 64 * 32),                    # the draws fold into one matrix
    ("sum(R, n=8)", 64, 32, 8 * (64 + 32) + 8),          # U, V and the coefficients
    ("sum(lowrank(r=2), n=3)", 64, 32, 3 * 2 * 96 + 3),  # draw by draw
    ("tile(lowrank(r=2), n=4)", 64, 32, 4 * 2 * (64 + 8)),
    ("kron(DCT2(h=4, w=4), dense)", 64, 32, 16 * 16 + 4 * 2),
    ("(A1*a + B1*b) DCT[:8]", 64, 8, 2 * 64 * 64 + 2 + 64 * 8),  # two Gaussians kept at batch 1
    ("DCT[:8] dense", 64, 4, 64 * 8 + 8 * 4),
    ("sparse(q=2, s=4)", 64, 32, 2 * (64 + 32) * 4 + 1),  # values and supports, and the scale
    ("butterfly()", 32, 32, 2 * 5 * 32 * 2 + 1),
    ("tri(k=4, h=3)", 20, 10, 20 * 4 + 4 * 3 + 10 * 3),
])
def test_stored_entries(expression, n, m, entries):
    node = available(expression, n, m)
    assert stored_entries(node) == (node.num_params if entries is None else entries)


# ---- auto ----------------------------------------------------------------------------------------

def one_layer(expression, n, m, **params):
    return keras.Sequential([keras.Input((n,)), Dense(m, W=expression, params=params, name="layer")])


@pytest.mark.parametrize("expression, n, m, params, form", [
    ("DCT2[:k] dense", 784, 10, {"k": 100}, "folded"),   # 78400 + 1000 numbers > 7840
    ("lowrank(r=8)", 512, 512, {}, "factored"),          # 8192 < 262144
    ("sss(p=4, d=4)", 256, 256, {}, "factored"),
    ("dense", 64, 64, {}, "folded"),                     # a tie in bytes and FLOPs: plain Dense
    ("lowrank(r=8)'", 512, 512, {}, "folded"),           # factored would store W^T anyway
])
def test_auto_picks_the_form_with_fewer_bytes(expression, n, m, params, form):
    available(expression, n, m, params)
    model = one_layer(expression, n, m, **params)
    assert choose_forms(model, "auto") == {"layer": form}
    assert choose_forms(model, "folded") == {"layer": "folded"}


@pytest.mark.slow
def test_auto_export_reports_its_choices(folder):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), Dense(10, W="DCT2[:k] dense", params={"k": 100}, name="dct"),
                              Dense(512, W="lowrank(r=8)", name="low")])
    report = export(model, folder / "auto.tflite", mode="auto")
    assert report["forms"] == {"dct": "folded", "low": "factored"}
    assert report["parameters_stored"] == (7840 + 10) + (10 * 8 + 8 * 512 + 512)
    assert report["max_abs_diff"] <= 1e-5


# ---- bad arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"format": "onnx"}, r"format must be 'tflite' or 'saved_model', got 'onnx'"),
    ({"mode": "dense"}, r"mode must be one of \('folded', 'factored', 'auto'\), got 'dense'"),
    ({"quantize": "int4"}, r"quantize must be one of \(None, 'dynamic', 'int8'\), got 'int4'"),
    ({"quantize": "int8"}, r"quantize='int8' needs representative_data: a few hundred typical inputs"),
    ({"format": "saved_model", "quantize": "dynamic"}, r"quantization applies to TFLite files only"),
])
def test_bad_arguments(kwargs, message, tmp_path):
    model = one_layer("lowrank(r=2)", 8, 4)
    with pytest.raises(DecompError, match=message):
        export(model, tmp_path / "out.tflite", **kwargs)
    assert not list(tmp_path.iterdir())  # refused before anything is written


# ---- the command line ----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_export_writes_the_file_and_prints_the_report(trained, folder, capsys):
    source = folder / "cli.keras"
    trained("lowrank").save(source)
    out = folder / "cli.tflite"
    assert main(["export", str(source), "--tflite", str(out), "--mode", "factored", "--data", "bundled"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file()
    assert f"tflite -> {out}: {out.stat().st_size:,} bytes" in printed
    assert "forms: hidden=factored" in printed
    assert "top-1 agreement 100.00%" in printed
    assert "test accuracy on 500 images: Keras 0." in printed
    assert "batch-1 latency (median of 200, 1 thread)" in printed


@pytest.mark.parametrize("arguments, message", [
    ([], "error: nothing to export to"),
    (["--tflite", "m.tflite", "--quantize", "int8"], "error: --quantize int8 needs --data"),
    (["--tflite", "m.tflite", "--data", "bundled"],
     "error: --data bundled: the model takes inputs of shape (8,), the data set's images are (28, 28, 1)"),
])
def test_cli_export_refuses(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_layer("lowrank(r=2)", 8, 4).save("m.keras")
    assert main(["export", "m.keras", *arguments]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.slow
def test_train_exports_the_default_spec(tmp_path, capsys):
    spec = ROOT / "specs" / "linear_dct.yaml"
    assert "export: {tflite: {mode: auto, quantize: dynamic}}" in spec.read_text()
    shutil.copy(spec, tmp_path / "linear_dct.yaml")
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "linear_dct.yaml"), "--epochs", "1", "--data", "bundled",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert (out / "model.tflite").is_file()
    report = json.loads((out / "report.json").read_text())
    tflite = report["export"]["tflite"]
    assert tflite["bytes"] == (out / "model.tflite").stat().st_size
    assert tflite["forms"] == {"dense_1": "folded"} and tflite["quantize"] == "dynamic"
    assert tflite["top1_agreement"] >= 0.99
    assert tflite["accuracy"]["images"] == 500 and tflite["accuracy"]["exported"] > 0.6
    tail = printed.rstrip().splitlines()[-6:]  # the run ends with the export report
    assert tail[0] == f"export (tflite; also in {out}/report.json):"
    assert tail[-1].startswith("  batch-1 latency")


# ---- mode="auto", prefer="speed": each layer's two forms exported alone and timed ---------------

def test_prefer_speed_picks_the_measured_faster_form_where_size_disagrees(tmp_path):
    # "big": a 2048 x 2048 rank-2 layer, factored reads 8,192 numbers, folded 4.2 million (16 MiB):
    # factored is the smaller and, by a wide margin, the faster file.  "chain": sss(p=16, d=1) on
    # 32 x 32 keeps fewer numbers than its 1,024-entry kernel, so size picks factored, but its file
    # runs dozens of operators where the folded one runs one small matmul.
    from keras_decomp.export import latency, layer_entries
    model = keras.Sequential([keras.Input((2048,)), Dense(2048, W="lowrank(r=2)", name="big"),
                              Dense(32, W="lowrank(r=32)", name="squeeze"),
                              Dense(32, W="sss(p=16, d=1)", name="chain")])
    chain = model.get_layer("chain")
    assert layer_entries(chain) < 32 * 32
    assert choose_forms(model, "auto") == {"big": "factored", "squeeze": "folded", "chain": "factored"}
    forms = choose_forms(model, "auto", prefer="speed")
    assert forms["big"] == "factored" and forms["chain"] == "folded"
    # the measurement behind the choice, made again independently: the chain alone, both forms
    alone = keras.Sequential([keras.Input(batch_shape=(1, 32)), Dense(32, W="sss(p=16, d=1)")])
    x = np.ones((1, 32), "float32")
    seconds = {}
    for form in ("folded", "factored"):
        path = export(alone, tmp_path / f"{form}.tflite", mode=form, check=False)["path"]
        seconds[form] = latency(path, x, runs=50)
    assert seconds["folded"] < seconds["factored"], seconds


def test_prefer_must_be_size_or_speed():
    model = keras.Sequential([keras.Input((8,)), Dense(8, W="lowrank(r=2)", name="low")])
    with pytest.raises(DecompError, match=r"prefer must be one of \('size', 'speed'\), got 'fast'"):
        choose_forms(model, "auto", prefer="fast")


def test_prefer_in_a_spec_is_checked_and_located():
    from keras_decomp.errors import SpecError
    from keras_decomp.training.specs import load_spec
    base = ("name: p\ninput: {shape: [8]}\nlayers:\n  - Dense: {units: 4, W: \"lowrank(r=2)\"}\n"
            "data: {name: fashion_mnist}\n")
    assert load_spec(base + "export: {tflite: {mode: auto, prefer: speed}}\n").export == {
        "tflite": {"mode": "auto", "prefer": "speed"}}
    with pytest.raises(SpecError, match=r":6 .*export\.tflite\.prefer: must be size or speed, got 'fast'"):
        load_spec(base + "export: {tflite: {mode: auto, prefer: fast}}\n")


def test_cli_export_prefer_speed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_layer("lowrank(r=2)", 8, 4).save("m.keras")
    assert main(["export", "m.keras", "--tflite", "m.tflite", "--prefer", "speed"]) == 0
    assert "forms: " in capsys.readouterr().out and (tmp_path / "m.tflite").is_file()
