"""Approximate-then-train against train-from-scratch for SSS layers on Fashion-MNIST, after
Kissel and Diepold: the last hidden Dense layer of a trained MLP 784-1024-512-10 (its
1024 x 512 kernel) is replaced by ``sss(p=P, params=f)`` at f = 5%, 10%, 20% and 30% of its
parameters.

For each fraction it prints the state size d the budget allows, the relative error of the
Hankel-SVD approximation of the trained kernel, and test accuracy

- after approximation only (``keras_decomp.decompose``: the trained kernel is approximated,
  every other weight copied),
- after approximation and fine-tuning (``--finetune-epochs``, all layers trained),
- from scratch: the same model, randomly initialised, trained for as many epochs as the
  reference and the fine-tuning together (``--epochs`` + ``--finetune-epochs``).

The bundled subset of Fashion-MNIST (5000 training / 1000 test images) is the default; ``--data
full`` uses the full set where it is installed (tensorflow-datasets or IDX files).

    .venv/bin/python benchmarks/sss_mnist.py --quick         # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/sss_mnist.py                 # bundled subset
    .venv/bin/python benchmarks/sss_mnist.py --data full --epochs 10 --finetune-epochs 5
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

from keras_decomp import decompose, layers  # noqa: E402
from keras_decomp.training.data import load  # noqa: E402

REPLACED = "hidden2"  # the last hidden layer, 1024 -> 512


def mlp(expression: str | None = None, seed: int = 0):
    """784-1024-512-10; with ``expression``, the 1024 -> 512 layer is a keras_decomp Dense."""
    hidden2 = (layers.Dense(512, W=expression, activation="relu", seed=seed, name=REPLACED) if expression
               else keras.layers.Dense(512, activation="relu", name=REPLACED))
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(1024, activation="relu", name="hidden1"), hidden2,
                             keras.layers.Dense(10, name="logits")])


def compiled(model, learning_rate):
    # No XLA: an SSS layer with p=32 has 7p variables and its training graph ~29k ops,
    # which XLA takes minutes to compile on a small CPU for no gain at this size.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def train(model, data, epochs, args, learning_rate):
    """Fit for ``epochs``; (test accuracy, seconds)."""
    compiled(model, learning_rate)
    x, y, _, _ = data
    start = time.perf_counter()
    if epochs:
        model.fit(x, y, batch_size=args.batch, epochs=epochs, shuffle=True, verbose=0)
    return accuracy(model, data), time.perf_counter() - start


def accuracy(model, data) -> float:
    _, _, x_test, y_test = data
    return float(model.evaluate(x_test, y_test, batch_size=512, verbose=0)[1])


def arrays(args):
    data = load("fashion_mnist", source=args.data)
    n = args.limit or len(data.x_train)
    scale = lambda x: x.astype("float32") / 255.0  # noqa: E731
    return data.source, (scale(data.x_train[:n]), data.y_train[:n], scale(data.x_test), data.y_test)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="bundled", choices=("bundled", "full", "auto", "idx", "tfds"))
    parser.add_argument("--epochs", type=int, default=None, help="reference training (default 10, --quick 3)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="after approximating (5, --quick 2)")
    parser.add_argument("--fractions", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--stages", type=int, default=32, help="p of sss(p=, params=)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--limit", type=int, default=None, help="keep the first N training images")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 + 2 epochs on 2000 training images")
    args = parser.parse_args(argv)
    defaults = (3, 2, 2000) if args.quick else (10, 5, None)
    for name, default in zip(("epochs", "finetune_epochs", "limit"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    fractions = [float(f) for f in args.fractions.split(",")]

    source, data = arrays(args)
    print(f"# {' '.join(sys.argv)}")
    print(f"# data: {source}, {len(data[0])} training / {len(data[2])} test images; keras {keras.__version__}, "
          f"backend {keras.backend.backend()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    keras.utils.set_random_seed(args.seed)
    reference = mlp()
    ref_acc, ref_seconds = train(reference, data, args.epochs, args, args.lr)
    dense_params = 1024 * 512
    print(f"# reference MLP 784-1024-512-10: {args.epochs} epochs, test accuracy {ref_acc:.4f} "
          f"({ref_seconds:.0f} s); {REPLACED} kernel 1024 x 512 = {dense_params} parameters")
    print(f"# fine-tuning: {args.finetune_epochs} epochs at lr {args.finetune_lr:g}; from scratch: "
          f"{args.epochs + args.finetune_epochs} epochs at lr {args.lr:g}")
    print()
    print("| fraction | structure | params (share) | rel. error | acc. approximated | acc. approx. + fine-tuned "
          "| acc. from scratch | dense reference |")
    print("|---|---|---|---|---|---|---|---|")
    for f in fractions:
        expression = f"sss(p={args.stages}, params={f:g})"
        report = {}
        small = decompose(reference, {REPLACED: expression}, seed=args.seed, report=report)
        node = small.get_layer(REPLACED).node
        approx_acc = accuracy(compiled(small, args.finetune_lr), data)
        tuned_acc, tuned_seconds = train(small, data, args.finetune_epochs, args, args.finetune_lr)
        keras.utils.set_random_seed(args.seed)
        scratch = mlp(expression, seed=args.seed)
        scratch_acc, scratch_seconds = train(scratch, data, args.epochs + args.finetune_epochs, args, args.lr)
        print(f"| {f:g} | {node.label()} | {node.num_params} ({node.num_params / dense_params:.3f}) "
              f"| {report[REPLACED]:.3f} | {approx_acc:.4f} | {tuned_acc:.4f} | {scratch_acc:.4f} | {ref_acc:.4f} |",
              flush=True)
        print(f"<!-- fraction {f:g}: fine-tune {tuned_seconds:.0f} s, scratch {scratch_seconds:.0f} s -->", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
