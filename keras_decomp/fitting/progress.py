"""Progress of long work: a bar per layer in ``decompose``, per sweep inside long
fits (palm4MSA, ALS, the gradient fallback), with the error so far.

Framework-free: a plain printer on stderr.  A bar stays silent until its work
has run ``after`` seconds (quick fits print nothing), then redraws in place on a
terminal or writes a line every few seconds elsewhere (logs, CI).  Outside a
``reporting()`` scope bars show on a terminal only; ``reporting(False)``
silences them (``--quiet``).

>>> import io
>>> out = io.StringIO()
>>> with reporting(stream=out, after=0):
...     bar = Bar("ALS", total=3)
...     for sweep in range(3):
...         bar.update(sweep + 1, error=0.5 / (sweep + 1))
...     bar.close()
>>> print(out.getvalue().splitlines()[-1])  # doctest: +ELLIPSIS
ALS [##############################] 3/3 error 1.667e-01 ...s
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time

_SCOPE = contextvars.ContextVar("keras_decomp_progress", default=None)
WIDTH = 30


class _Settings:
    def __init__(self, enabled: bool, stream, after: float, every: float | None):
        self.enabled = enabled
        self.stream = stream
        self.after = after
        self.every = every


@contextlib.contextmanager
def reporting(enabled: bool = True, stream=None, after: float = 3.0, every: float | None = None):
    """Bars opened inside print to ``stream`` (default stderr) once their work has run
    ``after`` seconds; ``enabled=False`` silences them.  ``every``: seconds between
    lines when the stream is no terminal (default 5)."""
    token = _SCOPE.set(_Settings(enabled, stream, after, every))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _settings() -> _Settings:
    found = _SCOPE.get()
    if found is not None:
        return found
    return _Settings(bool(getattr(sys.stderr, "isatty", lambda: False)()), None, 3.0, None)


class Bar:
    """One task of ``total`` steps; ``update(done, **numbers)`` after each step."""

    def __init__(self, title: str, total: int | None = None, after: float | None = None):
        settings = _settings()
        self.title = title
        self.total = total
        self.enabled = settings.enabled
        self.stream = settings.stream
        self.after = settings.after if after is None else after
        self.start = time.monotonic()
        self.last = None  # when the last line went out
        self.line = ""
        interactive = bool(getattr(self._out(), "isatty", lambda: False)())
        self.every = 0.2 if interactive else (5.0 if settings.every is None else settings.every)
        self.interactive = interactive

    def _out(self):
        return self.stream if self.stream is not None else sys.stderr

    def update(self, done: int, **numbers) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.start < self.after or (self.last is not None and now - self.last < self.every
                                             and done != self.total):
            return
        self.last = now
        self.line = self._render(done, numbers, now)
        self._write(self.line)

    def _render(self, done, numbers, now) -> str:
        parts = [self.title]
        if self.total:
            filled = int(WIDTH * min(done, self.total) / self.total)
            parts.append("[" + "#" * filled + "." * (WIDTH - filled) + f"] {done}/{self.total}")
        else:
            parts.append(str(done))
        for key, value in numbers.items():
            parts.append(f"{key} {value:.3e}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"{now - self.start:.0f}s")
        return " ".join(parts)

    def _write(self, line: str) -> None:
        out = self._out()
        if self.interactive:
            out.write("\r" + line + "\033[K")
        else:
            out.write(line + "\n")
        out.flush()

    def close(self) -> None:
        """End the bar's line (a terminal's redrawn line needs its newline)."""
        if self.enabled and self.last is not None and self.interactive:
            self._out().write("\n")
            self._out().flush()
