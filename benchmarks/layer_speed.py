"""Speed of decomposed Dense layers against ``keras.layers.Dense`` of the same shape.

Two measurements, each inside one compiled function that loops over several steps (so the
per-call dispatch cost is amortised):

- train: forward + backward + optimizer update at batch 128 (GradientTape + ``optimizer.apply``
  in a ``tf.function`` on TensorFlow; ``jax.value_and_grad`` + ``stateless_apply`` in a
  ``jax.jit`` on JAX);
- forward: one forward pass at batch 1.

Every candidate, the Dense baselines and the memory-bandwidth probes run in each round in a
shuffled order; a candidate's ratio is its time over the same-shape Dense time of the same
round, and the table prints medians over rounds.  Sums of many full random bases are bound
by memory traffic: for them the table adds the floor, the bytes of fixed arrays that a step
must read (twice in training: the forward contraction and the coefficient gradient; once in a
forward pass) divided by the best read bandwidth measured in the same run.

    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/layer_speed.py --quick
    KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/layer_speed.py --jit
    KERAS_BACKEND=jax .venv/bin/python benchmarks/layer_speed.py
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_decomp  # noqa: E402

N_IN, N_OUT, BATCH = 784, 1024, 128
MIB = 2 ** 20


@dataclass
class Case:
    label: str
    W: str | None  # None: keras.layers.Dense
    units: int = N_OUT
    fixed_dtype: str | None = None
    target: str = ""  # "dense<=0.3", "dense<=1.5", "floor<=1.2"

    @property
    def baseline(self) -> str:
        return f"Dense {N_IN}->{self.units}"


def cases(dtypes) -> list[Case]:
    tile_units = 8 * N_IN
    out = [Case(f"Dense {N_IN}->{N_OUT}", None), Case(f"Dense {N_IN}->{tile_units}", None, tile_units),
           Case("DCT2[:k] dense (k=100)", "DCT2[:k] dense", target="dense<=0.3"),
           Case("lowrank(r=16)", "lowrank(r=16)", target="dense<=0.3"),
           Case("sum(R, n=50)", "sum(R, n=50)", target="dense<=0.3"),
           Case("sum(G, n=8)", "sum(G, n=8)", target="dense<=1.5"),
           Case("sum(G, n=20)", "sum(G, n=20)", target="dense<=1.5"),
           Case("sum(G, n=50)", "sum(G, n=50)", target="floor<=1.2"),
           Case("sum(G, n=8) sum(G, n=8)", "sum(G, n=8) sum(G, n=8)"),
           Case("sum(tile(D, n=8), n=100)", "sum(tile(D, n=8), n=100)", tile_units)]
    for dtype in dtypes:
        for n in (20, 50):
            out.append(Case(f"sum(G, n={n}) {dtype}", f"sum(G, n={n})", fixed_dtype=dtype,
                            target="floor<=1.2" if n == 50 else "dense<=1.5"))
    return out


def make_layer(case: Case):
    if case.W is None:
        layer = keras.layers.Dense(case.units)
    else:
        layer = keras_decomp.layers.Dense(case.units, W=case.W, params={"k": 100}, seed=0,
                                          fixed_dtype=case.fixed_dtype)
    layer.build((None, N_IN))
    return layer


def fixed_bytes(layer) -> int:
    """Bytes of the fixed arrays a decomposed layer holds (0 for keras Dense)."""
    fixed = getattr(layer, "_fixed", None)
    if fixed is None:
        return 0
    return sum(int(np.prod(a.shape)) * np.dtype(_dtype_name(a.dtype)).itemsize for a in fixed.arrays.values())


def _dtype_name(dtype) -> str:
    name = keras.backend.standardize_dtype(dtype)
    return "float16" if name == "bfloat16" else name  # numpy has no bfloat16; same size


def chosen_mode(layer, batch: int) -> str:
    node = getattr(layer, "node", None)
    if node is None:
        return "-"
    if layer.mode != "auto":
        return layer.mode
    return node.choose(batch)  # the cost model's pick (operators/cost.py), as the layer makes it


# ---- compiled loops, one pair per backend ----------------------------------------------

def tf_loops(layer, x, t, x1, optimizer, jit):
    import tensorflow as tf

    variables = layer.trainable_variables

    @tf.function(jit_compile=jit)
    def train(steps):
        loss = tf.zeros(())
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(layer(x) - t))
            optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    @tf.function(jit_compile=jit)
    def forward(steps):
        s = tf.zeros(())
        for _ in tf.range(steps):  # each input depends on the last output: nothing is hoisted
            s = tf.reduce_mean(layer(x1 + 1e-30 * s))  # all of it: one entry would let XLA prune
        return s

    return (lambda k: float(train(tf.constant(k)))), (lambda k: float(forward(tf.constant(k))))


def jax_loops(layer, x, t, x1, optimizer, jit):
    import jax
    import jax.numpy as jnp

    def loss_fn(tv, ntv):
        y, ntv = layer.stateless_call(tv, ntv, x)
        return jnp.mean(jnp.square(y - t)), ntv

    grad = jax.value_and_grad(loss_fn, has_aux=True)

    def step(_, state):
        tv, ntv, ov, _ = state
        (loss, ntv), g = grad(tv, ntv)
        tv, ov = optimizer.stateless_apply(ov, g, tv)
        return tv, ntv, ov, loss

    def fwd_step(_, carry):  # each input depends on the last output: nothing is hoisted
        # the barrier ties the weights to the changing carry, so XLA cannot hoist the
        # materialisation of W (loop-invariant otherwise) out of the loop
        tv, ntv, s = jax.lax.optimization_barrier(carry)
        y, _ = layer.stateless_call(tv, ntv, x1 + 1e-30 * s)
        return tv, ntv, jnp.mean(y)  # all of it: one entry would let XLA prune the rest

    tv0 = [v.value for v in layer.trainable_variables]
    ntv0 = [v.value for v in layer.non_trainable_variables]
    state = [(tv0, ntv0, [v.value for v in optimizer.variables], jnp.zeros(()))]
    train_jit = jax.jit(lambda s, k: jax.lax.fori_loop(0, k, step, s))
    # the trainable values are arguments, not constants, so XLA cannot fold W away
    forward_jit = jax.jit(lambda tv, ntv, k: jax.lax.fori_loop(0, k, fwd_step, (tv, ntv, jnp.zeros(())))[2])

    def train(k):
        state[0] = train_jit(state[0], k)
        return float(state[0][3])

    return train, (lambda k: float(forward_jit(tv0, ntv0, k)))


def make_optimizer(name, layer):
    optimizer = keras.optimizers.SGD(1e-4) if name == "sgd" else keras.optimizers.Adam(1e-4)
    optimizer.build(layer.trainable_variables)
    return optimizer


# ---- memory bandwidth probes -------------------------------------------------------------

def bandwidth_probes(mib: int) -> dict:
    """name -> (function of k that reads a float32 buffer of ``mib`` MiB k times, its bytes).
    The two products are the shapes of the sum collapse: the forward contraction c . stack
    and the coefficient gradient stack . dW."""
    rows = 64
    cols = mib * MIB // 4 // rows
    host = np.random.default_rng(1).standard_normal((rows, cols), dtype=np.float32)
    c, w = np.ones((1, rows), np.float32), np.ones((cols, 1), np.float32)
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp
        buf, c, w = jnp.asarray(host), jnp.asarray(c), jnp.asarray(w)
        fns = {"reduce_sum": jax.jit(jnp.sum), "c . buf": jax.jit(jnp.dot), "buf . w": jax.jit(jnp.dot)}
        args = {"reduce_sum": (buf,), "c . buf": (c, buf), "buf . w": (buf, w)}
        calls = {name: (lambda f=f, a=args[name]: f(*a).block_until_ready()) for name, f in fns.items()}
    else:
        import tensorflow as tf
        buf = tf.Variable(host, trainable=False)
        c, w = tf.constant(c), tf.constant(w)
        fns = {"reduce_sum": tf.function(lambda: tf.reduce_sum(buf)),
               "c . buf": tf.function(lambda: tf.matmul(c, buf)),
               "buf . w": tf.function(lambda: tf.matmul(buf, w))}
        calls = {name: (lambda f=f: f().numpy()) for name, f in fns.items()}
    calls["numpy sum (1 thread)"] = host.sum
    return {name: (_repeat(fn), host.nbytes) for name, fn in calls.items()}


def _repeat(fn):
    def run(k):
        for _ in range(k):
            fn()
    return run


# ---- measurement --------------------------------------------------------------------------

CLOCK = time.perf_counter  # --cpu-time: time.process_time


def timed(fn, k) -> float:
    start = CLOCK()
    fn(k)
    return (CLOCK() - start) / k


def calibrate(fn, budget: float) -> int:
    """Steps per call so that one call takes about ``budget`` seconds."""
    fn(1)  # compile
    fn(1)
    t = min(timed(fn, 1) for _ in range(3))
    return int(max(1, min(512, round(budget / max(t, 1e-6)))))


def measure(entries: dict, rounds: int, budget: float) -> dict:
    """entries: name -> fn(k).  Returns name -> list of per-step times, one per round."""
    steps = {name: calibrate(fn, budget) for name, fn in entries.items()}
    times = {name: [] for name in entries}
    for _ in range(rounds):
        order = list(entries)
        random.shuffle(order)
        for name in order:
            times[name].append(timed(entries[name], steps[name]))
    return times


# ---- report -----------------------------------------------------------------------------

def machine() -> str:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or os.cpu_count()
    versions = f"keras {keras.__version__}, backend {keras.backend.backend()}"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        versions += f" (tensorflow {tf.__version__})"
    else:
        import jax
        versions += f" (jax {jax.__version__})"
    return f"nproc {nproc}, CPU '{cpu}', python {platform.python_version()}, numpy {np.__version__}, {versions}"


def check(target: str, ratio: float, floor_ratio: float | None) -> str:
    if not target:
        return ""
    what, limit = target.split("<=")
    value = ratio if what == "dense" else floor_ratio
    if value is None:
        return ""
    return f"{'met' if value <= float(limit) else 'MISSED'} ({what} <= {limit})"


def table(rows, header) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def report(kind, layer_cases, times, reads) -> str:
    """One row per layer.  The floor is the time to read the fixed arrays ``reads`` times at
    the bandwidth of the same round; "x (floor+D)" compares with the floor plus the Dense step
    of that round, the bound when the memory-bound contraction and the Dense-sized matmuls run
    one after the other."""
    rows = []
    bandwidth = np.asarray(times["bandwidth"])
    for case in layer_cases:
        base, t = np.asarray(times[case.baseline]), np.asarray(times[case.label])
        ratio = float(np.median(t / base))
        nbytes = reads * case.bytes
        floor = floor_ratio = None
        cells = ["", "", "", ""]
        if case.W is not None and case.bytes > 32 * MIB:
            floor = nbytes / bandwidth
            floor_ratio = float(np.median(t / floor))
            cells = [f"{nbytes / MIB:.1f}", f"{np.median(floor) * 1e3:.2f}", f"{floor_ratio:.2f}",
                     f"{np.median(t / (floor + base)):.2f}"]
        rows.append([case.label, case.mode[kind], f"{np.median(t) * 1e3:.3f}", f"{ratio:.3f}", *cells,
                     check(case.target, ratio, floor_ratio)])
    header = ["layer", "mode", "ms/step", "x Dense", "MiB read", "floor ms", "x floor", "x (floor+D)", "target"]
    return table(rows, header)


def accuracy(layer_cases, x) -> list[str]:
    """Relative difference of outputs and kernels: low-precision fixed bases vs float32."""
    lines = []
    by_text = {(c.W, c.fixed_dtype): c for c in layer_cases}
    for case in layer_cases:
        ref = by_text.get((case.W, None))
        if case.fixed_dtype is None or ref is None:
            continue
        y, y0 = (keras.ops.convert_to_numpy(c.layer(x)).astype(np.float64) for c in (case, ref))
        w, w0 = (keras.ops.convert_to_numpy(c.layer.materialize()).astype(np.float64) for c in (case, ref))
        lines.append(f"{case.label}: |y - y32|/|y32| = {np.linalg.norm(y - y0) / np.linalg.norm(y0):.2e}, "
                     f"|W - W32|/|W32| = {np.linalg.norm(w - w0) / np.linalg.norm(w0):.2e}, "
                     f"fixed arrays {case.bytes / MIB:.1f} MiB (float32: {ref.bytes / MIB:.1f} MiB)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, short calls (about a minute)")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved measurements (default 20, quick 4)")
    parser.add_argument("--jit", action="store_true", help="TensorFlow: tf.function(jit_compile=True)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--dtypes", default="bfloat16,float16",
                        help="comma-separated fixed_dtype= variants of sum(G, n=20/50); '' for none")
    parser.add_argument("--only", default="", help="keep layers whose label contains this text")
    parser.add_argument("--bandwidth-mib", type=int, default=512, help="size of the bandwidth probe buffer")
    parser.add_argument("--cpu-time", action="store_true",
                        help="TensorFlow: one thread, timed by the process's CPU time (the work, "
                             "steadier than wall time on a loaded machine; no second core)")
    args = parser.parse_args(argv)
    if args.cpu_time:
        global CLOCK
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        CLOCK = time.process_time
    rounds = args.rounds or (4 if args.quick else 20)
    budget = 0.02 if args.quick else 0.06
    jit = args.jit or keras.backend.backend() == "jax"
    random.seed(0)
    print(f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# {machine()}")
    print(f"# KERAS_BACKEND={keras.backend.backend()}, compiled loop jit_compile={jit}, optimizer {args.optimizer}, "
          f"train batch {BATCH}, {rounds} rounds, medians{', one thread, CPU time' if args.cpu_time else ''}")
    print(f"# load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")

    dtypes = [d for d in args.dtypes.split(",") if d]
    layer_cases = [c for c in cases(dtypes) if c.W is None or args.only in c.label]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, N_IN)).astype("float32")
    x1 = x[:1]
    loops = {"train": {}, "forward": {}}
    for case in layer_cases:
        case.layer = make_layer(case)
        case.bytes = fixed_bytes(case.layer)
        case.mode = {"train": chosen_mode(case.layer, BATCH), "forward": chosen_mode(case.layer, 1)}
        t = rng.standard_normal((BATCH, case.units)).astype("float32")
        optimizer = make_optimizer(args.optimizer, case.layer)
        build = jax_loops if keras.backend.backend() == "jax" else tf_loops
        loops["train"][case.label], loops["forward"][case.label] = build(case.layer, x, t, x1, optimizer, jit)

    lines = accuracy(layer_cases, x)  # before training moves the trainable values apart
    probes = bandwidth_probes(args.bandwidth_mib)
    results = {}
    for kind in ("train", "forward"):
        entries = {**loops[kind], **{name: fn for name, (fn, _) in probes.items()}}
        results[kind] = measure(entries, rounds, budget)

    for kind in results:  # the floor bandwidth of a round: its best probe
        results[kind]["bandwidth"] = [max(nbytes / results[kind][name][r] for name, (_, nbytes) in probes.items())
                                      for r in range(rounds)]
    print("\n## Memory read bandwidth (buffer of %d MiB, medians over rounds of both phases)" % args.bandwidth_mib)
    for name, (_, nbytes) in probes.items():
        samples = results["train"][name] + results["forward"][name]
        print(f"  {name:24s} {nbytes / float(np.median(samples)) / 1e9:6.2f} GB/s")
    best = results["train"]["bandwidth"] + results["forward"]["bandwidth"]
    print(f"  floor bandwidth: the best probe of each round, median {np.median(best) / 1e9:.2f} GB/s, "
          f"max {max(best) / 1e9:.2f} GB/s")

    print(f"\n## Training step, batch {BATCH} (forward + backward + {args.optimizer} update)")
    print(report("train", [c for c in layer_cases if c.W is not None], results["train"], reads=2))
    dense = [c for c in layer_cases if c.W is None]
    print("  Dense baselines: " + ", ".join(f"{c.label} {np.median(results['train'][c.label]) * 1e3:.3f} ms"
                                           for c in dense))
    print("\n## Forward pass, batch 1")
    print(report("forward", [c for c in layer_cases if c.W is not None], results["forward"], reads=1))
    print("  Dense baselines: " + ", ".join(f"{c.label} {np.median(results['forward'][c.label]) * 1e3:.3f} ms"
                                           for c in dense))
    print(f"\n# load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if lines:
        print("\n## Accuracy of low-precision fixed bases (same seed, same trainable values, batch 128)")
        print("\n".join("  " + line for line in lines))


if __name__ == "__main__":
    main()
