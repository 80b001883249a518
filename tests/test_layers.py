"""Tests of keras_decomp.layers: one shared harness over the rows of tests/layer_cases.py for
Dense and Conv2D (output against the dense kernel in every mode, gradients, counts, config,
saving, a fit step), then weight tying, errors, mixed precision and the other backend.

The reference is a dense kernel W of the layer's own variables, applied in float64: ``x @ W``
for Dense, the kh x kw patches of x @ W for Conv2D.  W is built independently of the code the
layer runs wherever HAND_BUILT has the case (numpy and scipy, from the values and the fixed
arrays); for the other cases the layer's output is compared with the numpy IR's matrix by both
of its paths (``materialize`` and ``apply`` to the identity), so each layer mode meets the
other path.  A plain ``keras.layers.Dense``/``Conv2D`` holding W checks that reference (and the
convolution options).  Most of the time goes to compiling, so the numpy reference saves JAX
a compilation per case.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras import ops

from keras_decomp import DecompError, layers, parse
from layer_cases import BY_ID, EXPENSIVE
from test_ir import perm_matrix, ref_dct, ref_dct2
from test_sparse_reference import butterfly_dense, key_of, sparse_dense

BACKEND = keras.backend.backend()
ROOT = Path(__file__).resolve().parents[1]
KINDS = ("dense", "conv")
MODES = ("apply", "materialize", "auto")
IMAGE = (5, 5)
BATCH = 3
TOL = 1e-5  # float32, relative to the largest output

pytestmark = pytest.mark.filterwarnings(  # raised inside Keras when it saves a variable
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def rows(*names):
    """(case, layer kind) parameters for the named rows of the case table, both kinds."""
    return [pytest.param(BY_ID[name], kind, id=f"{name}-{kind}") for name in names for kind in KINDS]


ALL = rows(*BY_ID)
FEW = rows(*EXPENSIVE)


# ---- the harness -----------------------------------------------------------------------------

def make(case, kind, mode="auto", **kwargs):
    """The layer for ``case``, not built."""
    common = dict(W=case.W, params=case.params, seed=7, mode=mode, **kwargs)
    if kind == "dense":
        return layers.Dense(case.m, **common)
    return layers.Conv2D(case.m, case.kernel, **common)


def input_shape(case, kind) -> tuple[int, ...]:
    return (case.n,) if kind == "dense" else IMAGE + (case.channels,)


def sample(case, kind, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH,) + input_shape(case, kind)).astype("float32")


def built(case, kind, mode="auto", **kwargs):
    """The layer, built, with a non-zero bias so that the reference checks it too."""
    layer = make(case, kind, mode, **kwargs)
    layer.build((None,) + input_shape(case, kind))
    if layer.bias is not None:
        layer.bias.assign(np.linspace(-1.0, 1.0, case.m).astype("float32"))
    return layer


def values(layer) -> dict[str, np.ndarray]:
    """The layer's trainable arrays by IR key, in float64."""
    return {key: np.asarray(v.numpy(), np.float64) for key, v in layer.decomposition_variables.items()}


def kernel_rows(layer, x) -> np.ndarray:
    """The rows that meet the kernel matrix, float64: x for Dense; for Conv2D (stride 1, valid
    padding, channels last) the kh x kw patches of x, flattened in (kh, kw, cin) order."""
    x = np.asarray(x, np.float64)
    if not isinstance(layer, layers.Conv2D):
        return x.reshape(-1, x.shape[-1])
    assert (layer.strides, layer.padding, layer.dilation_rate) == ((1, 1), "valid", (1, 1))
    (kh, kw), (_, h, w, c) = layer.kernel_size, x.shape
    patches = [x[:, i:i + h - kh + 1, j:j + w - kw + 1, :] for i in range(kh) for j in range(kw)]
    return np.stack(patches, axis=3).reshape(-1, kh * kw * c)


