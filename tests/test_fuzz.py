"""The fuzz suite: thousands of generated and mutated inputs, each of which must either work
or fail with a located DecompError, never with any other exception.

- grammar-generated expressions (tests/fuzz_strategies.py): a result has the right shape,
  finite values, a trainable count that matches its initial values and a numpy ``apply``
  equal to ``x @ to_dense``; every 2nd that parses also goes through ``keras_decomp.layers.Dense``,
  whose output must equal ``x @ to_dense + bias`` (float32, 1e-5 of the largest output);
- mutated corpus texts (grammar/examples/): the same checks;
- mutated YAML specs: ``build`` makes a model, or raises a SpecError naming the file, and its
  line or key path.

An expression's DecompError must put a caret under the text.  Hypothesis runs derandomized
(a fixed seed, no example database), so CI sees the same cases every time.
``KERAS_DECOMP_FUZZ=nightly`` runs 10 times as many with fresh random seeds.  The memory
guard is lowered here, so that huge sizes are refused before anything is allocated.
The counts of each outcome are printed (``pytest -s``) and checked at the end of each test.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_strategies import SYMBOLS, corpus_texts, expressions, mutated_specs, mutated_texts, spec_texts
from keras_decomp import DecompError, parse

NIGHTLY = os.environ.get("KERAS_DECOMP_FUZZ") == "nightly"
SCALE = 10 if NIGHTLY else 1
GOALS = {"grammar": 2000 * SCALE, "mutated": 2000 * SCALE, "spec": 500 * SCALE}
LAYER_EVERY = 2  # every 2nd generated expression that parses also goes through a Keras Dense layer
MAX_BYTES = str(32 * 2 ** 20)  # 4M float64 numbers: far above the small shapes, far below huge ones
TOL = 1e-5  # float32, relative to the largest output (as in tests/test_layers.py)
COUNTS: collections.Counter = collections.Counter()


def _settings(goal: int):
    return settings(max_examples=goal, deadline=None, derandomize=not NIGHTLY, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(autouse=True, scope="module")
def small_memory_guard():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_DECOMP_MAX_BYTES", MAX_BYTES)
        yield


def _report(category: str) -> None:
    outcomes = {k[1]: v for k, v in sorted(COUNTS.items()) if k[0] == category}
    print(f"\nfuzz {category}: {sum(outcomes.values())} cases, " +
          ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    assert sum(outcomes.values()) >= GOALS[category], outcomes


# ---- checks ----------------------------------------------------------------------------------

def check_caret(message: str, text: str) -> None:
    """The message shows a line of the text with a caret under a place in it."""
    lines = message.split("\n")
    carets = [i for i, line in enumerate(lines) if re.fullmatch(r" *\^", line)]
    assert len(carets) == 1 and carets[0] >= 2, f"no caret line (or several) in:\n{message}"
    printed = lines[carets[0] - 1]
    assert printed.startswith("  "), message
    assert printed[2:] in text.split("\n") or printed[2:] == text.strip("\n"), \
        f"the printed line is not a line of the text:\n{message}"
    assert 0 <= lines[carets[0]].index("^") - 2 <= len(printed) - 2, f"the caret is outside the text:\n{message}"


def parse_or_error(category: str, text: str, n: int, m: int, params: dict):
    """The decomposition, or None after checking that the error is a located DecompError.
    Anything else than DecompError propagates and fails the test."""
    try:
        d = parse(text, n, m, params=params)
    except DecompError as err:
        check_caret(str(err), text)
        COUNTS[category, "DecompError"] += 1
        return None
    COUNTS[category, "built"] += 1
    return d


def check_values(d, n: int, m: int) -> None:
    """Every stage: shape, counts, finite dense form, numpy apply equal to x @ to_dense."""
    assert d.shape == (n, m)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, n))
    for stage in d.stages:
        assert stage.shape == (n, m)
        values = stage.init(rng)
        assert sum(np.size(v) for v in values.values()) == stage.num_params
        dense = stage.to_dense(values)
        assert dense.shape == (n, m) and np.all(np.isfinite(dense))
        v = {**stage.fixed_arrays(), **values}
        expected = x @ dense
        actual = np.asarray(stage.apply(x, v, np), np.float64)
        # relative to the largest output, and at least to the inputs' size (1): a product that
        # cancels to zero (S S on 2x2) still carries rounding errors of the size of its factors
        scale = max(float(np.max(np.abs(expected))), 1.0)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-9 * scale)


# ---- grammar-generated expressions -----------------------------------------------------------

def test_grammar_generated_expressions():
    @_settings(GOALS["grammar"])
    @given(expressions())
    def run(case):
        text, n, m = case
        d = parse_or_error("grammar", text, n, m, SYMBOLS)
        if d is not None:
            check_values(d, n, m)
            if COUNTS["grammar", "built"] % LAYER_EVERY == 0:
                check_layer(text, n, m)

    run()
    _report("grammar")
    layers = sum(v for k, v in COUNTS.items() if k[0] == "layer")
    print(f"fuzz layer: {layers} Dense layers checked against x @ to_dense + bias")
    assert layers >= COUNTS["grammar", "built"] // LAYER_EVERY >= 200 * SCALE


def check_layer(text: str, n: int, m: int) -> None:
    """A Dense layer of the expression: its output is x @ to_dense(its own variables) + bias
    (float32, 1e-5 of the largest output), in the mode the count picks."""
    from keras_decomp import layers

    mode = ("auto", "apply", "materialize")[sum(v for k, v in COUNTS.items() if k[0] == "layer") % 3]
    layer = layers.Dense(m, W=text, params=SYMBOLS, seed=5, mode=mode)
    layer.build((None, n))
    layer.bias.assign(np.linspace(-1.0, 1.0, m).astype("float32"))
    x = np.random.default_rng(1).standard_normal((3, n)).astype("float32")
    values = {k: np.asarray(v.numpy(), np.float64) for k, v in layer.decomposition_variables.items()}
    expected = x.astype(np.float64) @ layer.node.to_dense(values) + layer.bias.numpy()
    actual = np.asarray(layer(x), np.float64)
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL * scale, err_msg=f"{text} ({mode})")
    COUNTS["layer", mode] += 1


# ---- mutated expressions ---------------------------------------------------------------------

CORPUS = corpus_texts()


def test_mutated_corpus_expressions():
    @_settings(GOALS["mutated"])
    @given(mutated_texts(CORPUS))
    def run(case):
        text, n, m, params = case
        d = parse_or_error("mutated", text, n, m, params)
        if d is not None:
            check_values(d, n, m)

    run()
    _report("mutated")


# ---- mutated YAML specs ----------------------------------------------------------------------

SPECS = spec_texts()


def test_mutated_specs(tmp_path_factory):
    from keras_decomp.training.builder import build

    folder = tmp_path_factory.mktemp("specs")
    np.save(folder / "basis.npy", np.ones((4, 4)))
    path = folder / "fuzzed.yaml"

    @_settings(GOALS["spec"])
    @given(mutated_specs(SPECS))
    def run(text):
        path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates: bad UTF-8
        try:
            build(path)
        except DecompError as err:
            message = str(err)
            # "<file>:<line> <key.path>: ..." or "<file>:<line>: ..."
            assert re.match(rf"{re.escape(str(path))}:\d+( [^\n]*?)?: ", message), message
            COUNTS["spec", "DecompError"] += 1
            return
        COUNTS["spec", "built"] += 1

    run()
    _report("spec")
