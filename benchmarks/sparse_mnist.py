"""Post-training compression of a trained model's Dense layers by products of sparse factors.

Train the MLP of specs/mlp.yaml (784 -> 1024 -> 512 -> 10, ReLU; ``--model mlp``) or the LeNet
of specs/lenet.yaml (two 5x5 convolutions with pooling, 3136 -> 1024 -> 10; ``--model lenet``,
built from the spec) on Fashion-MNIST, then for each fraction f (5%, 10%, 20%) replace the
hidden Dense layers (MLP: both; LeNet: its one hidden Dense layer, 3.2 of its 3.3 million
weights; the convolutions stay) by ``sparse(q=2, params=f)``
with ``keras_decomp.decompose`` (hierarchical palm4MSA chooses the supports and values from
the trained kernels), and report: the relative error of each kernel, the test accuracy right
after compression and after fine-tuning, the trainable parameters of the two layers, and the
speed of a batch-1 forward pass of the whole model (compiled, median over rounds) against the
dense model, for the cost model's choice ("auto": the gather apply at batch 1) and with
materialised kernels.  The classifier (-> 10) stays dense: at 5% its 10 outputs would get no
non-zero at all.

    .venv/bin/python benchmarks/sparse_mnist.py                     # bundled subset (5000 / 1000 images)
    .venv/bin/python benchmarks/sparse_mnist.py --source auto       # full data when installed
    .venv/bin/python benchmarks/sparse_mnist.py --epochs 1 --iters 10 --fractions 0.1   # quick
    .venv/bin/python benchmarks/sparse_mnist.py --model lenet --source auto
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp.training import data as kdata  # noqa: E402
from keras_decomp.fitting import sparse as sparse_fit  # noqa: E402

HIDDEN = {"mlp": ("fc1", "fc2"), "lenet": ("dense_5",)}  # lenet: specs.build's name of its layer 5


def lenet():
    from keras_decomp.training import specs

    return specs.build(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "specs", "lenet.yaml"))


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
    for _ in range(min(20, calls)):
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
    parser.add_argument("--model", choices=sorted(HIDDEN), default="mlp", help="mlp or lenet")
    parser.add_argument("--source", default="bundled", help="data source for keras_decomp.data.load")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the dense model")
    parser.add_argument("--finetune", type=int, default=2, help="fine-tuning epochs after compression")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--q", type=int, default=2, help="number of sparse factors")
    parser.add_argument("--iters", type=int, default=sparse_fit.N_ITER,
                        help="palm4MSA sweeps per stage of the fit")
    parser.add_argument("--finetune-samples", type=int, default=None,
                        help="fine-tune on the first N training images only (default: all)")
    parser.add_argument("--materialize-calls", type=int, default=10,
                        help="calls per round of the materialised timing (0: skip it)")
    args = parser.parse_args()
    hidden = HIDDEN[args.model]
    sparse_fit.N_ITER = args.iters
    keras.utils.set_random_seed(0)
    data = kdata.load("fashion_mnist", source=args.source)
    x_train, x_test = (a.astype("float32") / 255.0 for a in (data.x_train, data.x_test))
    y_train, y_test = data.y_train, data.y_test
    print(f"data: {data.source}, {len(x_train)} train / {len(x_test)} test images; keras {keras.__version__}, "
          f"backend {keras.backend.backend()}, load average {os.getloadavg()[0]:.1f}")

    dense = compile_model(lenet() if args.model == "lenet" else mlp())
    start = time.perf_counter()
    dense.fit(x_train, y_train, epochs=args.epochs, batch_size=128, verbose=0)
    dense_params = sum(dense.get_layer(n).count_params() for n in hidden)
    base_acc = accuracy(dense, x_test, y_test)
    base_ms = forward_ms(dense)
    names = "+".join(hidden)
    print(f"dense {args.model}: trained in {time.perf_counter() - start:.0f} s, test accuracy {base_acc:.4f}, "
          f"{names} {dense_params} parameters (model {dense.count_params()}), batch-1 forward {base_ms:.3f} ms",
          flush=True)
    x_tune, y_tune = x_train[:args.finetune_samples], y_train[:args.finetune_samples]
    header = ("fraction", "expr", f"params {names}", *(f"rel.err {n}" for n in hidden), "fit s",
              "acc compressed", "acc fine-tuned", "fwd ms auto", "x dense", "fwd ms materialize", "x dense")
    print(" | ".join(header))
    for fraction in args.fractions:
        expr = f"sparse(q={args.q}, params={fraction:g})"
        errors = {}
        start = time.perf_counter()
        small = keras_decomp.decompose(dense, {name: expr for name in hidden}, report=errors)
        fit_seconds = time.perf_counter() - start
        print(f"  {expr}: decomposed in {fit_seconds:.0f} s", flush=True)
        params = sum(small.get_layer(n).count_params() for n in hidden)
        compile_model(small)
        acc_before = accuracy(small, x_test, y_test)
        small.fit(x_tune, y_tune, epochs=args.finetune, batch_size=128, verbose=0)
        acc_after = accuracy(small, x_test, y_test)
        print(f"  fine-tuned in {time.perf_counter() - start - fit_seconds:.0f} s", flush=True)
        auto_ms = forward_ms(small)
        mat_ms = math.nan  # ~1 GFLOP a call (MLP), ~10 GFLOP (LeNet)
        if args.materialize_calls:
            mat_ms = forward_ms(with_mode(small, "materialize"), rounds=3, calls=args.materialize_calls)
        print(" | ".join([f"{fraction:.2f}", expr, f"{params} ({params / dense_params:.1%})",
                          *(f"{errors[n]:.3f}" for n in hidden), f"{fit_seconds:.0f}",
                          f"{acc_before:.4f}", f"{acc_after:.4f}", f"{auto_ms:.3f}", f"{auto_ms / base_ms:.2f}",
                          f"{mat_ms:.3f}", f"{mat_ms / base_ms:.2f}"]), flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