def expected_output(layer, x, kernel=None) -> np.ndarray:
    """x @ kernel + bias in float64 (for Conv2D, the patches of x @ kernel); the kernel is
    to_dense(values) unless given."""
    kernel = layer.node.to_dense(values(layer)) if kernel is None else kernel
    y = kernel_rows(layer, x) @ kernel
    if layer.bias is not None:
        y = y + layer.bias.numpy()
    return y.reshape(tuple(x.shape[:1]) + tuple(layer.compute_output_shape(x.shape)[1:]))


# ---- kernels built without the IR's code -------------------------------------------------------

def _diag(d, rows, cols):
    w = np.zeros((rows, cols))
    for i, value in enumerate(d):
        w[i, i] = value
    return w


def _weighted(c, stack):
    return sum(cj * a for cj, a in zip(c, stack))


def _sparse(q):
    return lambda V, F, case, node: sparse_dense(node, F, V, case.n, case.m, q)


def _butterfly(V, F, case, node):
    (sub,) = [n for n in node.walk() if n.label().startswith("butterfly(")]
    return butterfly_dense(key_of(sub), V, *sub.shape)


# case id -> (values V, fixed arrays F, case, node) -> the (n, m) kernel, by hand
HAND_BUILT = {
    "dense": lambda V, F, c, node: V["dense.0.0"],
    "diag": lambda V, F, c, node: _diag(V["diag.0.0"], 12, 8),
    "diag_wide": lambda V, F, c, node: _diag(V["diag.0.0"], 8, 12),
    "lowrank": lambda V, F, c, node: V["lowrank.0.0.u"] @ V["lowrank.0.0.v"],
    "named_factors": lambda V, F, c, node: V["g0"] @ V["g1"],
    "named_tri": lambda V, F, c, node: V["g0"] @ V["s1"] @ V["g1"].T,
    "named_scalar": lambda V, F, c, node: V["a"] * F["G.0.0"],
    "constant_scale": lambda V, F, c, node: 2.5 * V["dense.0.0"],
    "sum": lambda V, F, c, node: V["dense.0.0"] + V["lowrank.0.1.u"] @ V["lowrank.0.1.v"],
    "difference": lambda V, F, c, node: V["dense.0.0"] - _weighted(V["sum.0.1"], F["SUM.0.1"]),
    "product": lambda V, F, c, node: F["G.0.0"] @ V["dense.0.1"],
    "product_at": lambda V, F, c, node: V["lowrank.0.0.u"] @ V["lowrank.0.0.v"] @ _diag(V["diag.0.1"], 12, 8),
    "transpose": lambda V, F, c, node: V["dense.0.0"].T,
    "transpose_product": lambda V, F, c, node: (F["G.0.0"] @ V["dense.0.1"]).T,
    "slice": lambda V, F, c, node: V["dense.0.0"][:, 2:10],
    "dct_slice_symbol": lambda V, F, c, node: ref_dct(12)[:, :5] @ V["dense.0.1"],
    "sum_G": lambda V, F, c, node: _weighted(V["sum.0.0"], F["SUM.0.0"]),
    "sum_S": lambda V, F, c, node: _weighted(V["sum.0.0"], F["SUM.0.0"]),
    "sum_R": lambda V, F, c, node: sum(cj * np.outer(u, v) for cj, u, v in
                                       zip(V["sum.0.0"], F["SUM.0.0.u"], F["SUM.0.0.v"])),
    "sum_D": lambda V, F, c, node: _diag(_weighted(V["sum.0.0"], F["SUM.0.0"]), 12, 12),
    "sum_P_slice": lambda V, F, c, node: _weighted(
        V["sum.0.0"], [perm_matrix(F[f"P.0.1.0.{j}"], 12) for j in range(3)])[:, :8],
    "tile": lambda V, F, c, node: np.hstack([V["dense.0.1.0.0"], V["dense.0.1.0.1"]]),
    "kron": lambda V, F, c, node: np.kron(ref_dct2(2, 2), V["dense.0.2.0.1"]),
    "kron_right": lambda V, F, c, node: np.kron(V["dense.0.1.0.0"], ref_dct2(2, 2)),
    "identity": lambda V, F, c, node: V["dense.0.0"] @ np.eye(8),
    "tri": lambda V, F, c, node: V["tri.0.0.g_in"] @ V["tri.0.0.s"] @ V["tri.0.0.g_out"].T,
    "sss_one_stage": lambda V, F, c, node: V["sss.0.0.D0"][0],  # one stage: the stack of D holds W
    "sparse": _sparse(3),
    "sparse_one_factor": _sparse(1),
    "butterfly": _butterfly,
    "butterfly_padded": _butterfly,
    "butterfly_in_product": lambda V, F, c, node: ref_dct(12) @ _butterfly(V, F, c, node),
}


