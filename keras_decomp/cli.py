"""The ``keras-decomp`` command.

    keras-decomp parse "W = sum(G, n=8) | dense" --in 784 --out 10 [--param k=100] [--seed 0]

Errors in what the user wrote print as the DecompError message and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import DecompError


def _param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value of {name} must be a number, got {value!r}") from None
    return name.strip(), int(number) if number.is_integer() else number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keras-decomp", description="Structured weight decompositions for Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("parse", help="parse an expression and print its per-node table")
    p.add_argument("expression", help='e.g. "W = sum(G, n=8) | dense"')
    p.add_argument("--in", dest="n", type=int, required=True, help="input size n (rows of W)")
    p.add_argument("--out", dest="m", type=int, required=True, help="output size m (columns of W)")
    p.add_argument("--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="bind a symbol, e.g. --param k=100 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, action="append", help="batch sizes for the FLOPs columns (default 1 and 128)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "parse":
            return _parse(args)
    except DecompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


def _parse(args) -> int:
    from .parse import parse

    d = parse(args.expression, args.n, args.m, params=dict(args.param), seed=args.seed)
    print(d.summary(batches=tuple(args.batch or (1, 128))))
    dense = args.n * args.m
    print(f"\n{len(d.stages)} stage(s); first stage: {d.num_params} trainable parameters "
          f"for a {args.n}x{args.m} kernel ({dense} dense, {dense / max(d.num_params, 1):.1f}x fewer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
