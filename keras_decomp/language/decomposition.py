"""The result of ``parse``: one IR root per ``|`` stage, and the summary table."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..operators.ir import Node


@dataclass(frozen=True)
class Decomposition:
    """A parsed expression for an (n, m) operator.

    >>> from keras_decomp import parse
    >>> d = parse("lowrank(r=2) | dense", 8, 6)
    >>> d.shape, [st.num_params for st in d.stages]
    ((8, 6), [28, 48])
    """

    text: str
    stages: tuple[Node, ...]
    n: int
    m: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.m)

    @property
    def num_params(self) -> int:
        """Trainable parameters of the first stage."""
        return self.stages[0].num_params

    def summary(self, batches=(1, 128)) -> str:
        """A per-node table: shape, trainable params, fixed entries, FLOPs of
        apply vs materialise per batch size, compression against dense."""
        return summarize_stages(self.stages, batches, title=self.text.strip())


def summarize_stages(stages, batches=(1, 128), title: str = "") -> str:
    header = ["stage", "node", "shape", "params", "fixed"]
    for b in batches:
        header += [f"apply@{b}", f"mat@{b}"]
    header.append("compression")
    rows = []
    for index, root in enumerate(stages):
        for depth, node in _walk(root):
            size = math.prod(node.shape)
            params = node.num_params
            row = [str(index) if depth == 0 else "", "  " * depth + node.label(),
                   f"{node.shape[0]}x{node.shape[1]}", str(params), str(node.num_fixed)]
            for b in batches:
                row += [short_count(node.flops(b, "apply")), short_count(node.flops(b, "materialize"))]
            row.append(f"{size / params:.1f}x" if params else "-")
            rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _walk(node: Node, depth: int = 0):
    yield depth, node
    for child in node.children():
        yield from _walk(child, depth + 1)


def short_count(flops: int) -> str:
    """3 significant digits with k, M or G: 1234567 -> "1.23M"."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g}{unit}"
    return str(flops)
