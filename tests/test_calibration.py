"""Compression with calibration data: fits in the data norm ||X (W - E)||_F,
sequential calibration through decompose, and distillation fine-tuning.

References are built independently: numpy.linalg.lstsq on X W over the
expression's dense basis, the truncated SVD of X W, Grams of activations
computed with numpy, softmax and cross-entropy written out by hand."""

import math

import numpy as np
import pytest

from keras_decomp import parse
from keras_decomp.errors import DecompError
from keras_decomp.fitting.approximate import approximate, fit
from keras_decomp.fitting.data_norm import Gram, whitening

RNG = np.random.default_rng(7)
N, M = 18, 9
X = (RNG.normal(size=(240, N)) @ RNG.normal(size=(N, N))) * np.linspace(0.2, 2.0, N)
W = RNG.normal(size=(N, M))


def _design(node, X):
    """Columns X E(e_j) for every trainable entry, from the IR's dense form."""
    zero = {k: np.zeros(s) for k, s in node.param_shapes().items()}
    offset = X @ node.to_dense(zero)
    columns = []
    for key, shape in node.param_shapes().items():
        for i in range(math.prod(shape)):
            probe = np.zeros(math.prod(shape))
            probe[i] = 1.0
            columns.append((X @ node.to_dense({**zero, key: probe.reshape(shape)}) - offset).ravel())
    return np.stack(columns, axis=1), offset


LINEAR = ["sum(G, n=6)", "DCT[:5] dense", "P[:7] dense", "sketch(k=2, l=2)", "sum(G, n=3) + sum(R, n=4)",
          "G(seed=3)[:4] dense"]


@pytest.mark.parametrize("expr", LINEAR)
def test_calibrated_least_squares_equals_lstsq_on_XW(expr):
    node = parse(expr, N, M).stages[-1]
    A, offset = _design(node, X)
    theta, *_ = np.linalg.lstsq(A, (X @ W - offset).ravel(), rcond=None)
    best = offset + (A @ theta).reshape(X.shape[0], M)
    values, error = approximate(W, node, gram=X.T @ X, damping=0.0)
    fitted = X @ node.to_dense(values)
    scale = np.linalg.norm(X @ W)
    assert np.linalg.norm(fitted - best) / scale < 1e-8
    assert error == pytest.approx(np.linalg.norm(X @ W - best) / scale, rel=1e-8)


def _tail(M_, r):
    s = np.linalg.svd(M_, compute_uv=False)
    return math.sqrt(np.sum(s[r:] ** 2)) / np.linalg.norm(M_)


@pytest.mark.parametrize("expr, r", [("lowrank(r=3)", 3), ("tri(k=2, h=4)", 2), ("lowrank(r=1)", 1)])
def test_whitened_svd_is_optimal_in_the_data_norm(expr, r):
    # X E with rank(E) <= r ranges over the rank-r matrices in X's column space, and
    # X W lies there: the optimum is the truncated SVD of X W (Eckart-Young).
    result = fit(W, expr, gram=X.T @ X, damping=0.0)
    optimum = _tail(X @ W, r)
    assert result.data_error == pytest.approx(optimum, rel=1e-9)
    E = parse(expr, N, M).stages[-1].to_dense(result.values)
    assert np.linalg.matrix_rank(E, tol=1e-9) <= r
    tries = 0
    for _ in range(200):  # no rank-r matrix near it, or at random, does better
        U, V = RNG.normal(size=(N, r)), RNG.normal(size=(r, M))
        for candidate in (U @ V, E + 1e-3 * (U @ V) / np.linalg.norm(U @ V) * np.linalg.norm(E)):
            if np.linalg.matrix_rank(candidate, tol=1e-9) <= r:
                tries += 1
                assert np.linalg.norm(X @ (W - candidate)) >= np.linalg.norm(X @ (W - E)) * (1 - 1e-12)
    assert tries >= 200


def test_whitened_svd_is_the_plain_svd_when_the_gram_is_the_identity():
    node = parse("lowrank(r=3)", N, M).stages[-1]
    values, _ = approximate(W, node, gram=np.eye(N), damping=0.0)
    U, s, Vt = np.linalg.svd(W)
    expected = (U[:, :3] * s[:3]) @ Vt[:3]
    assert np.abs(node.to_dense(values) - expected).max() < 1e-12 * s[0]


