"""The table of structure-specific fits: node type -> method.

A structure whose best fit has its own algorithm (SSS by Hankel SVD, sparse
factors by palm4MSA, ...) registers it here from its module in ``fitting/``;
``approximate`` looks a node's type up before trying the generic methods.
"""

from __future__ import annotations

from typing import Callable

_METHODS: dict[type, Callable] = {}
_DATA_METHODS: dict[type, Callable] = {}


def register(node_type: type, method: Callable) -> None:
    """``method(W, node, rng) -> values`` approximates nodes of ``node_type``."""
    _METHODS[node_type] = method


def lookup(node_type: type) -> Callable | None:
    return _METHODS.get(node_type)


def register_data_norm(node_type: type, method: Callable) -> None:
    """``method(W, node, R, rng) -> values`` fits nodes of ``node_type`` in the
    data norm ||R (W - E)||_F (R upper triangular, R^T R the damped Gram)."""
    _DATA_METHODS[node_type] = method


def lookup_data_norm(node_type: type) -> Callable | None:
    return _DATA_METHODS.get(node_type)
