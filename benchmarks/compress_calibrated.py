"""Post-training compression with calibration data, against weight-only fits, on full Fashion-MNIST.

A dense model (the MLP 784-512-512-10, or LeNet) is trained here; its compressed layers (the MLP's
two hidden layers; LeNet's conv2 and fc1) are replaced by every family at a fraction of their
parameters, fitted to the trained kernels

- in the weight norm ||W - E||_F (``decompose(model, {...})``), and
- in the data norm over the inputs of ``--calibrate`` training images, layer after layer
  (``decompose(model, {...}, data=images)``): by default ``--calibration asymmetric``,
  ||X W - Z E||_F with Z the compressed model's inputs and X the original's; ``sequential``,
  ||Z (W - E)||_F (the tables of BENCHMARKS.md before 2026-12-07); ``--center`` for centred fits
  with bias correction;

then the calibrated model is fine-tuned for one epoch with the labels only, and, from the same
start, by distillation from the dense model (``fine_tune``); the same structured model is also
trained from scratch for the dense model's epochs + 1.  One CSV row per (family, fraction) is
appended to ``--csv`` as soon as it is measured, so a partial run keeps what finished;
``--plot`` draws accuracy against parameters from that file.

    .venv/bin/python benchmarks/compress_calibrated.py --model mlp --epochs 5 --csv runs/calib_mlp.csv
    .venv/bin/python benchmarks/compress_calibrated.py --plot runs/calib_mlp.csv --out docs/figures/calibrated_mlp.png
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

FAMILIES = {  # family -> expression for a (n, m) kernel at a fraction f of its n*m parameters
    "lowrank": lambda f, n, m: f"lowrank(params={f})",
    "tri": lambda f, n, m: f"tri(params={f})",
    "sss": lambda f, n, m: f"sss(p=16, params={f})",
    # fewer, larger blocks leave more of the budget to the state size d (at 10% of 784x512, p=16
    # gives d=5); run on request only (--families sss_p32,sss_p64)
    "sss_p32": lambda f, n, m: f"sss(p=32, params={f})",
    "sss_p64": lambda f, n, m: f"sss(p=64, params={f})",
    "sketch": lambda f, n, m: f"sketch(params={f})",
    "dct_basis": lambda f, n, m: f"DCT[:{max(1, math.floor(f * n))}] dense",  # a fixed basis, trained coefficients
    "monarch": lambda f, n, m: f"monarch(params={f})",
    "sparse": lambda f, n, m: f"sparse(q=2, params={f})",
}
COLUMNS = ["model", "family", "fraction", "params_compressed", "params_dense_layers", "dense", "weight_only",
           "calibrated", "weight_error", "data_error", "labels_1ep", "distill_1ep", "scratch", "scratch_epochs",
           "fit_seconds", "calibration"]  # the last: decompose's mode (+centred), absent from older files


def mlp(expressions=None, seed=0):
    import keras

    from keras_decomp import layers
    expressions = expressions or {}

    def dense(name, units, activation=None):
        kw = dict(units=units, activation=activation, name=name)
        return layers.Dense(W=expressions[name], seed=seed, **kw) if name in expressions else keras.layers.Dense(**kw)
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), dense("hidden1", 512, "relu"),
                             dense("hidden2", 512, "relu"), dense("logits", 10)])


def lenet(expressions=None, seed=0):
    import keras

    from keras_decomp import layers
    expressions = expressions or {}

    def conv(name, filters):
        kw = dict(filters=filters, kernel_size=5, padding="same", activation="relu", name=name)
        return layers.Conv2D(W=expressions[name], seed=seed, **kw) if name in expressions else keras.layers.Conv2D(**kw)

    def dense(name, units, activation=None):
        kw = dict(units=units, activation=activation, name=name)
        return layers.Dense(W=expressions[name], seed=seed, **kw) if name in expressions else keras.layers.Dense(**kw)
    return keras.Sequential([
        keras.Input((28, 28, 1)), conv("conv1", 32), keras.layers.MaxPooling2D(2), conv("conv2", 64),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), dense("fc1", 1024, "relu"), dense("fc2", 10)])


MODELS = {"mlp": (mlp, ("hidden1", "hidden2")), "lenet": (lenet, ("conv2", "fc1"))}


def compile_(model, learning_rate=1e-3):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=512, verbose=0), axis=1) == y))


def run(args):
    import keras

    from keras_decomp.compression.decompose import decompose
    from keras_decomp.compression.distill import fine_tune
    from keras_decomp.training.data import load

    data = load("fashion_mnist", source="full")
    x_train, x_test = data.x_train.astype("float32") / 255.0, data.x_test.astype("float32") / 255.0
    y_train, y_test = data.y_train, data.y_test
    calibration = x_train[np.random.default_rng(args.seed).choice(len(x_train), args.calibrate, replace=False)]
    build, compressed = MODELS[args.model]
    keras.utils.set_random_seed(args.seed)
    t = time.time()
    if args.dense and Path(args.dense).exists():  # the same trained model for several runs
        from keras_decomp.layers import load_model
        dense = compile_(load_model(args.dense))
    else:
        dense = compile_(build())
        dense.fit(x_train, y_train, epochs=args.epochs, batch_size=128, verbose=0)
        if args.dense:
            dense.save(args.dense)
    dense_acc = accuracy(dense, x_test, y_test)
    print(f"dense {args.model}: {dense.count_params()} params, test accuracy {dense_acc:.4f} "
          f"({args.epochs} epochs, {time.time() - t:.0f} s)", flush=True)
    shapes = {name: _kernel_shape(dense.get_layer(name)) for name in compressed}
    dense_params = sum(n * m for n, m in shapes.values())
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if not csv_path.exists():
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)
    for fraction in args.fractions:
        for family in args.families:
            expressions = {name: FAMILIES[family](fraction, *shapes[name]) for name in compressed}
            try:
                row = _one(args, build, dense, expressions, calibration, (x_train, y_train), (x_test, y_test),
                           decompose, fine_tune, compile_)
            except Exception as err:  # a family that cannot be fitted here: say so, go on
                print(f"{family} at {fraction}: failed: {type(err).__name__}: {err}", flush=True)
                continue
            row = {"model": args.model, "family": family, "fraction": fraction, "params_dense_layers": dense_params,
                   "dense": dense_acc, **row}
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow([_fmt(row[c]) for c in COLUMNS])
            print(" ".join(f"{c}={_fmt(row[c])}" for c in COLUMNS[1:]), flush=True)


def _one(args, build, dense, expressions, calibration, train, test, decompose, fine_tune, compile_):
    import keras

    weight = decompose(dense, expressions)
    weight_only = accuracy(weight, *test)
    report, data_report = {}, {}
    t = time.time()
    calibrated = decompose(dense, expressions, data=calibration, calibration=args.calibration, center=args.center,
                           report=report, data_report=data_report)
    fit_seconds = time.time() - t
    calibrated_acc = accuracy(calibrated, *test)
    start = calibrated.get_weights()
    compile_(calibrated, args.fine_tune_lr)
    calibrated.fit(*train, epochs=1, batch_size=128, verbose=0)
    labels = accuracy(calibrated, *test)
    calibrated.set_weights(start)
    fine_tune(calibrated, dense, train, epochs=1, temperature=args.temperature, alpha=args.alpha,
              learning_rate=args.fine_tune_lr)
    distilled = accuracy(calibrated, *test)
    scratch = float("nan")
    if not args.no_scratch:
        keras.utils.set_random_seed(args.seed)
        model = compile_(build(expressions))
        model.fit(*train, epochs=args.epochs + 1, batch_size=128, verbose=0)
        scratch = accuracy(model, *test)
    params = sum(_kernel_params(calibrated.get_layer(name)) for name in expressions)
    return {"params_compressed": params, "weight_only": weight_only, "calibrated": calibrated_acc,
            "weight_error": np.mean(list(report.values())), "data_error": np.mean(list(data_report.values())),
            "labels_1ep": labels, "distill_1ep": distilled, "scratch": scratch, "scratch_epochs": args.epochs + 1,
            "fit_seconds": fit_seconds, "calibration": args.calibration + ("+centred" if args.center else "")}


def _kernel_shape(layer):
    kernel = layer.kernel
    return int(np.prod(kernel.shape[:-1])), int(kernel.shape[-1])


def _kernel_params(layer) -> int:
    bias = int(np.prod(layer.bias.shape)) if getattr(layer, "bias", None) is not None else 0
    return layer.count_params() - bias


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot(csv_file, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_file) as f:
        rows = list(csv.DictReader(f))
    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, column, title in ((axes[0], "calibrated", "right after compression (calibrated; dashed: weight-only)"),
                              (axes[1], "distill_1ep", "after 1 epoch (distillation; dotted: from scratch)")):
        for i, family in enumerate(families):
            mine = sorted((r for r in rows if r["family"] == family), key=lambda r: int(r["params_compressed"]))
            p = [int(r["params_compressed"]) for r in mine]
            color = f"C{i}"
            ax.plot(p, [float(r[column]) for r in mine], "o-", color=color, label=family)
            other = "weight_only" if column == "calibrated" else "scratch"
            ax.plot(p, [float(r[other]) for r in mine], "x--" if other == "weight_only" else "x:", color=color)
        ax.axhline(float(rows[0]["dense"]), color="k", lw=0.8, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("parameters of the compressed layers")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("test accuracy (full Fashion-MNIST)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def table(csv_file) -> str:
    """The CSV as a markdown table: accuracies in points, gaps to the dense model."""
    with open(csv_file) as f:
        rows = list(csv.DictReader(f))
    head = ("| family | fraction | params | weight-only | calibrated (gap) | data err / weight err | "
            "1 ep labels | 1 ep distill | scratch | fit s |")
    out = [head, "|---" * 10 + "|"]
    for r in sorted(rows, key=lambda r: (float(r["fraction"]), r["family"])):
        pct = lambda c: "-" if r[c] in ("nan", "") else f"{100 * float(r[c]):.1f}"  # noqa: E731
        gap = 100 * (float(r["calibrated"]) - float(r["dense"]))
        out.append(f"| {r['family']} | {float(r['fraction']):g} | {r['params_compressed']} | {pct('weight_only')} | "
                   f"{pct('calibrated')} ({gap:+.1f}) | {float(r['data_error']):.3f} / {float(r['weight_error']):.3f} | "
                   f"{pct('labels_1ep')} | {pct('distill_1ep')} | {pct('scratch')} | {float(r['fit_seconds']):.0f} |")
    return "\n".join(out)


def summary(csv_files) -> str:
    """Rows of several runs (seeds: one dense model each) grouped by model, family and fraction:
    mean and sample standard deviation of the calibrated gap and of the distilled gap to dense."""
    rows = []
    for name in csv_files:
        with open(name) as f:
            rows += list(csv.DictReader(f))
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["family"], float(r["fraction"])), []).append(r)
    out = ["| model | family | fraction | runs | dense | calibrated gap | 1 ep distill gap |", "|---" * 7 + "|"]
    for (model, family, fraction), mine in sorted(groups.items()):
        def stats(column):
            gaps = [100 * (float(r[column]) - float(r["dense"])) for r in mine]
            spread = f" +- {np.std(gaps, ddof=1):.2f}" if len(gaps) > 1 else ""
            return f"{np.mean(gaps):+.2f}{spread} ({', '.join(f'{g:+.1f}' for g in gaps)})"
        dense = ", ".join(f"{100 * float(r['dense']):.2f}" for r in mine)
        out.append(f"| {model} | {family} | {fraction:g} | {len(mine)} | {dense} | {stats('calibrated')} | "
                   f"{stats('distill_1ep')} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the dense model")
    parser.add_argument("--calibrate", type=int, default=1000, help="training images used as calibration data")
    parser.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.25, 0.05])
    parser.add_argument("--families", type=lambda s: s.split(","), default=[f for f in FAMILIES if not f.startswith("sss_p")])
    parser.add_argument("--calibration", default="asymmetric", choices=("asymmetric", "sequential", "original"),
                        help="decompose's calibration mode (the tables before 2026-12-07: sequential)")
    parser.add_argument("--center", action="store_true", help="centred fits with bias correction")
    parser.add_argument("--fine-tune-lr", type=float, default=1e-3,
                        help="Adam learning rate of both one-epoch fine-tunings (default 1e-3, as in training)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-scratch", action="store_true", help="skip training from scratch")
    parser.add_argument("--dense", help="a .keras file: load the trained dense model from it, or train and save it")
    parser.add_argument("--csv", default="runs/compress_calibrated.csv")
    parser.add_argument("--plot", help="draw this CSV instead of running")
    parser.add_argument("--out", default="docs/figures/compress_calibrated.png")
    parser.add_argument("--table", help="print this CSV as a markdown table instead of running")
    parser.add_argument("--summary", nargs="+", help="print these CSVs (runs of several seeds) as mean +- std")
    args = parser.parse_args()
    if args.summary:
        print(summary(args.summary))
    elif args.table:
        print(table(args.table))
    elif args.plot:
        plot(args.plot, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
