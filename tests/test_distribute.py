"""Tests of distributed training: MirroredStrategy over two logical CPU devices, two
MultiWorkerMirroredStrategy workers on 127.0.0.1, and DataParallel on the JAX backend.

Each distributed run happens in child processes: logical devices and collective ops are
configured once, before TensorFlow starts, and must not leak into this process. Children
are bounded in time and killed in a ``finally``; they print one ``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from keras_decomp import DecompError
from keras_decomp.training import distribute, staging
from keras_decomp.cli.main import main
from keras_decomp.layers import load_model
from keras_decomp.training.data import load
from keras_decomp.training.staging import fit_staged

from checkpoints import check_handovers

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 420  # seconds for any group of children; a busy 2-core machine needs about a quarter

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
    "ignore:`shuffle=True` was passed:UserWarning")


def staged_spec(name, expression, limit, batch_size, epochs):
    return {"name": name, "seed": 0, "input": {"shape": [28, 28, 1]},
            "layers": [{"Flatten": {}}, {"Dense": {"units": 10, "W": expression}}],
            "data": {"name": "fashion_mnist", "limit": limit},
            "train": {"batch_size": batch_size, "optimizer": "adam", "learning_rate": 1.0e-2},
            "stages": [{"epochs": e} for e in epochs]}


# nested draws, then dense: every hand-over is exact up to float32
SUMS = staged_spec("sums_small", "sum(G, n=10) | sum(G, n=50) | dense", 500, 128, [1, 1, 1])
# for fit_staged on one machine: two stages, no partial batch (JAX compiles a step per batch shape)
TWO_STAGES = staged_spec("two_stages", "sum(G, n=10) | dense", 512, 128, [1, 2])
# the spec of the two-worker runs: the second stage starts from a truncated SVD, computed on the chief
WORKERS = staged_spec("workers_small", "sum(G, n=10) | lowrank(r=8)", 1000, 200, [1, 3])


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "XLA_FLAGS")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow", "PYTHONPATH": str(ROOT), **extra})
    return env


def run_children(commands, logs, timeout=TIMEOUT, meanwhile=None) -> list[int]:
    """Start every (argv, env), call ``meanwhile()`` if given, wait for all within ``timeout``
    of the start; the first failure or the deadline kills the rest. Output goes to ``logs``."""
    files = [open(log, "w") for log in logs]
    children = []
    try:
        deadline = time.monotonic() + timeout
        for (argv, env), f in zip(commands, files):
            children.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
        if meanwhile is not None:
            meanwhile()
        while any(c.poll() is None for c in children):
            failed = [c for c in children if c.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return [c.poll() for c in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()
        for f in files:
            f.close()


def result_of(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    assert lines, log.read_text()[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def tails(logs) -> str:
    return "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def keras_decomp_command() -> list[str]:
    script = Path(sys.executable).with_name("keras-decomp")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "keras_decomp.cli"]


# ---- in this process: choices, roles and errors ---------------------------------------------------

def test_one_process_is_the_chief_and_broadcast_returns_its_values():
    dist = distribute.make(None)
    values = {"w": np.arange(3.0)}
    assert dist.is_chief and dist.num_replicas == 1 and dist.kind is None
    assert dist.broadcast(values) is values
    assert distribute.current().kind is None
    with dist.scope():
        assert distribute.current() is dist
    assert distribute.current() is not dist


@pytest.mark.parametrize("cluster, task, chief", [
    ({"worker": ["a:1", "b:1"]}, ("worker", 0), True),
    ({"worker": ["a:1", "b:1"]}, ("worker", 1), False),
    ({"chief": ["a:1"], "worker": ["b:1"]}, ("chief", 0), True),
    ({"chief": ["a:1"], "worker": ["b:1"]}, ("worker", 0), False),
    ({"worker": ["a:1"], "evaluator": ["b:1"]}, ("evaluator", 0), False),
])
def test_the_chief_is_the_chief_task_else_worker_0(cluster, task, chief):
    assert distribute._is_chief(cluster, *task) is chief


def test_make_errors(monkeypatch):
    with pytest.raises(DecompError, match=r"^unknown distribution 'ring'\nuse mirrored or multi-worker$"):
        distribute.make("ring")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(DecompError, match=r"^multi-worker training needs TF_CONFIG describing the cluster "
                                          r"and this worker\ne\.g\. export TF_CONFIG="):
        distribute.make("multi-worker")
    monkeypatch.setenv("TF_CONFIG", "{cluster: 1}")
    with pytest.raises(DecompError, match=r"^TF_CONFIG is not valid JSON: "):
        distribute.make("multi-worker")
    monkeypatch.setenv("TF_CONFIG", "[1]")
    with pytest.raises(DecompError, match=r"^TF_CONFIG must be a JSON object with 'cluster' and 'task'$"):
        distribute.make("multi-worker")


def test_jax_batches_must_split_evenly_over_the_devices():
    mesh = SimpleNamespace(device_mesh=SimpleNamespace(devices=np.zeros(2)))
    dist = distribute.Distribution("mirrored", keras_distribution=mesh)
    dist.check_batches(128, {"training": 5000, "test": 1000})  # last batches of 8 and 104
    with pytest.raises(DecompError, match=r"^on the JAX backend every batch is split evenly over 2 devices, but "
                                          r"the batch size is 128 and the last test batch has 45 examples\n"
                                          r"choose train.batch_size and data.limit so that both are multiples of 2"):
        dist.check_batches(128, {"training": 5000, "test": 301})
    with pytest.raises(DecompError, match=r"the batch size is 7 and the last training batch has 7 examples"):
        dist.check_batches(7, {"training": 70})


def test_train_command_rejects_an_unknown_distribution(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "specs/linear_dct.yaml", "--distribute", "ring"])
    assert exit_info.value.code == 2
    assert "argument --distribute: invalid choice: 'ring'" in capsys.readouterr().err


# ---- MirroredStrategy over two logical CPU devices ------------------------------------------------

MIRRORED = r'''
import json, sys
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
import numpy as np
import pytest

from keras_decomp import build
from keras_decomp.training import distribute
from keras_decomp.training.data import load
from keras_decomp.training.staging import fit_staged, hand_over
from keras_decomp.training.run import compile_model

spec, staged, two_stages = (json.loads(a) for a in sys.argv[1:4])
out = sys.argv[4]
train, _ = load(source="bundled").pipelines(batch_size=64, shuffle=False, limit=512)


def copies(variable):
    """The per-device values of a (mirrored) variable."""
    return [np.asarray(c) for c in getattr(variable.value, "values", [variable.value])]


def trained(dist):
    """Plain SGD on 8 global batches of 64, in order, twice: (weights before, after, model)."""
    with dist.scope():
        keras.utils.set_random_seed(0)
        model = compile_model(build(spec), {"optimizer": "sgd"}, learning_rate=0.1)
        before = model.get_weights()
        model.fit(dist.shard(train), epochs=2, verbose=0)
    return before, model.get_weights(), model


_, one, _ = trained(distribute.make(None))
dist = distribute.make("mirrored")
before, two, model = trained(dist)
fixed = [v for layer in model.layers if hasattr(layer, "_fixed") for v in layer._fixed.arrays.values()]
trainable = [v for layer in model.layers if hasattr(layer, "_fixed") for v in layer.decomposition_variables.values()]
result = {
    "replicas": dist.num_replicas,
    "difference": max(float(np.max(np.abs(a - b))) for a, b in zip(one, two)),
    "moved": max(float(np.max(np.abs(a - b))) for a, b in zip(before, two)),
    "kinds": sorted({type(v.value).__name__ for v in fixed + trainable}),
    "copies_agree": all(all(np.array_equal(c, copies(v)[0]) for c in copies(v)) for v in fixed + trainable),
    "num_copies": len(copies(fixed[0])),
}

# the hand-over inside the strategy: the new stage's variables are mirrored and every copy holds the fit
with dist.scope():
    old, new = build(staged, stage=0), build(staged, stage=1)
    errors = hand_over(old, new)
    layer_old, layer_new = old.layers[-1], new.layers[-1]
    result["handover_error"] = max(errors.values())
    result["handover_copies_agree"] = all(
        all(np.array_equal(c, copies(v)[0]) for c in copies(v)) for v in layer_new.decomposition_variables.values())
    result["handover_kernel"] = float(np.max(np.abs(np.asarray(layer_old.materialize())
                                                    - np.asarray(layer_new.materialize()))))

sys.path.insert(0, "tests")  # run from the repository's root
from checkpoints import keep_checkpoints

with pytest.MonkeyPatch.context() as monkeypatch:  # every committed model file, for the test to read
    keep_checkpoints(monkeypatch, Path(out + "-kept"))
    report = fit_staged(two_stages, source="bundled", out=out, verbose=0, distribute="mirrored")
result["report"] = {k: report[k] for k in ("stages", "history", "test_accuracy", "distribution")}
print("RESULT " + json.dumps(result))
'''

DECOMPOSED = {"seed": 0, "input": {"shape": [28, 28, 1]},
              "layers": [{"Flatten": {}},
                         {"Dense": {"units": 32, "activation": "relu", "W": "DCT2[:100] dense"}},
                         {"Dense": {"units": 10, "W": "sum(G, n=8) + lowrank(r=2)"}}],
              "data": {"name": "fashion_mnist"}}


@pytest.mark.slow
def test_mirrored_on_two_devices_trains_like_one_device_and_hands_over(tmp_path):
    log = tmp_path / "mirrored.log"
    argv = [sys.executable, "-c", MIRRORED, *(json.dumps(s) for s in (DECOMPOSED, SUMS, TWO_STAGES)),
            str(tmp_path / "run")]
    (code,) = run_children([(argv, child_env())], [log])
    assert code == 0, tails([log])
    result = result_of(log)
    assert result["replicas"] == 2 and result["num_copies"] == 2
    # the fixed arrays (DCT, Gaussian draws), untracked by Keras, are mirrored like the variables
    assert result["kinds"] == ["MirroredVariable"] and result["copies_agree"]
    assert result["moved"] > 1e-2  # training did change the weights ...
    assert result["difference"] < 1e-4  # ... in the same way on two devices as on one

    assert result["handover_error"] < 1e-5 and result["handover_copies_agree"]
    assert result["handover_kernel"] < 1e-5
    report = result["report"]
    assert report["distribution"] == {"kind": "mirrored", "replicas": 2, "backend": "tensorflow"}
    assert [(h["stage"], h["epoch"]) for h in report["history"]] == [(0, 0), (1, 0), (1, 1)]
    first, second = report["stages"]
    # against the model files of the end of stage 0 and of the hand-over, evaluated here
    test = load(source="bundled")
    check_handovers(report["stages"], tmp_path / "run-kept", test.x_test, test.y_test, last_epochs=[1, 2], limit=512)
    assert report["test_accuracy"] > max(0.4, first["accuracy_end"])  # the dense stage trained on
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "model.keras", "report.json"]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["model-s1-e2.keras", "state.json"]


# ---- two MultiWorkerMirroredStrategy workers on 127.0.0.1 -------------------------------------------

def run_workers(spec_file: Path, outs: list[Path], tmp_path: Path, extra=(), meanwhile=None) -> list[Path]:
    """``keras-decomp train --distribute multi-worker`` in two processes, worker i writing to
    ``outs[i]``, and ``meanwhile()`` here; returns their logs. Fails unless both finish in time."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    commands, logs = [], []
    for index, out in enumerate(outs):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        argv = [*keras_decomp_command(), "train", str(spec_file), "--data", "bundled", "--out", str(out),
                "--quiet", "--distribute", "multi-worker", *extra]
        commands.append((argv, child_env(TF_CONFIG=config)))
        logs.append(tmp_path / f"worker{index}.log")
    codes = run_children(commands, logs, meanwhile=meanwhile)
    assert codes == [0, 0], f"exit codes {codes}\n{tails(logs)}"
    return logs


