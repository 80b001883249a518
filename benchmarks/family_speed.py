"""Every structured family against ``keras.layers.Dense`` of the same square shape.

For each size (1024, 4096) and each parameter budget (about 10% and 1% of the dense
count), one decomposed ``keras_decomp.layers.Dense`` per family, timed side by side
with a plain Dense layer in interleaved, shuffled rounds (ratios of the same round,
medians over rounds):

- train: forward + backward + Adam update at batch 128;
- fwd1, fwd128: one forward pass at batch 1 and at batch 128;

each inside one compiled loop (``benchmarks/layer_speed.py``'s loops: a tf.function,
with ``--jit`` an XLA-compiled one; a ``jax.jit`` on JAX).  Then, per family, the
factored TFLite file (``keras_decomp.export``, mode="factored") at batch 1, one
thread: its latency against the dense file's and against its floor, the latency of a
file holding one plain fully connected layer with as many weight bytes (the bytes at
the bandwidth this machine gives TFLite for a read of that size, caches included,
plus the per-invoke cost); and its operator count.

A family whose structure is not registered in this version (``monarch``, say) is
skipped.  ``sum(R, n)`` has n trainable scalars; its row uses n such that its stored
vectors are the budget's share of the dense count (which is also its FLOP share).

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/family_speed.py --quick     # ~3 min
    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/family_speed.py             # both sizes, budgets
    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/family_speed.py --jit --no-tflite
    KERAS_BACKEND=jax .venv/bin/python benchmarks/family_speed.py --no-tflite
    .venv/bin/python benchmarks/family_speed.py --plot        # docs/figures/family_speed.png from the CSVs

Rows are appended to docs/figures/family_speed_<backend>.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from layer_speed import jax_loops, make_optimizer, measure, tf_loops  # noqa: E402

import keras_decomp  # noqa: E402
from keras_decomp.operators.structures import registry  # noqa: E402

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
KINDS = ("train", "fwd1", "fwd128")


def families(size: int, share: float) -> dict[str, str]:
    """family -> expression at about ``share`` of the dense parameters."""
    rank1_terms = max(1, round(share * size * size / (2 * size)))
    out = {"lowrank": f"lowrank(params={share})",
           # the diagonal blocks alone are 1/p of dense: p = 16 leaves room at 10%, p = 256 at 1%
           "sss": f"sss(p={16 if share >= 0.05 else 256}, params={share})",
           "sketch": f"sketch(params={share})",
           "tri": f"tri(params={share})",
           "sum_R": f"sum(R, n={rank1_terms})",
           "monarch": f"monarch(params={share})",
           "sparse": f"sparse(q=2, params={share})"}
    if share >= 0.05:  # no size argument: one row per size
        out.update(kron="kron(dense, dense)", butterfly="butterfly()")
    return out


def available(expression: str, size: int) -> bool:
    """Registered in this version, and buildable at this size and budget."""
    if expression.split("(")[0] not in registry._TABLE:
        return False
    try:
        keras_decomp.parse(expression, size, size)
    except keras_decomp.DecompError:
        return False
    return True


def compiled_loops(layer, size, jit):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, size)).astype("float32")
    t = rng.standard_normal((128, size)).astype("float32")
    x1 = x[:1]
    loops = jax_loops if keras.backend.backend() == "jax" else tf_loops
    train, fwd1 = loops(layer, x, t, x1, make_optimizer("adam", layer), jit)
    _, fwd128 = loops(layer, x, t, x, make_optimizer("adam", layer), jit)
    return {"train": train, "fwd1": fwd1, "fwd128": fwd128}


def speed(size: int, cases: dict[str, str], rounds: int, budget: float, jit: bool) -> dict:
    """(name, kind) -> median ratio to Dense of the same round, and Dense's ms."""
    layers = {"Dense": keras.layers.Dense(size)}
    for name, expression in cases.items():
        layers[name] = keras_decomp.layers.Dense(size, W=expression)
    entries = {}
    for name, layer in layers.items():
        layer.build((None, size))
        for kind, fn in compiled_loops(layer, size, jit).items():
            entries[name, kind] = fn
    times = measure(entries, rounds, budget)
    out = {}
    for (name, kind), series in times.items():
        dense = np.asarray(times["Dense", kind])
        out[name, kind] = (float(np.median(np.asarray(series) / dense)), 1e3 * float(np.median(series)))
    return out, layers


