"""Per-layer tables of a built model: expression, parameters, compression, FLOPs."""

from __future__ import annotations

import math

from ..language.decomposition import short_count


def layer_table(model, batch: int = 1) -> list[dict]:
    """Per layer: name, expression (or class), trainable params, dense params,
    compression, FLOPs of one forward pass at ``batch``."""
    from .base import _Decomposed

    rows = []
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        params = layer.count_params()
        row = {"layer": layer.name, "expression": type(layer).__name__, "params": params,
               "dense_params": params, "compression": 1.0, "flops": None}
        if isinstance(layer, _Decomposed) and layer.node is not None:
            n, m = layer.node.shape
            positions = batch * _pixels(layer)
            row.update(expression=layer.W.split("|")[layer.stage].strip(),
                       dense_params=n * m + (m if layer.use_bias else 0),
                       flops=min(layer.node.flops(positions, "apply"), layer.node.flops(positions, "materialize")))
            row["compression"] = round(row["dense_params"] / max(params, 1), 2)
        rows.append(row)
    return rows


def summarize(model, batch: int = 1, print_fn=print) -> str:
    """Print and return the per-layer table of ``layer_table`` with a total."""
    text = format_table(layer_table(model, batch), batch)
    if print_fn:
        print_fn(text)
    return text


def format_table(rows: list[dict], batch: int = 1) -> str:
    """The rows of ``layer_table`` as aligned text with a total line."""
    total = sum(r["params"] for r in rows)
    dense_total = sum(r["dense_params"] for r in rows)
    header = ["layer", "expression", "params", "dense params", "compression", f"FLOPs@{batch}"]
    cells = [[r["layer"], r["expression"], str(r["params"]), str(r["dense_params"]),
              f"{r['compression']:.1f}x" if r["flops"] is not None else "",
              short_count(r["flops"]) if r["flops"] is not None else ""] for r in rows]
    cells.append(["total", "", str(total), str(dense_total), f"{dense_total / max(total, 1):.1f}x", ""])
    widths = [max(len(r[i]) for r in [header] + cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + cells)


def _pixels(layer) -> int:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is None or len(shape) != 4:
        return 1
    return math.prod(d or 1 for d in (shape[1:3] if layer.data_format == "channels_last" else shape[2:4]))
