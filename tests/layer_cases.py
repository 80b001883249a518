"""The expressions that the layer harness (tests/test_layers.py) runs through Dense and Conv2D.

One row per node kind, or per path through a node kind (a sum collapses differently for G, R,
D, P and for a generic sum of products).  A row is the (n, m) kernel matrix the expression must
describe: Dense gets n inputs and m units; Conv2D gets a (kh, kw, cin) kernel with
kh*kw*cin == n (2x2 by default, so n must be a multiple of 4) and m filters.

To cover a new structure (sss, sketch, sparse, tri, ...), append rows to CASES: every check
of the harness then runs on them for both layers, all modes and both backends.  Rows in
EXPENSIVE run the checks that compile, save and reload a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    id: str
    W: str
    n: int = 12
    m: int = 8
    params: dict = field(default_factory=dict)
    kernel: tuple[int, int] = (2, 2)

    @property
    def channels(self) -> int:
        """Conv2D input channels: n = kh * kw * cin."""
        kh, kw = self.kernel
        if self.n % (kh * kw):
            raise ValueError(f"case {self.id}: n={self.n} is not a multiple of the kernel {self.kernel}")
        return self.n // (kh * kw)


CASES = [
    # trainable structures
    Case("dense", "dense"),
    Case("diag", "diag"),
    Case("diag_wide", "diag", n=8, m=12),
    Case("lowrank", "lowrank(r=2)"),
    Case("lowrank_budget", "lowrank(params=0.3)"),
    # named trainable matrices and scalars
    Case("named_factors", "g0 g1"),
    Case("named_tri", "g0 s1 g1'"),
    Case("named_scalar", "G * a"),
    Case("scalars_paper", "(A1*a + B1*b)(DCT[:k])", params={"k": 8}),
    # combinators
    Case("constant_scale", "2.5 * dense"),
    Case("sum", "dense + lowrank(r=1)"),
    Case("difference", "dense - sum(G, n=2)"),
    Case("product", "G dense"),
    Case("product_at", "lowrank(r=3) @ diag"),
    Case("transpose", "dense'"),
    Case("transpose_product", "(G dense)'"),
    Case("slice", "dense[2:10]"),
    Case("dct_slice_symbol", "DCT[:k] dense", params={"k": 5}),
    # sums of fixed draws: each collapse path
    Case("sum_G", "sum(G, n=3)"),
    Case("sum_S", "sum(S, n=3)"),
    Case("sum_R", "sum(R, n=3)"),
    Case("sum_D", "sum(D, n=3)", m=12),
    Case("sum_P_slice", "sum(P, n=3)[:8]"),
    Case("sum_budget", "sum(G, params=0.05)"),
    Case("sum_of_product", "sum(G dense, n=2)"),
    Case("sum_of_fixed_product", "sum(G S, n=2)"),
    Case("product_of_sums", "sum(G, n=3) sum(G, n=2)"),
    # the fast random basis: one F's arrays whatever n (n = rows*cols: every bucket one entry)
    Case("sum_F", "sum(F, n=5)"),
    Case("sum_F_all_entries", "sum(F, n=96)"),
    Case("sum_F_prime_rows", "sum(F, n=9)", n=67, m=4, kernel=(1, 1)),
    Case("sum_F_in_product", "DCT[:k] sum(F, n=7) + sum(R, n=2)", params={"k": 6}),
    Case("F_seeded", "F(seed=2) diag"),
    # tile and kron
    Case("tile", "tile(dense, n=2)"),
    Case("tile_fixed", "tile(G, n=2) diag"),
    Case("sum_tile_D", "sum(tile(D, n=2), n=3)", m=24),
    Case("kron", "kron(DCT2(h=2, w=2), dense)"),
    Case("kron_right", "kron(dense, DCT2(h=2, w=2))"),
    Case("kron_split", "kron(dense, dense)"),  # near-square: (3, 2) and (4, 4)
    Case("kron_sized", "kron(dense, lowrank(r=1), rows=2, cols=4)"),  # (2, 4) and (6, 2)
    # fixed bases
    Case("dct2", "DCT2 dense", n=16),
    Case("dct2_hw", "DCT2(h=3, w=4)[:6] dense"),
    Case("hadamard", "H[:8] diag", n=16),
    Case("identity", "dense I"),
    Case("gaussian_named", "A1 dense"),
    Case("sign_seeded", "S(seed=3) dense"),
    # sketch: SK-FC for Dense; SK-CONV for Conv2D (U2 on the 3 input channels of each of
    # the 2x2 kernel positions), and the reshaped kernel sketched as a plain matrix
    Case("sketch", "sketch(k=2, l=2)"),
    Case("sketch_budget", "sketch(params=0.5)"),
    Case("sketch_flat", "sketch(k=3, spatial=1)"),
    Case("sketch_in_sum", "sketch(k=1, l=3) + diag"),
    # sss: the forward and backward recursions over p stages; odd block sizes and n != m
    # (inputs (5, 4, 4), outputs (3, 3, 2)), more stages than transitions need, one and two stages
    Case("sss", "sss(p=3, d=2)", n=13, m=8, kernel=(1, 1)),
    Case("sss_long", "sss(p=5, d=3)", n=20, m=10),
    Case("sss_two_stages", "sss(p=2, d=1)"),
    Case("sss_one_stage", "sss(p=1, d=1)"),
    Case("sss_budget", "sss(p=3, params=0.7)"),
    Case("sss_plus_lowrank", "sss(p=3, d=1) + lowrank(r=1)"),
    # stacks broken where blocks shrink (inputs (4, 4, 3, 3), outputs (3, 3, 2, 2)), two transitions
    # per stack: the batched apply pads the smaller blocks
    Case("sss_uneven", "sss(p=4, d=2)", n=14, m=10, kernel=(1, 2)),
    # sparse factors: random seeded supports (gather apply), s capped at a factor's inputs,
    # a budget; butterfly on powers of two and padded (12 -> 16 inputs, 8 of 16 outputs)
    Case("sparse", "sparse(q=3, s=2)"),
    Case("sparse_one_factor", "sparse(q=1, s=20)", n=16),
    Case("sparse_budget", "sparse(params=0.5)"),
    Case("butterfly", "butterfly", n=16, m=16),
    Case("butterfly_padded", "butterfly()"),
    Case("butterfly_in_product", "DCT butterfly"),
    Case("butterfly_wide", "butterfly", n=8, m=32),
    # monarch: square (q = b, one transpose), rectangular with q != b (the general permutation),
    # padded inputs and outputs (12 -> 4 blocks of 3, 10 -> 4 blocks of 3), a budget, in a product
    Case("monarch", "monarch(b=4)", n=16, m=16),
    Case("monarch_rect", "monarch(b=2)"),
    Case("monarch_padded", "monarch(b=4)", m=10),
    Case("monarch_budget", "monarch(params=0.5)"),
    Case("monarch_in_product", "DCT monarch(b=3)"),
    # tri: G_in S G_out^T (k != h, h defaulting to k, factors wider than the kernel, a budget,
    # inside a sum, transposed)
    Case("tri", "tri(k=3, h=2)"),
    Case("tri_square_core", "tri(k=4)"),
    Case("tri_wide", "tri(k=16, h=10)"),
    Case("tri_budget", "tri(params=0.5)"),
    Case("tri_in_sum", "tri(k=2, h=1) + diag"),
    Case("tri_transposed", "tri(k=2, h=3)'"),
]

# The checks that compile, fit, save and reload a model are the slow ones: run them on a
# handful of rows that between them hold every kind of variable and fixed array.
EXPENSIVE = ["dense", "lowrank", "named_tri", "scalars_paper", "sum_R", "sum_P_slice",
             "sum_of_product", "sum_tile_D", "kron", "kron_split", "dct2", "sketch", "sss", "sss_uneven", "sparse",
             "butterfly_padded", "tri", "monarch_padded", "sum_F_in_product"]

BY_ID = {case.id: case for case in CASES}
