"""keras_decomp's palm4MSA against pyfaust's, same matrices, same constraints, one run.

Hierarchical palm4MSA of an n x n matrix into log2(n) factors: every factor 2 non-zeros per
row and column (``splincol``), the residual after l factors n / 2^l per row and column, 30
sweeps for each local and each global optimisation (pyfaust's ``ParamsHierarchicalWHT``
settings, there with is_update_way_R2L=True, packing_RL=False; pyfaust's default backend).
Matrices: the Walsh-Hadamard matrix and a Gaussian matrix (seed 0).  A third row: a product of
3 random sparse 64 x 64 factors (4 per row, values +-[1, 2]) fitted by flat palm4MSA from
each library's standard start with the true support sizes (``splin`` 4 per row of A = W^T,
our ``spcol`` on W), 1000 sweeps.

pyfaust is optional (never a dependency of keras_decomp): without it the script prints our
figures alone.  BLAS threads default to 1 for both (OMP_NUM_THREADS, set before numpy loads).

    .venv/bin/python benchmarks/palm4msa_vs_pyfaust.py            # n = 256
    .venv/bin/python benchmarks/palm4msa_vs_pyfaust.py --n 64     # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from scipy.linalg import hadamard  # noqa: E402

from keras_decomp.fitting import palm4msa as palm  # noqa: E402


def ours_hierarchical(M, iters):
    n = M.shape[0]
    levels = int(np.log2(n))
    result = palm.hierarchical(M.T, [palm.Constraint("splincol", 2)] * (levels - 1),
                               [palm.Constraint("splincol", n // 2 ** (i + 1)) for i in range(levels - 1)],
                               n_iter_local=iters, n_iter_global=iters)
    return result.product().T, sum(int(np.count_nonzero(f)) for f in result.factors)


def faust_hierarchical(M, iters):
    from pyfaust.fact import hierarchical
    from pyfaust.factparams import ConstraintInt, ParamsHierarchical, StoppingCriterion

    n = M.shape[0]
    levels = int(np.log2(n))
    stop = StoppingCriterion(num_its=iters)
    params = ParamsHierarchical([ConstraintInt("splincol", n, n, 2) for _ in range(levels - 1)],
                                [ConstraintInt("splincol", n, n, n // 2 ** (i + 1)) for i in range(levels - 1)],
                                stop, stop, is_update_way_R2L=True, packing_RL=False)
    F = hierarchical(M, params)
    return F.toarray(), int(F.nnz_sum())


def random_product(seed=0, n=64, per_row=4, q=3):
    rng = np.random.default_rng(seed)
    factors = []
    for _ in range(q):
        A = np.zeros((n, n))
        for r in range(n):
            A[r, rng.choice(n, per_row, replace=False)] = rng.choice([-1.0, 1.0], per_row) * rng.uniform(1, 2, per_row)
        factors.append(A)
    return factors[0] @ factors[1] @ factors[2]


def ours_flat(M, iters):
    result = palm.palm4msa(M.T, [palm.Constraint("spcol", 4)] * 3, n_iter=iters, tol=0, rtol=0)
    return result.product().T, sum(int(np.count_nonzero(f)) for f in result.factors)


def faust_flat(M, iters):
    from pyfaust.fact import palm4msa
    from pyfaust.factparams import ConstraintInt, ParamsPalm4MSA, StoppingCriterion

    n = M.shape[0]
    params = ParamsPalm4MSA([ConstraintInt("splin", n, n, 4)] * 3, StoppingCriterion(num_its=iters),
                            is_update_way_R2L=True)
    F = palm4msa(M, params)
    return F.toarray(), int(F.nnz_sum())


def measure(fn, M, iters):
    start = time.perf_counter()
    approx, nnz = fn(M, iters)
    seconds = time.perf_counter() - start
    return float(np.linalg.norm(approx - M) / np.linalg.norm(M)), seconds, nnz


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="matrix size, a power of two")
    parser.add_argument("--iters", type=int, default=30, help="sweeps per local and global optimisation")
    parser.add_argument("--flat-iters", type=int, default=1000, help="sweeps of the flat palm4MSA row")
    args = parser.parse_args()
    try:
        warnings.filterwarnings("ignore")  # pyfaust warns that PyTorch is absent
        import pyfaust
        faust_version = pyfaust.version()
    except ImportError:
        faust_version = None
    print(f"numpy {np.__version__}, python {platform.python_version()}, OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}, load average {os.getloadavg()[0]:.1f}, "
          f"pyfaust {faust_version or 'not installed: ours alone'}")
    rows = [(f"Hadamard {args.n}x{args.n}", hadamard(args.n).astype(float), ours_hierarchical, faust_hierarchical,
             args.iters),
            (f"Gaussian {args.n}x{args.n}", np.random.default_rng(0).normal(size=(args.n, args.n)),
             ours_hierarchical, faust_hierarchical, args.iters),
            ("3 random sparse 64x64, flat", random_product(), ours_flat, faust_flat, args.flat_iters)]
    print(f"{'matrix':30s} {'ours rel.err':>13s} {'ours s':>8s} {'ours nnz':>8s}   "
          f"{'pyfaust rel.err':>15s} {'pyfaust s':>9s} {'pyfaust nnz':>11s}   err ratio  time ratio")
    for label, M, ours, faust, iters in rows:
        e1, t1, z1 = measure(ours, M, iters)
        line = f"{label:30s} {e1:13.3e} {t1:8.2f} {z1:8d}"
        if faust_version:
            e2, t2, z2 = measure(faust, M, iters)
            line += f"   {e2:15.3e} {t2:9.2f} {z2:11d}   {e1 / e2:9.3g}  {t1 / t2:10.3g}"
        print(line, flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
