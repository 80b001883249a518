"""What a path through an operator costs on this machine: FLOPs, memory traffic and
graph ops, turned into seconds by three measured constants.

FLOPs alone pick badly at both ends: a tiny layer is bound by the fixed cost of
each op the framework runs (a few microseconds), a large batch-1 product by the
bytes it reads.  ``Cost(flops, numbers, ops).seconds()`` adds the three terms;
the constants live in ``MEASURED`` (``benchmarks/cost_constants.py`` measures
them: a large float32 matmul, a large streaming add, a chain of tiny ops, all in
TensorFlow graph mode) and can be replaced for another machine with ``use`` or
the environment variable ``KERAS_DECOMP_COST`` ("flops_per_s=2e11,bytes_per_s=1e10").

>>> Cost(2e9, 0, 0).seconds(Machine(1e9, 1e9, 1e-6))
2.0
>>> with use(seconds_per_op=1.0):
...     Cost(0, 0, 3).seconds()
3.0
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields, replace

BYTES_PER_NUMBER = 4  # float32 in the layers


@dataclass(frozen=True)
class Machine:
    """Sustained float32 matmul rate, streaming bandwidth and the fixed cost of one op."""

    flops_per_s: float
    bytes_per_s: float
    seconds_per_op: float


# benchmarks/cost_constants.py on the development machine (2 shared cores, TensorFlow graph
# mode): FLOP/s and bandwidth at load 4.7, the per-op cost (ops inside a loop) at load 20, when
# FLOP/s and bandwidth read 4 and 6 times lower; rerun it on another machine and pass its
# figures to ``use`` or KERAS_DECOMP_COST
MEASURED = Machine(flops_per_s=1.2e11, bytes_per_s=9.1e9, seconds_per_op=1.1e-6)

_current = [MEASURED]


def machine() -> Machine:
    """The constants in force: ``use``'s, else KERAS_DECOMP_COST's, else ``MEASURED``."""
    if _current[-1] is MEASURED and os.environ.get("KERAS_DECOMP_COST"):
        return _from_environment(os.environ["KERAS_DECOMP_COST"])
    return _current[-1]


def _from_environment(text: str) -> Machine:
    names = {f.name for f in fields(Machine)}
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in names:
            raise ValueError(f"KERAS_DECOMP_COST: unknown constant {name.strip()!r}; known: {sorted(names)}")
        values[name.strip()] = float(value)
    return replace(MEASURED, **values)


@contextlib.contextmanager
def use(machine: Machine | None = None, **constants):
    """Cost with other constants inside the block (a whole ``Machine`` or some of its fields)."""
    _current.append(replace(machine or _current[-1], **constants))
    try:
        yield _current[-1]
    finally:
        _current.pop()


@dataclass(frozen=True)
class Cost:
    """One path's work: multiply-adds counted as 2 FLOPs, numbers read or written, ops run."""

    flops: float = 0
    numbers: float = 0
    ops: float = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.numbers + other.numbers, self.ops + other.ops)

    def seconds(self, on: Machine | None = None) -> float:
        on = on or machine()
        return (self.flops / on.flops_per_s + self.numbers * BYTES_PER_NUMBER / on.bytes_per_s
                + self.ops * on.seconds_per_op)
