"""The example corpora in grammar/examples/: every valid case parses to its pinned
shape and parameter count, every invalid case fails with a DecompError whose
message matches its pattern and puts a caret under the culprit.

The file format is described in grammar/examples/README.md.  ``read_cases`` is
also used by the property tests (mutations of the valid texts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from keras_decomp import DecompError, parse
from keras_decomp.operators.structures import registry

EXAMPLES = Path(__file__).resolve().parents[1] / "grammar" / "examples"
HEADER_KEYS = {"n", "m", "params", "seed", "name", "requires"}
PIN_KEYS = {"shape", "params"}

# The examples of DESIGN.md section 3, without their comments: each must be a valid case.
DESIGN_EXAMPLES = (
    "W = DCT2[:k] dense",
    "W = P[:k] dense",
    "W = sum(G, n=8) sum(G, n=8) sum(G, n=8)",
    "W = sum(G, n=20) + sum(R, n=50)",
    "W = (A1*a + B1*b)(DCT[:k]) | sss(p=8, d=4)",
    "W = sum(G, n=10) | sum(G, n=50) | dense",
    "W = sum(tile(D, n=8), n=100)",
    "W = sketch(k=16, l=2)",
    "W = sss(p=8, d=4) | sss(p=8, d=16)",
    "W = sss(p=8, d=4) + lowrank(r=2)",
    "W = g0 s1 g1'",
)


@dataclass(frozen=True)
class Case:
    """One block of a corpus file."""

    file: str
    line: int
    text: str
    n: int
    m: int
    params: dict = field(default_factory=dict)
    seed: int = 0
    name: str | None = None
    requires: tuple[str, ...] = ()
    shape: tuple[int, int] | None = None
    counts: tuple[int, ...] | None = None
    pattern: str | None = None

    @property
    def id(self) -> str:
        lines = [line.split("#")[0].strip() for line in self.text.splitlines()]
        first = next((line for line in lines if line), self.text.strip())
        return f"{self.file}:{self.line}:{first[:48]}"


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # kept as text on purpose: a symbol bound to a non-number


def _fields(line: str, keys: set[str], where: str) -> dict[str, str]:
    out = {}
    for item in line[1:].split():
        key, sep, value = item.partition("=")
        if not sep or key not in keys or key in out:
            raise ValueError(f"{where}: bad header item {item!r} (keys: {', '.join(sorted(keys))})")
        out[key] = value
    return out


def _case(path: Path, start: int, lines: list[str], valid: bool) -> Case:
    where = f"{path.relative_to(EXAMPLES)}:{start}"
    if not lines[0].startswith("# n="):
        raise ValueError(f"{where}: a case starts with '# n=... m=...', got {lines[0]!r}")
    head = _fields(lines[0], HEADER_KEYS, where)
    params = {}
    if head.get("params"):
        params = {k: _number(v) for k, v in (p.split(":", 1) for p in head["params"].split(","))}
    body = lines[1:]
    shape = counts = None
    if body and body[0].startswith("# shape="):
        pin = _fields(body.pop(0), PIN_KEYS, where)
        shape = tuple(int(x) for x in pin["shape"].split("x"))
        if "params" in pin:
            counts = tuple(int(x) for x in pin["params"].split(","))
    pattern = None
    if body and body[-1].startswith("! "):
        pattern = body.pop()[2:]
    if any(line.startswith("! ") for line in body):
        raise ValueError(f"{where}: one '! pattern' line, at the end of the case")
    if valid != (pattern is None):
        raise ValueError(f"{where}: " + ("a valid case has no '! pattern'" if valid else
                                         "an invalid case needs a '! pattern' line"))
    if not body:
        raise ValueError(f"{where}: the case has no expression")
    return Case(file=path.stem, line=start, text="\n".join(body),
                n=int(head["n"]), m=int(head["m"]), params=params, seed=int(head.get("seed", 0)),
                name=head.get("name"), requires=tuple(filter(None, head.get("requires", "").split(","))),
                shape=shape, counts=counts, pattern=pattern)


def read_cases(kind: str) -> list[Case]:
    """All cases of grammar/examples/<kind>/*.txt (kind is "valid" or "invalid")."""
    cases = []
    for path in sorted((EXAMPLES / kind).glob("*.txt")):
        block: list[str] = []
        start = 0
        for number, raw in enumerate(path.read_text().splitlines() + [""], start=1):
            line = raw.rstrip()
            if line:
                start = start if block else number
                block.append(line)
                continue
            if block and not block[0].startswith("## "):  # "## ..." blocks are notes
                cases.append(_case(path, start, block, valid=(kind == "valid")))
            block = []
    return cases


VALID = read_cases("valid")
INVALID = read_cases("invalid")


def _parse(case: Case):
    return parse(case.text, case.n, case.m, params=case.params, seed=case.seed)


def _available(structure: str) -> bool:
    """Is this reserved structure built yet?  (A bare call fails on its arguments if so.)"""
    try:
        parse(structure, 8, 8)
    except DecompError as err:
        return "not available" not in str(err)
    return True


# ---- valid -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in VALID])
def test_valid_case_parses_with_its_pinned_shape_and_count(case):
    missing = [s for s in case.requires if not _available(s)]
    if missing:  # until the structure lands, the case must say so
        with pytest.raises(DecompError, match="not available") as info:
            _parse(case)
        assert any(f"'{s}'" in str(info.value) for s in missing), str(info.value)
        return
    d = _parse(case)
    assert d.shape == (case.n, case.m)
    if case.shape is not None:
        assert d.shape == case.shape
    counts = tuple(stage.num_params for stage in d.stages)
    if case.counts is not None and len(case.counts) == 1:
        assert d.num_params == case.counts[0]
    elif case.counts is not None:
        assert counts == case.counts
    rng = np.random.default_rng(0)
    for stage in d.stages:
        assert stage.shape == (case.n, case.m)
        values = stage.init(rng)
        assert sum(np.size(v) for v in values.values()) == stage.num_params
        dense = stage.to_dense(values)
        assert dense.shape == (case.n, case.m)
        assert np.all(np.isfinite(dense))


# ---- invalid ---------------------------------------------------------------------------------

def _caret(message: str) -> tuple[str, int]:
    """(printed expression line, caret column) of a DecompError message."""
    lines = message.split("\n")
    carets = [i for i, line in enumerate(lines) if re.fullmatch(r" *\^", line)]
    assert len(carets) == 1, f"no caret line (or several) in:\n{message}"
    i = carets[0]
    assert i >= 2, f"the caret line must follow the fact and the expression:\n{message}"
    printed = lines[i - 1]
    assert printed.startswith("  "), f"the expression line is indented by two spaces:\n{message}"
    return printed[2:], lines[i].index("^") - 2


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in INVALID])
def test_invalid_case_raises_decomp_error_with_caret(case):
    try:
        _parse(case)
    except DecompError as err:
        message = str(err)
    except Exception as err:  # noqa: BLE001 - the point: nothing but DecompError escapes
        pytest.fail(f"{type(err).__name__} instead of DecompError: {err}")
    else:
        if case.file == "not_available":
            pytest.fail(f"{case.name} is available now: move this case to grammar/examples/valid/ "
                        f"with its pinned shape and count:\n{case.text}")
        pytest.fail(f"parsed without error:\n{case.text}")

    assert re.search(case.pattern, message), f"{case.pattern!r} not found in:\n{message}"
    expression, column = _caret(message)
    assert expression in case.text.split("\n"), f"the printed line is not a line of the case:\n{message}"
    assert 0 <= column <= len(expression), f"the caret is outside the expression:\n{message}"
    assert column == len(expression) or not expression[column].isspace(), \
        f"the caret points at a space:\n{message}"
    if case.name:
        assert re.search(rf"\b{re.escape(case.name)}\b", message.split("\n")[0]), \
            f"the message does not name {case.name!r}"
        # under the name itself, or under the keyword that holds it (n=k)
        assert re.match(rf"({re.escape(case.name)}|\w+\s*=\s*{re.escape(case.name)})\b", expression[column:]), \
            f"the caret is not under {case.name!r}:\n{message}"


# ---- the corpora themselves ------------------------------------------------------------------

def test_corpora_are_big_enough():
    assert len(VALID) >= 25
    assert len(INVALID) >= 45


def test_every_design_example_is_a_valid_case():
    def expression(case):
        return "\n".join(line.split("#")[0].rstrip() for line in case.text.splitlines()).strip()

    texts = {expression(c) for c in VALID}
    missing = [e for e in DESIGN_EXAMPLES if e not in texts]
    assert not missing


# The families that register themselves from their own module: before their module lands
# (here: with their registry entry removed), the reserved name must say so.
FAMILIES = ("sss", "sketch", "sparse", "butterfly", "tri", "monarch")


@pytest.mark.parametrize("family", FAMILIES)
def test_not_available_cases_say_so(family, monkeypatch):
    monkeypatch.delitem(registry._TABLE, family)
    required = [c for c in VALID if family in c.requires]
    written = [c for c in INVALID if c.file == "not_available" and c.name == family]
    texts = [f"{family}(p=2)", f"W = G {family}(q=1, s=2) + dense", *(c.text for c in required + written)]
    checked = 0
    for text in texts:
        case = next((c for c in required + written if c.text == text), None)
        with pytest.raises(DecompError) as info:
            parse(text, case.n if case else 16, case.m if case else 8, params=case.params if case else None)
        message = str(info.value)
        fact = message.split("\n")[0]
        assert f"the structure '{family}' is not available in this version yet" in fact, message
        expression, column = _caret(message)
        assert expression[column:].startswith(family), message
        assert family not in re.findall(r"\w+", message.split("available: ")[-1]), message  # not offered
        assert not _available(family)
        checked += 1
    assert checked == len(texts) >= 2 + {"sss": 4, "sketch": 2, "tri": 1, "monarch": 4}.get(family, 0)
    for case in written:  # a case of not_available.txt pins that message
        assert "not available" in case.pattern, case.id


def test_cases_about_a_name_declare_it():
    about_names = re.compile(r"unknown name|did you mean|not available|not bound|unknown structure")
    for case in INVALID:
        if about_names.search(case.pattern):
            assert case.name, f"{case.id}: add name=... to its header"


# ---- errors from parse's own arguments (no expression to point into) --------------------------

@pytest.mark.parametrize("n, m, kwargs, pattern", [
    (0, 4, {}, r"size n must be a positive integer, got 0"),
    (4, 2.5, {}, r"size m must be a positive integer, got 2.5"),
    (True, 4, {}, r"size n must be a positive integer, got True"),
    (4, 4, {"seed": -1}, r"the seed must be an integer >= 0, got -1"),
    (4, 4, {"seed": 1.5}, r"the seed must be an integer >= 0, got 1.5"),
    (4, 4, {"seed": None}, r"the seed must be an integer >= 0, got None"),
])
def test_bad_parse_arguments_raise_decomp_error(n, m, kwargs, pattern):
    with pytest.raises(DecompError, match=pattern):
        parse("W = G dense", n, m, **kwargs)


@pytest.mark.parametrize("text", [None, b"W = dense", 3])
def test_an_expression_must_be_a_string(text):
    with pytest.raises(DecompError, match="must be a string"):
        parse(text, 4, 4)


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "# only a comment", "  # one\n# two\n"])
def test_empty_expressions(text):
    with pytest.raises(DecompError, match="the expression is empty"):
        parse(text, 4, 4)


def test_numpy_integers_are_sizes():
    assert parse("W = DCT[:k] dense", np.int64(8), np.int32(3), params={"k": np.int64(4)}).shape == (8, 3)


def test_decomp_error_is_a_value_error():
    assert issubclass(DecompError, ValueError)
    with pytest.raises(ValueError):
        parse("W = DTC", 4, 4)