@pytest.mark.slow
def test_two_workers_train_like_one_process(tmp_path):
    """The non-chief worker is given its own --out: it must not even create it (on a
    cluster every worker is given the same folder, which only the chief writes)."""
    spec_file = tmp_path / "workers_small.yaml"
    spec_file.write_text(yaml.safe_dump(WORKERS))
    chief_out, other_out = tmp_path / "run", tmp_path / "not-written"
    alone = {}  # the same spec in this process, while the workers run

    def train_alone():
        alone.update(fit_staged(WORKERS, source="bundled", out=tmp_path / "alone", verbose=0))
    logs = run_workers(spec_file, [chief_out, other_out], tmp_path, meanwhile=train_alone)
    assert not other_out.exists()
    assert sorted(p.name for p in chief_out.iterdir()) == ["checkpoint", "model.keras", "report.json"]
    assert sorted(p.name for p in (chief_out / "checkpoint").iterdir()) == ["model-s1-e3.keras", "state.json"]
    report = json.loads((chief_out / "report.json").read_text())
    assert report["distribution"] == {"kind": "multi-worker", "replicas": 2, "backend": "tensorflow"}
    assert [(h["stage"], h["epoch"]) for h in report["history"]] == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert f"wrote {chief_out}/model.keras" in logs[0].read_text()
    assert f"test accuracy {report['test_accuracy']:.4f}; this worker is done" in logs[1].read_text()

    assert abs(report["test_accuracy"] - alone["test_accuracy"]) < 0.03, (report["test_accuracy"],
                                                                          alone["test_accuracy"])
    assert report["test_accuracy"] > 0.6
    (error,) = report["stages"][1]["handover_error"].values()
    assert error == pytest.approx(alone["stages"][1]["handover_error"]["dense_1"], rel=0.05)


