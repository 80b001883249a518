"""The tutorials run: each one in its fast mode, in a subprocess of its own (so
that the structure tutorials/04 registers does not leak into other tests), with
its exit code and the key lines it prints checked."""

import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
CHANCE = 0.1  # ten classes


def run(name: str, *args: str, fast_by: str = "flag") -> str:
    """The tutorial's stdout and stderr; fails the test on a non-zero exit."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
           # small matrices on a busy 2-core machine: OpenBLAS threads only contend
           "OPENBLAS_NUM_THREADS": "1"}
    command = [sys.executable, str(TUTORIALS / name), *args]
    if fast_by == "flag":
        command.append("--fast")
    else:
        env["KERAS_DECOMP_TUTORIAL_FAST"] = "1"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{name} exited with {done.returncode}:\n{output[-4000:]}"
    return output


def number(pattern: str, output: str) -> float:
    match = re.search(pattern, output)
    assert match, f"no line matching {pattern!r} in:\n{output[-4000:]}"
    return float(match.group(1))


def _tested_scripts() -> list[str]:
    """The scripts this module runs: one test_NN_name function per tutorials/NN_name.py, whose
    body runs that script."""
    found = []
    for name, test in globals().items():
        if re.fullmatch(r"test_\d\d_\w+", name) and callable(test):
            script = name[len("test_"):] + ".py"
            assert f'run("{script}"' in inspect.getsource(test), f"{name} does not run {script}"
            found.append(script)
    return sorted(found)


def test_every_tutorial_is_listed_and_tested():
    on_disk = sorted(p.name for p in TUTORIALS.glob("*.py"))
    readme = (TUTORIALS / "README.md").read_text()
    linked = sorted(set(re.findall(r"\]\((\w+\.py)\)", readme)))
    assert on_disk == linked, "tutorials/README.md must link every script in tutorials/, and only those"
    assert on_disk == _tested_scripts(), "every script in tutorials/ needs its test_NN_name here"
    assert len(on_disk) >= 4


def test_01_language():
    out = run("01_language.py", fast_by="env")
    assert "language tutorial: OK" in out
    assert "did you mean DCT?" in out and "\n                  ^\n" in out  # the caret under DTC
    assert number(r"max \|layer\(x\) - \(x @ W \+ b\)\| = (\S+)", out) < 1e-3
    assert number(r"sum\(G, n=50\): relative error (\S+)", out) < 1e-8
    assert "DCT DCT' is the identity: True" in out


def test_02_staged_lenet(tmp_path):
    out = run("02_staged_lenet.py", "--out", str(tmp_path / "lenet"))
    assert number(r"final test accuracy: (\S+)", out) > 2 * CHANCE
    # the sums of Gaussians line up and dense holds anything: lossless hand-overs;
    # the low-rank hand-over of the hidden layer loses something
    assert number(r"(?m)^  conv2d_2 +(\S+)$", out) < 1e-5
    assert number(r"(?m)^  dense_7 +(\S+)$", out) < 1e-5
    # The hand-over to lowrank(r=8) of the fast mode's (3136, 128) hidden W keeps its top 8 of 128
    # singular values (Eckart-Young): the 120 dropped are the smallest, so they hold at most
    # 120/128 of ||W||^2 -- the error is at most sqrt(1 - 8/128) (keeping any other 8 is worse)
    assert 1e-3 < number(r"(?m)^  dense_5 +(\S+)$", out) <= math.sqrt(1 - 8 / 128)
    assert re.search(r"^\s+1\s+[\d,]+\s+0\.\d+\s+0\.\d+$", out, re.M), "no stage-1 accuracy row"
    assert (tmp_path / "lenet" / "model.keras").is_file()
    assert (tmp_path / "lenet" / "report.json").is_file()


def test_03_compress_export(tmp_path):
    out = run("03_compress_export.py", "--out", str(tmp_path / "lite"))
    assert number(r"final test accuracy \(sss, fine-tuned\): (\S+)", out) > 2 * CHANCE
    sizes = {name: (tmp_path / "lite" / f"{name}.tflite").stat().st_size for name in ("dense", "sss", "sparse")}
    assert sizes["sparse"] < sizes["sss"] < sizes["dense"], sizes
    diffs = [float(d) for d in re.findall(r"LiteRT vs Keras on \d+ images: max \|diff\| (\S+),", out)]
    assert len(diffs) == 3 and max(diffs) < 1e-3, diffs
    table = out.replace(",", "")  # the parameter column of the summary table
    dense = number(r"(?m)^dense\s+(\d+)\s", table)
    for name in ("sss", "sparse"):
        assert number(rf"(?m)^{name}\s+(\d+)\s", table) < dense


def test_04_new_structure():
    out = run("04_new_structure.py")
    assert "unknown structure 'toeplitz'" in out  # before registering
    assert "apply == x @ to_dense: True" in out
    assert "saved and loaded: same outputs" in out
    assert number(r"max \|t - lstsq\| = (\S+)", out) < 1e-8
    assert number(r"final test accuracy: (\S+)", out) > 2 * CHANCE
    # the registration stayed in the tutorial's process
    from keras_decomp import DecompError, parse
    with pytest.raises(DecompError, match="unknown structure 'toeplitz'"):
        parse("toeplitz(b=2)", 6, 4)


def test_05_nested_models(tmp_path):
    pytest.importorskip("keras_hub")
    out = run("05_nested_models.py", "--out", str(tmp_path / "lite"))
    assert "encoder_0/self_attention_layer/query" in out
    sizes = re.findall(r"(?m)^encoder_\d/\S+ +lowrank\(r=(\d+)\)", out)
    assert len(sizes) == 24  # 8 feed-forward Dense + 16 attention EinsumDense layers, sizes chosen per layer
    params = re.search(r"(?m)^model +(\d+) +(\d+)$", out)
    assert int(params.group(2)) < int(params.group(1))
    assert number(r"saved and loaded: max \|difference\| (\S+)", out) < 1e-6
    assert number(r"folded: .*max \|difference\| (\S+)", out) < 1e-4
    diffs = [float(d) for d in re.findall(r"TFLite \((?:factored|folded)\): .* max \|diff\| (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, diffs
    assert number(r"MobileNetV2: (\d+) 1x1 convolutions decomposed", out) >= 30
    assert number(r"MobileNetV2: .*saved and loaded: max \|difference\| (\S+);", out) < 1e-6
