"""Tensor-sketched LeNet on Fashion-MNIST: SK-CONV and SK-FC (``sketch(params=f)``) at about
1/5, 1/10 and 1/20 of the sketched layers' parameters, trained from scratch and made from a
trained model (decompose + fine-tune), beside the dense reference.

LeNet: conv 5x5 32, pool, conv 5x5 64, pool, dense 1024, dropout 0.5, dense 10.  The second
convolution (5*5*32 x 64, SK-CONV: the sketches act on its channel modes) and the first dense
layer (3136 x 1024, SK-FC) hold 99.3% of the weights and are sketched.  The first convolution
(cin = 1: nothing to sketch on the input side, and 1/20 of its 800 weights is less than one
sketch pair) and the 1024 x 10 classifier stay dense.

For each fraction it prints: the sketch sizes, the relative error of the paper's unbiased
estimator and of the least-squares fit to the trained kernels, test accuracy right after
decomposition with either initialisation, after fine-tuning (from least squares) and from
scratch.

    .venv/bin/python benchmarks/sketch_mnist.py --quick            # minutes on 2 CPU cores
    .venv/bin/python benchmarks/sketch_mnist.py                    # bundled subset, 5 epochs
    .venv/bin/python benchmarks/sketch_mnist.py --data full --epochs 10
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_decomp import decompose, layers  # noqa: E402
from keras_decomp.training.data import load  # noqa: E402
from keras_decomp.training.staging import kernel_matrix  # noqa: E402
from keras_decomp.fitting.sketch import compare  # noqa: E402

SKETCHED = ("conv2", "fc1")


def lenet(input_shape, expressions=None, seed=0):
    """LeNet; layers named in ``expressions`` are keras_decomp layers with that W."""
    expressions = expressions or {}

    def conv(name, filters):
        kw = dict(filters=filters, kernel_size=5, padding="same", activation="relu", name=name)
        return layers.Conv2D(W=expressions[name], seed=seed, **kw) if name in expressions else keras.layers.Conv2D(**kw)

    def dense(name, units, activation=None):
        kw = dict(units=units, activation=activation, name=name)
        return layers.Dense(W=expressions[name], seed=seed, **kw) if name in expressions else keras.layers.Dense(**kw)

    return keras.Sequential([
        keras.Input(input_shape), conv("conv1", 32), keras.layers.MaxPooling2D(2), conv("conv2", 64),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(), dense("fc1", 1024, "relu"),
        keras.layers.Dropout(0.5), dense("fc2", 10)])


def compiled(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def train(model, data, epochs, args, learning_rate=1e-3):
    """Fit ``model`` for ``epochs``; (test accuracy, seconds)."""
    compiled(model, learning_rate)
    x, y, _, _ = data
    start = time.perf_counter()
    if epochs:
        model.fit(x, y, batch_size=args.batch, epochs=epochs, shuffle=True, verbose=0)
    return accuracy(model, data), time.perf_counter() - start


def accuracy(model, data) -> float:
    _, _, x_test, y_test = data
    return float(model.evaluate(x_test, y_test, batch_size=512, verbose=0)[1])


def sketched_params(model) -> int:
    return sum(model.get_layer(name).node.num_params for name in SKETCHED)


def assign(model, values: dict) -> None:
    """values: layer name -> {IR key: array}."""
    for name, arrays_ in values.items():
        for key, value in arrays_.items():
            model.get_layer(name).decomposition_variables[key].assign(np.asarray(value, "float32"))


def from_trained(reference, data, expressions, args):
    """Decompose the trained reference (least squares); accuracy with the estimator's and with
    the least-squares initialisation, then fine-tuned from least squares."""
    report = {}
    small = compiled(decompose(reference, expressions, seed=args.seed, report=report), args.finetune_lr)
    fits = {name: compare(kernel_matrix(reference.get_layer(name)), small.get_layer(name).node)
            for name in SKETCHED}
    row = {"ls_error": report, "est_error": {name: fit.estimator_error for name, fit in fits.items()}}
    assign(small, {name: fit.estimator for name, fit in fits.items()})
    row["acc_estimator"] = accuracy(small, data)
    assign(small, {name: fit.least_squares for name, fit in fits.items()})
    row["acc_lstsq"] = accuracy(small, data)
    row["acc_finetuned"], row["seconds_finetune"] = train(small, data, args.finetune_epochs, args,
                                                          learning_rate=args.finetune_lr)
    row["params"] = sketched_params(small)
    row["sizes"] = {name: small.get_layer(name).node.label() for name in SKETCHED}
    return row


def arrays(args):
    data = load("fashion_mnist", source=args.data)
    scale = lambda x: (x.astype("float32") / 255.0)  # noqa: E731
    n = args.limit or len(data.x_train)
    return data.source, (scale(data.x_train[:n]), data.y_train[:n], scale(data.x_test), data.y_test)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bundled", choices=("bundled", "full", "auto", "idx", "tfds"))
    parser.add_argument("--epochs", type=int, default=None, help="reference and from-scratch epochs (5)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="after decomposing (2)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--fractions", default="0.2,0.1,0.05")
    parser.add_argument("--l", type=int, default=1, help="sketch pairs per term")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N training images")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="defaults of 2 epochs, 1 fine-tuning epoch and "
                                                                "2000 training images")
    args = parser.parse_args(argv)
    defaults = (2, 1, 2000) if args.quick else (5, 2, None)
    for name, default in zip(("epochs", "finetune_epochs", "limit"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    fractions = [float(f) for f in args.fractions.split(",")]

    source, data = arrays(args)
    print(f"# {' '.join(sys.argv)}")
    print(f"# data: {source}, {len(data[0])} training / {len(data[2])} test images; backend "
          f"{keras.backend.backend()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    keras.utils.set_random_seed(args.seed)
    reference = lenet(data[0].shape[1:])
    ref_acc, ref_seconds = train(reference, data, args.epochs, args)
    dense_params = sum(int(np.prod(reference.get_layer(n).kernel.shape)) for n in SKETCHED)
    print(f"# reference LeNet: {reference.count_params()} parameters ({dense_params} in conv2 + fc1 kernels), "
          f"{args.epochs} epochs, test accuracy {ref_acc:.4f} ({ref_seconds:.0f} s)")
    print()
    print("| fraction | conv2, fc1 | sketched params | rel. error est. / LS (conv2; fc1) | "
          "acc. after decompose est. / LS | acc. fine-tuned | acc. from scratch | reference |")
    print("|---|---|---|---|---|---|---|---|")
    for f in fractions:
        expressions = {name: f"sketch(params={f:g}, l={args.l})" for name in SKETCHED}
        row = from_trained(reference, data, expressions, args)
        keras.utils.set_random_seed(args.seed)
        scratch = lenet(data[0].shape[1:], expressions, seed=args.seed)
        scratch_acc, scratch_seconds = train(scratch, data, args.epochs, args)
        errors = "; ".join(f"{row['est_error'][n]:.3f} / {row['ls_error'][n]:.3f}" for n in SKETCHED)
        print(f"| {f:g} | {', '.join(row['sizes'][n] for n in SKETCHED)} | {row['params']} "
              f"({row['params'] / dense_params:.3f}) | {errors} | {row['acc_estimator']:.4f} / "
              f"{row['acc_lstsq']:.4f} | {row['acc_finetuned']:.4f} | {scratch_acc:.4f} | {ref_acc:.4f} |",
              flush=True)
        print(f"<!-- fraction {f:g}: fine-tune {row['seconds_finetune']:.0f} s, "
              f"scratch {scratch_seconds:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