class Interrupted(Exception):
    """Stands for the process dying at this point."""


@pytest.mark.slow
def test_two_workers_resume_a_checkpoint(tmp_path, monkeypatch):
    """A run stopped before its hand-over goes on on two workers: both read the chief's
    checkpoint from the shared --out, the chief approximates and broadcasts, then writes.
    The checkpoint's model, loaded and measured here, is what the hand-over started from: its
    test accuracy is the report's before the hand-over, and the error of the rank-8 fit is
    that of the truncated SVD of its kernel. One epoch per stage (--epochs 1) keeps it short."""
    spec_file = tmp_path / "workers_small.yaml"
    spec_file.write_text(yaml.safe_dump(WORKERS))
    out = tmp_path / "run"

    def stop(old, new):
        raise Interrupted
    monkeypatch.setattr(staging, "hand_over", stop)
    with pytest.raises(Interrupted):
        fit_staged(WORKERS, source="bundled", out=out, epochs=1, verbose=0)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == (0, 1)
    checkpoint = load_model(out / "checkpoint" / state["model"])  # read now: the resume removes the file
    test = load(source="bundled")
    logits = checkpoint.predict(test.x_test[:1000].astype("float32") / 255.0, verbose=0)
    stage0 = float(np.mean(np.argmax(logits, axis=1) == test.y_test[:1000]))
    kernel = np.asarray(checkpoint.get_layer("dense_1").materialize(), np.float64)  # (784, 10)
    s = np.linalg.svd(kernel, compute_uv=False)
    svd_error = np.sqrt(np.sum(s[8:] ** 2)) / np.linalg.norm(kernel)

    logs = run_workers(spec_file, [out, out], tmp_path, extra=("--resume", "--epochs", "1"))
    report = json.loads((out / "report.json").read_text())
    assert [(h["stage"], h["epoch"]) for h in report["history"]] == [(0, 0), (1, 0)]
    stages = report["stages"]
    # a count of images over their number, in float32 in Keras: equal up to float32 rounding
    assert stages[1]["accuracy_before_handover"] == pytest.approx(stage0, abs=1e-6)
    # the truncated SVD in float64 of the same float32 kernel
    assert stages[1]["handover_error"]["dense_1"] == pytest.approx(svd_error, rel=1e-6)
    assert stages[1]["accuracy_end"] > stage0 + 0.1  # stage 2 trained on from the broadcast fit
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["model-s1-e1.keras", "state.json"]
    assert "this worker is done" in logs[1].read_text()


