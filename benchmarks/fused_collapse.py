"""Side test for issue 13: can an XLA-fused collapse of ``sum(G, n)`` with low-precision stored
bases beat the float32 bases of the layer in TensorFlow graph mode?

The layer collapses W = sum_i c_i G_i with one tensordot of the float32 (n, 784, 1024) stack and
gets dc_i = <G_i, dW> from a second one: the stack is read twice per training step.  Here the
stack is stored as bfloat16, float16 or int8 (symmetric, one scale per draw) and both the
collapse and its gradient are ``tf.function(jit_compile=True)`` functions (joined by
``tf.custom_gradient``) in which XLA fuses the convert into the multiply-and-reduce, so that only
the 2- or 1-byte entries are read.  Plain TensorFlow, not the layer: an experiment, not a path
of the package.

Two measurements, interleaved per round (medians):
- parts: the forward collapse alone and the gradient contraction alone;
- train: a whole training step at batch 128 (collapse, x @ W + bias, squared loss, gradients,
  SGD update), against the same step with the float32 stack in graph mode.

    .venv/bin/python benchmarks/fused_collapse.py --n 8 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROWS, COLS, BATCH = 784, 1024, 128
STORED = ("float32", "bfloat16", "float16", "int8")


def jit(fn):
    return tf.function(fn, jit_compile=True, autograph=False)


def stored(G, kind):
    """(variable holding the stack as ``kind``, per-draw scale or None)."""
    if kind == "int8":
        scale = np.abs(G).reshape(len(G), -1).max(1) / 127.0
        return tf.Variable(np.round(G / scale[:, None, None]).astype(np.int8), trainable=False), \
            tf.constant(scale.astype(np.float32))
    return tf.Variable(tf.cast(G, kind), trainable=False), None


def collapse_fns(S, scale):
    """(forward, gradient) of W(c) = sum_i c_i S_i: graph-mode tensordots for float32, fused XLA
    multiply-and-reduce with the convert inside for the others."""
    if S.dtype == tf.float32:
        fwd = lambda c: tf.tensordot(c, S, 1)  # noqa: E731 - what the layer does
        bwd = lambda dW: tf.tensordot(tf.reshape(S, (S.shape[0], -1)), tf.reshape(dW, (-1,)), 1)  # noqa: E731
        return fwd, bwd

    @jit
    def fwd_xla(c, s):
        c = c * scale if scale is not None else c
        return tf.reduce_sum(c[:, None, None] * tf.cast(s, tf.float32), axis=0)

    @jit
    def bwd_xla(dW, s):
        g = tf.reduce_sum(tf.cast(s, tf.float32) * dW[None], axis=[1, 2])
        return g * scale if scale is not None else g

    return (lambda c: fwd_xla(c, S.value())), (lambda dW: bwd_xla(dW, S.value()))


def train_loop(fwd, bwd, c0, x, t):
    c = tf.Variable(c0)
    bias = tf.Variable(tf.zeros(COLS))

    @tf.custom_gradient
    def collapse(cc):
        return fwd(cc), (lambda dW: bwd(dW))

    @tf.function
    def train(steps):
        loss = tf.zeros(())
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                y = tf.nn.bias_add(tf.matmul(x, collapse(c.value())), bias)
                loss = tf.reduce_mean(tf.square(y - t))
            for v, g in zip((c, bias), tape.gradient(loss, [c, bias])):
                v.assign_sub(1e-4 * g)
        return loss
    return train


def part_loop(fn, arg):
    """fn(arg + tiny * carry) k times: nothing is hoisted out of the loop."""
    @tf.function
    def run(steps):
        s = tf.zeros(())
        for _ in tf.range(steps):
            s = s + tf.reduce_sum(fn(arg + 1e-30 * s)[0])
        return s
    return run


def timed(fn, k):
    start = time.perf_counter()
    fn(tf.constant(k)).numpy()
    return (time.perf_counter() - start) / k


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="number of Gaussian draws")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", default=",".join(STORED), help="stored dtypes to compare")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    print(f"# load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rng = np.random.default_rng(0)
    G = (rng.standard_normal((args.n, ROWS, COLS)) / np.sqrt(ROWS)).astype(np.float32)
    c0 = rng.normal(0.0, 0.05, args.n).astype(np.float32)
    dW = tf.constant(rng.standard_normal((ROWS, COLS)).astype(np.float32))
    x = tf.constant(rng.standard_normal((BATCH, ROWS)).astype(np.float32))
    t = tf.constant(rng.standard_normal((BATCH, COLS)).astype(np.float32))

    entries, W = {}, {}
    for kind in kinds:
        S, scale = stored(G, kind)
        fwd, bwd = collapse_fns(S, scale)
        W[kind] = fwd(tf.constant(c0)).numpy().astype(np.float64)
        entries[f"{kind} forward collapse"] = part_loop(fwd, tf.constant(c0))
        entries[f"{kind} gradient contraction"] = part_loop(bwd, dW)
        entries[f"{kind} training step"] = train_loop(fwd, bwd, c0, x, t)
    steps = {}
    for name, fn in entries.items():
        timed(fn, 1)  # compile
        steps[name] = max(1, round(0.3 / timed(fn, 2)))
    times = {name: [] for name in entries}
    for _ in range(args.rounds):
        for name in random.sample(list(entries), len(entries)):
            times[name].append(timed(entries[name], steps[name]))

    print(f"## sum(G, n={args.n}), 784 -> 1024, stack of {G.nbytes / 2**20:.1f} MiB in float32; "
          f"{args.rounds} rounds, medians")
    for name, samples in times.items():
        kind = name.split()[0]
        ref = np.asarray(times[name.replace(kind, "float32", 1)]) if "float32" in kinds else None
        ratio = f"  x float32 {np.median(np.asarray(samples) / ref):.2f}" if ref is not None else ""
        print(f"  {name:34s} {np.median(samples) * 1e3:8.3f} ms{ratio}")
    if "float32" in kinds:
        for kind in kinds[1:]:
            err = np.linalg.norm(W[kind] - W["float32"]) / np.linalg.norm(W["float32"])
            print(f"  {kind}: |W - W32|/|W32| = {err:.2e} (y = x W: the same relative error)")
    print(f"# load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
