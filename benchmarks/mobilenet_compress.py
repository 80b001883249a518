"""keras.applications MobileNetV2 (weights=None, alpha=0.35, 32x32x3 inputs, 10 classes)
trained here on Fashion-MNIST, then its 1x1 convolutions (every ``*_expand`` and
``*project`` Conv2D and ``Conv_1``) and its classifier Dense decomposed by ``decompose``.

Images are padded from 28x28 to 32x32 and repeated over 3 channels.  Every
BatchNormalization layer's momentum is set to 0.9 before training (``--bn-momentum``):
the moving statistics then average the last ten or so steps, not the last hundred, so they
match the final weights better after a short training (same training, same weights: 0.8196
test accuracy with 0.9 against 0.8035 with Keras's default 0.99, BENCHMARKS.md).

Rows ``method:fraction``, as in vit_compress.py: ``lowrank:0.5`` is lowrank(params=0.5)
on every matched layer, ``budget:0.25`` lowrank sizes chosen per layer by budget=0.25.
Per row: parameters of the decomposed layers, test accuracy right after decompose
(``--calibrate N``: fitted on N training images, ``--calibration`` sequential by default), after
re-estimating the BatchNormalization statistics (``--bn-recalibrate N``:
keras_decomp.recalibrate_batchnorm on N training images) and after one fine-tuning
epoch; the largest output difference after save + keras_decomp.load_model; the TFLite
file size and batch-1 latency in factored and in folded form (the dense model's beside
them, measured in the same interleaved rounds, median of each).

    .venv/bin/python benchmarks/mobilenet_compress.py --quick      # bundled subset, minutes
    .venv/bin/python benchmarks/mobilenet_compress.py --data full --epochs 2 --dense /tmp/mnv2.keras \\
        --rows lowrank:0.5,budget:0.25 --bn-recalibrate 2000
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
from keras_decomp.export import latency  # noqa: E402
from keras_decomp.training.data import load  # noqa: E402
from vit_compress import accuracy, compile_, matched_kernels, tune_and_reload  # noqa: E402  (this folder is on sys.path)

PATTERNS = ("*_expand", "*project", "Conv_1", "predictions")  # the 1x1 convolutions and the classifier


def mobilenet(seed=0, momentum=0.9):
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                           classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum  # 0.9: statistics of the last ~10 steps, not ~100
    return model


def rgb32(images):
    """uint8 (N, 28, 28, 1) -> float32 (N, 32, 32, 3) in [0, 1]: padded by 2, channel repeated."""
    x = np.pad(np.asarray(images, "float32") / 255.0, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return np.repeat(x, 3, axis=-1)


def pipelines(data, batch_size=128, seed=0):
    import tensorflow as tf

    def convert(images, labels):
        x = tf.pad(tf.cast(images, tf.float32) / 255.0, [[0, 0], [2, 2], [2, 2], [0, 0]])
        return tf.repeat(x, 3, axis=-1), labels

    def pipeline(x, y, shuffled):
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if shuffled:
            ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).map(convert, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return pipeline(data.x_train, data.y_train, True), pipeline(data.x_test, data.y_test, False)


def dense_model(args, train, test):
    if args.dense and os.path.exists(args.dense):
        model = keras.saving.load_model(args.dense)
        print(f"dense: loaded {args.dense}")
        return model
    start = time.time()
    model = mobilenet(momentum=args.bn_momentum)
    compile_(model, 1e-3)
    model.fit(train, epochs=args.epochs, verbose=2)
    print(f"dense: trained {args.epochs} epoch(s) in {time.time() - start:.0f} s")
    if args.dense:
        model.save(args.dense)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bundled", choices=("bundled", "full", "auto"))
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the dense model")
    parser.add_argument("--dense", default=None, help="a .keras file: loaded if it exists, else written after training")
    parser.add_argument("--rows", default="lowrank:0.5,budget:0.25", help="method:fraction pairs (lowrank, budget)")
    parser.add_argument("--bn-momentum", type=float, default=0.9, help="BatchNormalization momentum in training")
    parser.add_argument("--calibrate", type=int, default=0, help="decompose with data=N training images")
    parser.add_argument("--calibration", default="sequential", choices=("sequential", "asymmetric", "original"),
                        help="decompose's calibration mode (BENCHMARKS.md's rows: sequential)")
    parser.add_argument("--bn-recalibrate", type=int, default=0,
                        help="re-estimate the BatchNormalization statistics on N training images after decompose")
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300, help="TFLite batch-1 runs per round")
    parser.add_argument("--quick", action="store_true", help="bundled data, 1 epoch, lowrank:0.5 only")
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.rows, args.runs = "bundled", 1, "lowrank:0.5", 50
    data = load("fashion_mnist", source=args.data)
    train, test = pipelines(data)
    print(f"data: {data.name} ({data.source}), {len(data.y_train)} train / {len(data.y_test)} test images; "
          f"keras {keras.__version__}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    print(f"command: {' '.join(sys.argv)}")
    start = time.time()
    dense = dense_model(args, train, test)
    rows = [("dense", None, None, None, accuracy(dense, test), dense, None)]
    print(f"dense: test accuracy {rows[0][4]:.4f}")
    calibration = rgb32(data.x_train[:args.calibrate]) if args.calibrate else None
    statistics = rgb32(data.x_train[-args.bn_recalibrate:]) if args.bn_recalibrate else None
    check = rgb32(data.x_test[:64])
    for row in filter(None, args.rows.split(",")):  # --rows "": the dense model only
        method, fraction = row.split(":")[0], float(row.split(":")[1])
        expression = {"lowrank": f"lowrank(params={fraction})", "budget": "lowrank"}[method]
        errors = {}
        small = keras_decomp.decompose(dense, {p: expression for p in PATTERNS}, data=calibration,
                                       calibration=args.calibration,
                                       budget=fraction if method == "budget" else None, report=errors)
        print(f"{row}: relative error of the kernels per layer {min(errors.values()):.3f} to "
              f"{max(errors.values()):.3f} (median {np.median(list(errors.values())):.3f})", flush=True)
        decomposed = accuracy(small, test)
        recalibrated = None
        if statistics is not None:
            keras_decomp.recalibrate_batchnorm(small, statistics)
            recalibrated = accuracy(small, test)
        back, same = tune_and_reload(small, train, args.fine_tune_epochs, check)
        rows.append((f"{method} {fraction:g}", decomposed, recalibrated, same, accuracy(back, test), back,
                     expression))
        print(f"{rows[-1][0]}: decomposed {decomposed:.4f}, BN re-estimated {recalibrated}, fine-tuned "
              f"{rows[-1][4]:.4f}; reloaded max diff {same:.1e}; {time.time() - start:.0f} s", flush=True)
    report(rows, args, check[:1])


def report(rows, args, sample):
    dense_kernels = matched_kernels(rows[0][5], PATTERNS)
    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for name, *_, model, _ in rows:
            for mode in ("factored", "folded"):
                path = f"{folder}/{name.replace(' ', '_')}_{mode}.tflite"
                files[name, mode] = (keras_decomp.export(model, path, mode=mode, sample=sample, check=True), path)
        times = {key: [] for key in files}
        for _ in range(3):  # interleaved rounds: the machine's load hits every file alike
            for key, (_, path) in files.items():
                times[key].append(latency(path, sample, runs=args.runs))
        print("\n| model | decomposed layers' params | acc. after decompose | after BN re-estimate "
              "| after fine-tune (dense: trained) | reload max diff | TFLite factored KB, ms | TFLite folded KB, ms |")
        print("|---|---|---|---|---|---|---|---|")
        for name, decomposed, recalibrated, same, final, model, _ in rows:
            kernels = matched_kernels(model, PATTERNS)
            cells = [f"{v:.4f}" if v is not None else "-" for v in (decomposed, recalibrated)]
            forms = [f"{files[name, m][0]['bytes'] / 1024:.0f}, {np.median(times[name, m]) * 1e3:.2f}"
                     for m in ("factored", "folded")]
            print(f"| {name} | {kernels} ({kernels / dense_kernels:.0%}) | {cells[0]} | {cells[1]} | {final:.4f} | "
                  f"{f'{same:.1e}' if same is not None else '-'} | {forms[0]} | {forms[1]} |")


if __name__ == "__main__":
    main()
