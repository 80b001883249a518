"""decompose() reaches layers at any depth (keras_hub blocks, MultiHeadAttention,
Sequential, subclassed models); the result saves, loads in a fresh process, folds
and exports.  References are the original Keras model's outputs and numpy SVDs."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import keras_decomp
from keras_decomp import DecompError, decompose
from keras_decomp.layers import Conv1D, EinsumDense, fold, load_model
from keras_decomp.layers.base import _Decomposed
from keras_decomp.layers.plan import entries_of

keras_hub = pytest.importorskip("keras_hub")
pytestmark = pytest.mark.filterwarnings(  # raised inside Keras when it saves a variable
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
ROOT = Path(__file__).resolve().parents[1]


def encoder_model(dim=16, heads=2, seq=6):
    """A small Functional model around two keras_hub TransformerEncoders, rebuilt from its config."""
    inp = keras.Input((seq, dim))
    x = keras_hub.layers.TransformerEncoder(intermediate_dim=2 * dim, num_heads=heads, name="enc0")(inp)
    x = keras_hub.layers.TransformerEncoder(intermediate_dim=2 * dim, num_heads=heads, name="enc1")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(3, name="head")(x)
    model = keras.Model.from_config(keras.Model(inp, out).get_config())
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def inputs(seq=6, dim=16, batch=4):
    return np.random.default_rng(0).normal(size=(batch, seq, dim)).astype("float32")


def kinds(model):
    return sorted(type(layer).__name__ for layer in model._flatten_layers() if isinstance(layer, _Decomposed))


@pytest.fixture(scope="module")
def encoder():
    return encoder_model()


def test_full_rank_nested_dense_and_einsum_reproduce_outputs(encoder):
    x = inputs()
    reference = np.asarray(encoder(x))
    full = decompose(encoder, {"*self_attention_layer/*": "lowrank(r=16)", "*feedforward*": "lowrank(r=16)"})
    equations = {layer.equation for layer in full._flatten_layers() if isinstance(layer, EinsumDense)}
    assert equations == {"abc,cde->abde", "abcd,cde->abe"}  # query/key/value and output of MHA
    assert kinds(full) == ["Dense"] * 4 + ["EinsumDense"] * 8
    np.testing.assert_allclose(np.asarray(full(x)), reference, atol=1e-5)
    np.testing.assert_allclose(np.asarray(encoder(x)), reference, atol=0)  # the original is untouched


@keras.saving.register_keras_serializable(package="test_nested")
class Block(keras.Model):
    """A subclassed model holding its convolutions in a list, unnamed inside."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.convs = [keras.layers.Conv1D(6, 3, padding="causal"), keras.layers.Conv1D(4, 2, strides=2)]

    def call(self, x):
        return self.convs[1](keras.activations.relu(self.convs[0](x)))


def test_full_rank_nested_conv1d_in_a_subclassed_model(tmp_path):
    model = Block(name="block")
    x = inputs(seq=8, dim=5, batch=3)
    reference = np.asarray(model(x))
    first, second = (conv.name for conv in model.convs)
    # kernel matrices (3 * 5, 6) and (2 * 6, 4): full rank is 6 and 4
    full = decompose(model, {first: "lowrank(r=6)", second: "lowrank(r=4)"}, inplace=True)
    assert kinds(full) == ["Conv1D", "Conv1D"] and full is model
    np.testing.assert_allclose(np.asarray(full(x)), reference, atol=1e-5)
    full.save(tmp_path / "block.keras")
    Block(name="other")(x)  # shifts the automatic names of unnamed layers in this process
    back = load_model(tmp_path / "block.keras")
    assert kinds(back) == ["Conv1D", "Conv1D"]
    np.testing.assert_allclose(np.asarray(back(x)), reference, atol=1e-5)


