"""The operator IR: node kinds with shapes, counts, FLOPs and dense forms; the
fixed bases; the trainable structures and the registry plug-ins use.  numpy only."""

from . import structures  # noqa: F401 - registers the built-in structures
