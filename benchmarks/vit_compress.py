"""A small vision transformer from keras_hub layers on Fashion-MNIST, compressed by
``decompose`` inside its blocks: the feed-forward Dense and the attention EinsumDense
layers of its four TransformerEncoders, to about 50% and 25% of their parameters with
lowrank, sss(p=4; --sss-p), sketch and monarch (each layer at ``params=f``) and with ``budget=f`` (lowrank sizes
chosen per layer from the spectra), each fine-tuned one epoch.

ViT: 7x7 patches (a strided Conv2D, 16 tokens of width 64; --patch 4 gives 49) + learned
positions -> TransformerEncoder(128, 4 heads) x 4 -> average pooling -> Dense(10).

Per row: test accuracy right after decomposition and after fine-tuning, parameters of
the matched kernels and of the whole model, the TFLite file (mode auto) and its batch-1
latency relative to the dense model's, measured side by side in one process
(interleaved rounds, the median of each).  The decomposed model is saved, loaded back
with keras_decomp.load_model and checked to predict identically before it is exported.

    .venv/bin/python benchmarks/vit_compress.py --quick                  # bundled subset, a few minutes
    .venv/bin/python benchmarks/vit_compress.py --data full --epochs 3   # full data
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp.export import latency, run_tflite  # noqa: E402
from keras_decomp.training.data import load  # noqa: E402

PATTERNS = ("*feedforward_*_dense", "*self_attention_layer/*")


def vit(dim=64, depth=4, heads=4, patch=7, seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    tokens = (28 // patch) ** 2
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(dim, patch, strides=patch, name="patches")(inputs)
    x = keras.layers.Reshape((tokens, dim))(x)
    x = x + keras_hub.layers.PositionEmbedding(tokens, name="positions")(x)
    for i in range(depth):
        x = keras_hub.layers.TransformerEncoder(2 * dim, heads, name=f"encoder_{i}")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="classifier")(x), name="vit")


def compile_(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])


def matched_kernels(model, patterns=PATTERNS):
    """Parameters of the kernels matched by ``patterns`` (without biases), dense or decomposed."""
    from keras_decomp.layers.base import _Decomposed
    from keras_decomp.layers.surgery import matches, walk

    total = 0
    for layer, _, _ in walk(model):
        if isinstance(layer, _Decomposed):
            total += layer.node.num_params
        elif any(matches(model, layer, p) for p in patterns) and hasattr(layer, "kernel"):
            total += int(np.prod(layer.kernel.shape))
    return total


def images(data, count):
    return np.asarray(data.x_test[:count], "float32").reshape((-1,) + tuple(data.input_shape)) / 255.0


def accuracy(model, test):
    return float(model.evaluate(test, verbose=0)[1])


def tune_and_reload(small, train, epochs, check):
    """Fine-tune ``small`` for ``epochs`` (Adam 5e-4), save it and load it back with
    keras_decomp.load_model: (the loaded model, the max |output difference| on ``check``)."""
    compile_(small, 5e-4)
    small.fit(train, epochs=epochs, verbose=0)
    with tempfile.TemporaryDirectory() as folder:  # the saved model is the one exported
        small.save(f"{folder}/m.keras")
        back = keras_decomp.load_model(f"{folder}/m.keras")
    return back, float(np.abs(np.asarray(back(check)) - np.asarray(small(check))).max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bundled", choices=("bundled", "full", "auto"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the dense model")
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--fractions", default="0.5,0.25")
    parser.add_argument("--methods", default="lowrank,sss,sketch,budget")
    parser.add_argument("--quick", action="store_true", help="bundled data, 1 epoch, 0.5 only, lowrank and budget")
    parser.add_argument("--runs", type=int, default=300, help="TFLite batch-1 runs per round")
    parser.add_argument("--rows", default=None,
                        help="method:fraction pairs instead of every method at every fraction, e.g. "
                             "lowrank:0.5,sss:0.5,budget:0.25")
    parser.add_argument("--sss-p", type=int, default=4, help="the SSS block count p of the sss rows")
    parser.add_argument("--patch", type=int, default=7, choices=(4, 7), help="patch size: 16 or 49 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.fractions, args.methods = "bundled", 1, "0.5", "lowrank,budget"
    data = load("fashion_mnist", source=args.data)
    train, test = data.pipelines(batch_size=128)
    print(f"data: {data.name} ({data.source}), {len(data.y_train)} train / {len(data.y_test)} test images; "
          f"keras {keras.__version__}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    print(f"command: {' '.join(sys.argv)}")
    start = time.time()
    dense = vit(patch=args.patch)
    compile_(dense, 1e-3)
    dense.fit(train, epochs=args.epochs, verbose=2)
    rows = [("dense", None, accuracy(dense, test), None, dense)]
    print(f"dense: {rows[0][2]:.4f} after {args.epochs} epoch(s), {time.time() - start:.0f} s")
    pairs = [(m, float(f)) for f in args.fractions.split(",") for m in args.methods.split(",")]
    if args.rows:
        pairs = [(row.split(":")[0], float(row.split(":")[1])) for row in args.rows.split(",")]
    for method, fraction in pairs:
        expression = {"lowrank": f"lowrank(params={fraction})", "sss": f"sss(p={args.sss_p}, params={fraction})",
                      "sketch": f"sketch(params={fraction})", "monarch": f"monarch(params={fraction})",
                      "budget": "lowrank"}[method]
        small = keras_decomp.decompose(dense, {p: expression for p in PATTERNS},
                                       budget=fraction if method == "budget" else None)
        before = accuracy(small, test)
        back, same = tune_and_reload(small, train, args.fine_tune_epochs, images(data, 64))
        rows.append((f"{method} {fraction:g}", expression, before, accuracy(back, test), back))
        print(f"{rows[-1][0]}: {before:.4f} -> {rows[-1][3]:.4f}; reloaded max diff {same:.1e}; "
              f"{time.time() - start:.0f} s", flush=True)
    report(rows, args, data)


def report(rows, args, data):
    sample = images(data, 1)
    dense_kernels = matched_kernels(rows[0][4])
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for name, _, _, _, model in rows:
            path = f"{folder}/{name.replace(' ', '_')}.tflite"
            files[name] = (keras_decomp.export(model, path, mode="auto", sample=sample, check=True), path)
        times = {name: [] for name in files}
        for _ in range(3):  # interleaved rounds: the machine's load hits every file alike
            for name, (_, path) in files.items():
                times[name].append(latency(path, sample, runs=args.runs))
        base = np.median(times["dense"])
        print("\n| model | acc. after decompose | acc. after fine-tuning (dense: trained) | matched kernels | model params "
              "| TFLite KB | latency vs dense |")
        print("|---|---|---|---|---|---|---|")
        for name, expression, before, after, model in rows:
            report_, _ = files[name]
            kernels = matched_kernels(model)
            first = f"{before:.4f}" if after is not None else "-"
            last = f"{after:.4f}" if after is not None else f"{before:.4f}"
            print(f"| {name} | {first} | {last} | {kernels} ({kernels / dense_kernels:.0%}) | "
                  f"{model.count_params()} | {report_['bytes'] / 1024:.0f} | "
                  f"{np.median(times[name]) / base:.2f} |")
        assert run_tflite  # the export check ran each file in the LiteRT interpreter


if __name__ == "__main__":
    main()