def reference_kernels(layer, case) -> dict[str, np.ndarray]:
    """The kernels the layer's output must match, float64: the hand-built one where there is
    one; always the numpy IR's by ``materialize`` (to_dense) and by ``apply`` to the identity."""
    node, theta = layer.node, values(layer)
    v = {**node.fixed_arrays(), **theta}
    kernels = {"to_dense": node.to_dense(theta), "apply(I)": np.asarray(node.apply(np.eye(case.n), v, np))}
    if case.id in HAND_BUILT:
        kernels["hand-built"] = HAND_BUILT[case.id](theta, node.fixed_arrays(), case, node)
    return kernels


def reference(layer, kernel=None):
    """A plain Keras layer holding ``kernel`` (by default the dense kernel that the numpy IR makes
    of the layer's values) and the layer's bias."""
    kernel = layer.node.to_dense(values(layer)) if kernel is None else kernel
    if isinstance(layer, layers.Conv2D):
        ref = keras.layers.Conv2D(layer.filters, layer.kernel_size, strides=layer.strides,
                                  padding=layer.padding, data_format=layer.data_format,
                                  dilation_rate=layer.dilation_rate, use_bias=layer.use_bias)
        last = layer.data_format == "channels_last"
        shape = (None, None, None, layer.cin) if last else (None, layer.cin, None, None)
        kernel = kernel.reshape(layer.kernel_size + (layer.cin, layer.filters))
    else:
        ref = keras.layers.Dense(layer.units, use_bias=layer.use_bias)
        shape = (None, kernel.shape[0])
    ref.build(shape)
    ref.set_weights([kernel.astype("float32")] + ([layer.bias.numpy()] if layer.use_bias else []))
    return ref


def assert_close(actual, expected, tol=TOL, msg=""):
    actual, expected = (np.asarray(ops.convert_to_numpy(a), np.float64) for a in (actual, expected))
    assert actual.shape == expected.shape, msg
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale, err_msg=msg)


def gradients(model, x, loss) -> list[np.ndarray | None]:
    """d loss(model(x)) / d v for every v in ``model.trainable_variables`` (None: not connected)."""
    variables = model.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf
        with tf.GradientTape() as tape:
            value = loss(model(x))
        return [None if g is None else tf.convert_to_tensor(g).numpy() for g in tape.gradient(value, variables)]
    if BACKEND == "jax":
        # jax.grad gives zeros, never None, for an unused input: callers also check for zeros
        import jax

        fixed = [v.value for v in model.non_trainable_variables]

        def f(trainable):
            y, _ = model.stateless_call(trainable, fixed, x)
            return loss(y)

        return [np.asarray(g) for g in jax.jit(jax.grad(f))([v.value for v in variables])]
    raise NotImplementedError(f"no gradient helper for the {BACKEND} backend")


def output_weights(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=tuple(shape)).astype("float32")


def weighted_sum(y):
    """A loss that weighs every output differently, so no gradient vanishes by symmetry."""
    return ops.sum(ops.cast(y, "float32") * output_weights(y.shape))