def test_rank_deficient_gram():
    Xd = X.copy()
    Xd[:, :4] = 0.0  # never-active inputs (border pixels)
    Xd[:, 4] = Xd[:, 5]  # duplicated inputs
    gram = Xd.T @ Xd
    assert np.linalg.matrix_rank(gram) == N - 5
    for damping in (0.0, 1e-2):
        R = whitening(gram, damping)
        assert np.all(np.isfinite(R)) and np.linalg.matrix_rank(R) == N
        result = fit(W, "lowrank(r=3)", gram=gram, damping=damping)
        assert all(np.all(np.isfinite(v)) for v in result.values.values())
        # the optimum is still the truncated SVD of X W; damping costs at most a little
        assert result.data_error == pytest.approx(_tail(Xd @ W, 3), rel=1e-5 if damping == 0 else 5e-2)
        assert result.data_error >= _tail(Xd @ W, 3) * (1 - 1e-9)


def test_gram_accumulates_batches_and_refuses_bad_input():
    gram = Gram(N)
    for i in range(0, len(X), 50):
        gram.add(X[i:i + 50])
    assert gram.count == len(X)
    assert np.allclose(gram.matrix, X.T @ X, rtol=1e-12, atol=1e-9)
    with pytest.raises(DecompError, match="inputs have 1 NaN or infinite entries"):
        gram.add(np.where(np.arange(N) == 3, np.nan, 1.0)[None])
    with pytest.raises(DecompError, match=r"the Gram matrix of the inputs is \(3, 3\), expected \(18, 18\)"):
        fit(W, "lowrank(r=2)", gram=np.eye(3))


def test_data_norm_fits_beat_weight_fits_in_the_data_norm():
    # every method family: the data-norm fit may not lose to the weight fit in its own norm
    gram = X.T @ X
    cases = ["sss(p=3, d=2)", "lowrank(r=2) + sum(G, n=3)", "sketch(k=2)", "sparse(q=2, s=3)", "monarch(b=3)"]
    for expr in cases:
        node = parse(expr, N, M).stages[-1]
        weight = fit(W, node)
        data = fit(W, node, gram=gram, damping=0.0)
        E0 = node.to_dense(weight.values)
        weight_fit_data_error = np.linalg.norm(X @ (W - E0)) / np.linalg.norm(X @ W)
        assert data.data_error <= weight_fit_data_error * (1 + 1e-9), expr
        E1 = node.to_dense(data.values)
        assert data.data_error == pytest.approx(np.linalg.norm(X @ (W - E1)) / np.linalg.norm(X @ W), rel=1e-9)
        assert data.weight_error == pytest.approx(np.linalg.norm(W - E1) / np.linalg.norm(W), rel=1e-9)


def test_sss_data_norm_fit_on_uneven_blocks_is_exact_and_its_sweeps_never_lose():
    # 14 x 10 in p=4 stages: blocks (4, 4, 3, 3) x (3, 3, 2, 2), so the stacked stage
    # matrices break into several stacks; the fit reads and writes them stage by stage
    from keras_decomp.fitting.sss import data_norm_sweeps, whitened_hankel
    rng = np.random.default_rng(5)
    node = parse("sss(p=4, d=2)", 14, 10).stages[0]
    assert len(node.param_shapes()) > 7  # more stacks than the 7 letters
    inputs = rng.normal(size=(60, 14)) * np.linspace(0.2, 3.0, 14)
    target = node.to_dense(node.init(rng))  # exactly an SSS of this size: the fit recovers it
    got = node.to_dense(whitened_hankel(target, node, inputs))
    assert np.linalg.norm(inputs @ (target - got)) <= 1e-9 * np.linalg.norm(inputs @ target)
    # on a W that is no SSS, each exact stage solve can only lower the data error
    _, history = data_norm_sweeps(rng.normal(size=(14, 10)), node, inputs, node.init(rng), sweeps=6)
    assert len(history) == 7 and history[-1] < 0.5 * history[0]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:])), history