# ---- TFLite ------------------------------------------------------------------------------------

def tflite_file(model, folder, name, mode):
    from keras_decomp.export import export
    path = Path(folder) / f"{name}.tflite"
    export(model, path, mode=mode, check=False)
    return path


def operator_count(path) -> int:
    from ai_edge_litert.interpreter import Interpreter
    return len(Interpreter(model_path=str(path))._get_ops_details())


def tflite_rows(size, layers, runs) -> dict:
    """name -> (latency ms, x dense, x floor, operators, bytes).  A file's floor is the
    latency of one plain fully connected layer holding as many weight bytes (its reads at
    the bandwidth this machine gives a TFLite matrix-vector product of that size, caches
    included, plus the per-invoke cost)."""
    from keras_decomp.export import latency
    x = np.random.default_rng(0).standard_normal((1, size)).astype("float32")
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        def floor(nbytes):
            cols = 256
            rows = max(1, nbytes // 4 // cols)
            path = Path(folder) / f"floor_{rows}.tflite"
            _plain_tflite(keras.Sequential([keras.Input((rows,)), keras.layers.Dense(cols, use_bias=False)]), path)
            return latency(path, np.ones((1, rows), "float32"), runs=runs)

        dense_path = Path(folder) / "dense.tflite"
        _plain_tflite(keras.Sequential([keras.Input((size,)), layers["Dense"]]), dense_path)
        dense = latency(dense_path, x, runs=runs)
        out["Dense"] = (1e3 * dense, 1.0, dense / floor(dense_path.stat().st_size), operator_count(dense_path),
                        dense_path.stat().st_size)
        for name, layer in layers.items():
            if name == "Dense":
                continue
            path = tflite_file(keras.Sequential([keras.Input((size,)), layer]), folder, name, "factored")
            seconds = latency(path, x, runs=runs)
            out[name] = (1e3 * seconds, seconds / dense, seconds / floor(path.stat().st_size), operator_count(path),
                         path.stat().st_size)
    return out


def _plain_tflite(model, path):
    import tensorflow as tf
    with tempfile.TemporaryDirectory() as folder:
        spec = [keras.InputSpec(shape=(1,) + tuple(model.inputs[0].shape[1:]), dtype="float32")]
        model.export(folder, format="tf_saved_model", verbose=False, input_signature=spec)
        Path(path).write_bytes(tf.lite.TFLiteConverter.from_saved_model(folder).convert())


# ---- report ----------------------------------------------------------------------------------

def run(args):
    backend = keras.backend.backend() + ("+xla" if args.jit and keras.backend.backend() == "tensorflow" else "")
    sizes = (1024,) if args.quick else tuple(args.sizes)
    shares = (0.1,) if args.quick else tuple(args.shares)
    print(f"# {' '.join(['python'] + sys.argv)}")
    print(f"# backend {backend}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} interleaved rounds, medians; ratios are this / Dense of the same round")
    FIGURES.mkdir(parents=True, exist_ok=True)
    csv_path = FIGURES / f"family_speed_{backend}.csv"
    fresh = not csv_path.exists()
    with open(csv_path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(["backend", "size", "family", "expression", "param_share", "flop_share_b1", "kind",
                             "x_dense", "ms", "tflite_x_dense", "tflite_x_floor", "tflite_ops"])
        for size in sizes:
            for share in shares:
                cases = {f: e for f, e in families(size, share).items() if available(e, size)
                         and (not args.only or f in args.only)}
                skipped = sorted(f for f in set(families(size, share)) - set(cases) if not args.only or f in args.only)
                print(f"\n## {size} x {size}, budget {share:g} of dense" +
                      (f" (not registered here, or impossible at this budget: {', '.join(skipped)})" if skipped else ""))
                ratios, layers = speed(size, cases, args.rounds, args.budget, args.jit)
                lite = {}
                if not args.no_tflite and keras.backend.backend() == "tensorflow":
                    lite = tflite_rows(size, layers, args.tflite_runs)
                header = (f"{'family':<10} {'expression':<26} {'params':>7} {'FLOPs b1':>8} "
                          f"{'train x':>8} {'fwd1 x':>7} {'fwd128 x':>8}  {'Dense ms (train/fwd1/fwd128)':<28}"
                          f"{' TFLite x dense':>15} {'x floor':>8} {'ops':>5}")
                print(header)
                dense_ms = "/".join(f"{ratios['Dense', k][1]:.2f}" for k in KINDS)
                for name, layer in layers.items():
                    node = getattr(layer, "node", None)
                    expression = cases.get(name, "keras Dense")
                    p_share = node.num_params / size ** 2 if node else 1.0
                    f_share = node.cost(1, node.choose(1)).flops / (2 * size * size) if node else 1.0
                    cells = [ratios[name, k][0] for k in KINDS]
                    tl = lite.get(name)
                    tl_text = f"{tl[1]:>15.3f} {tl[2]:>8.2f} {tl[3]:>5}" if tl else ""
                    print(f"{name:<10} {expression:<26} {p_share:>7.4f} {f_share:>8.4f} "
                          f"{cells[0]:>8.2f} {cells[1]:>7.2f} {cells[2]:>8.2f}  "
                          f"{dense_ms if name == 'Dense' else '':<28}{tl_text}")
                    for kind, value in zip(KINDS, cells):
                        writer.writerow([backend, size, name, expression, f"{p_share:.5f}", f"{f_share:.5f}", kind,
                                         f"{value:.4f}", f"{ratios[name, kind][1]:.4f}",
                                         f"{tl[1]:.4f}" if tl else "", f"{tl[2]:.4f}" if tl else "",
                                         tl[3] if tl else ""])
                handle.flush()
    print(f"\n# rows appended to {csv_path}; load at end {os.getloadavg()[0]:.1f}")


def plot():
    """Time x Dense against parameter share, one panel per family, from every CSV here."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {}  # a rerun of a row replaces it
    for path in sorted(FIGURES.glob("family_speed_*.csv")):
        with open(path) as handle:
            for r in csv.DictReader(handle):
                latest[r["backend"], r["size"], r["expression"], r["kind"]] = r
    rows = list(latest.values())
    names = sorted({r["family"] for r in rows} - {"Dense"})
    if not names:
        raise SystemExit("no rows: run the benchmark first")
    cols = 3
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((len(names) + 2) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        mine = [r for r in rows if r["family"] == name]
        share = "flop_share_b1" if name == "sum_R" else "param_share"  # sum(R): n scalars, n pairs of vectors
        for key in sorted({(r["backend"], r["size"], r["kind"]) for r in mine}):
            points = sorted((float(r[share]), float(r["x_dense"])) for r in mine
                            if (r["backend"], r["size"], r["kind"]) == key)
            colour = f"C{KINDS.index(key[2]) + 3 * (key[1] == '4096')}"
            marker = {"tensorflow": "o", "tensorflow+xla": "s", "jax": "^"}.get(key[0], "x")
            ax.plot(*zip(*points), marker=marker, color=colour, label=f"{key[0]} {key[1]} {key[2]}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("FLOPs / dense (batch 1)" if name == "sum_R" else "parameters / dense")
        ax.set_ylabel("time / Dense")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(FIGURES / "family_speed.png", dpi=110)
    print(f"wrote {FIGURES / 'family_speed.png'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 only, 10%% budget, 3 rounds")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--only", nargs="+", help="families to time (default: all)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, --quick 3)")
    parser.add_argument("--budget", type=float, help="seconds per timed call (default 0.2, --quick 0.05)")
    parser.add_argument("--jit", action="store_true", help="TensorFlow: tf.function(jit_compile=True)")
    parser.add_argument("--no-tflite", action="store_true")
    parser.add_argument("--tflite-runs", type=int, default=100)
    parser.add_argument("--plot", action="store_true", help="only draw docs/figures/family_speed.png")
    args = parser.parse_args(argv)
    if args.plot:
        return plot()
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.budget = args.budget or (0.05 if args.quick else 0.2)
    random.seed(0)
    keras.utils.set_random_seed(0)
    run(args)
    plot()


if __name__ == "__main__":
    main()
