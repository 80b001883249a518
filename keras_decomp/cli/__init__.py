"""The ``keras-decomp`` command."""

from .main import main

__all__ = ["main"]