# ---- Keras side: decompose(data=...), calibration errors, distillation ---------------

def _two_layer_model():
    import keras

    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((N,)), keras.layers.Dense(12, activation="relu", name="a"),
                             keras.layers.Dense(M, name="b")])


def _kernel(layer):
    import keras

    from keras_decomp.training.staging import kernel_matrix

    return kernel_matrix(layer) if hasattr(layer, "node") else keras.ops.convert_to_numpy(layer.kernel)


def test_sequential_calibration_feeds_each_layer_the_compressed_models_activations():
    import keras

    from keras_decomp.compression import calibrate
    from keras_decomp.compression.decompose import decompose

    model = _two_layer_model()
    data = X.astype("float32")
    seen = []  # instrumented: which model and layer each Gram is read from
    original = calibrate.layer_gram

    def spy(source, layer, batches, name=None):
        gram = original(source, layer, batches, name)
        seen.append((source, layer, gram))
        return gram
    calibrate.layer_gram = spy
    try:
        expressions = {"a": "lowrank(r=2)", "b": "lowrank(r=2)"}
        new = decompose(model, expressions, data=data, calibration="sequential", center=False)
        # read in the model being built (its layer a already decomposed), at the copy's layer of that
        # name, before the copy's layer is swapped for the decomposed one
        assert [(s is new, layer.name == n, layer is not model.get_layer(n))
                for (s, layer, _), n in zip(seen, "ab")] == [(True, True, True)] * 2
        seen.clear()
        old = decompose(model, expressions, data=data, calibration="original", center=False)
        assert [(s is model, layer is model.get_layer(n)) for (s, layer, _), n in zip(seen, "ab")] == [(True, True)] * 2
    finally:
        calibrate.layer_gram = original
    f64 = X.astype("float32").astype(np.float64)
    bias = keras.ops.convert_to_numpy(model.get_layer("a").bias)
    compressed_hidden = np.maximum(f64 @ _kernel(new.get_layer("a")) + bias, 0)  # numpy, from the new layer a
    original_hidden = np.maximum(f64 @ _kernel(model.get_layer("a")) + bias, 0)
    W_b = _kernel(model.get_layer("b")).astype(np.float64)
    for built, hidden in ((new, compressed_hidden), (old, original_hidden)):
        node = built.get_layer("b").node
        values, _ = approximate(W_b, node, gram=hidden.T @ hidden)
        expected = node.to_dense(values)
        assert np.abs(_kernel(built.get_layer("b")) - expected).max() < 1e-4 * np.abs(expected).max()
    assert np.abs(_kernel(new.get_layer("b")) - _kernel(old.get_layer("b"))).max() > 1e-3


@pytest.mark.parametrize("bad, message", [
    ("nan", r"layer 'a': calibration batch 1 has 1 NaN or infinite values"),
    ("inf", r"layer 'a': calibration batch 1 has 1 NaN or infinite values"),
    ("shape", r"layer 'a': calibration batch 1 has shape \(30, 17\), the model takes \(batch, 18\)"),
])
def test_bad_calibration_data_names_the_layer_and_the_batch(bad, message):
    from keras_decomp.compression.decompose import decompose

    batches = [X[:30].astype("float32"), X[30:60].astype("float32")]
    if bad == "shape":
        batches[1] = batches[1][:, :17]
    else:
        batches[1] = batches[1].copy()
        batches[1][4, 2] = np.nan if bad == "nan" else np.inf
    with pytest.raises(DecompError, match=message):
        decompose(_two_layer_model(), {"a": "lowrank(r=2)"}, data=iter(batches))


def test_overflowing_activations_name_the_later_layer_and_the_batch():
    from keras_decomp.compression.decompose import decompose

    huge = np.full((4, N), 3e38, "float32")  # finite inputs, infinite activations after layer a
    with pytest.raises(DecompError, match=r"layer 'b': calibration batch 0: the layer's inputs have \d+ NaN"):
        decompose(_two_layer_model(), {"b": "lowrank(r=2)"}, data=huge)