def test_einsum_layer_matches_keras_for_each_attention_equation():
    rng = np.random.default_rng(0)
    cases = [("abc,cde->abde", (2, 5, 6), (None, 2, 3), "de"), ("abcd,cde->abe", (2, 5, 2, 3), (None, 6), "e"),
             ("...b,bc->...c", (2, 3, 4, 7), (9,), "c")]
    for equation, shape, out, bias in cases:
        plain = keras.layers.EinsumDense(equation, out, bias_axes=bias)
        x = rng.normal(size=shape).astype("float32")
        reference = np.asarray(plain(x))
        ours = EinsumDense(equation, out, W="dense", bias_axes=bias)
        ours.build(shape)
        kernel = np.asarray(plain.kernel, np.float64)
        # the (contracted, free) matrix, built by hand from the equation's letters
        letters = equation.replace("...", "").split("->")[0].split(",")[1]
        free = [i for i, c in enumerate(letters) if c in equation.split("->")[1]]
        contracted = [i for i in range(len(letters)) if i not in free]
        matrix = np.transpose(kernel, contracted + free).reshape(
            int(np.prod([kernel.shape[i] for i in contracted])), -1)
        (variable,) = ours.decomposition_variables.values()
        variable.assign(matrix.astype("float32"))
        ours.bias.assign(np.asarray(plain.bias))
        np.testing.assert_allclose(np.asarray(ours(x)), reference, atol=1e-5)


def test_compressed_nested_model_loads_in_a_fresh_process(encoder, tmp_path):
    small = decompose(encoder, {"enc*/self_attention_layer/*": "lowrank(r=3)", "*feedforward_*_dense": "sss(p=2, d=2)"})
    x = inputs()
    expected = np.asarray(small(x))
    assert np.abs(expected - np.asarray(encoder(x))).max() > 1e-3  # really compressed
    path = tmp_path / "small.keras"
    small.save(path)
    np.save(tmp_path / "x.npy", x)
    # the file holds the factors, not a folded (16, 2, 8) query kernel, and the plan by path
    with zipfile.ZipFile(path) as archive, h5py.File(__import__("io").BytesIO(archive.read("model.weights.h5"))) as f:
        names = []
        f.visit(names.append)
        query = [n for n in names if n.endswith("query_dense/vars/0")]
        assert query and all(f[n].shape in ((16, 3), (3, 16)) for n in query), [f[n].shape for n in query]
    script = ("import numpy as np, sys, keras_decomp\n"
              f"m = keras_decomp.load_model({str(path)!r})\n"
              f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(m(np.load({str(tmp_path / 'x.npy')!r}))))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-6)


JAX_RUN = """
import sys
import numpy as np, keras, keras_decomp
sys.path.insert(0, {tests!r})
from test_nested import encoder_model, inputs, kinds

model, x = encoder_model(dim=8, heads=2, seq=4), inputs(seq=4, dim=8, batch=3)
# query/key/value (8, 2, 4) and output (2, 4, 8) kernels, feed-forward (8, 16) and (16, 8): all rank 8
full = keras_decomp.decompose(model, {{"*self_attention_layer/*": "lowrank(r=8)", "*feedforward*": "lowrank(r=8)",
                                       "head": "lowrank(r=3)"}})
small = keras_decomp.decompose(model, {{"*self_attention_layer/*": "lowrank(r=2)", "*feedforward*": "lowrank(r=2)",
                                        "head": "lowrank(r=1)"}})
small.save({path!r})
back = keras_decomp.load_model({path!r})
np.savez({out!r}, backend=keras.backend.backend(), kinds=kinds(full) + ["|"] + kinds(back), x=x,
         reference=np.asarray(model(x)), full=np.asarray(full(x)), small=np.asarray(small(x)),
         back=np.asarray(back(x)))
"""


