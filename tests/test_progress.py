"""Progress bars: per sweep inside long fits, per layer in decompose/compress; silent under --quiet."""

import io

import keras
import numpy as np
import pytest

from keras_decomp import approximate
from keras_decomp.cli.main import main
from keras_decomp.fitting import progress


def test_a_long_fit_reports_its_sweeps_with_the_error():
    W = np.random.default_rng(0).normal(size=(64, 64))
    out = io.StringIO()
    with progress.reporting(stream=out, after=0, every=0):
        _, error = approximate(W, "sparse(q=2, s=8)")
    lines = [line for line in out.getvalue().splitlines() if line.startswith("palm4MSA 64x64")]
    assert len(lines) >= 5, out.getvalue()[:500]
    last = float(lines[-1].split(" error ")[1].split()[0])
    assert 0 < last < 1 and abs(last - error) < 0.2  # the error so far, of the same fit
    quiet = io.StringIO()
    with progress.reporting(False, stream=quiet, after=0, every=0):
        approximate(W, "sparse(q=2, s=8)")
    assert quiet.getvalue() == ""


def test_a_quick_fit_prints_nothing_by_default():
    out = io.StringIO()
    with progress.reporting(stream=out):  # 3 s grace: an SVD is done long before
        approximate(np.eye(8), "lowrank(r=2)")
    assert out.getvalue() == ""


def test_compress_shows_a_bar_per_layer_unless_quiet(tmp_path, capsys):
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, name="a"), keras.layers.Dense(4, name="b")])
    model.save(tmp_path / "m.keras")
    base = ["compress", str(tmp_path / "m.keras"), "--layer", "*=lowrank(r=2)", "--out", str(tmp_path / "n.keras"),
            "--data", "none"]
    assert main(base) == 0
    err = capsys.readouterr().err
    assert "decompose [" in err and "2/2 layer b error" in err, err
    assert main(base + ["--quiet"]) == 0
    captured = capsys.readouterr()
    assert "decompose" not in captured.err and "wrote" in captured.out


def test_als_and_gradient_fits_report_too():
    W = np.random.default_rng(0).normal(size=(16, 16))
    for expression, title, least in (("g h", "ALS 16x16", 1), ("g g", "gradient fit 16x16", 10)):
        out = io.StringIO()
        with progress.reporting(stream=out, after=0, every=0):
            _, error = approximate(W, expression)
        lines = [line for line in out.getvalue().splitlines() if line.startswith(title)]
        assert len(lines) >= least, out.getvalue()[:300]
        assert float(lines[-1].split(" error ")[1].split()[0]) == pytest.approx(error, rel=1e-3, abs=1e-12)
