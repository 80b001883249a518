"""Files replaced atomically: readers see the old or the new file, never a part.

Every file that a run commits (checkpoints, ``state.json``, ``model.keras``,
``report.json``, exported TFLite files) is first written to a temporary file
in the same folder, flushed and fsync'ed, then moved over the target with
``os.replace``; the folder is fsync'ed after, so that the rename survives a
power cut too.  A process killed at any moment leaves at most a stray
temporary file, which the next write replaces.

>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_text(folder / "state.json", '{"epoch": 1}')
>>> (folder / "state.json").read_text(), sorted(p.name for p in folder.iterdir())
('{"epoch": 1}', ['state.json'])
"""

from __future__ import annotations

import os
from pathlib import Path


def temporary(path) -> Path:
    """The temporary name ``path`` is written under before ``replace``: same folder, same suffix
    (Keras checks that a model file ends in ``.keras``)."""
    path = Path(path)
    return path.with_name(f"tmp-{path.name}")


def replace(tmp, path) -> None:
    """Make the complete file ``tmp`` durable, then move it over ``path`` in one step."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync_folder(Path(path).parent)


def write_bytes(path, data: bytes) -> None:
    tmp = temporary(path)
    with open(tmp, "wb") as f:
        f.write(data)
    replace(tmp, path)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_model(model, path) -> None:
    """``model.save(path)``, atomically."""
    tmp = temporary(path)
    model.save(tmp)
    replace(tmp, path)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