def test_nested_decomposition_on_the_jax_backend(tmp_path):
    """Full rank reproduces, a compressed model saves and loads back, under KERAS_BACKEND=jax
    (a subprocess: Keras fixes its backend at import)."""
    script = JAX_RUN.format(tests=str(ROOT / "tests"), path=str(tmp_path / "small.keras"),
                            out=str(tmp_path / "jax.npz"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "jax.npz")
    assert str(got["backend"]) == "jax"
    decomposed = ["Dense"] * 5 + ["EinsumDense"] * 8  # two encoders' MHA and feed-forward, and the head
    assert list(got["kinds"]) == decomposed + ["|"] + decomposed
    np.testing.assert_allclose(got["full"], got["reference"], atol=1e-5)
    assert np.abs(got["small"] - got["reference"]).max() > 1e-3  # really compressed
    np.testing.assert_allclose(got["back"], got["small"], atol=1e-6)


def test_plan_survives_a_second_save(encoder, tmp_path):
    small = decompose(encoder, {"*query": "lowrank(r=2)", "head": "lowrank(r=1)"})
    x = inputs()
    small.save(tmp_path / "a.keras")
    once = load_model(tmp_path / "a.keras")
    once.save(tmp_path / "b.keras")
    twice = load_model(tmp_path / "b.keras")
    assert sorted(entries_of(twice)) == ["enc0/self_attention_layer/query", "enc1/self_attention_layer/query", "head"]
    assert [e["config"]["config"]["W"] for e in entries_of(twice).values()] == \
        [e["config"]["config"]["W"] for e in entries_of(small).values()]
    np.testing.assert_allclose(np.asarray(twice(x)), np.asarray(small(x)), atol=1e-6)


def test_sequential_and_keras_hub_backbone_round_trip(tmp_path):
    seq = keras.Sequential([keras.Input((6, 16)), keras_hub.layers.TransformerEncoder(32, 2), keras.layers.Flatten(),
                            keras.layers.Dense(3)])
    gpt = keras_hub.models.GPT2Backbone(vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16,
                                        intermediate_dim=32, max_sequence_length=8)
    cases = [(seq, {"*attention_layer/key": "lowrank(r=2)"}, inputs()),
             (gpt, {"transformer_layer_*/self_attention/*": "lowrank(r=4)", "*intermediate*": "lowrank(r=4)"},
              {"token_ids": np.arange(16).reshape(2, 8) % 50, "padding_mask": np.ones((2, 8), "int32")})]
    for i, (model, expressions, x) in enumerate(cases):
        small = decompose(model, expressions)
        small.save(tmp_path / f"{i}.keras")
        back = load_model(tmp_path / f"{i}.keras")
        assert kinds(back) == kinds(small) and kinds(small)
        np.testing.assert_allclose(np.asarray(back(x)), np.asarray(small(x)), atol=1e-6)
    assert kinds(small) == ["Dense"] * 2 + ["EinsumDense"] * 8


def test_fold_equals_the_decomposed_model_and_loads_in_plain_keras(encoder, tmp_path):
    small = decompose(encoder, {"*value": "lowrank(r=2)", "*output_dense": "sss(p=2, d=2)", "head": "lowrank(r=2)"})
    plain = fold(small)
    x = inputs()
    assert kinds(plain) == [] and entries_of(plain) == {}
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(small(x)), atol=1e-5)
    plain.save(tmp_path / "plain.keras")
    again = keras.saving.load_model(tmp_path / "plain.keras")
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(small(x)), atol=1e-5)


@pytest.mark.parametrize("mode", ["folded", "factored"])
def test_tflite_export_of_a_nested_model(encoder, tmp_path, mode):
    small = decompose(encoder, {"*feedforward_*_dense": "lowrank(r=4)", "*query": "lowrank(r=2)"})
    report = keras_decomp.export(small, tmp_path / "m.tflite", mode=mode, sample=inputs(batch=3))
    assert len(report["forms"]) == 6 and set(report["forms"].values()) == {mode}
    assert report["max_abs_diff"] < 1e-4


def test_budget_keeps_the_total_and_follows_the_spectra():
    rng = np.random.default_rng(0)
    inp = keras.Input((40,))
    low = keras.layers.Dense(40, name="low")  # a rank-4 kernel: 4 ranks are all it needs
    flat = keras.layers.Dense(40, name="flat")
    model = keras.Model(inp, flat(low(inp)))
    low.kernel.assign(rng.normal(size=(40, 4)) @ rng.normal(size=(4, 40)))
    flat.kernel.assign(rng.normal(size=(40, 40)))
    errors = {}
    small = decompose(model, {"low": "lowrank", "flat": "lowrank"}, budget=0.25, report=errors)
    ranks = {name: small.get_layer(name).W for name in ("low", "flat")}
    assert ranks == {"low": "lowrank(r=4)", "flat": "lowrank(r=6)"}  # not uniform: 5 and 5
    kernel_params = sum(small.get_layer(n).node.num_params for n in ranks)
    assert kernel_params <= 0.25 * 2 * 40 * 40
    sv = np.linalg.svd(np.asarray(flat.kernel, np.float64), compute_uv=False)
    assert errors["flat"] == pytest.approx(np.sqrt(np.sum(sv[6:] ** 2) / np.sum(sv ** 2)), rel=1e-4)


def test_budget_with_a_fitted_structure_stays_within_it(encoder):
    errors = {}
    small = decompose(encoder, {"*feedforward_*_dense": "sss(p=4)"}, budget=0.5, report=errors)
    layers = [small.get_layer("enc0"), small.get_layer("enc1")]
    nodes = [d.node for block in layers for d in (block._feedforward_intermediate_dense, block._feedforward_output_dense)]
    # the smallest, d=1, takes 204 of 512 per layer; the 208 left buy one step, d=2 (+84), for two layers
    assert sorted(node.num_params for node in nodes) == [204, 204, 288, 288]
    assert sum(node.num_params for node in nodes) <= 0.5 * 4 * 16 * 32
    assert len(errors) == 4