def test_conv2d_calibration_reads_im2col_patches():
    import keras

    from keras_decomp.compression.calibrate import conv_patches, layer_gram

    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, name="c")
    model = keras.Sequential([keras.Input((7, 7, 2)), conv])
    x = RNG.normal(size=(5, 7, 7, 2)).astype("float32")
    kernel = keras.ops.convert_to_numpy(conv.kernel).reshape(-1, 4)
    patches = conv_patches(x, conv)
    out = keras.ops.convert_to_numpy(model(x)).reshape(-1, 4)
    assert np.abs(patches @ kernel - out).max() < 1e-5 * np.abs(out).max()
    # the reference: patches cut by hand, (kh, kw, cin) order, zero padding of 1 ("same", stride 2)
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    rows = [padded[b, i:i + 3, j:j + 3].ravel() for b in range(5) for i in range(0, 7, 2) for j in range(0, 7, 2)]
    hand = np.stack(rows).astype(np.float64)
    assert np.allclose(layer_gram(model, conv, x).matrix, hand.T @ hand, rtol=1e-5, atol=1e-4)


def test_distillation_loss_on_hand_computed_logits():
    from keras_decomp.compression.distill import distillation_loss

    student = np.array([[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]])
    teacher = np.array([[2.0, 0.0, 1.0], [-1.0, 0.5, 0.0]])
    labels = np.array([2, 1])
    T, alpha = 2.5, 0.3

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    p_t, p_s = softmax(teacher / T), softmax(student / T)
    kl = np.sum(p_t * np.log(p_t / p_s), axis=1)
    ce = -np.log(softmax(student)[np.arange(2), labels])
    expected = np.mean(alpha * T * T * kl + (1 - alpha) * ce)
    got = float(distillation_loss(labels, student, teacher, temperature=T, alpha=alpha))
    assert got == pytest.approx(expected, rel=1e-6)


def test_fine_tune_distils_towards_the_teacher():
    import keras

    from keras_decomp.compression.distill import fine_tune

    teacher = _two_layer_model()
    keras.utils.set_random_seed(5)
    student = keras.Sequential([keras.Input((N,)), keras.layers.Dense(M)])
    x = X.astype("float32")
    t = keras.ops.convert_to_numpy(teacher(x))
    before = np.mean((keras.ops.convert_to_numpy(student(x)) - t) ** 2)
    fine_tune(student, teacher, (x, np.argmax(t, axis=1)), epochs=20, alpha=1.0, temperature=1.0,
              learning_rate=1e-2, batch_size=64)
    after = np.mean((keras.ops.convert_to_numpy(student(x)) - t) ** 2)
    assert after < 0.5 * before


def test_compress_command_calibrates_and_distils(tmp_path, capsys):
    import keras

    from keras_decomp.cli.main import main
    from keras_decomp.layers import load_model

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu", name="hidden"), keras.layers.Dense(10)])
    path, out = tmp_path / "m.keras", tmp_path / "small.keras"
    model.save(path)
    code = main(["compress", str(path), "--layer", "hidden=lowrank(r=4)", "--out", str(out), "--data", "bundled",
                 "--calibrate", "300", "--distill", "--epochs", "1"])
    text = capsys.readouterr().out
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0] == "data: fashion_mnist, bundled subset (5000 train / 1000 test); calibrated on 300 training images"
    assert lines[1].split()[-3:] == ["error", "data-norm", "error"]
    weight_error, data_error = map(float, lines[2].split()[-2:])
    assert 0 < data_error < weight_error  # random kernel, structured images: the fit favours the inputs
    assert "test accuracy after 1 epoch(s) of fine-tuning by distillation (temperature 2.0, alpha 0.5): 0." in text
    assert load_model(out).get_layer("hidden").W == "lowrank(r=4)"
    assert main(["compress", str(path), "--layer", "hidden=lowrank(r=4)", "--out", str(out), "--data", "none",
                 "--calibrate", "10"]) == 2
    assert "--calibrate, --epochs and --distill need data" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["original", "asymmetric"])
