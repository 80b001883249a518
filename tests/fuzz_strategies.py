"""Strategies of the fuzz suite (tests/test_fuzz.py) and of fuzz/parser_atheris.py.

Three generators, all deterministic for a given hypothesis seed:

- ``expressions()``: texts built from the productions of grammar/decomp.lark and the names of
  grammar/README.md (every basis, structure and form), at small shapes;
- ``mutated_texts()``: corpus texts (grammar/examples/) after byte and token edits, random
  unicode, huge numbers and deep nesting;
- ``mutated_specs()``: YAML specs (specs/ and small fixtures) after text edits and edits of the
  loaded document (types changed, keys deleted or invented, wrong nesting, huge numbers, bad
  unicode, anchors and aliases, roots that are not mappings).

Mutation positions come from a ``random.Random`` seeded by hypothesis: hypothesis alone would
mostly edit the first character.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import yaml
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = {"k": 3, "j": 2, "p": 0.5, "r": 2}

# ---- grammar-generated expressions ----------------------------------------------------------
# A child is (text, level): 0 an atom or postfix form, 1 a product, 2 a sum.  A form puts a
# child in parentheses when its level is above what the position allows, as the grammar's
# precedence requires, so most texts parse and the checks reach shapes and values.

SIZES = st.sampled_from(["1", "2", "3", "4", "k", "j", "r"])
SEEDS = st.sampled_from(["0", "1", "3", "k"])
BUDGETS = st.sampled_from(["0.5", "1", "0.25", "p", "0.01"])


def _seeded(name):
    return st.one_of(st.just(name), SEEDS.map(lambda s: f"{name}(seed={s})"))


BASES = st.one_of(
    st.sampled_from(["I", "DCT", "DCT2", "H", "A1", "B1", "Q"]),
    *(_seeded(b) for b in ("G", "S", "P", "R", "D")),
    st.tuples(st.sampled_from(["1", "2", "3", "k"]), st.sampled_from(["1", "2", "j"])).map(
        lambda hw: f"DCT2(h={hw[0]}, w={hw[1]})"),
)
STRUCTURES = st.one_of(
    st.sampled_from(["dense", "diag", "butterfly()", "butterfly"]),
    SIZES.map(lambda r: f"lowrank(r={r})"),
    BUDGETS.map(lambda f: f"lowrank(params={f})"),
    st.tuples(SIZES, st.sampled_from(["", ", l=1", ", l=2"])).map(lambda a: f"sketch(k={a[0]}{a[1]})"),
    st.tuples(st.sampled_from(["1", "2", "3"]), st.sampled_from(["1", "2", "j"])).map(
        lambda a: f"sss(p={a[0]}, d={a[1]})"),
    BUDGETS.map(lambda f: f"sss(p=2, params={f})"),
    st.tuples(st.sampled_from(["", "q=1, ", "q=2, ", "q=3, "]), SIZES).map(lambda a: f"sparse({a[0]}s={a[1]})"),
    st.tuples(SIZES, st.sampled_from(["", ", h=1", ", h=2", ", h=k"])).map(lambda a: f"tri(k={a[0]}{a[1]})"),
    st.sampled_from(["a", "b", "g0", "s1", "g1"]),  # named trainable matrices (scalars when scaling)
)
SCALARS = st.sampled_from(["a", "b", "c", "2", "0.5", "1e-3", ".25", "0", "3."])
COUNTS = st.sampled_from(["1", "2", "3", "j", "params=0.5"])
BOUNDS = st.sampled_from(["", "0", "1", "2", "3", "k", "j"])
KNOWN = st.sampled_from(["DCT2(h=2, w=2)", "DCT2(h=1, w=2)", "DCT2(h=k, w=1)", "DCT2(h=1, w=1)"])
LEAVES = st.one_of(BASES, STRUCTURES, STRUCTURES).map(lambda t: (t, 0))


def _wrap(child, level: int) -> str:
    text, child_level = child
    return text if child_level <= level else f"({text})"


def _count(c: str) -> str:
    return c if c.startswith("params") else f"n={c}"


def _forms(children):
    pairs = st.tuples(children, children)
    return st.one_of(
        st.tuples(pairs, st.sampled_from([" + ", " - ", "+", "-"])).map(
            lambda p: (_wrap(p[0][0], 2) + p[1] + _wrap(p[0][1], 1), 2)),
        st.tuples(pairs, st.sampled_from([" ", " @ ", "@"])).map(
            lambda p: (_wrap(p[0][0], 1) + p[1] + _wrap(p[0][1], 0), 1)),
        st.tuples(children, SCALARS).map(lambda p: (f"{_wrap(p[0], 1)} * {p[1]}", 1)),
        st.tuples(SCALARS, children).map(lambda p: (f"{p[0]} * {_wrap(p[1], 0)}", 1)),
        children.map(lambda c: (_wrap(c, 0) + "'", 0)),
        st.tuples(children, BOUNDS, BOUNDS).map(lambda p: (f"{_wrap(p[0], 0)}[{p[1]}:{p[2]}]", 0)),
        children.map(lambda c: (f"({c[0]})", 0)),
        st.tuples(children, COUNTS).map(lambda p: (f"sum({p[0][0]}, {_count(p[1])})", 0)),
        st.tuples(children, COUNTS.filter(lambda c: "params" not in c)).map(
            lambda p: (f"tile({p[0][0]}, n={p[1]})", 0)),
        pairs.map(lambda p: (f"kron({p[0][0]}, {p[1][0]})", 0)),
        st.tuples(KNOWN, children).map(lambda p: (f"kron({p[0]}, {p[1][0]})", 0)),
        st.tuples(children, KNOWN).map(lambda p: (f"kron({p[0][0]}, {p[1]})", 0)),
    )


EXPRESSION = st.recursive(LEAVES, _forms, max_leaves=6)


@st.composite
def expressions(draw):
    """(text, n, m): one to three stages, an optional target, comments and line breaks."""
    stages = [text for text, _ in draw(st.lists(EXPRESSION, min_size=1, max_size=3))]
    text = draw(st.sampled_from(["", "W = ", "kernel = ", "W=", "W =\n  "])) + \
        draw(st.sampled_from([" | ", "|", " |\n  "])).join(stages)
    text += draw(st.sampled_from(["", "  # a comment", "\n# more\n"]))
    return text, draw(st.integers(1, 12)), draw(st.integers(1, 12))


# ---- mutated expressions --------------------------------------------------------------------

INTERESTING = "()[]:,=+-*@'|#._ \n\t0123456789eEknGDHIPRSdensumtilkrowbfyq"
UNICODE = "\x00\x7f\u00e9\u00a0\u2009\u200b\u2028\u3000\ufeff\ufffd\ud800\U0001f600\u0301\u212a\uff08\u2212"
HUGE = ("99999999999999999999", "1e308", "1e400", "1e-400", "0", "00", "007", ".5e-999", "4294967296",
        "9" * 400, "1.5", "2e9", "65536", "100000")
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+\.?\d*(?:[eE][+-]?\d+)?|\S")
NUMBER = re.compile(r"\d+\.?\d*(?:[eE][+-]?\d+)?")
WRAPPERS = ("({})", "{}'", "sum({}, n=1)", "tile({}, n=1)", "{}[:]", "2 * {}", "({} + dense)")


def _join(tokens: list[str]) -> str:
    """Tokens back to text: a space only between two words, so calls stay calls."""
    out = tokens[0] if tokens else ""
    for left, right in zip(tokens, tokens[1:]):
        word = (left[-1].isalnum() or left[-1] == "_") and (right[0].isalnum() or right[0] in "._")
        out += (" " if word else "") + right
    return out


def mutate_text(text: str, rnd: random.Random, edits: int) -> str:
    """``text`` after ``edits`` random edits: characters, tokens, numbers, nesting."""
    for _ in range(edits):
        kind = rnd.choice(["delete", "insert", "replace", "swap", "duplicate", "token_swap",
                           "token_duplicate", "token_delete", "unicode", "huge", "nest", "truncate",
                           "repeat"])
        at = rnd.randrange(len(text) + 1)
        tokens = TOKEN.findall(text)
        if kind == "delete":
            text = text[:at] + text[at + 1:]
        elif kind == "insert":
            text = text[:at] + rnd.choice(INTERESTING) + text[at:]
        elif kind == "replace":
            text = text[:at] + rnd.choice(INTERESTING) + text[at + 1:]
        elif kind == "swap" and len(text) > 1:
            at = min(at, len(text) - 2)
            text = text[:at] + text[at + 1] + text[at] + text[at + 2:]
        elif kind == "duplicate":
            end = min(len(text), at + rnd.randint(1, 12))
            text = text[:end] + text[at:end] + text[end:]
        elif kind.startswith("token") and len(tokens) >= 2:
            i = rnd.randrange(len(tokens) - 1)
            if kind == "token_swap":
                tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
            elif kind == "token_duplicate":
                tokens[i:i] = tokens[i:i + rnd.randint(1, 4)]
            else:
                del tokens[i]
            text = _join(tokens)
        elif kind == "unicode":
            text = text[:at] + rnd.choice(UNICODE) + text[at:]
        elif kind == "huge":
            numbers = list(NUMBER.finditer(text))
            if numbers:
                hit = rnd.choice(numbers)
                text = text[:hit.start()] + rnd.choice(HUGE) + text[hit.end():]
            else:
                text = text[:at] + rnd.choice(HUGE) + text[at:]
        elif kind == "nest":
            depth = rnd.choice([2, 2, 10, 10, 49, 51, 200, 1200])
            wrapper = rnd.choice(WRAPPERS)
            body = text.split("=", 1)[-1] if rnd.random() < 0.5 else text
            if wrapper == "({})":
                text = "(" * depth + body + ")" * depth
            elif wrapper == "{}'":
                text = body + "'" * depth
            else:
                for _ in range(min(depth, 300)):  # each level is a few characters more
                    body = wrapper.format(body)
                text = body
        elif kind == "truncate":
            text = text[:at]
        elif kind == "repeat":  # long enough (1200) to overflow a recursive walk of lark's left-deep tree
            count = rnd.choice([2, 2, 2, 20, 20, 20, 1200])
            body = text.split("=", 1)[-1] if count < 1200 else rnd.choice(["dense", "G", "a", "I", "S'"])
            text = rnd.choice([" + ", " | ", " ", " @ ", " * "]).join([body] * count)
    return text


def corpus_texts() -> list[tuple[str, int, int, dict]]:
    """(text, n, m, params) of every case of grammar/examples/{valid,invalid}."""
    from test_corpus import read_cases

    return [(c.text, c.n, c.m, dict(c.params)) for kind in ("valid", "invalid") for c in read_cases(kind)]


@st.composite
def mutated_texts(draw, cases):
    """(text, n, m, params): a corpus case after 1 to 4 edits; half keep the case's shape,
    half get a small random one, so that the checks of values stay cheap."""
    text, n, m, params = draw(st.sampled_from(cases))
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    text = mutate_text(text, rnd, rnd.randint(1, 4))
    if rnd.random() < 0.5 or n * m > 4096:
        n, m = rnd.randint(1, 16), rnd.randint(1, 16)
    return text, n, m, params


# ---- mutated YAML specs ---------------------------------------------------------------------

SMALL_SPEC = """\
name: small
seed: 3
input: {shape: [4, 4, 2]}
params: {k: 4}
fixed: {A1: {basis: R}}
layers:
  - Conv2D: {filters: 3, kernel_size: 2, padding: same, activation: relu, W: "sum(G, n=2) | dense"}
  - Flatten: {}
  - Dense: {units: 6, W: "DCT[:k] dense + A1 * a"}
  - Dense: {units: 2}
