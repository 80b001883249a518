"""Pruning MLPs on Fashion-MNIST: tri-factorisation scores against magnitude pruning.

Two MLPs, 784-300-100-10 (two hidden layers) and 784-256x5-10 (five hidden layers), ReLU,
are trained dense, then every Dense kernel is pruned to 50%, 80%, 90% and 95% sparsity by

- ``magnitude``: |w| (the classic baseline);
- ``trifactor``: |w_hat|, w_hat from the simultaneous tri-factorisation of all kernels
  (keras_decomp.prune, default ranks: a quarter of each layer's width);
- ``paper``: the paper's literal rule, prune where |w| - |w_hat| is below a threshold,

and fine-tuned for the same number of epochs with the masks held (keras_decomp.prune).
Each cell is the test accuracy after fine-tuning, mean and spread over ``--seeds`` seeds
(each seed trains its own dense model, shared by the three methods); ``--no-fine-tune``
accuracies, right after pruning, are printed too.

    .venv/bin/python benchmarks/prune_mnist.py --quick       # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/prune_mnist.py               # bundled subset, 3 seeds
    .venv/bin/python benchmarks/prune_mnist.py --data full --seeds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The factorisation is small numpy linear algebra: threads only fight TensorFlow's.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp.training.data import load  # noqa: E402
from keras_decomp.compression.prune import mask_sparsity  # noqa: E402

MODELS = {"mlp2": (300, 100), "mlp5": (256,) * 5}
METHODS = {"magnitude": dict(method="magnitude"), "trifactor": dict(method="trifactor"),
           "paper": dict(method="trifactor", criterion="paper")}


def mlp(hidden, seed):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((784,))] + [keras.layers.Dense(h, activation="relu") for h in hidden]
    return keras.Sequential(layers + [keras.layers.Dense(10)])


def compiled(model, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def accuracy(model, data) -> float:
    return float(model.evaluate(data[2], data[3], batch_size=1000, verbose=0)[1])


def arrays(source):
    data = load("fashion_mnist", source=source)
    flat = lambda x: x.reshape(len(x), -1).astype("float32") / 255.0  # noqa: E731
    return (flat(data.x_train), data.y_train, flat(data.x_test), data.y_test), data.source


def run(args):
    data, source = arrays(args.data)
    print(f"data: {source}; pretrain {args.epochs} epochs (Adam 1e-3), fine-tune {args.fine_tune_epochs} "
          f"epochs (Adam {args.fine_tune_lr:g}), batch {args.batch}, seeds {args.seeds}, "
          f"ranks {args.ranks or 'default'}")
    results = {}  # (model, method, sparsity) -> {"before": [...], "after": [...]}
    dense = {}
    for name in args.models:
        for seed in range(args.seeds):
            model = compiled(mlp(MODELS[name], seed), 1e-3)
            model.fit(data[0], data[1], batch_size=args.batch, epochs=args.epochs, shuffle=True, verbose=0)
            dense.setdefault(name, []).append(accuracy(model, data))
            for sparsity in args.sparsities:
                for method in args.methods:
                    start = time.perf_counter()
                    keras.utils.set_random_seed(1000 + seed)  # same fine-tuning batches for every method
                    pruned = keras_decomp.prune(model, sparsity=sparsity, ranks=args.ranks, **METHODS[method])
                    reached = mask_sparsity(pruned)
                    assert all(abs(s - sparsity) < 1 / 1000 for s in reached.values()), reached
                    compiled(pruned, args.fine_tune_lr)
                    before = accuracy(pruned, data)
                    pruned.fit(data[0], data[1], batch_size=args.batch, epochs=args.fine_tune_epochs,
                               shuffle=True, verbose=0)
                    after = accuracy(pruned, data)
                    cell = results.setdefault((name, method, sparsity), {"before": [], "after": []})
                    cell["before"].append(before)
                    cell["after"].append(after)
                    print(f"  {name} seed {seed} sparsity {sparsity:.2f} {method:9s}: {before:.4f} -> {after:.4f} "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return results, dense


def cell(values) -> str:
    values = np.asarray(values) * 100
    return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")


def table(results, dense, args, key) -> str:
    lines = []
    for name in args.models:
        lines.append(f"\n{name} {MODELS[name]}: dense {cell(dense[name])}% ({key})\n")
        lines.append("| sparsity | " + " | ".join(args.methods) + " | trifactor - magnitude |")
        lines.append("|---|" + "---|" * (len(args.methods) + 1))
        for sparsity in args.sparsities:
            row = [cell(results[(name, m, sparsity)][key]) for m in args.methods]
            if "trifactor" in args.methods and "magnitude" in args.methods:
                diff = (np.asarray(results[(name, "trifactor", sparsity)][key])
                        - np.asarray(results[(name, "magnitude", sparsity)][key]))
                row.append(cell(diff))
            else:
                row.append("")
            lines.append(f"| {sparsity:.0%} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bundled", choices=("bundled", "full", "auto"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--fine-tune-lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ranks", type=float, default=None,
                        help="rank of each layer of neurons, as a fraction of its width (default: 0.25)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 + 2 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.fine_tune_epochs = 1, 5, 2
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load "
          f"{os.getloadavg()[0]:.1f}; python {platform.python_version()}, keras {keras.__version__} "
          f"({keras.backend.backend()}), numpy {np.__version__}")
    start = time.perf_counter()
    results, dense = run(args)
    print(table(results, dense, args, "after"))
    print("\nright after pruning, before fine-tuning:")
    print(table(results, dense, args, "before"))
    print(f"\n{time.perf_counter() - start:.0f} s, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
