"""Is the cost model's choice ever much slower than the other path?

For each case (an expression, a shape, a batch size), a training step (forward, backward,
SGD update) of a decomposed Dense layer forced to "apply" and forced to "materialize",
timed side by side in interleaved rounds (``benchmarks/layer_speed.py``'s compiled loops).
A training step, not a forward pass: in a loop of forward passes TensorFlow's graph
optimiser hoists the build of W (it depends on the weights only) out of the loop, which
flatters "materialize" (``--forward`` times that anyway).  The table gives
the path ``node.choose(batch)`` picks (operators/cost.py, the measured constants), the
FLOP rule's pick, and the chosen path's time over the faster one's (1.00: it picked
the faster; the target is that it never exceeds about 1.2).

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/cost_choice.py
    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/cost_choice.py --quick
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from layer_speed import jax_loops, make_optimizer, measure, tf_loops  # noqa: E402

import keras_decomp  # noqa: E402

CASES = [  # (expression, n, m, batch)
    ("lowrank(r=2)", 32, 32, 1), ("lowrank(r=2)", 32, 32, 1024),
    ("lowrank(r=16)", 1024, 1024, 1), ("lowrank(r=256)", 1024, 1024, 1024),
    ("G dense", 512, 512, 1), ("G dense", 64, 64, 4096),
    ("DCT2[:100] dense", 784, 10, 1), ("DCT2[:100] dense", 784, 10, 1024),
    ("sum(G dense, n=4)", 64, 64, 1024),
    ("sum(R, n=50)", 1024, 1024, 1), ("sum(R, n=50)", 1024, 1024, 128),
    ("kron(dense, dense)", 1024, 1024, 1), ("kron(dense, dense)", 1024, 1024, 128),
    ("sss(p=4, d=2)", 16, 16, 1), ("sss(p=4, d=2)", 16, 16, 4096),
    ("sss(p=8, d=4)", 64, 64, 1), ("sss(p=16, d=16)", 1024, 1024, 1), ("sss(p=16, d=16)", 1024, 1024, 128),
    ("sketch(k=32)", 1024, 1024, 1), ("tri(k=64)", 1024, 1024, 128),
]


def step(layer, n, batch, jit, forward):
    x = np.random.default_rng(0).standard_normal((batch, n)).astype("float32")
    target = np.zeros((batch, layer.units), "float32")
    loops = jax_loops if keras.backend.backend() == "jax" else tf_loops
    return loops(layer, x, target, x, make_optimizer("sgd", layer), jit)[1 if forward else 0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of short calls")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--forward", action="store_true", help="time forward passes, not training steps")
    args = parser.parse_args(argv)
    rounds, budget = (3, 0.03) if args.quick else (7, 0.1)
    random.seed(0)
    keras.utils.set_random_seed(0)
    print(f"# {' '.join(['python'] + sys.argv)}")
    print(f"# backend {keras.backend.backend()}{' +xla' if args.jit else ''}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; {rounds} interleaved rounds, medians; "
          f"{'forward passes' if args.forward else 'training steps (SGD)'}")
    print(f"{'expression':<20} {'n x m':>11} {'batch':>5} {'chosen':>12} {'FLOP rule':>12} "
          f"{'apply ms':>9} {'mat. ms':>9} {'chosen / faster':>15}")
    worst = 1.0
    for text, n, m, batch in CASES:
        entries = {}
        for mode in ("apply", "materialize"):
            layer = keras_decomp.layers.Dense(m, W=text, mode=mode)
            layer.build((None, n))
            entries[mode] = step(layer, n, batch, args.jit, args.forward)
        times = {k: float(np.median(v)) for k, v in measure(entries, rounds, budget).items()}
        node = keras_decomp.parse(text, n, m).stages[0]
        chosen = node.choose(batch)
        rule = "apply" if node.flops(batch, "apply") < node.flops(batch, "materialize") else "materialize"
        ratio = times[chosen] / min(times.values())
        worst = max(worst, ratio)
        print(f"{text:<20} {f'{n}x{m}':>11} {batch:>5} {chosen:>12} {rule:>12} {1e3 * times['apply']:>9.3f} "
              f"{1e3 * times['materialize']:>9.3f} {ratio:>15.2f}")
    print(f"# worst chosen / faster: {worst:.2f}; load at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
