"""The memory guard: an expression that would not fit in this machine's memory is
refused before anything is allocated, with the size named."""

from __future__ import annotations

import math
import os

from ..errors import ShapeError
from .fixed import FixedLeaf

def memory_limit() -> int:
    """Numbers (float64) we let one expression hold: half the machine's memory,
    or KERAS_DECOMP_MAX_BYTES if set."""
    limit = os.environ.get("KERAS_DECOMP_MAX_BYTES")
    if limit:
        return int(float(limit)) // 8
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 16
    except (ValueError, OSError, AttributeError):
        return 2 ** 31


def check_memory(entries: int, what: str, pos: int | None = None) -> None:
    """Refuse, before allocating, what would not fit in memory."""
    if entries > memory_limit():
        # sizes from symbols such as d=1e308 are integers too large for a float: no division
        count, gib = (f"{entries:,}", f"{entries * 8 / 2 ** 30:,.1f}") if entries < 10 ** 30 else \
            (f"about 10^{len(str(entries)) - 1}", f"about 10^{len(str(entries * 8 // 2 ** 30)) - 1}")
        raise ShapeError(f"{what} would need {count} numbers ({gib} GiB), more than this machine "
                         f"allows ({memory_limit() * 8 / 2 ** 30:,.1f} GiB)", pos=pos,
                         hint="use fewer or smaller terms, or set KERAS_DECOMP_MAX_BYTES to allow more")


# Draws of one sub-expression a stage may make in all (``sum`` inside ``sum`` multiplies): each is
# a Python object with its own random stream, which the memory guard does not count; the paper's
# largest layer makes 1600 (sum(tile(D, n=8), n=200)).
MAX_DRAWS = 10_000




def draw_entries(node) -> int:
    """Numbers one draw of ``node`` keeps inside ``sum`` or ``tile``: where the draws
    collapse (a fixed leaf linear in its arrays, or rank-1), its arrays stacked (two
    vectors for R, one for D); otherwise its dense matrix, which a sum of generic
    draws may materialise one by one.

    >>> from keras_decomp import parse
    >>> draw_entries(parse("R", 4096, 4096).stages[0]), draw_entries(parse("G", 64, 32).stages[0])
    (8192, 2048)
    """
    if isinstance(node, FixedLeaf) and node.stack in ("linear", "rank1", "shared"):
        return 0 if node.stack == "shared" else sum(math.prod(s) for s in node.array_shapes().values())
    return max(math.prod(node.shape), node.num_params + node.num_fixed)