def directional_derivative(f, theta, key, direction, eps=1e-3):
    """d/dt f(theta with theta[key] + t * direction) at t=0, by central differences (float64)."""
    def at(t):
        return f({**theta, key: theta[key] + t * direction})
    return (at(eps) - at(-eps)) / (2 * eps)


def stored_numbers(path) -> int:
    """How many numbers a .keras file's weights hold."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    sizes = []
    with h5py.File(io.BytesIO(data), "r") as f:
        f.visititems(lambda name, obj: sizes.append(obj.size) if isinstance(obj, h5py.Dataset) else None)
    return int(sum(sizes))


def model_of(layer, case, kind):
    return keras.Sequential([keras.Input(input_shape(case, kind)), layer])


# ---- the checks, per row and layer kind -------------------------------------------------------

@pytest.mark.parametrize("case, kind", ALL)
def test_output_equals_dense_kernel_in_every_mode(case, kind):
    x = sample(case, kind)
    expected = None
    outputs = {}
    for mode in MODES:  # same seed, same initial values: one reference serves all modes
        layer = built(case, kind, mode)
        if expected is None:
            expected = {name: expected_output(layer, x, kernel)
                        for name, kernel in reference_kernels(layer, case).items()}
            assert_close(layer.materialize(), layer.node.to_dense(values(layer)), msg="materialize()")
        y = outputs[mode] = layer(x)
        assert tuple(y.shape) == tuple(layer.compute_output_shape(x.shape))
        for name, reference_y in expected.items():
            assert_close(y, reference_y, msg=f"mode={mode} against the {name} kernel")
    assert len(expected) == 2 + (case.id in HAND_BUILT)
    assert_close(outputs["apply"], outputs["materialize"], msg="apply against materialize")


def test_hand_built_kernels_cover_most_cases():
    assert set(HAND_BUILT) <= set(BY_ID)
    assert len(HAND_BUILT) >= 30


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_numpy_ir_equals_the_hand_built_kernel(name):
    """In float64 at 1e-12, for random values (init sets diagonals and scalars to ones):
    the layer harness's two numpy paths against the matrix built by hand."""
    case = BY_ID[name]
    node = parse(case.W, case.n, case.m, params=case.params, seed=7).stages[0]
    rng = np.random.default_rng(5)
    theta = {k: rng.standard_normal(shape) for k, shape in node.param_shapes().items()}
    fixed = node.fixed_arrays()
    hand = HAND_BUILT[name](theta, fixed, case, node)
    assert hand.shape == (case.n, case.m)
    scale = float(np.abs(hand).max())
    np.testing.assert_allclose(node.to_dense(theta), hand, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(node.apply(np.eye(case.n), {**fixed, **theta}, np), hand, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("case, kind", rows("dense", "named_tri", "sum_P_slice", "kron"))
def test_the_reference_agrees_with_keras(case, kind):
    """The harness's numpy reference is a plain keras.layers.Dense/Conv2D holding the dense kernel:
    for Conv2D this pins the (kh, kw, cin) row order of the kernel matrix."""
    layer = built(case, kind)
    x = sample(case, kind)
    assert_close(reference(layer)(x), expected_output(layer, x))
    assert_close(layer(x), reference(layer)(x))


@pytest.mark.parametrize("case, kind", ALL)
def test_every_variable_gets_the_right_gradient(case, kind):
    x = sample(case, kind)
    x_rows = kernel_rows(make(case, kind), x)
    for mode in ("apply", "materialize"):
        layer = built(case, kind, mode)
        grads = dict(zip(map(id, layer.trainable_variables), gradients(layer, x, weighted_sum)))
        for v in layer.trainable_variables:
            g = grads[id(v)]
            assert g is not None and np.any(g != 0), f"mode={mode}: no gradient reaches {v.path}"
        # The loss is linear in the kernel: loss = <W(theta), rows' r> + <bias, sum of r>.
        r = output_weights((BATCH,) + tuple(layer.compute_output_shape(x.shape)[1:])).reshape(-1, case.m)
        k = x_rows.T @ r
        theta = values(layer)
        rng = np.random.default_rng(2)
        for key, v in layer.decomposition_variables.items():
            direction = rng.normal(size=theta[key].shape)
            expected = directional_derivative(lambda t: np.sum(layer.node.to_dense(t) * k), theta, key, direction)
            actual = float(np.sum(grads[id(v)] * direction))
            scale = float(np.sum(np.abs(grads[id(v)] * direction))) or 1.0
            assert abs(actual - expected) <= 1e-4 * scale, f"mode={mode}, {key}: {actual} != {expected}"
        assert_close(grads[id(layer.bias)], r.sum(axis=0), msg=f"mode={mode}: bias")


@pytest.mark.parametrize("case, kind", ALL)
def test_count_params_is_the_ir_count_plus_bias(case, kind):
    layer = built(case, kind)
    assert layer.count_params() == layer.node.num_params + case.m
    assert len(layer.trainable_variables) == len(layer.node.param_shapes()) + 1
    assert not layer.non_trainable_variables  # fixed arrays are not Keras weights


@pytest.mark.parametrize("case, kind", ALL)
def test_config_round_trip(case, kind):
    layer = built(case, kind)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    clone.build((None,) + input_shape(case, kind))
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == config
    x = sample(case, kind)
    np.testing.assert_array_equal(ops.convert_to_numpy(clone(x)), ops.convert_to_numpy(layer(x)))


@pytest.mark.parametrize("case, kind", ALL)
def test_save_load_keeps_outputs_and_stores_only_trainable_values(case, kind, tmp_path):
    layer = built(case, kind)
    model = model_of(layer, case, kind)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = sample(case, kind)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))
    assert loaded.layers[0].get_config() == layer.get_config()
    assert stored_numbers(path) == layer.count_params()
    assert path.stat().st_size < 4 * layer.count_params() + 40_000


