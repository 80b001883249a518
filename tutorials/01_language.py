"""Tutorial 1: the decomposition language in five minutes.

One line of text says how a layer's weight matrix W is built.  This walk-through
parses expressions, reads their shapes and parameter counts, looks at the error
messages, checks a few equivalences numerically, and finally builds a Keras
layer from an expression and checks that it computes x @ W + b.

Run it from the repository root:

    .venv/bin/python tutorials/01_language.py          # a few seconds
    .venv/bin/python tutorials/01_language.py --fast   # the same, smaller layer

The language reference is grammar/README.md.
"""

import argparse
import os

import numpy as np

import keras_decomp
from keras_decomp import DecompError, parse


def fast_mode() -> bool:
    """--fast on the command line or KERAS_DECOMP_TUTORIAL_FAST=1: small and quick."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small sizes, for tests")
    args = parser.parse_args()
    return args.fast or os.environ.get("KERAS_DECOMP_TUTORIAL_FAST") == "1"


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 66 - len(title)))


def main() -> None:
    fast = fast_mode()
    rng = np.random.default_rng(0)

    # --- 1. parse -----------------------------------------------------------
    # parse(text, n, m) reads an expression for a matrix with n inputs and m
    # outputs (the Keras kernel convention: y = x W, W is (n, m)).  Symbols
    # such as k are bound with params=.  Nothing here needs TensorFlow.
    section("1. parse an expression")
    d = parse("W = DCT2[:k] dense", 784, 10, params={"k": 100})
    print("shape:", d.shape, " trainable parameters:", d.num_params, " (dense would be", 784 * 10, ")")
    # The summary has one row per node of the operator tree: shape, trainable
    # and fixed entries, FLOPs of applying it factor by factor ("apply") or of
    # multiplying W out first ("mat"), at batch 1 and 128.
    print(d.summary())

    # --- 2. the forms, with their counts and dense shapes ---------------------
    # Every node of the IR can be turned into its dense (n, m) matrix, given
    # values for its trainable arrays; init() draws Keras-style initial values.
    section("2. sums, products, slices, bases, named parameters, structures")
    n, m = 784, 10
    examples = [
        ("dense", "the reference: a full trainable matrix"),
        ("DCT[:k] dense", "product, left factor first: k lowest DCT frequencies, then dense (k, m)"),
        ("P[:k] dense", "k random pixels, then dense"),
        ("sum(G, n=8)", "8 fixed Gaussians with one trainable coefficient each"),
        ("sum(G, n=20) + sum(R, n=50)", "a sum: full-rank plus rank-1 random terms"),
        ("(A1*a + B1*b)(DCT[:k])", "A1, B1 fixed (uppercase), a, b trainable scalars"),
        ("lowrank(r=4)", "a structure with an argument"),
        ("lowrank(params=0.25)", "the largest rank within 25% of the dense count"),
        ("sss(p=8, d=4) + lowrank(r=2)", "families compose"),
        ("sketch(k=16, l=2)", "tensor sketching"),
        ("g0 s1 g1'", "three named trainable factors, the last transposed"),
    ]
    print(f"{'expression':32} {'params':>7}  {'to_dense':10}  what")
    for text, what in examples:
        node = parse(text, n, m, params={"k": 10}).stages[0]
        W = node.to_dense(node.init(rng))
        print(f"{text:32} {node.num_params:>7}  {str(W.shape):10}  {what}")

    # Stages: `|` separates training stages; num_params is the first stage's.
    staged = parse("W = sum(G, n=10) | sum(G, n=50) | dense", n, m)
    print("\nstages of 'sum(G, n=10) | sum(G, n=50) | dense':",
          [stage.num_params for stage in staged.stages], "trainable parameters")

    # The same name twice is the same variable: one (n, m) matrix a, one scalar s.
    tied = parse("(a + a) * s", 6, 4).stages[0]
    print("'(a + a) * s' has arrays", {k: v for k, v in tied.param_shapes().items()})

    # --- 3. errors ------------------------------------------------------------
    # Every mistake is a keras_decomp.DecompError (a ValueError): what is wrong,
    # the line with a caret under the culprit, and how to fix it.
    section("3. what an error looks like")
    for text in ("W = sum(G, n=8) DTC[:k]", "W = lowrank(r=4) DCT[:k]", "W = sum (G, n=8)"):
        try:
            parse(text, 784, 10, params={"k": 100})
        except DecompError as err:
            print(f"{type(err).__name__}: {err}\n")

    # --- 4. equivalences ------------------------------------------------------
    # Different spellings of the same operator give the same parameters and the
    # same dense matrix for the same values.
    section("4. equivalences, checked numerically")
    n, m = (16, 8) if fast else (64, 32)

    def dense_of(text, values=None):
        node = parse(text, n, m).stages[0]
        values = node.init(np.random.default_rng(1)) if values is None else values
        return node.to_dense(values), values

    pairs = [
        ("W = dense", "dense  # the target name and comments change nothing"),
        ("G dense", "G @ dense"),
        ("2 * dense", "dense * 2"),
        ("A1 + B1 g'", "A1 + (B1 (g'))"),  # precedence: products bind tighter than +
        ("lowrank(r=3)", "(lowrank(r=3)')'"),
    ]
    for left, right in pairs:
        a, values = dense_of(left)
        b, _ = dense_of(right, values)
        print(f"{left!r:16} == {right!r:52} max |diff| = {np.max(np.abs(a - b)):.1e}")
        assert np.allclose(a, b)
    # A fixed matrix drawn by seed is the same matrix wherever it appears ...
    zero, _ = dense_of("G(seed=3) - G(seed=3)")
    print("G(seed=3) - G(seed=3) is zero:", bool(np.all(zero == 0)))
    # ... and the DCT basis is orthonormal, so DCT DCT' is the identity.
    square = parse("DCT DCT'", n, n).stages[0].to_dense()
    print("DCT DCT' is the identity:", bool(np.allclose(square, np.eye(n))))
    # Stages line up: the first 10 draws of sum(G, n=50) are those of sum(G, n=10),
    # so the least-squares hand-over between the stages loses nothing.
    stages = parse("sum(G, n=10) | sum(G, n=50)", n, m).stages
    W10 = stages[0].to_dense(stages[0].init(rng))
    _, error = keras_decomp.approximate(W10, stages[1])
    print(f"hand-over sum(G, n=10) -> sum(G, n=50): relative error {error:.1e}")
    assert error < 1e-8

    # --- 5. a Keras layer from an expression ------------------------------------
    # keras_decomp.layers.Dense takes Keras's Dense arguments plus W=.  It parses
    # the expression for the input size when it is built, creates one variable
    # per trainable array and regenerates the fixed ones from their seeds.
    section("5. a Keras layer from an expression")
    import keras

    k = 20 if fast else 100
    layer = keras_decomp.layers.Dense(10, W="DCT2[:k] dense", params={"k": k}, name="dct")
    x = np.random.default_rng(2).random((8, 784)).astype("float32")
    y = np.asarray(layer(x))
    W = np.asarray(layer.materialize())  # the (784, 10) kernel the expression denotes
    b = np.asarray(layer.bias)
    print(f"layer '{layer.name}': W {W.shape}, {layer.count_params()} parameters "
          f"({k} x 10 + 10 bias) instead of {784 * 10 + 10}")
    print(f"max |layer(x) - (x @ W + b)| = {np.max(np.abs(y - (x @ W + b))):.1e}")
    assert np.allclose(y, x @ W + b, atol=1e-4)
    # Conv2D works the same way: W is the kernel reshaped to (kh*kw*cin, filters).
    conv = keras_decomp.layers.Conv2D(4, 3, W="sum(G, n=5)", padding="same")
    images = np.random.default_rng(3).random((2, 8, 8, 3)).astype("float32")
    out = np.asarray(conv(images))  # the first call builds the layer
    kernel = np.asarray(conv.materialize()).reshape(3, 3, 3, 4)
    reference = np.asarray(keras.ops.conv(images, kernel, padding="same")) + np.asarray(conv.bias)
    print(f"Conv2D with W='sum(G, n=5)': {conv.count_params()} parameters (5 + 4 bias); "
          f"max |conv - keras.ops.conv with its kernel| = {np.max(np.abs(out - reference)):.1e}")
    assert np.allclose(out, reference, atol=1e-4)
    print("\nlanguage tutorial: OK")


if __name__ == "__main__":
    main()
