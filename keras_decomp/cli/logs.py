"""Quiet TensorFlow for the ``keras-decomp`` commands, unless ``--verbose``.

TensorFlow's C++ side writes a dozen lines to stderr while it loads (oneDNN
notices, a cuInit error on machines without a GPU, "All log messages before
absl::InitializeLog() ..."), several of them before any log level applies.  So
the level variables get quiet defaults, and TensorFlow is imported once with
the process's stderr (file descriptor 2) sent to a buffer that is shown only if
the import fails.  A variable the user set is never overridden, and setting
TF_CPP_MIN_LOG_LEVEL yourself keeps every line of the import.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}


def silence_tensorflow() -> None:
    """Call before anything imports TensorFlow (a no-op if something already did)."""
    user_chose = "TF_CPP_MIN_LOG_LEVEL" in os.environ
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if "tensorflow" not in sys.modules and not user_chose:
        _import_quietly()
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _import_quietly() -> None:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded): nothing to hide
        return
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except Exception:
            failed = True
        else:
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failed:  # the lines were the explanation: show them
            buffer.seek(0)
            sys.stderr.write(buffer.read().decode(errors="replace"))