@pytest.mark.parametrize("case, kind", FEW)
def test_one_fit_step_lowers_the_loss(case, kind):
    # Conv2D in apply mode: its factored path (a convolution, then products on the channels)
    # has the most shape logic to trace; Dense lets the cost model choose.
    model = model_of(make(case, kind, "apply" if kind == "conv" else "auto"), case, kind)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3), loss="mse")
    x = sample(case, kind)
    y = np.random.default_rng(3).normal(size=(BATCH,) + model.output_shape[1:]).astype("float32")
    # one batch per epoch: the second epoch's loss is the loss after the first step
    history = model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    first, second = history.history["loss"]
    assert second < first


@pytest.mark.parametrize("case, kind", rows("lowrank"))
def test_activation_and_no_bias(case, kind):
    layer = built(case, kind, activation="relu", use_bias=False)
    assert layer.count_params() == layer.node.num_params
    x = sample(case, kind)
    assert_close(layer(x), np.maximum(expected_output(layer, x), 0.0))


@pytest.mark.parametrize("case", [BY_ID[name] for name in ("dense", "product_of_sums", "kron")],
                         ids=lambda case: case.id)
def test_dense_applies_to_the_last_axis(case):
    layer = built(case, "dense", "apply")
    x = np.random.default_rng(0).normal(size=(2, 3, case.n)).astype("float32")
    assert_close(layer(x), expected_output(layer, x))


@pytest.mark.parametrize("mode", ("apply", "materialize"))
@pytest.mark.parametrize("options", [dict(strides=2), dict(padding="same"), dict(dilation_rate=2),
                                     dict(strides=(2, 1), padding="same"),
                                     dict(data_format="channels_first")],
                         ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()))
