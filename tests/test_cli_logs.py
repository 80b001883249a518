"""The keras-decomp commands hide TensorFlow's C++/absl log lines unless --verbose,
and never override a log level the user set."""

import os
import re
import subprocess
import sys
from pathlib import Path

from keras_decomp.cli import logs

ROOT = Path(__file__).resolve().parents[1]
TF_LINE = re.compile(r"^([IWE]\d{4} |WARNING: All log messages before absl)", re.M)


def run(args, tmp_path, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "GRPC"))}
    environment.update(PYTHONPATH=str(ROOT), **env)
    script = ("import keras, sys\n"
              f"keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name='d')]).save({str(tmp_path / 'm.keras')!r})\n")
    subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, check=True, timeout=300)
    command = ["-c", "import sys; from keras_decomp.cli import main; sys.exit(main(sys.argv[1:]))", "compress",
               str(tmp_path / "m.keras"), "--layer", "d=lowrank(r=2)", "--out", str(tmp_path / "n.keras"),
               "--data", "none", "--quiet", *args]
    return subprocess.run([sys.executable, *command], env=environment, capture_output=True, text=True, timeout=300)


def test_tensorflow_lines_hidden_by_default(tmp_path):
    done = run([], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not TF_LINE.search(done.stderr), done.stderr[:2000]
    assert "wrote" in done.stdout


def test_a_level_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    logs.silence_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    logs.silence_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
