"""Measure the cost model's constants on this machine and put them in force.

The layers pick apply or materialise by ``node.choose(batch)``, which weighs FLOPs,
memory traffic and ops by ``operators.cost.machine()``.  ``measure()`` times three
compiled loops on the current Keras backend (a 256x2048 @ 2048x2048 matmul, a
streaming add over 32 M floats, 20 loops of a chain of 20 tiny matmuls) and returns a
``Machine``; ``calibrate()`` measures and puts the result in force for this
process.  ``benchmarks/cost_constants.py`` prints the figures that
``operators/cost.py`` ships as ``MEASURED``.

>>> from keras_decomp.operators.cost import Machine, use
>>> with use(Machine(flops_per_s=1e11, bytes_per_s=1e10, seconds_per_op=5e-6)):
...     pass  # layers built and called here choose with these constants
"""

from __future__ import annotations

import time

import keras
import numpy as np

from ..operators import cost
from ..operators.cost import Machine

CHAIN = 20
LOOPS = 20


def _compiled(fn):
    if keras.backend.backend() == "jax":
        import jax
        return jax.jit(fn)
    import tensorflow as tf
    return tf.function(fn)


def _best_seconds(fn, *args, repeats: int = 5) -> float:
    keras.ops.convert_to_numpy(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.ops.convert_to_numpy(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def measure(repeats: int = 5) -> Machine:
    """The three constants of this machine, each the best of ``repeats`` timed calls."""
    ops = keras.ops
    rng = np.random.default_rng(0)
    a = ops.convert_to_tensor(rng.standard_normal((256, 2048)).astype("float32"))
    b = ops.convert_to_tensor(rng.standard_normal((2048, 2048)).astype("float32"))
    big = ops.convert_to_tensor(np.ones(32 * 2 ** 20, "float32"))
    tiny = ops.convert_to_tensor(np.ones((1, 8), "float32"))
    step = ops.convert_to_tensor(0.5 * np.eye(8, dtype="float32"))

    def chain(x, m, length):
        # small products inside a loop, as a training or benchmark loop runs a layer's ops
        # (straight-line graphs run them several times cheaper); nothing to fold or fuse
        def body(_, carry):
            y = carry
            for _ in range(length):
                y = ops.matmul(y, m)
            return ops.mean(y) + x
        return keras.ops.fori_loop(0, LOOPS, body, x)

    matmul = _best_seconds(_compiled(lambda x, y: ops.sum(ops.matmul(x, y))), a, b, repeats=repeats)
    stream = _best_seconds(_compiled(lambda x: ops.sum(x + 1.0)), big, repeats=repeats)
    empty = _best_seconds(_compiled(lambda x, m: chain(x, m, 0)), tiny, step, repeats=repeats)
    chained = _best_seconds(_compiled(lambda x, m: chain(x, m, CHAIN)), tiny, step, repeats=repeats)
    return Machine(flops_per_s=2 * 256 * 2048 * 2048 / matmul,
                   # the add reads and writes 32 M floats, the sum reads them again
                   bytes_per_s=3 * 4 * 32 * 2 ** 20 / stream,
                   seconds_per_op=max(chained - empty, 0.0) / (CHAIN * LOOPS))


def calibrate(repeats: int = 5) -> Machine:
    """Measure, then choose paths with these constants for the rest of the process."""
    machine = measure(repeats)
    cost._current.append(machine)
    return machine