def test_conv_options_match_keras(options, mode):
    case = BY_ID["product_at"]  # a product: apply mode convolves with its first factor only
    layer = make(case, "conv", mode, **options)
    x = sample(case, "conv")
    first = options.get("data_format") == "channels_first"
    if first:
        x = np.transpose(x, (0, 3, 1, 2))
    layer.build(x.shape)
    bias = np.linspace(-1.0, 1.0, case.m).astype("float32")  # non-zero, different per filter
    layer.bias.assign(bias)
    kernel = HAND_BUILT[case.id](values(layer), layer.node.fixed_arrays(), case, layer.node)
    y = layer(x)
    assert_close(y, reference(layer, kernel)(x))
    if first:  # the same convolution channels last, the transposes done here in numpy
        last = keras.layers.Conv2D(case.m, case.kernel)
        last.build((None, None, None, case.channels))
        last.set_weights([kernel.reshape(case.kernel + (case.channels, case.m)).astype("float32"), bias])
        y_last = ops.convert_to_numpy(last(np.transpose(x, (0, 2, 3, 1))))
        assert_close(y, np.transpose(y_last, (0, 3, 1, 2)))


def test_fixed_arrays_are_regenerated_not_saved(tmp_path):
    layer = layers.Dense(1024, W="sum(G, n=100)")
    model = keras.Sequential([keras.Input((784,)), layer])
    assert layer.node.num_fixed == 100 * 784 * 1024  # 80 million fixed numbers
    path = tmp_path / "model.keras"
    model.save(path)
    assert stored_numbers(path) == layer.count_params() == 100 + 1024
    assert path.stat().st_size < 4 * layer.count_params() + 40_000


@pytest.mark.skipif(BACKEND != "tensorflow", reason="counts TensorFlow graph ops")
@pytest.mark.parametrize("make_layer, matmuls", [
    (lambda: layers.Dense(64, W="DCT2[:k] dense", params={"k": 10}), 3),  # no gradient into the DCT
    (lambda: layers.Dense(64, W="sum(R, n=5)"), 3),
    (lambda: layers.Conv2D(64, 3, W="dense", mode="materialize"), 0),
], ids=["DCT2_slice", "sum_R", "conv"])
def test_tensorflow_training_step_has_no_avoidable_ops(make_layer, matmuls):
    """Issue 13: a small layer's step is dominated by per-op costs in TF graph mode, so the traced
    step must stay as lean as keras.layers.Dense's: the bias fused (BiasAdd, BiasAddGrad, not
    AddV2 and a broadcasting Sum), no gradient work for fixed arrays, no copies of them."""
    import tensorflow as tf
    layer = make_layer()
    x = tf.ones((8, 4, 4, 3)) if isinstance(layer, layers.Conv2D) else tf.ones((8, 784))
    layer(x)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x))
        return tape.gradient(loss, layer.trainable_variables)

    found = [op.type for op in step.get_concrete_function().graph.get_operations()]
    assert found.count("BiasAdd") == found.count("BiasAddGrad") == 1
    # (sum(R)'s transpose of its (n, rows) stack stays: Grappler folds it into the MatMul)
    assert "AddV2" not in found and "StridedSlice" not in found
    assert found.count("MatMul") == matmuls


# ---- weight tying -----------------------------------------------------------------------------

def tied_pair():
    """Two layers sharing g1; Sequential builds them inside the scope."""
    with layers.tying():
        a, b = layers.Dense(8, W="g0 g1", name="a"), layers.Dense(8, W="g1 g2", name="b")
        model = keras.Sequential([keras.Input((8,)), a, b])
    return model, a, b


def test_tied_parameter_is_one_variable():
    model, a, b = tied_pair()
    assert a.tied_variables["g1"] is b.tied_variables["g1"]
    paths = [v.path for v in model.trainable_variables]
    assert len(paths) == 5, paths  # g0, g1, g2 and two biases
    assert model.count_params() == 3 * 8 * 8 + 2 * 8


