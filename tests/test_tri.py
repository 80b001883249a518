"""Tri-factorisation: the tri(k=, h=) node, named factors shared across the layers of a
spec, the simultaneous factorisation of a chain of kernels, and pruning with masks
(prune, strip, shrink).  The Keras harness of tests/test_layers.py runs the tri rows of
tests/layer_cases.py as well."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small factorisations: threads only contend

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp import DecompError, approximate, parse  # noqa: E402
from keras_decomp.compression.prune import keep_mask, mask_sparsity, shrink  # noqa: E402
from keras_decomp.operators.structures.tri import Tri  # noqa: E402
from keras_decomp.fitting.trifactor import default_ranks, trifactorize  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # raised inside Keras when it saves a variable
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

RNG = np.random.default_rng(0)


# ---- the tri(k=, h=) node ----------------------------------------------------------------------

@pytest.mark.parametrize("text, n, m, shapes", [
    ("tri(k=4, h=3)", 20, 10, [(20, 4), (4, 3), (10, 3)]),
    ("tri(k=5)", 7, 9, [(7, 5), (5, 5), (9, 5)]),  # h defaults to k
    ("tri(k=r, h=2)", 6, 6, [(6, 3), (3, 2), (6, 2)]),  # a symbol
    ("tri(params=0.5)", 64, 10, [(64, 4), (4, 4), (10, 4)]),  # 64k + k^2 + 10k <= 320: k = 4
])
def test_tri_shapes_and_counts_by_hand(text, n, m, shapes):
    node = parse(text, n, m, params={"r": 3}).stages[0]
    assert isinstance(node, Tri)
    assert list(node.param_shapes().values()) == shapes
    assert node.num_params == sum(a * b for a, b in shapes)
    assert node.num_fixed == 0


def test_tri_dense_form_is_g_in_s_g_out_transposed():
    node = parse("tri(k=3, h=2)", 8, 5).stages[0]
    g_in, s, g_out = RNG.normal(size=(8, 3)), RNG.normal(size=(3, 2)), RNG.normal(size=(5, 2))
    values = dict(zip(node.param_shapes(), (g_in, s, g_out)))
    expected = np.einsum("ia,ab,jb->ij", g_in, s, g_out)  # W_ij = sum_ab G_in[i,a] S[a,b] G_out[j,b]
    np.testing.assert_allclose(node.to_dense(values), expected, rtol=1e-12)
    x = RNG.normal(size=(4, 8))
    np.testing.assert_allclose(node.apply(x, values, np), x @ expected, rtol=1e-12)


def test_tri_costs_by_hand():
    node = parse("tri(k=4, h=3)", 20, 10).stages[0]
    assert node.flops(7, "apply") == 2 * 7 * (20 * 4 + 4 * 3 + 3 * 10)
    assert node.flops(7, "materialize") == 2 * (20 * 4 * 3 + 20 * 3 * 10) + 2 * 7 * 20 * 10


def test_tri_initial_kernel_has_glorot_scale():
    node = parse("tri(k=16, h=16)", 400, 300).stages[0]
    W = node.to_dense(node.init(np.random.default_rng(1)))
    assert np.var(W) == pytest.approx(2 / (400 + 300), rel=0.15)


def test_tri_approximation_is_the_truncated_svd():
    W = RNG.normal(size=(12, 9))
    s = np.linalg.svd(W, compute_uv=False)
    values, error = approximate(W, "tri(k=5, h=3)")  # rank min(k, h) = 3
    assert error == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2)), rel=1e-10)
    _, exact = approximate(W, "tri(k=10, h=9)")
    assert exact < 1e-12


def test_tri_arguments_are_checked():
    with pytest.raises(DecompError, match="tri needs the argument 'k'"):
        parse("tri(h=2)", 4, 4)
    with pytest.raises(DecompError, match="give tri either k= or params=, not both"):
        parse("tri(k=2, params=0.5)", 4, 4)


# ---- named factors shared across the layers of a spec -------------------------------------------

def _variables_named(model, name):
    return [v for v in model.trainable_variables if v.path.split("/")[-1] == name]


@pytest.mark.parametrize("first, second, widths", [
    ("g0 s1 g1'", "g1 s2 g2'", (16, 16, 16)),  # inner sizes default to the input size
    ("g0[:k] s1 (g1[:j])'", "g1[:j] s2 (g2[:i])'", (20, 12, 5)),  # ranks fixed by slices
])
def test_shared_factor_is_one_variable_in_a_built_spec(first, second, widths):
    n, h, m = widths
    model = keras_decomp.build({
        "name": "shared", "input": {"shape": [n]}, "params": {"k": 6, "j": 4, "i": 3},
        "layers": [{"Dense": {"units": h, "activation": "relu", "W": first}},
                   {"Dense": {"units": m, "W": second}}]})
    a, b = (layer for layer in model.layers if hasattr(layer, "tied_variables"))
    assert a.tied_variables["g1"] is b.tied_variables["g1"]
    assert len(_variables_named(model, "g1")) == 1
    assert len(model.trainable_variables) == 7  # g0 s1 g1 bias, s2 g2 bias
    x = RNG.normal(size=(3, n)).astype("float32")
    y = np.ones((3, m), "float32")
    with _tape() as tape:
        loss = ops.sum((model(x) - y) ** 2)
    grads = dict(zip([v.path for v in model.trainable_variables],
                     tape.gradient(loss, model.trainable_variables)))
    assert all(g is not None for g in grads.values())


def _tape():
    import tensorflow as tf
    return tf.GradientTape()


# ---- the simultaneous factorisation -------------------------------------------------------------

def _chain(widths, rng):
    return [rng.normal(size=(a, b)) * rng.uniform(0.1, 3) for a, b in zip(widths, widths[1:])]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighting", ["relative", "absolute"])
def test_total_error_never_increases(seed, weighting):
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(3, 30, size=int(rng.integers(2, 6)))]
    ranks = [int(rng.integers(1, w + 1)) for w in widths]
    fit = trifactorize(_chain(widths, rng), ranks=ranks, sweeps=60, tol=0.0, weighting=weighting)
    history = np.asarray(fit.history)
    assert len(history) > 2
    assert np.all(np.diff(history) <= 1e-12 * history[0]), np.diff(history).max()
    assert history[-1] < history[0] or history[0] < 1e-20


def test_errors_per_matrix_and_the_weighted_total():
    rng = np.random.default_rng(5)
    Ws = _chain([15, 11, 7, 4], rng)
    fit = trifactorize(Ws, ranks=[5, 4, 3, 2])
    expected = [np.linalg.norm(W - fit.approximation(j)) / np.linalg.norm(W) for j, W in enumerate(Ws)]
    np.testing.assert_allclose(fit.errors, expected, rtol=1e-12)
    assert fit.history[-1] == pytest.approx(sum(e ** 2 for e in fit.errors), rel=1e-9)
    assert fit.num_params == 15 * 5 + 11 * 4 + 7 * 3 + 4 * 2 + 5 * 4 + 4 * 3 + 3 * 2


def test_factors_are_shared_orthonormal_and_cores_optimal():
    rng = np.random.default_rng(6)
    Ws = _chain([12, 9, 8], rng)
    fit = trifactorize(Ws, ranks=[4, 3, 5])
    assert [g.shape for g in fit.G] == [(12, 4), (9, 3), (8, 5)]
    assert [s.shape for s in fit.S] == [(4, 3), (3, 5)]
    for g in fit.G:
        np.testing.assert_allclose(g.T @ g, np.eye(g.shape[1]), atol=1e-10)
    for j, W in enumerate(Ws):  # each core is the least-squares core for its factors
        np.testing.assert_allclose(fit.S[j], np.linalg.pinv(fit.G[j]) @ W @ np.linalg.pinv(fit.G[j + 1]).T,
                                   atol=1e-10)
    # W_0 and W_1 are fitted through the one G_1
    np.testing.assert_allclose(fit.approximation(0), fit.G[0] @ fit.S[0] @ fit.G[1].T)
    np.testing.assert_allclose(fit.approximation(1), fit.G[1] @ fit.S[1] @ fit.G[2].T)


def test_an_exactly_tri_factorised_chain_is_recovered():
    rng = np.random.default_rng(7)
    ranks = [3, 2, 4, 2]
    G = [rng.normal(size=(n, k)) for n, k in zip([10, 8, 9, 6], ranks)]
    S = [rng.normal(size=(a, b)) for a, b in zip(ranks, ranks[1:])]
    Ws = [G[j] @ S[j] @ G[j + 1].T for j in range(3)]
    fit = trifactorize(Ws, ranks=ranks)
    assert max(fit.errors) < 1e-10


def test_sharing_costs_accuracy_against_separate_fits():
    # Each kernel alone is best fit by its truncated SVD; the shared G cannot beat that.
    rng = np.random.default_rng(8)
    Ws = _chain([14, 10, 6], rng)
    fit = trifactorize(Ws, ranks=[4, 4, 4])
    for W, error in zip(Ws, fit.errors):
        s = np.linalg.svd(W, compute_uv=False)
        assert error >= np.sqrt(np.sum(s[4:] ** 2) / np.sum(s ** 2)) - 1e-12


@pytest.mark.parametrize("ranks, expected", [
    (None, (13, 7, 3)), (2, (2, 2, 2)), (0.5, (7, 4, 2)), ([20, 1, 3], (13, 1, 3)),
])
def test_ranks(ranks, expected):
    rng = np.random.default_rng(9)
    assert trifactorize(_chain([13, 7, 3], rng), ranks=ranks, sweeps=2).ranks == expected


def test_default_ranks_are_a_quarter_but_keep_narrow_layers_whole():
    assert default_ranks([784, 300, 100, 10]) == (196, 75, 25, 10)
    assert default_ranks([40, 20]) == (16, 16)


@pytest.mark.parametrize("matrices, ranks, message", [
    ([np.ones((3, 4)), np.ones((5, 2))], None, r"matrices 0 and 1 are not neighbours: \(3, 4\) then \(5, 2\)"),
    ([np.ones((3, 4))], [1, 2, 3], r"ranks gives 3 numbers for 2 layers of neurons"),
    ([np.ones((3, 4))], [0, 2], r"every rank must be an integer >= 1, got 0"),
    ([np.ones((3, 4))], 1.5, r"a fractional rank must be in \(0, 1\)"),
    ([np.full((3, 4), np.nan)], None, r"matrix 0 has NaN"),
    ([], None, r"at least one matrix"),
])
def test_bad_chains_and_ranks(matrices, ranks, message):
    with pytest.raises(DecompError, match=message):
        trifactorize(matrices, ranks=ranks)


# ---- pruning ---------------------------------------------------------------------------------------

def mlp(seed=0, hidden=(16, 12)):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((20,))] + [keras.layers.Dense(h, activation="relu") for h in hidden]
    model = keras.Sequential(layers + [keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def toy_data(seed=1, count=64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, 20)).astype("float32"), rng.integers(0, 4, size=count)


def masks(model) -> dict:
    return {layer.name: ops.convert_to_numpy(layer.prune_mask) for layer in model.layers
            if hasattr(layer, "prune_mask")}


def kernels(model) -> dict:
    return {layer.name: ops.convert_to_numpy(layer.kernel) for layer in model.layers}


METHODS = [dict(method="magnitude"), dict(method="trifactor"), dict(method="trifactor", criterion="paper")]
METHOD_IDS = ["magnitude", "trifactor", "paper"]


@pytest.mark.parametrize("options", METHODS, ids=METHOD_IDS)
def test_pruned_weights_are_exactly_zero_after_fit(options):
    pruned = keras_decomp.prune(mlp(), sparsity=0.8, **options)
    before = kernels(pruned)
    x, y = toy_data()
    pruned.fit(x, y, epochs=3, batch_size=16, verbose=0)
    after = kernels(pruned)
    for name, mask in masks(pruned).items():
        assert np.all(after[name][mask == 0] == 0.0)
        assert np.any(after[name][mask == 1] != before[name][mask == 1])  # the kept weights trained


def test_the_constraint_holds_zeros_even_where_the_forward_pass_would_not():
    # A kernel whose pruned entries were set non-zero behind the layer's back is
    # masked in the forward pass and zeroed again by the first optimizer step.
    pruned = keras_decomp.prune(mlp(), sparsity=0.5)
    layer = pruned.layers[0]
    mask = ops.convert_to_numpy(layer.prune_mask)
    layer.kernel.assign(np.ones(mask.shape, "float32"))
    x, y = toy_data()
    np.testing.assert_allclose(layer(x), ops.relu(x @ mask + ops.convert_to_numpy(layer.bias)), rtol=1e-5)
    pruned.fit(x, y, epochs=1, batch_size=64, verbose=0)
    assert np.all(ops.convert_to_numpy(layer.kernel)[mask == 0] == 0.0)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.0, 0.37])
@pytest.mark.parametrize("options", METHODS, ids=METHOD_IDS)
def test_sparsity_reached_equals_the_request(sparsity, options):
    model = mlp(hidden=(20, 40))  # 400, 800 and 160 weights: 0.5..0.95 of each is a whole number
    pruned = keras_decomp.prune(model, sparsity=sparsity, **options)
    for name, mask in masks(pruned).items():
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert int(np.sum(mask == 0)) == int(np.floor(sparsity * mask.size + 0.5))
        assert int(np.sum(kernels(pruned)[name] == 0)) == int(np.sum(mask == 0))
    if sparsity != 0.37:
        assert all(s == pytest.approx(sparsity, abs=1e-12) for s in mask_sparsity(pruned).values())


def test_ties_are_broken_by_position_and_masks_are_deterministic():
    np.testing.assert_array_equal(keep_mask(np.zeros((2, 3)), 0.5), [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(keep_mask(np.array([2.0, 1.0, 1.0, 1.0, 3.0]), 0.4), [1, 0, 0, 1, 1])
    model = mlp()
    first, second = (masks(keras_decomp.prune(model, sparsity=0.9)) for _ in range(2))
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_magnitude_prunes_the_smallest_weights():
    model = mlp()
    pruned = keras_decomp.prune(model, method="magnitude", sparsity=0.75)
    for name, mask in masks(pruned).items():
        w = np.abs(kernels(model)[name])
        assert w[mask == 0].max() <= w[mask == 1].min()


def test_trifactor_scores_by_the_shared_approximation():
    model = mlp()
    ranks = [5, 4, 3, 2]
    fit = trifactorize([kernels(model)[layer.name] for layer in model.layers], ranks=ranks, sweeps=30)
    for criterion, score in (("approximation", lambda w, a: np.abs(a)),
                             ("paper", lambda w, a: np.abs(w) - np.abs(a))):
        got = masks(keras_decomp.prune(model, sparsity=0.6, ranks=ranks, criterion=criterion))
        for j, layer in enumerate(model.layers):
            s = score(kernels(model)[layer.name], fit.approximation(j))
            mask = got[layer.name]
            assert s[mask == 0].max() <= s[mask == 1].min() + 1e-6


def test_trifactor_at_full_rank_is_magnitude_pruning():
    model = mlp()
    full = masks(keras_decomp.prune(model, sparsity=0.7, ranks=1000))
    magnitude = masks(keras_decomp.prune(model, method="magnitude", sparsity=0.7))
    for name in full:
        assert np.mean(full[name] == magnitude[name]) > 0.98  # up to ties within rounding


def test_only_the_named_layers_are_pruned_and_biases_are_kept():
    model = mlp()
    pruned = keras_decomp.prune(model, sparsity=0.5, layers=[model.layers[1].name])
    kinds = [type(layer).__name__ for layer in pruned.layers]
    assert kinds == ["Dense", "PrunedDense", "Dense"]
    for old, new in zip(model.layers, pruned.layers):
        np.testing.assert_array_equal(ops.convert_to_numpy(old.bias), ops.convert_to_numpy(new.bias))
    np.testing.assert_array_equal(kernels(model)[model.layers[0].name], kernels(pruned)[pruned.layers[0].name])


def test_pruning_a_pruned_model_keeps_its_zeros():
    model = mlp()
    once = keras_decomp.prune(model, sparsity=0.5)
    twice = keras_decomp.prune(once, method="magnitude", sparsity=0.8)
    for name, mask in masks(twice).items():
        assert np.all(mask[masks(once)[name] == 0] == 0)
    with pytest.raises(DecompError, match="pruned already, more than"):
        keras_decomp.prune(twice, sparsity=0.5)


def test_compile_settings_carry_over():
    pruned = keras_decomp.prune(mlp(), sparsity=0.5)
    assert pruned.compiled
    x, y = toy_data()
    assert np.isfinite(pruned.evaluate(x, y, verbose=0))


@pytest.mark.slow
def test_save_and_load_keep_the_masks(tmp_path):
    pruned = keras_decomp.prune(mlp(), sparsity=0.8)
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer).__name__ for layer in loaded.layers] == ["PrunedDense"] * 3
    for name, mask in masks(pruned).items():
        np.testing.assert_array_equal(masks(loaded)[name], mask)
    x, y = toy_data()
    np.testing.assert_allclose(loaded(x), pruned(x), rtol=1e-6)
    loaded.fit(x, y, epochs=2, batch_size=16, verbose=0)  # fine-tuning goes on after loading
    for name, mask in masks(loaded).items():
        assert np.all(kernels(loaded)[name][mask == 0] == 0.0)


@pytest.mark.slow
def test_strip_gives_plain_dense_layers_with_the_same_outputs(tmp_path):
    pruned = keras_decomp.prune(mlp(), sparsity=0.9)
    x, y = toy_data()
    pruned.fit(x, y, epochs=1, verbose=0)
    plain = keras_decomp.strip(pruned)
    assert [type(layer) for layer in plain.layers] == [keras.layers.Dense] * 3
    np.testing.assert_allclose(plain(x), pruned(x), rtol=1e-6, atol=1e-6)
    for name, mask in masks(pruned).items():
        assert np.all(kernels(plain)[name][mask == 0] == 0.0)
    path = tmp_path / "plain.keras"
    plain.save(path)
    again = keras.saving.load_model(path)
    assert len(again.weights) == 6  # kernels and biases, no masks
    np.testing.assert_allclose(again(x), pruned(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="random"), r"method must be one of \('trifactor', 'magnitude'\)"),
    (dict(criterion="loose"), r"criterion must be one of"),
    (dict(sparsity=1.0), r"sparsity must be a fraction in \[0, 1\), got 1.0"),
    (dict(sparsity=-0.1), r"sparsity must be a fraction"),
    (dict(layers=["nope"]), r"the model has no layer 'nope'"),
])
def test_bad_prune_arguments(kwargs, message):
    with pytest.raises(DecompError, match=message):
        keras_decomp.prune(mlp(), **kwargs)


def test_only_dense_layers_can_be_pruned():
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(DecompError, match="layer 'conv' is a Conv2D; only keras Dense layers can be pruned"):
        keras_decomp.prune(model, layers=["conv"])
    assert [type(layer).__name__ for layer in keras_decomp.prune(model, sparsity=0.5).layers] == \
        ["Conv2D", "Flatten", "PrunedDense"]


# ---- structured shrinking ---------------------------------------------------------------------------

def test_shrink_shares_factors_and_starts_from_the_factorisation():
    model = mlp()
    report = {}
    small = shrink(model, ranks=[6, 5, 4, 3], report=report)
    first, second, third = small.layers
    assert first.tied_variables["shrink0_g1"] is second.tied_variables["shrink0_g1"]
    assert second.tied_variables["shrink0_g2"] is third.tied_variables["shrink0_g2"]
    fit = trifactorize([kernels(model)[layer.name] for layer in model.layers], ranks=[6, 5, 4, 3])
    for j, layer in enumerate(small.layers):
        np.testing.assert_allclose(ops.convert_to_numpy(layer.materialize()), fit.approximation(j), atol=1e-5)
        assert report[layer.name]["approximation_error"] == pytest.approx(fit.errors[j], rel=1e-6)
    x, y = toy_data()
    assert small.compiled
    small.fit(x, y, epochs=1, verbose=0)


def test_shrink_at_full_rank_keeps_the_outputs():
    model = mlp()
    x, _ = toy_data()
    np.testing.assert_allclose(shrink(model, ranks=100)(x), model(x), atol=1e-4)


# ---- the command ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_prune_command_prunes_fine_tunes_and_saves(tmp_path, capsys):
    from keras_decomp.cli.main import main
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
    model.save(tmp_path / "model.keras")
    out = tmp_path / "pruned.keras"
    assert main(["prune", str(tmp_path / "model.keras"), "--sparsity", "0.75", "--ranks", "0.5",
                 "--fine-tune-epochs", "1", "--data", "bundled", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sparsity 0.7500" in printed and "after 1 epoch(s) of fine-tuning" in printed
    loaded = keras.saving.load_model(out)
    assert list(mask_sparsity(loaded).values()) == [0.75, 0.75]
    stripped = tmp_path / "plain.keras"
    assert main(["prune", str(tmp_path / "model.keras"), "--method", "magnitude", "--data", "none", "--strip",
                 "--out", str(stripped)]) == 0
    assert [type(layer).__name__ for layer in keras.saving.load_model(stripped).layers] == ["Flatten", "Dense", "Dense"]
    assert main(["prune", str(tmp_path / "model.keras"), "--sparsity", "1.5", "--out", str(out)]) == 2
    assert "sparsity must be a fraction" in capsys.readouterr().err
