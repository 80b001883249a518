"""Measure the cost model's three constants (operators/cost.py) on this machine.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/cost_constants.py
    KERAS_BACKEND=jax .venv/bin/python benchmarks/cost_constants.py

Prints the Machine (sustained matmul FLOP/s, streaming bytes/s, seconds per op) as
the line to put in ``MEASURED`` or in KERAS_DECOMP_COST, each the median of five
measurements of the best of five calls.
"""

from __future__ import annotations

import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from keras_decomp.layers.cost import measure  # noqa: E402


def main():
    runs = [measure() for _ in range(5)]
    flops = statistics.median(r.flops_per_s for r in runs)
    bandwidth = statistics.median(r.bytes_per_s for r in runs)
    per_op = statistics.median(r.seconds_per_op for r in runs)
    print(f"# backend {keras.backend.backend()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"MEASURED = Machine(flops_per_s={flops:.2g}, bytes_per_s={bandwidth:.2g}, seconds_per_op={per_op:.2g})")
    print(f"KERAS_DECOMP_COST=flops_per_s={flops:.2g},bytes_per_s={bandwidth:.2g},seconds_per_op={per_op:.2g}")


if __name__ == "__main__":
    main()