@pytest.mark.parametrize("patterns, message", [
    ({"enc0/attention/query": "lowrank(r=2)"}, r"matches no layer of the model\nnearest layer paths: "
                                               r"enc0/self_attention_layer/query"),
    ({"enc0/self_attention_layer": "lowrank(r=2)"}, r"'enc0/self_attention_layer' is a MultiHeadAttention; only "
                                                    r"Dense, EinsumDense, Conv1D and Conv2D"),
    ({"*layer_norm": "lowrank(r=2)"}, r"matches 4 layer\(s\), none of which can be decomposed"),
    ({"*query": "lowrank(r=2)", "enc0/*": "lowrank(r=3)"}, r"matched by '\*query' \(lowrank\(r=2\)\) and by"),
])
def test_pattern_mistakes_are_decomp_errors(encoder, patterns, message):
    with pytest.raises(DecompError, match=message):
        decompose(encoder, patterns)


def test_a_subclass_of_dense_is_refused():
    class Scaled(keras.layers.Dense):
        def call(self, x):
            return 2 * super().call(x)

    model = keras.Sequential([keras.Input((4,)), Scaled(3, name="scaled")])
    with pytest.raises(DecompError, match="layer 'scaled' is a Scaled, a subclass of Dense"):
        decompose(model, {"scaled": "lowrank(r=1)"})


def test_einsum_dense_and_conv1d_in_a_spec():
    model = keras_decomp.build({"input": {"shape": [6, 8]}, "layers": [
        {"EinsumDense": {"equation": "abc,cde->abde", "output_shape": [None, 2, 5], "bias_axes": "de",
                         "W": "lowrank(r=3)", "name": "proj"}},
        {"Reshape": {"target_shape": [6, 10]}},
        {"Conv1D": {"filters": 4, "kernel_size": 3, "W": "lowrank(r=2)", "name": "conv"}},
        {"Flatten": {}}, {"Dense": {"units": 2}}]})
    proj, conv = model.get_layer("proj"), model.get_layer("conv")
    assert (type(proj), type(conv)) == (EinsumDense, Conv1D)
    # proj: (8, 2*5) matrix at rank 3 plus a (2, 5) bias; conv: (3*10, 4) at rank 2 plus 4 biases
    assert proj.count_params() == 3 * (8 + 10) + 10 and conv.count_params() == 2 * (30 + 4) + 4
    assert tuple(model(np.ones((2, 6, 8), "float32")).shape) == (2, 2)


def test_asymmetric_calibration_reaches_nested_layers(encoder):
    """Calibrated (the default, asymmetric: paired inputs from the model being built and from the
    original) on every EinsumDense and Dense of two keras_hub encoders: at full rank the outputs are
    reproduced and every layer's ||X W - Z E|| / ||X W|| is ~0; compressed, the later layers are
    fitted to other targets than under sequential calibration."""
    data = np.random.default_rng(1).normal(size=(64, 6, 16)).astype("float32")
    x = inputs()
    full_rank = {"*self_attention_layer/*": "lowrank(r=16)", "*feedforward*": "lowrank(r=16)"}
    report = {}
    full = decompose(encoder, full_rank, data=data, data_report=report)
    assert len(report) == 12 and max(report.values()) < 1e-4, report  # 4 attention + 2 feed-forward, twice
    np.testing.assert_allclose(np.asarray(full(x)), np.asarray(encoder(x)), atol=1e-4)
    small = {"*self_attention_layer/*": "lowrank(r=3)", "*feedforward*": "lowrank(r=3)"}
    asymmetric = decompose(encoder, small, data=data)
    sequential = decompose(encoder, small, data=data, calibration="sequential")
    last = "enc1/feedforward_output_dense"
    a, s = (_kernel_at(m, last) for m in (asymmetric, sequential))
    assert np.abs(a - s).max() > 1e-3 * np.abs(s).max()


def _kernel_at(model, path):
    from keras_decomp.layers import surgery
    from keras_decomp.layers.plan import entries_of
    from keras_decomp.training.staging import kernel_matrix

    return kernel_matrix(surgery.resolve(model, entries_of(model)[path]["chain"]))
