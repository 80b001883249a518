"""Regenerate the Fashion-MNIST subset shipped in keras_decomp/datasets/fashion_mnist_subset.

The subset holds real Fashion-MNIST images: 500 training and 100 test images per class,
drawn without replacement by a seeded generator from the full IDX files that the Debian
package dataset-fashion-mnist installs (apt-get install dataset-fashion-mnist), kept in
their original order. It is written in IDX format, gzipped without time stamps, so that
keras_decomp.data reads it like the full files and a regeneration is byte-identical.

    .venv/bin/python scripts/make_subset.py            # rewrite the shipped files
    .venv/bin/python scripts/make_subset.py --check    # exit 1 if they differ from a fresh draw
    .venv/bin/python scripts/make_subset.py --source DIR --out DIR --seed 0

Fashion-MNIST is (c) 2017 Zalando SE under the MIT licence; the notice ships beside the files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout, installed or not

from keras_decomp.training.data import IDX_FILES, read_idx, write_idx  # noqa: E402

LICENSE = """\
These files are a subset of Fashion-MNIST, https://github.com/zalandoresearch/fashion-mnist
({train} training and {test} test images per class, drawn with seed {seed} by
scripts/make_subset.py from the IDX files of the Debian package dataset-fashion-mnist).

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this
software and associated documentation files (the "Software"), to deal in the Software
without restriction, including without limitation the rights to use, copy, modify,
merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE.
"""


def draw(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` examples of every class, in their original order."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
              for c in range(int(labels.max()) + 1)]
    return np.sort(np.concatenate(chosen))


def write_subset(source: Path, out: Path, train: int, test: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train), ("test", test)):
        x = read_idx(min(source.glob(IDX_FILES[f"x_{split}"] + "*")))
        y = read_idx(min(source.glob(IDX_FILES[f"y_{split}"] + "*")))
        keep = draw(y, per_class, rng)
        write_idx(out / (IDX_FILES[f"x_{split}"] + ".gz"), x[keep])
        write_idx(out / (IDX_FILES[f"y_{split}"] + ".gz"), y[keep])
    (out / "LICENSE").write_text(LICENSE.format(train=train, test=test, seed=seed))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="folder with the full IDX files (default: %(default)s)")
    parser.add_argument("--out", type=Path,
                        default=REPO / "keras_decomp" / "datasets" / "fashion_mnist_subset",
                        help="folder to write (default: the one shipped in the package)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if --out differs from a fresh draw")
    args = parser.parse_args(argv)
    if not all(any(args.source.glob(stem + "*")) for stem in IDX_FILES.values()):
        parser.error(f"no Fashion-MNIST IDX files in {args.source}; "
                     "apt-get install dataset-fashion-mnist, or pass --source")
    draw_args = (args.train_per_class, args.test_per_class, args.seed)
    if not args.check:
        write_subset(args.source, args.out, *draw_args)
        size = sum(p.stat().st_size for p in args.out.iterdir())
        print(f"wrote {args.out}: {size} bytes")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_subset(args.source, Path(tmp), *draw_args)
        fresh = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    shipped = {p.name: p.read_bytes() for p in args.out.iterdir()} if args.out.is_dir() else {}
    differ = sorted(n for n in fresh.keys() | shipped.keys() if fresh.get(n) != shipped.get(n))
    print(f"{args.out}: " + (f"differs in {', '.join(differ)}" if differ else "up to date"))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
