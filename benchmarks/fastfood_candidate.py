"""The candidate F was chosen against: a Fastfood projection (Le, Sarlos, Smola 2013), timed
beside sum(F, n) and keras Dense (training step, batch 128, Adam, CPU time, interleaved rounds).

vec(W) = the first rows*cols entries of the stacked blocks S_i H G_i Pi_i H B c_pad: c padded to
d = 2^ceil(log2 n), B random signs (shared by the blocks, so H B c is computed once), Pi_i a
random permutation (one gather of rows*cols entries per step, a scatter-add in the backward
pass), G_i Gaussian, H the Walsh-Hadamard transform as small Kronecker factors (matmuls), S_i
random signs / sqrt(rows).  "no-perm" drops Pi_i (then the draws are dyadic shifts of each
other within a block: faster, but not the mixing Fastfood needs).  Prototype for timing only,
not part of the package.

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/fastfood_candidate.py
"""
import math
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_decomp.operators.fast_random import kron_apply


def hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def pow2_factors(d, most=64):
    out = []
    while d > 1:
        f = min(d, most); out.append(f); d //= f
    return out


class Fastfood(keras.layers.Layer):
    def __init__(self, units, n, gather=True, **kw):
        super().__init__(**kw); self.units, self.n, self.gather = units, n, gather
    def build(self, shape):
        rows, cols = shape[-1], self.units
        N = rows * cols
        d = 1 << max(0, (self.n - 1).bit_length())
        k = -(-N // d)
        rng = np.random.default_rng(0)
        self.d, self.k, self.N, self.rows = d, k, N, rows
        self.Hs = [tf.constant(hadamard(f), tf.float32) for f in pow2_factors(d)]
        self.B = tf.constant(rng.choice([-1.0, 1.0], d), tf.float32)
        self.perm = tf.constant(np.stack([rng.permutation(d) for _ in range(k)]), tf.int32)
        self.G = tf.constant(rng.standard_normal((k, d)), tf.float32)
        self.S = tf.constant(rng.choice([-1.0, 1.0], (k, d)) / math.sqrt(rows), tf.float32)
        self.c = self.add_weight(shape=(self.n,), initializer="random_normal")
        self.bias = self.add_weight(shape=(cols,), initializer="zeros")
    def call(self, x):
        u = ops.pad(self.c, [[0, self.d - self.n]]) * self.B
        u = kron_apply(u[None, :], self.Hs, ops)[0]
        if self.gather:
            v = ops.take(u, self.perm)
        else:
            v = ops.tile(u[None, :], [self.k, 1])
        v = kron_apply(v * self.G, self.Hs, ops) * self.S
        W = ops.reshape(ops.reshape(v, (-1,))[:self.N], (self.rows, self.units))
        return ops.matmul(x, W) + self.bias


if __name__ == "__main__":
    import layer_speed
    from layer_speed import make_optimizer, measure, tf_loops

    import keras_decomp
    layer_speed.CLOCK = time.process_time
    rng = np.random.default_rng(0)
    for rows, cols, ns in [(784, 1024, [50]), (4096, 4096, [2000])]:
        x = rng.standard_normal((128, rows)).astype("float32"); t = rng.standard_normal((128, cols)).astype("float32")
        entries = {}
        layers = {"dense": keras.layers.Dense(cols)}
        for n in ns:
            layers[f"F n={n}"] = keras_decomp.layers.Dense(cols, W=f"sum(F, n={n})")
            layers[f"fastfood n={n}"] = Fastfood(cols, n)
            layers[f"fastfood-no-perm n={n}"] = Fastfood(cols, n, gather=False)
        for name, layer in layers.items():
            layer.build((None, rows))
            entries[name] = tf_loops(layer, x, t, x[:1], make_optimizer("adam", layer), jit=False)[0]
        times = measure(entries, 3, 0.5)
        base = np.array(times["dense"])
        for k, v in times.items():
            print(f"{rows}x{cols} {k}: {np.median(v)*1e3:.1f} ms cpu, x Dense {np.median(np.array(v)/base):.2f}", flush=True)
