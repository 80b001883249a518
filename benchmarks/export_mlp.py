"""Batch-1 TFLite latency and file size of the MLP 784-1024-1024-10: dense, folded, factored.

The two hidden layers (784 -> 1024 and 1024 -> 1024) are plain ``keras.layers.Dense``, or
``sss(p=16, d=8)``, or ``lowrank(r=48)`` or ``sparse(q=2, s=48)`` (about the same parameter
count as the SSS pair; the sparse factors also store one int32 index per value); the output
layer (1024 -> 10) stays dense. Each decomposed model is exported twice with
``keras_decomp.export``: folded (each W one constant: the file is a dense model) and factored
(the apply form: SSS recursions, x u then v). Every file runs in the LiteRT interpreter, one
thread, batch 1 (XNNPACK, the interpreter's default CPU path).

Beside each time, the physical floor: the per-call overhead of an empty model (an identity
.tflite file, measured like the others) + the weight bytes / the memory read bandwidth, where
the bandwidth is that of a one-thread BLAS gemv streaming a float32 matrix of the same number
of bytes (so a model whose weights sit in L2 is held to L2 speed, one in L3 to L3 speed), less
the cost of a tiny gemv call.

Measurements are interleaved: every round runs every file and every probe in a shuffled
order; an "x dense" or "x floor" figure is the median over rounds of ratios taken within one
round. The machine may be shared: the load average is printed at the start and at the end.

    .venv/bin/python benchmarks/export_mlp.py --quick      # about 3 minutes on 2 busy cores
    .venv/bin/python benchmarks/export_mlp.py              # the figures in BENCHMARKS.md
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # the gemv probe on one thread, like the interpreter
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HIDDEN = {"sss": "sss(p=16, d=8)", "lowrank": "lowrank(r=48)", "sparse": "sparse(q=2, s=48)"}
SIZES = (784, 1024, 1024, 10)


def mlp(expression: str | None):
    """784-1024-1024-10, relu; the hidden layers decomposed by ``expression`` if given."""
    import keras

    from keras_decomp.layers import Dense

    keras.utils.set_random_seed(0)
    layers = [keras.Input((SIZES[0],))]
    for i, units in enumerate(SIZES[1:-1]):
        if expression:
            layers.append(Dense(units, W=expression, activation="relu", name=f"hidden{i}"))
        else:
            layers.append(keras.layers.Dense(units, activation="relu", name=f"hidden{i}"))
    layers.append(keras.layers.Dense(SIZES[-1], name="out"))
    return keras.Sequential(layers)


def flops(model, forms) -> int:
    """FLOPs of one batch-1 pass as exported (folded layers: a dense matmul)."""
    from keras_decomp.layers.base import _Decomposed

    total = 0
    for layer in model.layers:
        if isinstance(layer, _Decomposed) and forms.get(layer.name) == "factored":
            total += layer.node.flops(1, "apply")
        elif hasattr(layer, "units"):
            n = layer.input.shape[-1]
            total += 2 * n * layer.units
    return total


def interpreter(path):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.random.default_rng(1).random(inp["shape"]).astype(inp["dtype"]))
    return it


def median_invoke(it, invokes: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        it.invoke()
    times = []
    for _ in range(invokes):
        start = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Gemv:
    """y = x A for a float32 A of ``nbytes`` (one thread): a read-bandwidth probe."""

    def __init__(self, nbytes: int, cols: int = 1024):
        rows = max(1, nbytes // (4 * cols))
        rng = np.random.default_rng(2)
        self.a = rng.random((rows, cols), dtype=np.float32)
        self.x = rng.random(rows, dtype=np.float32)
        self.nbytes = self.a.nbytes

    def median(self, calls: int) -> float:
        self.x @ self.a  # warm: the matrix into cache where it fits
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            self.x @ self.a
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ai_edge_litert
    import keras
    import tensorflow as tf

    litert = getattr(ai_edge_litert, "__version__", None)
    if litert is None:
        from importlib.metadata import version
        litert = version("ai-edge-litert")
    return (f"nproc {os.cpu_count()}, CPU {cpu}, Python {platform.python_version()}, numpy {np.__version__}, "
            f"keras {keras.__version__}, tensorflow {tf.__version__}, ai-edge-litert {litert}")


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--invokes", type=int, default=200, help="invokes per file per round (the median is kept)")
    parser.add_argument("--quick", action="store_true", help="--rounds 4 --invokes 50")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.invokes = 4, 50

    print("$ .venv/bin/python benchmarks/export_mlp.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"# {machine()}")
    print(f"# load average at start: {load()}")

    from keras_decomp import export

    folder = Path(tempfile.mkdtemp(prefix="export_mlp_"))
    x = np.random.default_rng(0).random((32, SIZES[0])).astype("float32")
    rows = []  # (label, form, path, report, flops)
    started = time.time()
    dense = mlp(None)
    rows.append(("dense", "-", dense, "folded"))
    for name, expression in HIDDEN.items():
        model = mlp(expression)
        rows.append((f"{expression} hidden", "folded", model, "folded"))
        rows.append((f"{expression} hidden", "factored", model, "factored"))
    import keras
    rows.append(("empty model (identity)", "-", keras.Sequential([keras.Input((SIZES[0],)), keras.layers.Identity()]),
                 "folded"))
    entries = []
    for label, form, model, mode in rows:
        path = folder / f"{len(entries)}.tflite"
        report = export(model, path, mode=mode, sample=x)
        entries.append({"label": label, "form": form, "path": path, "bytes": report["bytes"],
                        "weight_bytes": 4 * report["parameters_stored"] if label != "empty model (identity)" else 0,
                        "parameters": model.count_params(), "flops": flops(model, report["forms"]),
                        "max_abs_diff": report["max_abs_diff"]})
    print(f"# exported {len(entries)} files in {time.time() - started:.0f} s")

    interpreters = [interpreter(e["path"]) for e in entries]
    for e, it in zip(entries, interpreters):
        e["ops"] = len(it._get_ops_details())  # operators the interpreter runs per call
    empty = len(entries) - 1
    probes = {e["weight_bytes"]: Gemv(e["weight_bytes"]) for e in entries if e["weight_bytes"]}
    tiny = Gemv(4 * 1024)
    dram = Gemv(256 << 20)
    times = {i: [] for i in range(len(entries))}
    probe_times = {b: [] for b in probes}
    tiny_times, dram_times = [], []
    started = time.time()
    for _ in range(args.rounds):
        jobs = [("model", i) for i in range(len(entries))] + [("probe", b) for b in probes] + [("tiny", 0), ("dram", 0)]
        random.shuffle(jobs)
        for kind, key in jobs:
            if kind == "model":
                times[key].append(median_invoke(interpreters[key], args.invokes))
            elif kind == "probe":
                probe_times[key].append(probes[key].median(max(20, args.invokes // 4)))
            elif kind == "tiny":
                tiny_times.append(tiny.median(200))
            else:
                dram_times.append(dram.median(5))
    print(f"# {args.rounds} rounds in {time.time() - started:.0f} s; load average at end: {load()}")

    def bandwidth(nbytes, r):  # bytes/s of round r, the call overhead of a tiny gemv taken off
        return probes[nbytes].nbytes / max(probe_times[nbytes][r] - tiny_times[r], 1e-9)

    results = []
    for i, e in enumerate(entries):
        t = times[i]
        x_dense = [t[r] / times[0][r] for r in range(args.rounds)]
        if e["weight_bytes"]:
            floors = [times[empty][r] + e["weight_bytes"] / bandwidth(e["weight_bytes"], r) for r in range(args.rounds)]
            x_floor = statistics.median(t[r] / floors[r] for r in range(args.rounds))
            gbs = statistics.median(bandwidth(e["weight_bytes"], r) for r in range(args.rounds)) / 1e9
            floor = statistics.median(floors)
        else:
            x_floor = gbs = floor = None
        results.append({**{k: v for k, v in e.items() if k != "path"}, "us": 1e6 * statistics.median(t),
                        "x_dense": statistics.median(x_dense), "floor_us": None if floor is None else 1e6 * floor,
                        "x_floor": x_floor, "probe_GBps": gbs})
    dram_gbs = statistics.median(dram.nbytes / (d - s) for d, s in zip(dram_times, tiny_times)) / 1e9

    print()
    header = (f"{'model':<28} {'form':<9} {'params':>9} {'file KiB':>9} {'weights KiB':>11} {'MFLOPs':>7} "
              f"{'ops':>4} {'us/call':>8} {'x dense':>8} {'GB/s':>6} {'floor us':>9} {'x floor':>8} {'max diff':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        opt = (lambda v, f: format(v, f) if v is not None else "-")
        print(f"{r['label']:<28} {r['form']:<9} {r['parameters']:>9,} {r['bytes'] / 1024:>9.1f} "
              f"{r['weight_bytes'] / 1024:>11.1f} {r['flops'] / 1e6:>7.2f} {r['ops']:>4} {r['us']:>8.1f} {r['x_dense']:>8.3f} "
              f"{opt(r['probe_GBps'], '6.1f'):>6} {opt(r['floor_us'], '9.1f'):>9} {opt(r['x_floor'], '8.2f'):>8} "
              f"{r['max_abs_diff']:>9.1e}")
    print(f"\nmemory read bandwidth, one thread, 256 MiB gemv (DRAM): {dram_gbs:.1f} GB/s; "
          f"per-call overhead (empty model): {results[empty]['us']:.2f} us; "
          f"x dense and x floor: medians over {args.rounds} rounds of ratios within a round")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "dram_GBps": dram_gbs,
                                               "rounds": args.rounds, "invokes": args.invokes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
