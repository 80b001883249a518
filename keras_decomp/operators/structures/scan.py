"""Linear recurrences over a stack of steps, s_0 = u_0, s_t = s_{t-1} M_t + u_t, run two
ways: step after step (T - 1 products and adds, in order), or by doubling (ceil(log2 T)
rounds, each a few batched ops over every step at once, at the price of more FLOPs and
of the products of transitions, which depend on the weights only and which a TFLite
converter folds).  ``scan_costs`` gives both ways' work so a caller can pick the faster.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> u, M = rng.normal(size=(6, 1, 3, 2)), rng.normal(size=(5, 1, 2, 2))
>>> bool(np.allclose(in_steps(u, M, np), by_doubling(u, M, np)))
True
"""

from __future__ import annotations

import math

from ..cost import Cost


def in_steps(inputs, moves, xp):
    """s_0 = u_0, s_t = s_{t-1} M_t + u_t, one step after the other."""
    u = unstack(inputs, xp)
    states = [u[0]]
    for t, move in enumerate(unstack(moves, xp) if moves is not None else (), start=1):
        states.append(xp.matmul(states[-1], move) + u[t])
    return xp.stack(states)


def by_doubling(inputs, moves, xp):
    """The same states in ceil(log2 T) rounds: after the round of span k, s_t holds the
    inputs of the last k steps carried to t and P_t the product of their transitions;
    then s_t += s_{t-k} P_t and P_t = P_{t-k} P_t (zeros before the first step)."""
    states, T = inputs, inputs.shape[0]
    carry = xp.pad(moves, [[1, 0], [0, 0], [0, 0], [0, 0]])  # P_0 = 0: nothing enters step 0
    span = 1
    while span < T:
        back = [[span, 0], [0, 0], [0, 0], [0, 0]]
        states = states + xp.matmul(xp.pad(states[:-span], back), carry)
        if 2 * span < T:
            carry = xp.matmul(xp.pad(carry[:-span], back), carry)
        span *= 2
    return states


def unstack(a, xp) -> list:
    """The sub-arrays of ``a`` along its first axis, in one op where ``xp`` has one."""
    return xp.unstack(a, axis=0) if hasattr(xp, "unstack") else list(a)



SCANS = {"steps": in_steps, "doubling": by_doubling}


def scan_costs(steps: int, d: int, batch: int, directions: int = 1) -> dict:
    """name -> Cost of ``steps`` steps on (batch, d) states with (d, d) transitions, for
    ``directions`` recurrences run side by side (one batched product each op)."""
    rounds = max(1, math.ceil(math.log2(max(steps, 2))))
    product = directions * 2 * batch * d * d
    add = directions * batch * d
    # stepping carries the directions in one state with block-diagonal moves: 2-D products (a tiny
    # batched product costs TensorFlow about a hundred times more per op), twice the FLOPs
    return {"steps": Cost((steps - 1) * (directions * product + add), 3 * steps * add, 2 * steps + 1),
            "doubling": Cost(rounds * steps * (product + add) + (rounds - 1) * steps * directions * 2 * d ** 3,
                             rounds * 4 * steps * add, 7 * rounds)}
