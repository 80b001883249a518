"""Training-step speed and fixed memory of sums of random bases: the fast basis F against
keras Dense of the same shape, with the stored Gaussian G beside it (issue 19).

One training step = forward + backward + Adam update at batch 128, looped inside one
``tf.function`` (``layer_speed.tf_loops``); every candidate and its Dense baseline run in each
round in a shuffled order, and a ratio is the median over rounds of candidate time / Dense
time of the same round.  "fixed MiB" is what the layer holds besides its trainable values
(float32): for F one matrix of signs and its small orthogonal factors whatever n.

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/random_bases.py
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/random_bases.py --quick   # 784x1024 only
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/random_bases.py --cpu-time  # shared machine
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/random_bases.py --specs benchmarks/fast_random/fashion_best_1k_g.yaml,fashion_best_1k
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import layer_speed
import numpy as np
from layer_speed import fixed_bytes, make_optimizer, measure, tf_loops

import keras_decomp
from keras_decomp import DecompError

BATCH = 128
MIB = 2 ** 20

# (rows, cols, expression or None for keras Dense, target ratio)
CASES = [
    (784, 1024, None, None),
    (784, 1024, "sum(F, n=50)", 1.3),
    (784, 1024, "sum(F, n=8) sum(F, n=8)", 1.5),
    (784, 1024, "sum(G, n=50)", None),
    (784, 1024, "sum(G, n=8) sum(G, n=8)", None),
    (4096, 4096, None, None),
    (4096, 4096, "sum(F, n=100)", 1.5),
    (4096, 4096, "sum(F, n=2000)", 1.5),
    (4096, 4096, "sum(F, n=20000)", 1.5),
    (4096, 4096, "sum(G, n=2000)", None),
]


def make(rows, cols, W):
    layer = keras.layers.Dense(cols) if W is None else keras_decomp.layers.Dense(cols, W=W, seed=0)
    layer.build((None, rows))
    return layer


def run(cases, rounds, budget, optimizer="adam", jit=False):
    rng = np.random.default_rng(0)
    entries, info = {}, {}
    for rows, cols, W, target in cases:
        label = f"{rows}x{cols} {W or 'Dense'}"
        try:
            layer = make(rows, cols, W)
        except DecompError as err:
            info[label] = (rows, cols, W, target, None, str(err).splitlines()[0])
            continue
        x = rng.standard_normal((BATCH, rows)).astype("float32")
        t = rng.standard_normal((BATCH, cols)).astype("float32")
        train, _ = tf_loops(layer, x, t, x[:1], make_optimizer(optimizer, layer), jit=jit)
        entries[label] = train
        mode = "-" if W is None else ("apply" if layer.node.flops(BATCH, "apply") < layer.node.flops(
            BATCH, "materialize") else "materialize")
        info[label] = (rows, cols, W, target, layer, mode)
    times = measure(entries, rounds, budget)
    lines = ["| shape | W | mode | params | fixed MiB | step ms | x Dense | target |", "|---|---|---|---|---|---|---|---|"]
    for label, (rows, cols, W, target, layer, mode) in info.items():
        if layer is None:
            lines.append(f"| {rows}x{cols} | `{W}` | refused: {mode} | | | | | |")
            continue
        base = np.array(times[f"{rows}x{cols} Dense"])
        mine = np.array(times[label])
        ratio = float(np.median(mine / base))
        params = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
        verdict = "" if target is None else f"<= {target}: {'met' if ratio <= target else 'missed'}"
        lines.append(f"| {rows}x{cols} | `{W or 'keras Dense'}` | {mode} | {params:,} | "
                     f"{fixed_bytes(layer) / MIB:.1f} | {np.median(mine) * 1e3:.1f} | {ratio:.2f} | {verdict} |")
    return "\n".join(lines)


def run_specs(names, rounds, budget):
    """Training step of whole spec models (first stage), e.g. fashion_best_1k with G (benchmarks/fast_random/fashion_best_1k_g.yaml) and with F."""
    rng = np.random.default_rng(0)
    entries, params = {}, {}
    for name in names:
        path = name if name.endswith(".yaml") else os.path.join(os.path.dirname(__file__), "..", "specs", name + ".yaml")
        model = keras_decomp.build(path)
        x = rng.standard_normal((BATCH,) + tuple(model.input_shape[1:])).astype("float32")
        t = rng.standard_normal((BATCH,) + tuple(model.output_shape[1:])).astype("float32")
        entries[name] = tf_loops(model, x, t, x[:1], make_optimizer("adam", model), jit=False)[0]
        params[name] = model.count_params()
    times = measure(entries, rounds, budget)
    base = np.array(times[names[0]])
    lines = ["| spec | params | step ms | x " + names[0] + " |", "|---|---|---|---|"]
    for name in names:
        ratio = float(np.median(np.array(times[name]) / base))
        lines.append(f"| {name} | {params[name]:,} | {np.median(times[name]) * 1e3:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="784x1024 only")
    parser.add_argument("--large", action="store_true", help="4096x4096 only")
    parser.add_argument("--jit", action="store_true", help="tf.function(jit_compile=True): XLA fuses elementwise ops")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="adam (default, as training does) or sgd (the cheapest update for Dense)")
    parser.add_argument("--specs", help="compare whole spec models instead: names in specs/ or .yaml paths, "
                        "the first the baseline")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per timed call")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time (steadier on a machine others share)")
    args = parser.parse_args(argv)
    if args.cpu_time:
        import time
        layer_speed.CLOCK = time.process_time
    if args.specs:
        print(run_specs(args.specs.split(","), args.rounds, args.budget))
        return
    cases = [c for c in CASES if (not args.quick or c[0] == 784) and (not args.large or c[0] == 4096)]
    print(run(cases, args.rounds, args.budget, args.optimizer, args.jit))


if __name__ == "__main__":
    main()
