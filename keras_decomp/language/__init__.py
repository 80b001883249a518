"""Text -> syntax tree -> operator IR.  ``parse`` is the entry point; lark is
imported here and nowhere else.  numpy and lark only."""

from .decomposition import Decomposition
from .parse import parse, parse_syntax

__all__ = ["Decomposition", "parse", "parse_syntax"]