def test_tied_parameter_gets_gradient_from_both_layers():
    model, a, b = tied_pair()
    x = np.random.default_rng(0).normal(size=(BATCH, 8)).astype("float32")
    g1 = a.tied_variables["g1"]
    grads = dict(zip(map(id, model.trainable_variables), gradients(model, x, weighted_sum)))
    r = output_weights((BATCH, 8))
    theta = {**values(a), **values(b)}
    bias_a, bias_b = a.bias.numpy(), b.bias.numpy()

    def loss(t):
        hidden = x @ a.node.to_dense(t) + bias_a
        return np.sum(r * (hidden @ b.node.to_dense(t) + bias_b))

    direction = np.random.default_rng(2).normal(size=(8, 8))
    expected = directional_derivative(loss, theta, "g1", direction)
    actual = float(np.sum(grads[id(g1)] * direction))
    assert abs(actual - expected) <= 1e-4 * float(np.sum(np.abs(grads[id(g1)] * direction)))


def test_untied_outside_the_scope():
    a, b = layers.Dense(8, W="g0 g1"), layers.Dense(8, W="g1 g2")
    model = keras.Sequential([keras.Input((8,)), a, b])
    assert a.decomposition_variables["g1"] is not b.decomposition_variables["g1"]
    assert len(model.trainable_variables) == 6


def test_tied_shapes_must_agree():
    with layers.tying():
        layers.Dense(8, W="g0 g1", name="a").build((None, 8))
        with pytest.raises(DecompError, match=r"layer 'b': the tied parameter 'g1' has shape \(8, 8\) "
                                              r"in another layer but \(8, 4\) here"):
            layers.Dense(4, W="g1", name="b").build((None, 8))


