"""Post-training compression of a trained MLP's Dense layers by products of sparse factors.

Train the MLP of specs/mlp.yaml (784 -> 1024 -> 512 -> 10, ReLU) on Fashion-MNIST, then for
each fraction f (5%, 10%, 20%) replace both hidden Dense layers by ``sparse(q=2, params=f)``
with ``keras_decomp.decompose`` (hierarchical palm4MSA chooses the supports and values from
the trained kernels), and report: the relative error of each kernel, the test accuracy right
after compression and after fine-tuning, the trainable parameters of the two layers, and the
speed of a batch-1 forward pass of the whole model (compiled, median over rounds) against the
dense model, for the cost model's choice ("auto": the gather apply at batch 1) and with
materialised kernels.  The classifier (512 -> 10) stays dense.

    .venv/bin/python benchmarks/sparse_mnist.py                     # bundled subset (5000 / 1000 images)
    .venv/bin/python benchmarks/sparse_mnist.py --source auto       # full data when installed
    .venv/bin/python benchmarks/sparse_mnist.py --epochs 1 --iters 10 --fractions 0.1   # quick
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp import data as kdata  # noqa: E402
from keras_decomp.structures import sparse as sparse_structure  # noqa: E402

HIDDEN = ("fc1", "fc2")


def mlp():
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(1024, activation="relu", name="fc1"),
                             keras.layers.Dense(512, activation="relu", name="fc2"),
                             keras.layers.Dense(10, name="out")])


def compile_model(model, lr=1e-3):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def accuracy(model, x, y) -> float:
    logits = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def forward_ms(model, rounds=7, calls=200) -> float:
    """Median over rounds of the mean time of one compiled batch-1 forward pass."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).random((1, 28, 28, 1), dtype=np.float32))
    step = tf.function(lambda t: model(t, training=False))
    for _ in range(20):
        step(x)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = step(x)
        np.asarray(out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return float(np.median(times))


def with_mode(model, mode):
    """The same model with every decomposed layer forced to ``mode``."""
    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras_decomp.layers.Dense):
            config["mode"] = mode
        return layer.__class__.from_config(config)
    new = keras.models.clone_model(model, clone_function=clone)
    new.set_weights(model.get_weights())
    return new


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="bundled", help="data source for keras_decomp.data.load")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the dense model")
    parser.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs after compression")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--q", type=int, default=2, help="number of sparse factors")
    parser.add_argument("--iters", type=int, default=sparse_structure.N_ITER,
                        help="palm4MSA sweeps per stage of the fit")
    args = parser.parse_args()
    sparse_structure.N_ITER = args.iters
    keras.utils.set_random_seed(0)
    data = kdata.load("fashion_mnist", source=args.source)
    x_train, x_test = (a.astype("float32") / 255.0 for a in (data.x_train, data.x_test))
    y_train, y_test = data.y_train, data.y_test
    print(f"data: {data.source}, {len(x_train)} train / {len(x_test)} test images; keras {keras.__version__}, "
          f"backend {keras.backend.backend()}, load average {os.getloadavg()[0]:.1f}")

    dense = compile_model(mlp())
    dense.fit(x_train, y_train, epochs=args.epochs, batch_size=128, verbose=0)
    dense_params = sum(dense.get_layer(n).count_params() for n in HIDDEN)
    base_acc = accuracy(dense, x_test, y_test)
    base_ms = forward_ms(dense)
    print(f"dense MLP: test accuracy {base_acc:.4f}, fc1+fc2 {dense_params} parameters, "
          f"batch-1 forward {base_ms:.3f} ms")
    header = ("fraction", "expr", "params fc1+fc2", "rel.err fc1", "rel.err fc2", "fit s", "acc compressed",
              "acc fine-tuned", "fwd ms auto", "x dense", "fwd ms materialize", "x dense")
    print(" | ".join(header))
    for fraction in args.fractions:
        expr = f"sparse(q={args.q}, params={fraction:g})"
        errors = {}
        start = time.perf_counter()
        small = keras_decomp.decompose(dense, {name: expr for name in HIDDEN}, report=errors)
        fit_seconds = time.perf_counter() - start
        print(f"  {expr}: decomposed in {fit_seconds:.0f} s", flush=True)
        params = sum(small.get_layer(n).count_params() for n in HIDDEN)
        compile_model(small)
        acc_before = accuracy(small, x_test, y_test)
        small.fit(x_train, y_train, epochs=args.finetune, batch_size=128, verbose=0)
        acc_after = accuracy(small, x_test, y_test)
        print(f"  fine-tuned in {time.perf_counter() - start - fit_seconds:.0f} s", flush=True)
        auto_ms = forward_ms(small)
        mat_ms = forward_ms(with_mode(small, "materialize"), rounds=3, calls=10)  # ~1 GFLOP a call
        print(" | ".join([f"{fraction:.2f}", expr, f"{params} ({params / dense_params:.1%})",
                          f"{errors['fc1']:.3f}", f"{errors['fc2']:.3f}", f"{fit_seconds:.0f}",
                          f"{acc_before:.4f}", f"{acc_after:.4f}", f"{auto_ms:.3f}", f"{auto_ms / base_ms:.2f}",
                          f"{mat_ms:.3f}", f"{mat_ms / base_ms:.2f}"]), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
