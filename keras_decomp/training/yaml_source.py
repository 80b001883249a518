r"""Reading a spec's YAML safely, with the line of every key path.

``yaml.safe_load`` only (no Python objects), after a check on the composed node
graph: aliases that point into their own anchor, or nested aliases that would
expand a small file into millions of values, are refused before anything is
built.  Every error is a ``SpecError`` that names the file and line.

>>> data, lines = read_yaml("a:\n  b: [1, 2]\n", "x.yaml")
>>> data, lines["a.b"]
({'a': {'b': [1, 2]}}, 2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import SpecError


def read_text(path: Path) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are an error at their line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: not UTF-8 text: byte "
                        f"{raw[err.start]:#04x} at offset {err.start}", hint="save the spec as UTF-8") from None


# A spec has a few hundred values; aliases (*a) of nested anchors could expand a small file into
# billions (or, pointing into themselves, into an endless structure): refused before checking.
MAX_YAML_VALUES = 100_000


def read_yaml(text: str, source: str) -> tuple[Any, dict]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_expansion(node, source)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else text[:getattr(err, "position", 0)].count("\n") + 1
        problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err).split("\n")[0]
        if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow
            code = err.character if isinstance(err.character, int) else ord(err.character[:1] or "\0")
            problem = f"unacceptable character #x{code:04x}: {err.reason}"
        raise SpecError(f"{source}:{line}: not valid YAML: {problem}") from None
    except RecursionError:  # PyYAML composes recursively: [[[[...]]]] thousands deep
        raise SpecError(f"{source}:1: not valid YAML: it nests too deeply", hint="a spec nests a few levels") from None
    lines: dict[str, int] = {}
    if node is not None:
        _record_lines(node, "", lines)
    else:  # an empty document: its errors are at line 1
        lines[""] = 1
    return data, lines


def _check_expansion(root, source: str) -> None:
    """Refuse an alias that points into its own anchor, and aliases that expand the document past
    MAX_YAML_VALUES values.  Iterative, with the size of each node counted once."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > MAX_YAML_VALUES:
                raise SpecError(f"{source}:{node.start_mark.line + 1}: not valid YAML: its aliases expand it to "
                                f"more than {MAX_YAML_VALUES:,} values", hint="use fewer nested aliases (*name)")
            continue
        if id(node) in size:
            continue
        open_.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_:
                raise SpecError(f"{source}:{child.start_mark.line + 1}: not valid YAML: an alias refers to a "
                                "node that contains it", hint="an alias (*name) may only repeat a finished anchor")
            if id(child) not in size:
                stack.append((child, False))


def _record_lines(node, path: str, lines: dict) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            lines[sub] = key.start_mark.line + 1
            _record_lines(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, f"{path}[{i}]", lines)