def test_load_model_keeps_parameters_tied(tmp_path):
    model, a, b = tied_pair()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.random.default_rng(0).normal(size=(BATCH, 8)).astype("float32")
    model.fit(x, x, epochs=1, verbose=0)
    path = tmp_path / "tied.keras"
    model.save(path)

    loaded = layers.load_model(path)
    la, lb = loaded.layers
    assert la.tied_variables["g1"] is lb.tied_variables["g1"]
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))

    with pytest.warns(UserWarning, match=r"layer 'a' was saved with parameters tied to other layers, "
                                         r"but is built outside keras_decomp.layers.tying\(\)"):
        untied = keras.saving.load_model(path)
    assert len(untied.trainable_variables) == len(model.trainable_variables) + 1


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make_layer, match", [
    (lambda: layers.Dense(4, W="dense +", name="enc"), r"layer 'enc': the expression ends too early"),
    (lambda: layers.Conv2D(4, 3, W="dense dense )", name="c"), r"layer 'c': unexpected '\)'"),
    (lambda: layers.Dense(4, W=3, name="enc"), r"layer 'enc': W must be an expression string, got int"),
    (lambda: layers.Dense(4, W="dense", stage=1, name="enc"), r"layer 'enc': stage 1 does not exist"),
    (lambda: layers.Dense(4, mode="fast", name="enc"), r"layer 'enc': mode must be one of \('auto'"),
    (lambda: layers.Conv2D(4, 3, mode="folded", name="c"), r"layer 'c': mode must be one of"),
    (lambda: layers.Dense(0, name="enc"), r"layer 'enc': units must be a positive integer, got 0"),
    (lambda: layers.Dense("4", name="enc"), r"units must be a positive integer, got '4'"),
    (lambda: layers.Dense(True, name="enc"), r"units must be a positive integer, got True"),
    (lambda: layers.Conv2D(-1, 3, name="c"), r"layer 'c': filters must be a positive integer, got -1"),
    (lambda: layers.Conv2D(4, (3,), name="c"), r"layer 'c': kernel_size must be a positive int or a pair"),
    (lambda: layers.Conv2D(4, 0, name="c"), r"kernel_size must be a positive int or a pair"),
    (lambda: layers.Conv2D(4, 3, strides=(1, 0), name="c"), r"strides must be a positive int or a pair"),
    (lambda: layers.Conv2D(4, 3, padding="full", name="c"), r"padding must be 'valid' or 'same', got 'full'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_fail_at_construction(make_layer, match):
    with pytest.raises(DecompError, match=match):
        make_layer()


@pytest.mark.parametrize("layer, shape, match", [
    (lambda: layers.Dense(8, W="DCT[:20]", name="enc"), (None, 12),
     r"layer 'enc': the slice \[0:20\] does not fit 12 columns\n  DCT\[:20\]\n       \^"),
    (lambda: layers.Conv2D(8, 2, W="DCT2(h=3, w=3) dense", name="c"), (None, 5, 5, 3),
     r"layer 'c': this factor has 9 rows, but 12 are needed here"),
    (lambda: layers.Dense(8, W="DCT[:k] dense", name="enc"), (None, 12),
     r"layer 'enc': the symbol 'k' in a slice bound is not bound"),
    (lambda: layers.Dense(8, W="H dense", name="enc"), (None, 12), r"layer 'enc': H needs a power-of-2 size"),
    (lambda: layers.Dense(8, W="DTC dense", name="enc"), (None, 12),
     r"layer 'enc': unknown name 'DTC'(.|\n)*did you mean DCT\?"),
    (lambda: layers.Dense(8, name="enc"), (None, None), r"layer 'enc': the last input dimension must be known"),
], ids=["slice", "conv-shape", "unbound", "hadamard", "near-miss", "unknown-n"])
def test_shape_errors_fail_at_build_naming_the_layer(layer, shape, match):
    layer = layer()  # constructing is fine: the shapes are not known yet
    with pytest.raises(DecompError, match=match):
        layer.build(shape)


# ---- mixed precision --------------------------------------------------------------------------

@pytest.fixture
def mixed_float16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy(previous)


# the eye-based nodes (diag, D, P, I) once built float32 kernels under mixed_float16
MIXED = rows("diag", "named_tri", "sum_D", "sum_P_slice", "identity", "kron")


@pytest.mark.parametrize("case, kind", MIXED)
def test_mixed_float16_keeps_float32_variables(case, kind, mixed_float16):
    x = sample(case, kind)
    for mode in ("apply", "materialize"):
        layer = built(case, kind, mode)
        assert layer.compute_dtype == "float16"
        assert {v.dtype for v in layer.weights} == {"float32"}
        y = layer(x)
        assert keras.backend.standardize_dtype(y.dtype) == "float16", mode
        twin = make(case, kind, mode, dtype="float32")
        twin.build(x.shape)
        twin.set_weights(layer.get_weights())
        assert keras.backend.standardize_dtype(twin(x).dtype) == "float32"
        assert_close(y, twin(x), tol=1e-2)
    for v, g in zip(layer.trainable_variables, gradients(layer, x, weighted_sum)):
        assert g is not None and g.dtype == np.float32 and np.any(g != 0), v.path


# ---- the other backend ------------------------------------------------------------------------

OTHER = {"tensorflow": "jax", "jax": "tensorflow"}[BACKEND]
SUBPROCESS_TEST = "test_layers_on_the_other_backend_in_a_subprocess"


@pytest.fixture(scope="module", autouse=True)
def other_backend_run(request, tmp_path_factory):
    """This file again under the other backend (Keras fixes its backend at import), started
    with the module's first test so that the two runs share the cores; the last test waits.
    Only when that test is selected: the run itself deselects it, so it does not recurse."""
    if not any(item.name == SUBPROCESS_TEST for item in request.session.items):
        yield None
        return
    log = tmp_path_factory.mktemp("other_backend") / "pytest.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layers.py",
             "-k", "not subprocess"],
            cwd=ROOT, env={**os.environ, "KERAS_BACKEND": OTHER}, stdout=out, stderr=subprocess.STDOUT)
    yield process, log
    if process.poll() is None:  # this module stopped early
        process.kill()
        process.wait()


def test_layers_on_the_other_backend_in_a_subprocess(other_backend_run):
    process, log = other_backend_run
    try:
        process.wait(timeout=900)
    finally:
        output = log.read_text()
    assert process.returncode == 0, f"under KERAS_BACKEND={OTHER}:\n{output[-8000:]}"
    assert " passed" in output.strip().splitlines()[-1]
