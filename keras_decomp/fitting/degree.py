"""What kind of fit an expression takes: the polynomial degree of its dense form in a
set of parameters (degree 1 in all of them: linear least squares; degree 1 in each
block: alternating least squares; else the gradient fallback), and whether a block of
higher degree is still solved exactly by its structure's own solve.  numpy only.

>>> from keras_decomp import parse
>>> node = parse("lowrank(r=2) dense", 6, 4).stages[0]
>>> degree(node, {"lowrank.0.0.u"}), degree(node, {"lowrank.0.0.u", "lowrank.0.0.v", "dense.0.1"})
(1, 3)
"""

from __future__ import annotations

from ..operators import ir
from ..operators.fixed import FixedLeaf
from ..operators.structures.basic import Dense, Diag, LowRank, SumOf
from ..operators.structures.kron import Kron


def degree(node: ir.Node, keys: set) -> int:
    """Polynomial degree of the node's dense form in the parameters ``keys``."""
    own = getattr(node, "degree", None)
    if own is not None:
        return own(keys)
    if isinstance(node, LowRank):
        return (node.key + ".u" in keys) + (node.key + ".v" in keys)
    if isinstance(node, (Dense, Diag)):
        return int(node.key in keys)
    if isinstance(node, SumOf):
        return int(node.key in keys) + max((degree(d, keys) for d in node.children()), default=0)
    if isinstance(node, ir.Scale):
        return int(node.key in keys if node.key else 0) + degree(node.child, keys)
    if isinstance(node, (ir.Product, Kron)):
        return sum(degree(c, keys) for c in node.children())
    if isinstance(node, FixedLeaf):
        return 0
    return max((degree(c, keys) for c in node.children()), default=int(bool(set(node.own_params()) & keys)))


def solved_by_parts(node: ir.Node, key: str) -> bool:
    """Whether ``solve_block`` reaches a structure's own solve for ``key`` through sums,
    scalings and transposes only: an SSS stack of transitions (of degree p - 2 in W) is
    solved stage after stage, each stage exactly, so a sweep still never raises the error."""
    if key in node.own_params():
        return getattr(node, "solve_block", None) is not None
    if isinstance(node, ir.Scale) and node.key == key:
        return False
    if isinstance(node, (ir.Add, ir.Scale, ir.Transpose)):
        holders = [c for c in node.children() if key in c.param_shapes()]
        return len(holders) == 1 and solved_by_parts(holders[0], key)
    return False
