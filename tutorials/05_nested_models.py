"""Tutorial 5: decompose layers deep inside a model: a keras_hub vision transformer
and keras.applications MobileNetV2.

keras_decomp.decompose finds Dense, EinsumDense, Conv1D and Conv2D layers at any
depth by their path (``layer.path``), with a layer name, a path or a glob as the
pattern: here the feed-forward Dense layers and the attention EinsumDense layers
(query, key, value, output) inside four keras_hub TransformerEncoders.  With
``budget=`` the expressions leave out their size and each layer gets the size
that its own error curve earns.  The result saves to .keras with the plan of
what was decomposed (keyed by layer path), comes back from
keras_decomp.load_model with identical outputs, folds back into plain Keras
layers (keras_decomp.fold) and exports to TFLite.

Run it from the repository root (needs keras-hub: pip install -e '.[hub]'):

    .venv/bin/python tutorials/05_nested_models.py          # a few minutes on a CPU
    .venv/bin/python tutorials/05_nested_models.py --fast   # few images, one epoch
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's start-up messages

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp.compression.decompose import comparison  # noqa: E402
from keras_decomp.training.data import load  # noqa: E402


def options():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="few images, one epoch")
    parser.add_argument("--out", default="runs/tutorial_05", help="where the .tflite files go")
    args = parser.parse_args()
    args.fast = args.fast or os.environ.get("KERAS_DECOMP_TUTORIAL_FAST") == "1"
    return args


def vit(dim=32, depth=4, heads=4):
    """Patches (a strided Conv2D) -> learned positions -> TransformerEncoder x depth -> pooling -> Dense."""
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Reshape((49, dim))(keras.layers.Conv2D(dim, 4, strides=4, name="patches")(inputs))
    x = x + keras_hub.layers.PositionEmbedding(49, name="positions")(x)
    for i in range(depth):
        x = keras_hub.layers.TransformerEncoder(2 * dim, heads, name=f"encoder_{i}")(x)
    outputs = keras.layers.Dense(10, name="classifier")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="vit")


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(model(x, training=False)), -1) == y))


def main() -> None:
    args = options()
    out = Path(args.out)
    images, epochs = (512, 1) if args.fast else (5000, 4)
    keras.utils.set_random_seed(0)

    # --- 1. a small vision transformer from keras_hub layers, trained briefly -------------
    data = load("fashion_mnist", source="bundled")
    x_train, y_train = data.x_train[:images].astype("float32") / 255.0, data.y_train[:images]
    x_test, y_test = data.x_test[:images].astype("float32") / 255.0, data.y_test[:images]
    model = vit()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    dense_accuracy = accuracy(model, x_test, y_test)
    print(f"ViT: {model.count_params():,} parameters, test accuracy {dense_accuracy:.4f}")

    # --- 2. the layers a pattern reaches ----------------------------------------------------
    # layer.path names each layer by where it sits: encoder_0/self_attention_layer/query
    # is the query EinsumDense ("abc,cde->abde") of the first block's attention, read as
    # the matrix (32 inputs, 4 heads x 8) for the expression.
    patterns = {"*feedforward_*_dense": "lowrank", "*self_attention_layer/*": "lowrank"}
    print("\nencoder_0 holds:", ", ".join(layer.path for layer in model.get_layer("encoder_0")._flatten_layers()
                                          if type(layer).__name__ in ("Dense", "EinsumDense")))

    # --- 3. a whole-model budget: a quarter of those parameters, sizes from the spectra -----
    errors = {}
    small = keras_decomp.decompose(model, patterns, budget=0.25, report=errors)
    print("\nbudget=0.25 with lowrank, the rank of each layer chosen from its singular values:")
    print(comparison(model, small, errors, (dense_accuracy, accuracy(small, x_test, y_test))))
    small.fit(x_train, y_train, batch_size=64, epochs=1, verbose=0)  # compile settings carried over
    print(f"after one epoch of fine-tuning: test accuracy {accuracy(small, x_test, y_test):.4f}")

    # --- 4. save, load in the same structure, fold, export ---------------------------------
    with tempfile.TemporaryDirectory() as folder:
        small.save(f"{folder}/small.keras")  # the factors, and the plan keyed by layer path
        back = keras_decomp.load_model(f"{folder}/small.keras")
    same = np.abs(np.asarray(back(x_test[:32])) - np.asarray(small(x_test[:32]))).max()
    print(f"\nsaved and loaded: max |difference| {same:.1e}")
    plain = keras_decomp.fold(small)  # plain Dense/EinsumDense layers holding W
    kinds = {type(layer).__module__.split(".")[0] for layer in plain._flatten_layers()}
    print(f"folded: layers from {sorted(kinds)}, max |difference| "
          f"{np.abs(np.asarray(plain(x_test[:32])) - np.asarray(small(x_test[:32]))).max():.1e}")
    for form in ("factored", "folded"):
        report = keras_decomp.export(small, out / f"vit_{form}.tflite", mode=form, sample=x_test[:8])
        print(f"TFLite ({form}): {report['bytes']:,} bytes, LiteRT vs Keras max |diff| {report['max_abs_diff']:.1e}")

    # --- 5. keras.applications MobileNetV2: its 1x1 convolutions and classifier ------------
    mobile = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    compressed = keras_decomp.decompose(mobile, {"*_project": "lowrank(params=0.5)",  # expanded_conv_project too
                                                 "block_*_expand": "lowrank(params=0.5)",
                                                 "Conv_1": "lowrank(params=0.5)", "predictions": "lowrank(r=8)"})
    colour = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        compressed.save(f"{folder}/mobile.keras")
        again = keras_decomp.load_model(f"{folder}/mobile.keras")
    decomposed = sum(isinstance(layer, keras_decomp.layers.Conv2D) for layer in again.layers)
    diff = np.abs(np.asarray(again(colour)) - np.asarray(compressed(colour))).max()
    report = keras_decomp.export(again, out / "mobilenet.tflite", mode="auto", sample=colour)
    print(f"\nMobileNetV2: {decomposed} 1x1 convolutions decomposed, {mobile.count_params():,} -> "
          f"{compressed.count_params():,} parameters; saved and loaded: max |difference| {diff:.1e}; "
          f"TFLite {report['bytes']:,} bytes, max |diff| {report['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
