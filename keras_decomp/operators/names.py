"""The reserved names of the language: the fixed bases (uppercase) and the
trainable structures (lowercase).

The language reads them to tell a basis from a named matrix and to find
near-misses; the structure registry adds the names of structures defined
outside the package (``reserve_structure``).
"""

from __future__ import annotations

BASES = ("I", "DCT", "DCT2", "G", "S", "P", "R", "D", "H", "F")
SQUARE_BASES = ("I", "DCT", "P", "D", "H")
_structures = ["dense", "diag", "lowrank", "sum", "tile", "kron", "sketch", "sparse", "butterfly", "tri", "sss"]


def structures() -> tuple[str, ...]:
    """Every structure name, built-in or registered.

    >>> "lowrank" in structures()
    True
    """
    return tuple(_structures)


def reserved() -> tuple[str, ...]:
    """Bases and structures: the names that are never a user's own matrix."""
    return BASES + tuple(_structures)


def reserve_structure(name: str) -> None:
    """Make ``name`` a structure name of the language, as the built-in ones are."""
    if name not in _structures:
        _structures.append(name)