# ---- JAX: keras.distribution.DataParallel ------------------------------------------------------------

JAX = r'''
import json, sys
from pathlib import Path

import jax
import keras
import pytest

from keras_decomp import DecompError
from keras_decomp.training import distribute
from keras_decomp.training.staging import fit_staged

staged, out = json.loads(sys.argv[1]), sys.argv[2]
try:
    distribute.make("multi-worker")
    refused = None
except DecompError as err:
    refused = str(err)
sys.path.insert(0, "tests")  # run from the repository's root
from checkpoints import keep_checkpoints

with pytest.MonkeyPatch.context() as monkeypatch:  # every committed model file, for the test to read
    keep_checkpoints(monkeypatch, Path(out + "-kept"))
    report = fit_staged(staged, source="bundled", out=out, verbose=0, distribute="mirrored")
print("RESULT " + json.dumps({"backend": keras.backend.backend(), "devices": len(jax.devices()),
                              "refused": refused, "report": report}))
'''


@pytest.mark.slow
def test_jax_data_parallel_trains_the_stages(tmp_path):
    log = tmp_path / "jax.log"
    env = child_env(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    argv = [sys.executable, "-c", JAX, json.dumps(TWO_STAGES), str(tmp_path / "run")]
    (code,) = run_children([(argv, env)], [log])
    assert code == 0, tails([log])
    result = result_of(log)
    assert (result["backend"], result["devices"]) == ("jax", 2)
    assert result["refused"].startswith("multi-worker training runs on the TensorFlow backend")
    report = result["report"]
    assert report["distribution"] == {"kind": "mirrored", "replicas": 2, "backend": "jax"}
    assert [(h["stage"], h["epoch"]) for h in report["history"]] == [(0, 0), (1, 0), (1, 1)]
    first, second = report["stages"]
    # against the model files of the end of stage 0 and of the hand-over, evaluated here
    test = load(source="bundled")
    check_handovers(report["stages"], tmp_path / "run-kept", test.x_test, test.y_test, last_epochs=[1, 2], limit=512)
    assert report["test_accuracy"] > max(0.4, first["accuracy_end"])  # the dense stage trained on
    assert (tmp_path / "run" / "model.keras").is_file()
