"""butterfly(), monarch(b=) and sparse(q, s) at 4096 x 4096 against keras.layers.Dense, side by side.

TensorFlow graph mode (``tf.function``, no XLA), one process, rounds interleaved in a shuffled
order; each figure is a median over rounds of the candidate's time over Dense's in the same round:

- train: forward + backward + Adam update at batch 128, 5 steps in one compiled loop;
- forward: batch-1 forward passes, 20 in one compiled loop (each input depends on the last output);
- TFLite (``--tflite``): the layer exported factored (export(mode="factored")), batch-1 latency in
  the LiteRT interpreter (1 thread, median of 200) against the dense file, and against its floor:
  weight bytes / read bandwidth + the per-call cost, the bandwidth measured for a buffer of the
  file's size (a BLAS dot of it with itself, warm: a 2 MB file is read from cache, 64 MB from memory)
  and the per-call cost that of a 4 -> 4 Dense file;
- raw sparse kernels (``--kernels``): two factors of s=204 random non-zeros per column as
  tf.sparse.sparse_dense_matmul and as CSR (tf.raw_ops.SparseMatrixMatMul), the kernels a real
  sparse path would use, against the same Dense step, to show where they stand on this CPU.

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/structured_speed_sparse.py --rounds 3 --tflite --kernels
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_decomp  # noqa: E402
export = importlib.import_module("keras_decomp.export")  # the module: the package exports a function of that name

N, BATCH = 4096, 128
CANDIDATES = ["butterfly()", "monarch(b=64)", "sparse(q=2, params=0.1)"]


def make(W):
    layer = keras.layers.Dense(N) if W is None else keras_decomp.layers.Dense(N, W=W, seed=0)
    layer.build((None, N))
    return layer


def loops(layer):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, N)).astype("float32"))
    t = tf.constant(rng.normal(size=(BATCH, N)).astype("float32"))
    x1 = tf.constant(rng.normal(size=(1, N)).astype("float32"))
    optimizer = keras.optimizers.Adam(1e-4)
    variables = layer.trainable_variables
    optimizer.build(variables)

    @tf.function
    def train(steps):
        loss = tf.zeros(())
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(layer(x) - t))
            optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    @tf.function
    def forward(steps):
        s = tf.zeros(())
        for _ in tf.range(steps):
            s = tf.reduce_mean(layer(x1 + 1e-30 * s))
        return s

    return (lambda k: float(train(tf.constant(k)))), (lambda k: float(forward(tf.constant(k))))


def timed(fn, k) -> float:
    start = time.perf_counter()
    fn(k)
    return (time.perf_counter() - start) / k


def keras_rows(rounds: int):
    names = [None] + CANDIDATES
    runs = {}
    for name in names:
        layer = make(name)
        train, forward = loops(layer)
        train(1), forward(2)  # trace and warm up
        runs[name] = (layer, train, forward)
    times = {name: ([], []) for name in names}
    for _ in range(rounds):
        order = list(names)
        random.shuffle(order)
        for name in order:
            _, train, forward = runs[name]
            times[name][0].append(timed(train, 5))
            times[name][1].append(timed(forward, 20))
    dense = times[None]
    print(f"\n4096 x 4096, TensorFlow graph mode, {rounds} rounds (median ratio to Dense in the same round)")
    print(f"{'expression':28s} {'params/dense':>12s} {'train b128':>11s} {'x Dense':>8s} {'fwd b1':>9s} {'x Dense':>8s}")
    for name in names:
        layer = runs[name][0]
        share = (layer.node.num_params if name else N * N) / (N * N)
        ratio_t = np.median([a / b for a, b in zip(times[name][0], dense[0])])
        ratio_f = np.median([a / b for a, b in zip(times[name][1], dense[1])])
        print(f"{name or 'keras Dense':28s} {share:12.4f} {1e3 * np.median(times[name][0]):9.1f}ms {ratio_t:8.3f} "
              f"{1e6 * np.median(times[name][1]):7.0f}us {ratio_f:8.3f}")


def tflite_rows():
    x = np.random.default_rng(0).normal(size=(4, N)).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        def file_latency(W, mode="factored", size=N):
            model = keras.Sequential([keras.Input((size,)), make(W) if size == N else keras.layers.Dense(size)])
            path = f"{folder}/m.tflite"
            report = export.export(model, path, mode=mode, check=False)
            return export.latency(path, x[:, :size]), report["bytes"]

        call_cost, _ = file_latency(None, size=4)
        dense_latency, dense_bytes = file_latency(None)
        dense_floor = dense_bytes / read_bandwidth(dense_bytes) + call_cost
        print(f"\nTFLite batch-1 (LiteRT, 1 thread): dense {1e6 * dense_latency:.0f} us for {dense_bytes / 2**20:.1f} MiB "
              f"(floor {1e6 * dense_floor:.0f} us), per-call cost {1e6 * call_cost:.1f} us")
        print(f"{'expression':28s} {'bytes':>10s} {'latency':>9s} {'x dense':>8s} {'floor':>8s} {'x floor':>8s}")
        for W in CANDIDATES[:2]:
            latency, size = file_latency(W)
            floor = size / read_bandwidth(size) + call_cost
            print(f"{W:28s} {size:10,d} {1e6 * latency:7.0f}us {latency / dense_latency:8.3f} {1e6 * floor:6.0f}us "
                  f"{latency / floor:8.2f}")


def read_bandwidth(size: int) -> float:
    """Bytes per second of reading a float32 buffer of ``size`` bytes, warm (median of 21)."""
    buffer = np.ones(max(size // 4, 1), dtype=np.float32)
    times = []
    for _ in range(21):
        start = time.perf_counter()
        np.dot(buffer, buffer)  # BLAS, SIMD: bound by the read, not the arithmetic
        times.append(time.perf_counter() - start)
    return size / float(np.median(times))


def kernel_rows(rounds: int):
    """Raw sparse kernels for the q=2, s=204 factors, against a Dense step of the same shape."""
    rng = np.random.default_rng(0)
    s = 204
    x = tf.constant(rng.normal(size=(BATCH, N)).astype("float32"))
    dense = tf.Variable(rng.normal(size=(N, N)).astype("float32") / 64)
    values = [tf.Variable(rng.normal(size=(N * s,)).astype("float32") / 14) for _ in range(2)]
    index = [tf.constant(np.stack([np.repeat(np.arange(N), s), np.sort(np.argpartition(
        rng.random((N, N)), s, axis=1)[:, :s], axis=1).reshape(-1)], 1).astype("int64")) for _ in range(2)]

    def coo(h, k):
        return tf.transpose(tf.sparse.sparse_dense_matmul(tf.sparse.SparseTensor(index[k], values[k], (N, N)), h,
                                                          adjoint_b=True))

    def csr(h, k):
        from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as ops
        matrix = ops.sparse_tensor_to_csr_sparse_matrix(index[k], values[k], tf.constant([N, N], tf.int64))
        return tf.transpose(ops.sparse_matrix_mat_mul(matrix, tf.transpose(h)))

    fns = {"dense matmul": (lambda h: h @ dense, [dense]), "tf.sparse (COO) x2": (lambda h: coo(coo(h, 0), 1), values),
           "CSR SparseMatrixMatMul x2": (lambda h: csr(csr(h, 0), 1), values)}
    steps = {}
    for name, (f, vs) in fns.items():
        def step(f=f, vs=vs):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(f(x)))
            return tape.gradient(loss, vs)
        steps[name] = (tf.function(step), tf.function(lambda f=f: f(x[:1])))
        steps[name][0](), steps[name][1]()
    times = {name: ([], []) for name in fns}
    for _ in range(rounds):
        for name, (step, fwd) in steps.items():
            for i, fn in enumerate((step, fwd)):
                start = time.perf_counter()
                for _ in range(3):
                    fn()
                times[name][i].append((time.perf_counter() - start) / 3)
    print("\nraw sparse kernels, 2 factors of 204 per column (gradient step b128 without optimizer; forward b1)")
    base = times["dense matmul"]
    for name, (t, f) in times.items():
        print(f"{name:28s} step {1e3 * np.median(t):8.1f}ms {np.median(t) / np.median(base[0]):7.2f}x   "
              f"b1 {1e6 * np.median(f):8.0f}us {np.median(f) / np.median(base[1]):7.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tflite", action="store_true")
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--skip-keras", action="store_true", help="only the TFLite and kernel rows")
    args = parser.parse_args()
    if not args.skip_keras:
        keras_rows(args.rounds)
    if args.tflite:
        tflite_rows()
    if args.kernels:
        kernel_rows(args.rounds)


if __name__ == "__main__":
    main()
