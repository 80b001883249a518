"""Forward speed of an SSS layer against ``keras.layers.Dense``: 4096 -> 4096, p=16, d=16.

The SSS layer (``keras_decomp.layers.Dense(4096, W="sss(p=16, d=16)")``, 1.3 M parameters)
runs its causal and anticausal recursions (the cost model picks "apply" at both batch sizes);
the dense layer holds 16.8 M.  The SSS layer forced to "materialize" (build W, one matmul) is
timed too, to show what the recursions save.  Batch 1 (target: SSS at least 4x faster than
Dense) and batch 128.

Each layer runs inside one compiled function that loops over k forward passes (a
``tf.function`` over ``tf.range``, or ``jax.lax.fori_loop`` under ``jax.jit``), each input
depending on the mean of the last output, so nothing is hoisted and no output is pruned as
unused (taking one entry would let XLA drop most of the work); k is chosen so that a call takes about
``--budget`` seconds.  Every round times all layers in a shuffled order; a ratio is Dense time
over SSS time *of the same round*, and the table prints medians over rounds.

    .venv/bin/python benchmarks/sss_speed.py --quick
    .venv/bin/python benchmarks/sss_speed.py
    .venv/bin/python benchmarks/sss_speed.py --jit                 # tf.function(jit_compile=True)
    KERAS_BACKEND=jax .venv/bin/python benchmarks/sss_speed.py
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402

SIZE, EXPRESSION = 4096, "sss(p=16, d=16)"
TARGET = 4.0  # Dense time / SSS time at batch 1


def make_layers() -> dict:
    out = {"Dense": keras.layers.Dense(SIZE),
           "SSS": keras_decomp.layers.Dense(SIZE, W=EXPRESSION),
           "SSS materialize": keras_decomp.layers.Dense(SIZE, W=EXPRESSION, mode="materialize")}
    for layer in out.values():
        layer.build((None, SIZE))
    return out


def forward_loop(layer, x, jit: bool):
    """k -> run k dependent forward passes of ``layer`` on ``x`` in one compiled call."""
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def run(tv, ntv, k):  # the weights are arguments: XLA cannot fold them as constants
            def step(_, s):
                y, _ = layer.stateless_call(tv, ntv, x + 1e-30 * s)
                return jnp.mean(y)
            return jax.lax.fori_loop(0, k, step, jnp.zeros(()))

        loop = jax.jit(run)
        return lambda k: float(loop(tv, ntv, k))
    import tensorflow as tf

    @tf.function(jit_compile=jit)
    def loop(steps):
        s = tf.zeros(())
        for _ in tf.range(steps):
            s = tf.reduce_mean(layer(x + 1e-30 * s))  # every output counts: none is pruned
        return s

    return lambda k: float(loop(tf.constant(k)))


def timed(fn, k) -> float:
    start = time.perf_counter()
    fn(k)
    return (time.perf_counter() - start) / k


def calibrate(fn, budget: float) -> int:
    fn(1)  # compile
    t = min(timed(fn, 1) for _ in range(3))
    return int(max(1, min(1000, round(budget / max(t, 1e-7)))))


def measure(entries: dict, rounds: int, budget: float) -> dict:
    """name -> fn(k); returns name -> per-round seconds per forward pass."""
    steps = {name: calibrate(fn, budget) for name, fn in entries.items()}
    times = {name: [] for name in entries}
    for _ in range(rounds):
        order = list(entries)
        random.shuffle(order)
        for name in order:
            times[name].append(timed(entries[name], steps[name]))
    return times


def machine() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    backend = keras.backend.backend()
    version = __import__("tensorflow" if backend == "tensorflow" else "jax").__version__
    return (f"nproc {os.cpu_count()}, CPU '{cpu}', python {platform.python_version()}, numpy {np.__version__}, "
            f"keras {keras.__version__}, backend {backend} {version}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds of short calls")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 20, --quick 5)")
    parser.add_argument("--budget", type=float, help="seconds per timed call (default 0.1, --quick 0.03)")
    parser.add_argument("--jit", action="store_true", help="TensorFlow: tf.function(jit_compile=True)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 20)
    budget = args.budget or (0.03 if args.quick else 0.1)
    jit = args.jit or keras.backend.backend() == "jax"
    random.seed(0)
    keras.utils.set_random_seed(0)
    print(f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# {machine()}")
    print(f"# load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; compiled loop "
          f"jit_compile={jit}; {rounds} rounds, medians")
    layers = make_layers()
    node = layers["SSS"].node
    print(f"# {EXPRESSION} on {SIZE}x{SIZE}: {node.num_params:,} parameters "
          f"({node.num_params / SIZE ** 2:.1%} of dense); FLOPs apply/materialize at batch 1: "
          f"{node.flops(1, 'apply'):,} / {node.flops(1, 'materialize'):,}")
    rng = np.random.default_rng(0)
    print(f"\n{'batch':>5}  {'layer':<16} {'mode':<12} {'ms/forward':>10} {'Dense / this':>12}")
    for batch in (1, 128):
        x = rng.standard_normal((batch, SIZE)).astype("float32")
        entries = {name: forward_loop(layer, x, jit) for name, layer in layers.items()}
        times = measure(entries, rounds, budget)
        dense = np.asarray(times["Dense"])
        for name, layer in layers.items():
            t = np.asarray(times[name])
            mode = getattr(layer, "mode", "-")
            if mode == "auto":
                mode = node.choose(batch)
            ratio = float(np.median(dense / t))
            verdict = ""
            if name == "SSS" and batch == 1:
                verdict = f"  target >= {TARGET:g}x: {'met' if ratio >= TARGET else 'MISSED'}"
            print(f"{batch:>5}  {name:<16} {mode:<12} {np.median(t) * 1e3:>10.3f} {ratio:>11.2f}x{verdict}")
    print(f"# load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
