"""Coverage-guided fuzzing of the expression parser and lowering with atheris (libFuzzer).

    .venv/bin/pip install -e '.[fuzz]'                    # atheris, not needed by CI
    .venv/bin/python fuzz/parser_atheris.py -max_total_time=60 [corpus_dir ...]
    make fuzz                                             # the same, 60 s

Each input is turned into (text, n, m) and given to ``keras_decomp.parse``; a result must have
the asked shape and a finite dense form, and an error must be a DecompError with a caret under
the text.  Anything else (another exception type, a wrong shape) is a crash: libFuzzer stops and
writes the input to ``crash-<sha1>``; replay it with ``python fuzz/parser_atheris.py crash-...``.
Without a corpus directory, the texts of grammar/examples/ seed a temporary one.

Without atheris the same entry function runs as a plain loop over mutated corpus texts and
random bytes (``-max_total_time=`` and ``-runs=`` are understood), so the target stays runnable.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_DECOMP_MAX_BYTES", str(32 * 2 ** 20))  # huge sizes refused, not allocated

try:
    import atheris
except ImportError:  # the plain loop below
    atheris = None

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = {"k": 3, "j": 2, "p": 0.5, "r": 2}

if atheris is not None:
    with atheris.instrument_imports(include=["keras_decomp", "lark"]):
        import numpy as np
        from keras_decomp import DecompError, parse
else:
    import numpy as np
    from keras_decomp import DecompError, parse


def check_one(data: bytes) -> None:
    """The entry function: two bytes pick the shape (1..16 each), the rest is the text."""
    if len(data) < 2:
        return
    n, m = data[0] % 16 + 1, data[1] % 16 + 1
    text = data[2:].decode("utf-8", "replace")
    try:
        d = parse(text, n, m, params=SYMBOLS)
    except DecompError as err:
        if not any(line.strip() == "^" for line in str(err).split("\n")):
            raise AssertionError(f"a DecompError without a caret:\n{err}") from err
        return
    if d.shape != (n, m):
        raise AssertionError(f"{text!r}: shape {d.shape}, asked for {(n, m)}")
    for stage in d.stages:
        dense = stage.to_dense(stage.init(np.random.default_rng(0)))
        if dense.shape != (n, m) or not np.all(np.isfinite(dense)):
            raise AssertionError(f"{text!r}: a stage gives {dense.shape} or non-finite values")


def seed_texts() -> list[bytes]:
    """The corpus cases of grammar/examples/, as inputs (shape bytes first)."""
    out = []
    for path in sorted((ROOT / "grammar" / "examples").glob("*/*.txt")):
        block: list[str] = []
        for line in path.read_text().splitlines() + [""]:
            if line.strip() and not line.startswith(("#", "!")):
                block.append(line)
            elif not line.strip() and block:
                out.append(bytes([7, 3]) + "\n".join(block).encode())
                block = []
    return out


def _options(argv: list[str]) -> dict[str, int]:
    return {a[1:].split("=")[0]: int(a.split("=")[1]) for a in argv if a.startswith("-") and "=" in a}


def plain_loop(argv: list[str]) -> None:
    """Without atheris: mutated seeds and random bytes through ``check_one``."""
    options = _options(argv)
    files = [Path(a) for a in argv[1:] if not a.startswith("-")]
    if files and all(f.is_file() for f in files):  # replay crash files
        for f in files:
            check_one(f.read_bytes())
        return
    seeds = seed_texts()
    rnd = random.Random(options.get("seed", 0))
    deadline = time.time() + options.get("max_total_time", 60)
    runs = 0
    while time.time() < deadline and runs < options.get("runs", 10 ** 12):
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 8)):
            at = rnd.randrange(len(data) + 1)
            kind = rnd.random()
            if kind < 0.3:
                data[at:at + 1] = b""
            elif kind < 0.6:
                data[at:at] = bytes([rnd.randrange(256)])
            elif kind < 0.8:
                data[at:at] = bytes([rnd.choice(b"()[]:,=+-*@'|#")])
            else:
                span = data[at:at + rnd.randint(1, 16)]
                data[at:at] = span * rnd.randint(1, 64)
        check_one(bytes(data))
        runs += 1
    print(f"plain loop (atheris not installed): {runs} runs, no crash", file=sys.stderr)


def main(argv: list[str]) -> None:
    if atheris is None:
        plain_loop(argv)
        return
    if not [a for a in argv[1:] if not a.startswith("-")]:  # no corpus given: seed a fresh one
        corpus = Path(tempfile.mkdtemp(prefix="keras_decomp_fuzz_"))
        for i, seed in enumerate(seed_texts()):
            (corpus / f"seed{i:04d}").write_bytes(seed)
        argv = argv + [str(corpus)]
    atheris.Setup(argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
