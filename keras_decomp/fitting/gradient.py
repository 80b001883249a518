"""The fallback fit: Adam on ||W - E(theta)||_F^2 / ||W||_F^2, for expressions
no exact method covers (a parameter used twice, as in ``g g'``).

Gradients come from JAX when it is installed (``materialize`` is written
against an array namespace, so ``jax.numpy`` runs it unchanged); otherwise by
central differences, which are exact for expressions of degree <= 2 in each
single parameter, and affordable only for small problems.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DecompError
from . import progress

FD_LIMIT = 2e9  # FLOPs per step we allow central differences


def gradient_fit(W, node, values, fixed, steps: int = 2000, lr: float = 1e-2, tol: float = 1e-12):
    """(values, history of relative errors), Adam from ``values``."""
    keys = list(node.param_shapes())
    norm2 = float(np.sum(W * W)) or 1.0
    grad = _jax_gradient(W, node, fixed, keys, norm2) or _fd_gradient(W, node, fixed, keys, norm2)
    theta = {k: np.asarray(values[k], dtype=np.float64) for k in keys}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    s = {k: np.zeros_like(v) for k, v in theta.items()}
    history = [_error(W, node, theta, fixed)]
    best = (history[0], dict(theta))
    bar = progress.Bar(f"gradient fit {W.shape[0]}x{W.shape[1]}", total=steps)
    for t in range(1, steps + 1):
        g = grad(theta)
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


def _error(W, node, theta, fixed) -> float:
    E = np.asarray(node.materialize({**fixed, **theta}, np))
    return float(np.linalg.norm(W - E) / (np.linalg.norm(W) or 1.0))


def _jax_gradient(W, node, fixed, keys, norm2):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    Wj = jnp.asarray(W)
    fixed_j = {k: jnp.asarray(v) for k, v in fixed.items()}

    def loss(theta):
        E = node.materialize({**fixed_j, **theta}, jnp)
        return jnp.sum((Wj - E) ** 2) / norm2

    step = jax.jit(jax.grad(loss))
    return lambda theta: {k: np.asarray(v) for k, v in step({k: jnp.asarray(v) for k, v in theta.items()}).items()}


def _fd_gradient(W, node, fixed, keys, norm2):
    p = sum(math.prod(node.param_shapes()[k]) for k in keys)
    cost = 2 * p * max(node.build_cost(), math.prod(node.shape))
    if cost > FD_LIMIT:
        raise DecompError(f"no exact method fits this expression, and gradient descent over {p} parameters "
                          "needs JAX for its gradients", hint="pip install jax, or train this stage instead")

    def grad(theta):
        base = {**fixed, **theta}
        E = np.asarray(node.materialize(base, np))
        residual = E - W
        out = {}
        for k in keys:
            g = np.zeros(theta[k].size)
            flat = theta[k].ravel()
            for i in range(flat.size):
                step = np.zeros_like(flat)
                step[i] = 1e-3
                plus = node.materialize({**base, k: (flat + step).reshape(theta[k].shape)}, np)
                minus = node.materialize({**base, k: (flat - step).reshape(theta[k].shape)}, np)
                g[i] = 2 * np.sum(residual * (plus - minus) / 2e-3) / norm2
            out[k] = g.reshape(theta[k].shape)
        return out
    return grad
