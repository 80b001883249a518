"""Can palm4MSA recover a product of 3 random sparse factors from the support SIZES alone?

Issue 6's criterion: "On a product of 3 random sparse factors (n=64, 4 non-zeros per row),
palm4MSA with the true support sizes reaches relative error < 1e-3".  The factors are those of
tests/test_sparse.py: (64, 64), 4 non-zeros in each row of A = W^T (each column of W in our
row-vector convention, so the constraint is ``spcol`` 4 on W, pyfaust's ``splin`` 4 on A),
values of magnitude in [1, 2] with random signs; W = F1 F2 F3 (about 39 non-zeros per column).

Every method gets the sizes only, except the two oracle rows at the end, which show where the
difficulty lies: with the true SUPPORTS (random values) palm4MSA converges; with sizes alone
every start we tried ends in a local minimum near 0.5.  Methods (sweeps in brackets):

  flat R2L / L2R      palm4MSA, standard start (identities and one zero factor), spcol 4 [1000]
  flat R2L 4000       the same, longer [4000]
  restarts            10 Gaussian starts (seeded), the best one [300 each, stop on rtol 1e-7]
  svd start           F1 = U S^1/2, F2 = I, F3 = S^1/2 V^T, then spcol 4 [1000]
  sp total -> spcol   256 non-zeros per factor anywhere (``sp``) [1000], then spcol 4 [1000]
  continuation        spcol 64, 32, 16, 8, 6, 5, 4 in turn, each from the last [150 each]
  hier R2L            hierarchical: W = T F3 (T spcol 16, F3 spcol 4), then T = F1 F2 [300 + 300]
  hier L2R            the same on W^T (peels F1 off the left; splin on W^T)
  hier splincol       hierarchical with splincol (NOT the true sizes: lets rows/cols keep more)
  two-factor F1 F2    the inner sub-problem alone: F1 F2 (sparse, ~15 per column) [1000]
  zero-pattern ...    two-factor splits whose projections also drop the entries that W's zero
                      pattern rules out given the neighbour's current support (A[i,k] != 0 and
                      B[k,c] != 0 need W[i,c] != 0): W = T F3 (16, 4) and F1 F2 (4, 4) [1000]
  oracle supports     palm4MSA on the TRUE supports, Gaussian values [2000]
  oracle 10% noise    the true factors with 10% value noise as start, spcol 4 [1000]
  pyfaust ...         (when pyfaust imports) its palm4msa and hierarchical, defaults otherwise

    .venv/bin/python benchmarks/palm4msa_random_product.py                 # 10 seeds
    .venv/bin/python benchmarks/palm4msa_random_product.py --seeds 0 1     # quick
    PYTHONPATH=/tmp/pyfaust_site .venv/bin/python benchmarks/palm4msa_random_product.py   # + pyfaust
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from keras_decomp.fitting import palm4msa as palm  # noqa: E402

C = palm.Constraint
N, PER, Q = 64, 4, 3


def random_sparse_factors(seed, n=N, per=PER, q=Q):
    """As tests/test_sparse.py: ``per`` non-zeros in each column, magnitudes in [1, 2]."""
    rng = np.random.default_rng(seed)
    factors = []
    for _ in range(q):
        F = np.zeros((n, n))
        for c in range(n):
            F[rng.choice(n, per, replace=False), c] = rng.choice([-1.0, 1.0], per) * rng.uniform(1, 2, per)
        factors.append(F)
    return factors


def _fit(W, constraints, start=None, iters=1000, rtol=0.0, order="right"):
    return palm.palm4msa(W, constraints, start, lam=None if start is not None else 1.0, n_iter=iters,
                         tol=1e-10, rtol=rtol, order=order)


def flat(W, truth, order, iters=1000):
    return _fit(W, [C("spcol", PER)] * Q, iters=iters, order=order).rel_error


def restarts(W, truth, seed, k=10):
    rng = np.random.default_rng(1000 + seed)
    return min(_fit(W, [C("spcol", PER)] * Q, [rng.normal(size=W.shape) for _ in range(Q)], iters=300,
                    rtol=1e-7).rel_error for _ in range(k))


def svd_start(W, truth):
    U, S, Vt = np.linalg.svd(W)
    return _fit(W, [C("spcol", PER)] * Q, [U * np.sqrt(S), np.eye(N), np.sqrt(S)[:, None] * Vt]).rel_error


def total_then_columns(W, truth):
    rough = _fit(W, [C("sp", N * PER)] * Q)
    return _fit(W, [C("spcol", PER)] * Q, [C("spcol", PER)(F) for F in rough.factors]).rel_error


def continuation(W, truth, schedule=(64, 32, 16, 8, 6, 5, 4)):
    fit = _fit(W, [C("spcol", schedule[0])] * Q, iters=150)
    for s in schedule[1:]:
        fit = _fit(W, [C("spcol", s)] * Q, [C("spcol", s)(F) for F in fit.factors], iters=150)
    return fit.rel_error


def hierarchical(W, truth, transpose=False, name=None):
    name = name or ("splin" if transpose else "spcol")
    M = W.T if transpose else W
    fit = palm.hierarchical(M, [C(name, PER)] * 2, [C(name, PER * PER), C(name, PER)], n_iter_local=300,
                            n_iter_global=300, tol=1e-10, rtol=0)
    return fit.rel_error


def two_factor(W, truth):
    T = truth[0] @ truth[1]
    return _fit(T, [C("spcol", PER)] * 2).rel_error


class ZeroConsistent:
    """spcol k on the entries that W's zero pattern allows, given the other factor's support
    (read from ``state``, where each projection leaves its result's support)."""

    def __init__(self, k, zeros, state, me, other, left):
        self.k, self.zeros, self.state, self.me, self.other, self.left = k, zeros, state, me, other, left

    def __call__(self, X):
        other = self.state.get(self.other)
        if other is not None:
            z, o = self.zeros.astype(float), other.astype(float)
            X = np.where((z @ o.T if self.left else o.T @ z) > 0, 0.0, X)
        out = palm.spcol(X, self.k)
        self.state[self.me] = out != 0
        return out


def zero_pattern(M, ka, kb):
    zeros, state = np.abs(M) < 1e-9 * np.abs(M).max(), {}
    constraints = [ZeroConsistent(ka, zeros, state, "A", "B", True), ZeroConsistent(kb, zeros, state, "B", "A", False)]
    return _fit(M, constraints).rel_error


def oracle_supports(W, truth, seed):
    rng = np.random.default_rng(2000 + seed)
    masks = [F != 0 for F in truth]
    start = [np.where(m, rng.normal(size=m.shape), 0.0) for m in masks]
    return _fit(W, [palm.Support(m) for m in masks], start, iters=2000).rel_error


def oracle_noise(W, truth, seed):
    rng = np.random.default_rng(100 + seed)
    start = [np.where(F != 0, F * (1 + 0.1 * rng.normal(size=F.shape)), 0.0) for F in truth]
    return _fit(W, [C("spcol", PER)] * Q, start).rel_error


def faust_flat(W, truth, r2l):
    from pyfaust.fact import palm4msa
    from pyfaust.factparams import ConstraintInt, ParamsPalm4MSA, StoppingCriterion

    A = W.T  # pyfaust: column vectors
    params = ParamsPalm4MSA([ConstraintInt("splin", N, N, PER)] * Q, StoppingCriterion(num_its=1000),
                            is_update_way_R2L=r2l)
    return float(np.linalg.norm(palm4msa(A, params).toarray() - A) / np.linalg.norm(A))


def faust_hierarchical(W, truth, left):
    from pyfaust.fact import hierarchical as faust_hier
    from pyfaust.factparams import ConstraintInt, ParamsHierarchical, StoppingCriterion

    A = W.T
    stop = StoppingCriterion(num_its=300)
    params = ParamsHierarchical([ConstraintInt("splin", N, N, PER)] * 2,
                                [ConstraintInt("splin", N, N, PER * PER), ConstraintInt("splin", N, N, PER)],
                                stop, stop, is_fact_side_left=left)
    return float(np.linalg.norm(faust_hier(A, params).toarray() - A) / np.linalg.norm(A))


def methods(with_faust):
    rows = [("flat R2L", lambda W, t, s: flat(W, t, "right")),
            ("flat L2R", lambda W, t, s: flat(W, t, "left")),
            ("flat R2L 4000", lambda W, t, s: flat(W, t, "right", iters=4000)),
            ("restarts x10", lambda W, t, s: restarts(W, t, s)),
            ("svd start", lambda W, t, s: svd_start(W, t)),
            ("sp total -> spcol", lambda W, t, s: total_then_columns(W, t)),
            ("continuation 64..4", lambda W, t, s: continuation(W, t)),
            ("hier R2L", lambda W, t, s: hierarchical(W, t)),
            ("hier L2R", lambda W, t, s: hierarchical(W, t, transpose=True)),
            ("hier splincol*", lambda W, t, s: hierarchical(W, t, name="splincol")),
            ("two-factor F1 F2", lambda W, t, s: two_factor(W, t)),
            ("zero-pattern W=T F3", lambda W, t, s: zero_pattern(W, PER * PER, PER)),
            ("zero-pattern F1 F2", lambda W, t, s: zero_pattern(t[0] @ t[1], PER, PER)),
            ("oracle supports", lambda W, t, s: oracle_supports(W, t, s)),
            ("oracle 10% noise", lambda W, t, s: oracle_noise(W, t, s))]
    if with_faust:
        rows += [("pyfaust flat L2R", lambda W, t, s: faust_flat(W, t, False)),
                 ("pyfaust flat R2L", lambda W, t, s: faust_flat(W, t, True)),
                 ("pyfaust hier right", lambda W, t, s: faust_hierarchical(W, t, False)),
                 ("pyfaust hier left", lambda W, t, s: faust_hierarchical(W, t, True))]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--only", nargs="+", default=None, help="run the methods whose name starts so")
    args = parser.parse_args()
    try:
        warnings.filterwarnings("ignore")  # pyfaust warns that PyTorch is absent
        import pyfaust
        faust = pyfaust.version()
    except ImportError:
        faust = None
    print(f"numpy {np.__version__}, pyfaust {faust or 'not installed'}, seeds {args.seeds}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':20s} " + " ".join(f"{'seed ' + str(s):>9s}" for s in args.seeds)
          + f" {'median':>8s} {'< 1e-3':>7s} {'s':>6s}")
    truths = {s: random_sparse_factors(s) for s in args.seeds}
    for label, method in methods(faust is not None):
        if args.only and not any(label.startswith(prefix) for prefix in args.only):
            continue
        start = time.perf_counter()
        errors = [method(palm.chain(truths[s]), truths[s], s) for s in args.seeds]
        print(f"{label:20s} " + " ".join(f"{e:9.2e}" for e in errors)
              + f" {np.median(errors):8.3f} {sum(e < 1e-3 for e in errors):4d}/{len(errors)}"
              f" {time.perf_counter() - start:6.0f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
