"""Weight tying across layers: the same lowercase parameter name in several
layers built inside ``tying()`` is one variable."""

from __future__ import annotations

import contextlib
import threading

_tying = threading.local()


@contextlib.contextmanager
def tying():
    """Layers built inside share their named trainable parameters: the same
    lowercase name (``g1`` in ``g0 s1 g1'`` and ``g1 s2 g2'``) is one variable.

    >>> import numpy as np
    >>> from keras_decomp.layers import Dense
    >>> with tying():
    ...     a, b = Dense(3, W="g s"), Dense(3, W="g t")
    ...     _ = b(a(np.ones((1, 3), "float32")))
    >>> a.tied_variables["g"] is b.tied_variables["g"]
    True
    """
    previous = getattr(_tying, "scope", None)
    _tying.scope = {}
    try:
        yield _tying.scope
    finally:
        _tying.scope = previous


def current_scope() -> dict | None:
    """The open ``tying()`` scope's name -> variable table, or None outside one."""
    return getattr(_tying, "scope", None)