data: {name: fashion_mnist, source: bundled, limit: 10}
train: {batch_size: 8, optimizer: adam, learning_rate: 1.0e-3, epochs: 1}
stages: [{epochs: 1}, {epochs: 2, learning_rate: 0.5}]
export: {tflite: {mode: auto, quantize: dynamic}, saved_model: {mode: folded}}
"""

TIED_SPEC = """\
name: tied
input: {shape: [6]}
layers:
  - Dense: {units: 6, W: "g0 s1 g1'"}
  - Dense: {units: 6, W: "g1 s2 g2'", activation: relu}
  - Dense: {units: 3, W: "sss(p=2, d=1) + lowrank(r=1)", use_bias: false}
"""

LINEAR_SPEC = """\
name: bad
input: {shape: [28, 28, 1]}
params: {k: 20}
layers:
  - Flatten: {}
  - Dense: {units: 10, W: "DCT2[:k] dense"}
"""

# Real specs made small, so that most mutants that still build do so in milliseconds.
_SHRINK = ((re.compile(r"\[28, 28, 1\]"), "[8, 8, 1]"), (re.compile(r"units: \d{3,}"), "units: 16"),
           (re.compile(r"filters: \d+"), "filters: 4"), (re.compile(r"k: 100"), "k: 10"),
           (re.compile(r"n=\d{2,}"), "n=3"), (re.compile(r"kernel_size: 5"), "kernel_size: 3"))


def _shrunk(text: str) -> str:
    for pattern, small in _SHRINK:
        text = pattern.sub(small, text)
    return text


def spec_texts() -> list[str]:
    """The specs to mutate: every file of specs/ (as is and made small) and the fixtures."""
    real = [path.read_text() for path in sorted((ROOT / "specs").glob("*.yaml"))]
    return [SMALL_SPEC, TIED_SPEC, LINEAR_SPEC] + [_shrunk(t) for t in real] + real


JUNK_LINES = ("foo: bar", "- [", "{", "}", "layers:", "  - Dense: {units: 3}", "input: *nowhere", "&a",
              "!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "? [a, b]\n: c",
              "\t- tab", "W: \"\"\"", "%YAML 1.1", "---", "...", "<<: {seed: 1}", "- !!set {a, b}",
              "a: &x [1, *x]", "seed: 0x10", "seed: 1_000", "seed: .inf", "seed: !!float nan")
JUNK_VALUES = (None, True, False, 0, -1, 1.5, float("inf"), float("nan"), 10 ** 30, -(10 ** 30), 2 ** 63,
               "", "x", "\u00e9\u0301", "\ud7ff\ufffd", "\x00", "1e-3", "DCT2[:k] dense", "sum(G, n=99999999)",
               [], [1, 2], [[]], {}, {"a": 1}, {"shape": [4]}, {"Dense": {"units": 2}}, "9" * 400)
KEYS = ("name", "seed", "input", "shape", "params", "fixed", "layers", "data", "train", "stages",
        "export", "W", "units", "filters", "kernel_size", "activation", "use_bias", "epochs", "basis",
        "file", "tflite", "mode", "k", "A1", "\u00e9", "", "Dense", "Conv2D", "Flatten")


def _nodes(doc):
    """(path, value) of a loaded document, containers first; a container met again (an alias,
    maybe of itself) is not entered twice."""
    seen: set[int] = set()
    todo = [((), doc)]
    while todo:
        path, value = todo.pop(0)
        yield path, value
        if isinstance(value, (dict, list)) and id(value) not in seen:
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            todo.extend((path + (key,), child) for key, child in items)


def _set(doc, path, value):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def mutate_document(doc, rnd: random.Random):
    """One edit of a loaded spec: a value's type, a key deleted or added, a value nested
    once more or unwrapped, a huge number, an alias (a shared node), a new root."""
    nodes = list(_nodes(doc))
    path, value = rnd.choice(nodes)
    kind = rnd.choice(["value", "value", "delete", "insert", "nest", "unwrap", "huge", "alias",
                       "root", "rename"])
    if kind == "value":
        return _set(doc, path, rnd.choice(JUNK_VALUES))
    if kind == "delete" and path:
        parent = _set(doc, (), doc)
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        return doc
    if kind == "insert" and isinstance(value, dict):
        value[rnd.choice(KEYS)] = rnd.choice(JUNK_VALUES)
        return doc
    if kind == "insert" and isinstance(value, list):
        value.insert(rnd.randint(0, len(value)), rnd.choice(JUNK_VALUES))
        return doc
    if kind == "nest":
        return _set(doc, path, rnd.choice([[value], {rnd.choice(KEYS): value}]))
    if kind == "unwrap" and isinstance(value, (dict, list)) and value:
        inner = next(iter(value.values())) if isinstance(value, dict) else value[0]
        return _set(doc, path, inner)
    if kind == "huge":
        return _set(doc, path, rnd.choice([10 ** 12, 2 ** 40, 10 ** 300, 99999, -5, 0]))
    if kind == "alias":  # the same object twice: yaml.dump writes an anchor and an alias
        other, _ = rnd.choice(nodes)
        if other[:len(path)] != path:  # not inside itself
            return _set(doc, other, value) if other else doc
        return doc
    if kind == "root":
        return rnd.choice([[doc], "text", 3, None, [], doc.get("layers") if isinstance(doc, dict) else doc])
    if kind == "rename" and isinstance(value, dict) and value:
        key = rnd.choice(list(value))
        value[_renamed(str(key), rnd)] = value.pop(key)
        return doc
    return doc


def _renamed(key: str, rnd: random.Random) -> str:
    at = rnd.randrange(len(key) + 1)
    return rnd.choice([key[:at] + key[at + 1:], key.lower(), key.upper(), key + "s", key[:at] + "\u00e9" + key[at:]])


def mutate_spec_text(text: str, rnd: random.Random) -> str:
    """One edit of a spec's text: lines deleted, doubled, swapped or re-indented, junk
    lines, characters, unicode, huge numbers, an expression mutated."""
    lines = text.split("\n")
    kind = rnd.choice(["delete_line", "duplicate_line", "swap_lines", "indent", "junk", "chars",
                       "unicode", "huge", "expression", "recursive_alias", "laughs"])
    i = rnd.randrange(len(lines))
    if kind == "delete_line":
        del lines[i]
    elif kind == "duplicate_line":
        lines.insert(i, lines[i])
    elif kind == "swap_lines" and len(lines) > 1:
        j = rnd.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif kind == "indent":
        lines[i] = rnd.choice(["  ", "\t", " ", ""]) + lines[i].lstrip(" " if rnd.random() < 0.5 else "")
    elif kind == "junk":
        lines.insert(i, rnd.choice(JUNK_LINES))
    elif kind == "chars":
        return mutate_text(text, rnd, 1) if len(text) < 20000 else text[: len(text) // 2]
    elif kind == "unicode":
        at = rnd.randrange(len(text) + 1)
        return text[:at] + rnd.choice(UNICODE) + text[at:]
    elif kind == "huge":
        numbers = list(NUMBER.finditer(text))
        if numbers:
            hit = rnd.choice(numbers)
            return text[:hit.start()] + rnd.choice(HUGE + ("-1", "-0", "0x7fffffff")) + text[hit.end():]
    elif kind == "expression":
        quoted = list(re.finditer(r'W: "([^"\n]*)"', text))
        if quoted:
            hit = rnd.choice(quoted)
            new = mutate_text(hit.group(1), rnd, rnd.randint(1, 3)).replace("\\", "").replace('"', "")
            return text[:hit.start(1)] + new.replace("\n", " ") + text[hit.end(1):]
    elif kind == "recursive_alias":
        return text.replace("layers:", "layers: &L\n  - Dense: {units: 2, W: [*L]}\nx_layers:", 1)
    elif kind == "laughs":  # nested aliases: small text, exponentially large if expanded
        bomb = "\n".join(["l0: &l0 [a, a, a, a, a, a, a, a, a]"] +
                         [f"l{k}: &l{k} [{', '.join(['*l%d' % (k - 1)] * 9)}]" for k in range(1, 9)])
        return text + "\n" + bomb + "\n"
    return "\n".join(lines)


@st.composite
def mutated_specs(draw, texts):
    """A spec text after one to three edits, of its text or of the loaded document."""
    text = draw(st.sampled_from(texts))
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    for _ in range(rnd.choice([1, 1, 2, 3])):
        if rnd.random() < 0.5:
            text = mutate_spec_text(text, rnd)
            continue
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            text = mutate_spec_text(text, rnd)
            continue
        doc = mutate_document(doc, rnd)
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=rnd.random() < 0.5, width=rnd.choice([80, 10 ** 6]))
    return text