def test_compress_command_passes_the_calibration_mode(tmp_path, mode):
    import keras

    from keras_decomp.cli.compress import _calibration_images
    from keras_decomp.cli.main import main
    from keras_decomp.compression.decompose import decompose
    from keras_decomp.layers import load_model
    from keras_decomp.training.data import load

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu", name="h1"),
                              keras.layers.Dense(16, activation="relu", name="h2"), keras.layers.Dense(10)])
    path, out = tmp_path / "m.keras", tmp_path / "small.keras"
    model.save(path)
    layers = ["--layer", "h1=lowrank(r=3)", "--layer", "h2=lowrank(r=3)"]
    assert main(["compress", str(path), *layers, "--out", str(out), "--data", "bundled", "--calibrate", "200",
                 "--calibration", mode, "--quiet"]) == 0
    images = _calibration_images(load("fashion_mnist", source="bundled"), 200, 0)
    expressions = {"h1": "lowrank(r=3)", "h2": "lowrank(r=3)"}
    kernels = {m: _kernel(decompose(model, expressions, data=images, calibration=m).get_layer("h2"))
               for m in ("original", "asymmetric")}
    got = _kernel(load_model(out).get_layer("h2"))
    other = "asymmetric" if mode == "original" else "original"
    assert np.abs(got - kernels[mode]).max() < 1e-5 * np.abs(kernels[mode]).max()
    assert np.abs(got - kernels[other]).max() > 1e-3 * np.abs(kernels[mode]).max()


def test_einsum_rows_flatten_the_contracted_axes_in_kernel_order():
    import keras

    from keras_decomp.compression.calibrate import einsum_rows

    for equation, shape, out_shape in (("abc,cd->abd", (3, 4, 5), (4, 6)), ("abcd,dce->abe", (2, 3, 4, 5), (3, 7)),
                                       ("...b,bc->...c", (2, 3, 4, 6), (5,))):
        layer = keras.layers.EinsumDense(equation, out_shape, name="e")
        x = RNG.normal(size=shape).astype("float32")
        out = keras.ops.convert_to_numpy(layer(x))
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        spec_w = equation.split(",")[1].split("->")[0]
        spec_out = equation.split("->")[1].removeprefix("...")
        free = [c for c in spec_w if c in spec_out]
        contracted = [c for c in spec_w if c not in spec_out]
        matrix = np.transpose(kernel, [spec_w.index(c) for c in contracted + free]).reshape(
            int(np.prod([kernel.shape[spec_w.index(c)] for c in contracted])), -1)
        rows = einsum_rows(x, layer)
        # free axes come last in every output here, in kernel order: out reshaped is rows @ matrix
        assert np.abs(rows @ matrix - out.reshape(rows.shape[0], -1)).max() < 1e-5 * np.abs(out).max()


def test_centred_calibration_fits_the_scatter_and_corrects_the_bias():
    import keras

    from keras_decomp.compression.decompose import decompose

    model = _two_layer_model()
    new = decompose(model, {"a": "lowrank(r=2)"}, data=X.astype("float32"), center=True)
    x = X.astype("float32").astype(np.float64)
    mean = x.mean(axis=0)
    scatter = (x - mean).T @ (x - mean)
    layer = new.get_layer("a")
    values, _ = approximate(_kernel(model.get_layer("a")).astype(np.float64), layer.node, gram=scatter)
    E = layer.node.to_dense(values)
    W_a = _kernel(model.get_layer("a")).astype(np.float64)
    assert np.abs(_kernel(layer) - E).max() < 1e-4 * np.abs(E).max()
    b = keras.ops.convert_to_numpy(model.get_layer("a").bias)
    expected_bias = b + mean @ (W_a - E)
    got = keras.ops.convert_to_numpy(layer.bias)
    assert np.abs(got - expected_bias).max() < 1e-4 * np.abs(expected_bias).max()


