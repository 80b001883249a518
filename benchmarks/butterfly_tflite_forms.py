"""butterfly() in a factored TFLite file, batch 1: the flips form against forms with fewer operators.

At batch 1 the layer (and so the factored file) runs the flips form: 4 elementwise ops per
factor over the 2 N log2 N stored values, about 5 operators per factor.  Two ways to have fewer
operators, each exported here from one ``Dense(N, W="butterfly()")``:

- blocks: the layer's large-batch path (two block-diagonal batched products with transposes;
  the blocks, multiplied out from the values, are folded into constants by the converter):
  6 operators, 2 N sqrt(N) stored numbers;
- radix 2^g (this script only, not a path of the library): g consecutive factors fused into one
  (the library's ``_blocks`` multiplies them out into 2^g x 2^g blocks, folded by the converter),
  applied by a broadcast product and a sum: log2(N) / g factors of 2^g N numbers each.

The layer's own choice (``ButterflyProduct.apply``) is replaced for the other forms' exports.
Per file: batch-1 latency, x dense, x floor, operators, bytes (family_speed.py's
``tflite_rows``: the floor is one plain fully connected layer holding as many bytes as the file).

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python benchmarks/butterfly_tflite_forms.py --size 4096 --runs 300
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_decomp  # noqa: E402
from family_speed import tflite_rows  # noqa: E402  (this folder is on sys.path)
from keras_decomp.operators.structures.butterfly import ButterflyProduct, _blocks  # noqa: E402


def apply_radix(node, x, v, xp, g):
    """x F_1 ... F_L with each run of g consecutive factors multiplied out into 2^g x 2^g blocks."""
    size = node.size
    x = node._padded(x, xp)
    columns = node._columns(v, xp)
    for k in range(0, len(columns), g):
        group = columns[k:k + g]
        stride, r = 1 << k, 1 << len(group)
        w = _blocks(group, stride, xp, size)  # (size / (stride r), r in, r out, stride)
        x5 = xp.reshape(x, (-1, size // (stride * r), r, 1, stride))
        x = xp.reshape(xp.sum(x5 * w, axis=2), (-1, size))
    return node._cut(x)


def rows(size: int, runs: int) -> dict:
    layers = {"Dense": keras.layers.Dense(size, use_bias=False),
              "butterfly": keras_decomp.layers.Dense(size, W="butterfly()", use_bias=False)}
    for layer in layers.values():
        layer.build((None, size))
    return tflite_rows(size, layers, runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--radix", type=lambda s: [int(g) for g in s.split(",")], default=[2, 3, 4],
                        help="g of the radix-2^g forms")
    args = parser.parse_args(argv)
    forms = {"flips": ButterflyProduct.apply_flips, "blocks": ButterflyProduct.apply_blocks}
    forms.update({f"radix {1 << g}": (lambda self, x, v, xp, g=g: apply_radix(self, x, v, xp, g))
                  for g in args.radix})
    chosen, results = ButterflyProduct.apply, {}
    try:
        for form, apply in forms.items():
            ButterflyProduct.apply = apply
            results[form] = rows(args.size, args.runs)
    finally:
        ButterflyProduct.apply = chosen
    print(f"| form | batch-1 ms | x dense | x floor | operators | bytes |  (size {args.size})")
    print("|---|---|---|---|---|---|")
    for form, out in results.items():
        ms, dense, floor, ops, size = out["butterfly"]
        print(f"| {form} | {ms:.4f} | {dense:.4f} | {floor:.2f} | {ops} | {size:,} |")


if __name__ == "__main__":
    main()
