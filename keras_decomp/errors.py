"""The one exception family of keras_decomp.

Low-level code raises short facts (``DecompError("k must be positive")``);
the public entry points add where it happened: the expression with a caret
under the culprit, or the YAML file, line and key path.
"""

from __future__ import annotations


class DecompError(ValueError):
    """Something the user wrote cannot be turned into a decomposition.

    ``text`` and ``pos`` (a 0-based character offset into ``text``) locate the
    culprit when known; ``hint`` says how to fix it.

    >>> str(DecompError("unknown name 'DTC'", text="W = DTC", pos=4, hint="did you mean DCT?"))
    "unknown name 'DTC'\\n  W = DTC\\n      ^\\ndid you mean DCT?"
    """

    def __init__(self, message: str, *, text: str | None = None, pos: int | None = None,
                 hint: str | None = None):
        self.fact = message
        self.text = text
        self.pos = pos
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [self.fact]
        if self.text is not None and self.pos is not None:
            # the line that holds the culprit, with the caret under its column
            start = self.text.rfind("\n", 0, self.pos) + 1
            end = self.text.find("\n", self.pos)
            lines.append("  " + self.text[start:end if end >= 0 else len(self.text)])
            lines.append("  " + " " * (self.pos - start) + "^")
        elif self.text is not None:
            lines.append("  " + self.text)
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)

    def located(self, text: str, pos: int | None) -> "DecompError":
        """The same error, shown under ``text`` (the line holding the culprit) at column ``pos``,
        unless it is already shown; ``self.pos`` stays where no column is given."""
        if self.text is not None:
            return self
        pos = pos if pos is not None else self.pos
        return type(self)(self.fact, text=text, pos=pos, hint=self.hint)


class ParseError(DecompError):
    """The text is not a well-formed expression."""


class UnknownNameError(DecompError):
    """A name is unknown, misspelt or not available yet."""


class ShapeError(DecompError):
    """Shapes do not fit together."""


class ArgumentError(DecompError):
    """A structure or basis got a bad or missing argument, or an impossible budget."""


class SpecError(DecompError):
    """A YAML model spec is malformed."""
