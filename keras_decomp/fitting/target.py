"""The matrix being fitted: checked on the way in, and the relative error of a fit."""

from __future__ import annotations

import numpy as np

from ..errors import DecompError


def check_target(W) -> np.ndarray:
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise DecompError(f"the matrix to approximate must be 2-D, got shape {W.shape}",
                          hint="reshape a Conv2D kernel (kh, kw, cin, cout) to (kh*kw*cin, cout)")
    if not np.all(np.isfinite(W)):
        bad = int(np.size(W) - np.count_nonzero(np.isfinite(W)))
        raise DecompError(f"the matrix to approximate has {bad} NaN or infinite entries",
                          hint="check the trained weights (a diverged run?) before decomposing")
    return W


def rel_error(W, node, values, fixed=None) -> float:
    fixed = node.fixed_arrays() if fixed is None else fixed
    E = node.materialize({**fixed, **values}, np)
    norm = np.linalg.norm(W)
    return float(np.linalg.norm(W - E) / (norm if norm > 0 else 1.0))
