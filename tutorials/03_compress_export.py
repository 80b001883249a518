"""Tutorial 3: compress a trained Keras model, fine-tune it, export it to TFLite.

keras_decomp.decompose takes an ordinary, already-trained Keras model and a
{layer name: expression} mapping, and returns a new model whose named layers
are decomposed, each initialised from its trained kernel by the best fit the
expression allows (a Hankel-SVD truncation for SSS, palm4MSA for sparse
factors); every other weight is copied.  This walk-through trains a plain MLP
on the bundled Fashion-MNIST subset, compresses it twice (SSS matrices, then
products of sparse factors), fine-tunes both, exports all three models to
TFLite and runs the files in the LiteRT interpreter.

Run it from the repository root:

    .venv/bin/python tutorials/03_compress_export.py          # a minute or two on a CPU
    .venv/bin/python tutorials/03_compress_export.py --fast   # small layers, few images

The .tflite files go to --out (default runs/tutorial_03).
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's start-up messages

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp.compression.decompose import comparison  # noqa: E402
from keras_decomp.training.data import load  # noqa: E402


def options():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small hidden layers, few images and epochs")
    parser.add_argument("--out", default="runs/tutorial_03", help="where the .tflite files go")
    args = parser.parse_args()
    args.fast = args.fast or os.environ.get("KERAS_DECOMP_TUTORIAL_FAST") == "1"
    return args


def scores(model, x) -> np.ndarray:
    # A direct call rather than predict(): predict traces a function per model.
    return np.asarray(model(x, training=False))


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(scores(model, x), axis=-1) == y))


def main() -> None:
    args = options()
    out = Path(args.out)
    hidden = (64, 32) if args.fast else (256, 128)
    images, epochs, tune_epochs = (1024, 2, 1) if args.fast else (5000, 8, 3)
    keras.utils.set_random_seed(0)

    # --- 1. an ordinary Keras model, trained briefly --------------------------------
    data = load("fashion_mnist", source="bundled")  # ships with the package: no download
    x_train = data.x_train[:images].astype("float32") / 255.0
    y_train = data.y_train[:images]
    x_test = data.x_test[:images].astype("float32") / 255.0
    y_test = data.y_test[:images]
    model = keras.Sequential([
        keras.Input(data.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(hidden[0], activation="relu", name="fc1"),
        keras.layers.Dense(hidden[1], activation="relu", name="fc2"),
        keras.layers.Dense(10, name="logits"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    dense_accuracy = accuracy(model, x_test, y_test)
    print(f"plain MLP 784-{hidden[0]}-{hidden[1]}-10: {model.count_params():,} parameters, "
          f"test accuracy {dense_accuracy:.4f} ({len(y_test)} images)")

    # --- 2. compress it twice ---------------------------------------------------------
    # SSS: fc1 and fc2 become sequentially semiseparable matrices (p blocks, state
    # size d), fitted to the trained kernels by Hankel-SVD truncation.
    # sparse: fc1 keeps s inputs per output (one sparse factor: pruning), fc2
    # becomes a product of two sparse factors with s non-zeros per output each;
    # palm4MSA chooses the supports from the trained kernel.
    # The output layer is small and stays dense (it is copied as it is).  The fast
    # mode uses fewer SSS blocks: each block is a few more operations to trace.
    p1, p2 = (4, 2) if args.fast else (8, 4)
    recipes = {
        "sss": {"fc1": f"sss(p={p1}, d=8)", "fc2": f"sss(p={p2}, d=8)"},
        "sparse": {"fc1": "sparse(q=1, s=32)", "fc2": "sparse(q=2, s=8)"},
    }
    models = {"dense": model}
    rows = [("dense", model.count_params(), dense_accuracy, dense_accuracy, {})]
    for name, expressions in recipes.items():
        errors = {}
        start = time.perf_counter()
        small = keras_decomp.decompose(model, expressions, report=errors)
        seconds = time.perf_counter() - start
        before = accuracy(small, x_test, y_test)
        # decompose carries the compile settings over with a fresh optimizer, so the
        # new model can be fine-tuned at once.
        small.fit(x_train, y_train, batch_size=64, epochs=tune_epochs, verbose=0)
        after = accuracy(small, x_test, y_test)
        print(f"\n{name}: decomposed and fitted in {seconds:.1f} s")
        print(comparison(model, small, errors, (dense_accuracy, before)))
        rows.append((name, small.count_params(), before, after, errors))
        models[name] = small

    print("\nmodel   parameters  accuracy after decompose  after fine-tuning")
    for name, params, before, after, _ in rows:
        print(f"{name:7} {params:>10,}  {before:>24.4f}  {after:>17.4f}")

    # --- 3. export to TFLite and run the files in LiteRT ---------------------------------
    # export() writes each decomposed layer folded into one kernel or factored
    # (mode="auto": whichever stores fewer numbers), converts, and checks the file
    # against Keras in the LiteRT interpreter on the sample it is given.
    print()
    from ai_edge_litert.interpreter import Interpreter

    n_check = min(len(y_test), 300 if args.fast else 1000)
    for name, m in models.items():
        path = out / f"{name}.tflite"
        report = keras_decomp.export(m, path, mode="auto", sample=x_test[:64], labels=y_test[:64])
        # Running a .tflite file by hand: one image at a time (the file is traced at batch 1).
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        lite = []
        for image in x_test[:n_check]:
            interpreter.set_tensor(inp["index"], image[None])
            interpreter.invoke()
            lite.append(interpreter.get_tensor(outp["index"])[0])
        lite = np.stack(lite)
        reference = scores(m, x_test[:n_check])
        lite_accuracy = float(np.mean(np.argmax(lite, -1) == y_test[:n_check]))
        print(f"{name:7} {path}: {path.stat().st_size:>9,} bytes, forms {report['forms'] or '-'}")
        print(f"        LiteRT vs Keras on {n_check} images: max |diff| {np.max(np.abs(lite - reference)):.1e}, "
              f"accuracy {lite_accuracy:.4f} (Keras {accuracy(m, x_test[:n_check], y_test[:n_check]):.4f})")
    print(f"\nfinal test accuracy (sss, fine-tuned): {rows[1][3]:.4f}")


if __name__ == "__main__":
    main()
