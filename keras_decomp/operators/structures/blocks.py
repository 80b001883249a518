"""Near-equal blocks as one stack: a length split into p blocks whose sizes differ
by at most one (the first ``total mod p`` one larger), laid out as p equal blocks
of the larger size, each smaller block padded with a zero at its end.  Padding
keeps products exact (a zero input meets a zero row; a padded output column is
cut off) and lets one batched product serve every block, where per-block
products would be one op each (SSS stages; block-diagonal factors).

>>> import numpy as np
>>> block_sizes(10, 4)
(3, 3, 2, 2)
>>> to_blocks(np.arange(10.0)[None], 4, np)[:, 0]
array([[0., 1., 2.],
       [3., 4., 5.],
       [6., 7., 0.],
       [8., 9., 0.]])
>>> from_blocks(to_blocks(np.arange(10.0)[None], 4, np), 10, np)
array([[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]])
"""

from __future__ import annotations

import numpy as np


def block_sizes(total: int, p: int) -> tuple[int, ...]:
    """``total`` split into ``p`` near-equal blocks, the first ``total mod p`` one larger."""
    base, extra = divmod(total, p)
    return tuple(base + (k < extra) for k in range(p))


def offsets(sizes) -> tuple[int, ...]:
    """Where each block starts, and the total at the end."""
    return tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)]))


def to_blocks(x, p: int, xp):
    """x (batch, n) -> (p, batch, ceil(n / p)), the smaller blocks padded with a zero."""
    n = x.shape[1]
    size, big = -(-n // p), n % p
    if big == 0:
        blocks = xp.reshape(x, (-1, p, size))
    else:
        head = xp.reshape(x[:, :big * size], (-1, big, size))
        tail = xp.reshape(x[:, big * size:], (-1, p - big, size - 1))
        blocks = xp.concatenate([head, xp.pad(tail, [[0, 0], [0, 0], [0, 1]])], axis=1)
    return xp.transpose(blocks, (1, 0, 2))


def from_blocks(y, m: int, xp):
    """(p, batch, ceil(m / p)) -> (batch, m), the padding of the smaller blocks cut off."""
    p, size = y.shape[0], y.shape[2]
    big = m % p
    y = xp.transpose(y, (1, 0, 2))
    if big == 0:
        return xp.reshape(y, (-1, m))
    return xp.concatenate([xp.reshape(y[:, :big], (-1, big * size)),
                           xp.reshape(y[:, big:, :size - 1], (-1, (p - big) * (size - 1)))], axis=1)


def padded_stack(parts, rows: int, cols: int, xp):
    """Stacks (count, r, c) with r <= rows, c <= cols -> one (sum of counts, rows, cols)."""
    parts = [a if tuple(a.shape[1:]) == (rows, cols) else
             xp.pad(a, [[0, 0], [0, rows - a.shape[1]], [0, cols - a.shape[2]]]) for a in parts]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=0)
