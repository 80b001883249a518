"""The fallback fit: Adam on ||W - E(theta)||_F^2 / ||W||_F^2, for expressions
no exact method covers (a parameter used twice, as in ``g g'``).

The gradient comes from one reverse-mode pass of ``autodiff`` through the node's
own ``materialize`` (written against an array namespace, so it runs unchanged on
traced arrays): it costs a small multiple of building E once, whatever the number
of parameters, and needs no framework.

>>> import numpy as np
>>> from keras_decomp import parse
>>> node = parse("g g'", 4, 4).stages[0]
>>> A = np.random.default_rng(0).normal(size=(4, 4))
>>> values, history = gradient_fit(A @ A.T, node, node.init(np.random.default_rng(1)), {})
>>> history[-1] < 1e-3 < history[0]
True
"""

from __future__ import annotations

import numpy as np

from . import progress
from .autodiff import value_and_pullback, xp


def gradient_fit(W, node, values, fixed, steps: int = 2000, lr: float = 1e-2, tol: float = 1e-12):
    """(values, history of relative errors), Adam from ``values``; the last entry of
    the history is the best error seen, whose values are returned."""
    keys = list(node.param_shapes())
    theta = {k: np.asarray(values[k], dtype=np.float64) for k in keys}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    s = {k: np.zeros_like(v) for k, v in theta.items()}
    history = [_error(W, node, theta, fixed)]
    best = (history[0], dict(theta))
    bar = progress.Bar(f"gradient fit {W.shape[0]}x{W.shape[1]}", total=steps)
    for t in range(1, steps + 1):
        _, g = loss_and_gradient(W, node, theta, fixed)
        for k in keys:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            s[k] = 0.999 * s[k] + 0.001 * g[k] ** 2
            theta[k] = theta[k] - lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(s[k] / (1 - 0.999 ** t)) + 1e-12)
        if t % 50 == 0 or t == steps:
            history.append(_error(W, node, theta, fixed))
            if history[-1] < best[0]:
                best = (history[-1], dict(theta))
            bar.update(t, error=best[0])
            if abs(history[-2] - history[-1]) <= tol:
                break
    bar.close()
    history.append(best[0])
    return {**values, **best[1]}, history


def loss_and_gradient(W, node, theta, fixed):
    """(||W - E||^2 / ||W||^2, its gradient: key -> array) at the values ``theta``.

    >>> import numpy as np
    >>> from keras_decomp import parse
    >>> node = parse("dense", 2, 2).stages[0]
    >>> loss, grad = loss_and_gradient(np.eye(2), node, {node.key: np.zeros((2, 2))}, {})
    >>> float(loss), bool(np.allclose(grad[node.key], -np.eye(2)))
    (1.0, True)
    """
    norm2 = float(np.sum(W * W)) or 1.0
    E, pullback = value_and_pullback(lambda leaves: node.materialize({**fixed, **leaves}, xp), theta)
    residual = np.asarray(E) - W
    return float(np.sum(residual * residual)) / norm2, pullback(2.0 * residual / norm2)


def _error(W, node, theta, fixed) -> float:
    E = np.asarray(node.materialize({**fixed, **theta}, np))
    return float(np.linalg.norm(W - E) / (np.linalg.norm(W) or 1.0))