def test_layer_gram_reaches_a_layer_nested_in_a_subclassed_model():
    import keras

    from keras_decomp.compression.calibrate import layer_gram

    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(5, name="inner")

        def call(self, x):
            return self.inner(keras.ops.tanh(x))

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def call(self, x):
            return self.block(2.0 * x)

    net = Net()
    x = X[:40].astype("float32")
    net(x)
    hidden = np.tanh(2.0 * x.astype(np.float64))
    gram = layer_gram(net, net.block.inner, [x[:25], x[25:]])
    assert gram.count == 40
    assert np.allclose(gram.matrix, hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    assert "call" not in vars(net.block.inner)  # the recording hook is gone


def _hidden(model, x):
    import keras

    layer = model.get_layer("a")
    return np.maximum(x @ _kernel(layer).astype(np.float64) + keras.ops.convert_to_numpy(layer.bias), 0)


@pytest.mark.parametrize("center", [False, True])
def test_asymmetric_calibration_maps_the_compressed_inputs_to_the_original_outputs(center):
    """Layer b at full rank, asymmetric: its outputs on the compressed model's hidden units Z are the
    least-squares fit of the original's outputs X W_b (+ bias) from Z (with a constant column when
    centred), numpy.linalg.lstsq; sequential calibration fits W_b itself instead."""
    import keras

    from keras_decomp.compression.decompose import decompose

    model = _two_layer_model()
    expressions = {"a": "lowrank(r=6)", "b": f"lowrank(r={M})"}  # Z well conditioned
    data, report = X.astype("float32"), {}
    new = decompose(model, expressions, data=data, calibration="asymmetric", center=center, damping=1e-9,
                    data_report=report)
    x = data.astype(np.float64)
    Z, H = _hidden(new, x), _hidden(model, x)
    b_old = keras.ops.convert_to_numpy(model.get_layer("b").bias).astype(np.float64)
    target = H @ _kernel(model.get_layer("b")).astype(np.float64) + b_old
    design = np.hstack([Z, np.ones((len(Z), 1))]) if center else Z
    expected = design @ np.linalg.lstsq(design, target - (0 if center else b_old), rcond=None)[0] \
        + (0 if center else b_old)
    layer = new.get_layer("b")
    got = Z @ _kernel(layer).astype(np.float64) + keras.ops.convert_to_numpy(layer.bias)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    # layer a sees the same inputs in both models: its fit is the sequential one
    sequential = decompose(model, expressions, data=data, calibration="sequential", damping=1e-9,
                            center=center)
    assert np.abs(_kernel(new.get_layer("a")) - _kernel(sequential.get_layer("a"))).max() \
        < 1e-4 * np.abs(_kernel(sequential.get_layer("a"))).max()
    seq_layer = sequential.get_layer("b")
    seq_out = Z @ _kernel(seq_layer).astype(np.float64) + keras.ops.convert_to_numpy(seq_layer.bias)
    assert np.linalg.norm(got - target) < 0.99 * np.linalg.norm(seq_out - target)  # the optimum: below
    # the reported data error is ||X W - Z E|| / ||X W|| (biases aside), per layer
    W_b = _kernel(model.get_layer("b")).astype(np.float64)
    relative = np.linalg.norm(H @ W_b - Z @ _kernel(layer)) / np.linalg.norm(H @ W_b)
    assert report["b"] == pytest.approx(relative, rel=1e-3)


def test_asymmetric_calibration_rejects_mismatched_paired_inputs():
    from keras_decomp.fitting.data_norm import CrossGram

    cross = CrossGram(4)
    with pytest.raises(DecompError, match=r"paired inputs differ in shape: \(3, 4\) in the compressed model, "
                                          r"\(2, 4\) in the original"):
        cross.add(np.zeros((3, 4)), np.zeros((2, 4)))


@pytest.mark.parametrize("mode", ["asymmetric", "original"])
def test_calibration_in_place_reads_the_original_as_it_was(mode):
    """In place, the original's activations must come from the model before any layer was
    replaced: the kernels equal those of the same decompose on a copy."""
    from keras_decomp.compression.decompose import decompose

    expressions = {"a": "lowrank(r=2)", "b": "lowrank(r=2)"}
    data = X.astype("float32")
    copied = decompose(_two_layer_model(), expressions, data=data, calibration=mode)
    model = _two_layer_model()
    same = decompose(model, expressions, data=data, calibration=mode, inplace=True)
    assert same is model
    for name in "ab":
        expected = _kernel(copied.get_layer(name))
        assert np.abs(_kernel(same.get_layer(name)) - expected).max() < 1e-5 * np.abs(expected).max(), name
