"""Staged training: train stage s, materialise each decomposed layer's W,
approximate stage s+1 from it by least squares, keep the biases and every
other layer, train on.  A checkpoint is written after every epoch and every
hand-over; a run that was interrupted, even by SIGKILL, resumes at the stage
and epoch where it stopped, and its report lists every epoch once.

Checkpoint layout (``OUT/checkpoint``): ``state.json`` records where the run
is, what it measured so far and which model file holds its weights
(``model-s<stage>-e<epoch>.keras``).  A model file is written under a new name
and complete before ``state.json`` is replaced to point at it, and the old
file is removed only after that: whenever the process dies, ``state.json``
names a complete model of exactly the stage and epoch it records.

Under a distribution (``distribute=``, see ``distribute.py``) every process
runs the same stages on its part of each global batch.  Only the chief writes
the checkpoint and the outputs; the others save into a throwaway folder, since
saving is collective there.  The least-squares hand-over runs on the chief and
is broadcast.  A multi-worker run needs ``out`` on a filesystem that every
worker reads: a resumed non-chief worker loads the chief's checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from . import atomic
from . import distribute as distribution
from . import recipe
from .guards import finite_guard, non_finite_layers  # noqa: F401 - non_finite_layers is public here too
from ..fitting.approximate import fit as fit_matrix
from ..errors import DecompError


def initialize_from(layer, W: np.ndarray, bias=None) -> float:
    """Set a decomposed layer's variables to the best fit of the dense W (its
    (n, m) kernel matrix); copy the bias.  Returns the relative error.

    Under a multi-worker distribution the fit is computed on the chief only and
    broadcast, so that every worker starts the stage from the same values.
    """
    dist = distribution.current()
    shapes = {key: tuple(variable.shape) for key, variable in layer.decomposition_variables.items()}
    fitted = fitted_shapes(layer.node)
    if dist.is_chief:
        try:
            result = fit_matrix(W, layer.node, seed=layer.seed)
        except DecompError as err:  # e.g. a kernel with NaN: say whose
            raise type(err)(f"layer '{layer.name}': {err.fact}", text=err.text, pos=err.pos, hint=err.hint) from None
        values, error = {key: result.values[key] for key in shapes}, result.rel_error
        for key in fitted:  # a support palm4MSA found, or the seeded one if another method ran
            values[key] = result.values.get(key, layer._fixed.arrays[key])
    else:
        values = {key: np.zeros(shape) for key, shape in {**shapes, **fitted}.items()}
        error = 0.0
    values = dist.broadcast({**values, _ERROR: np.float64(error)})  # no parameter is named "/error"
    for key, variable in layer.decomposition_variables.items():
        variable.assign(np.asarray(values[key], dtype=variable.dtype))
    if fitted:
        layer.set_fitted({key: np.rint(np.asarray(values[key], dtype=np.float64)) for key in fitted})
    if bias is not None and layer.bias is not None:
        layer.bias.assign(np.asarray(bias, dtype=layer.bias.dtype))
    return float(values[_ERROR])


_ERROR = "/error"


def fitted_shapes(node) -> dict:
    """The fixed arrays that ``approximate`` finds from data instead of seeds (the
    support of ``sparse(q, s)``): key -> shape, from nodes with ``fitted_fixed()``."""
    out = {}
    for sub in node.walk():
        out.update(getattr(sub, "fitted_fixed", dict)())
    return out


def kernel_matrix(layer) -> np.ndarray:
    """The (n, m) kernel matrix of a decomposed or plain Dense/Conv2D layer."""
    from ..layers.base import _Decomposed

    if isinstance(layer, _Decomposed):
        return np.asarray(layer.materialize(), dtype=np.float64)
    kernel = np.asarray(layer.kernel, dtype=np.float64)
    return kernel.reshape(-1, kernel.shape[-1])


def hand_over(old_model, new_model) -> dict[str, float]:
    """Initialise ``new_model`` from ``old_model`` layer by layer: copy what is
    unchanged (weights, biases, normalisation statistics), approximate what
    changed and copy its bias.  Returns the error per changed layer."""
    from ..layers.base import _Decomposed

    # Layers correspond by position (Keras numbers the names of unnamed layers per build).
    old_kinds = [type(layer).__name__ for layer in old_model.layers]
    new_kinds = [type(layer).__name__ for layer in new_model.layers]
    if old_kinds != new_kinds:
        raise DecompError(f"cannot hand over between models with different layers: {old_kinds} and {new_kinds}")
    errors = {}
    for old, new in zip(old_model.layers, new_model.layers):
        changed = isinstance(new, _Decomposed) and (
            not isinstance(old, _Decomposed) or (old.W, old.stage) != (new.W, new.stage))
        if changed:
            bias = old.bias if getattr(old, "use_bias", False) else None
            errors[new.name] = initialize_from(new, kernel_matrix(old), None if bias is None else np.asarray(bias))
        else:
            new.set_weights(old.get_weights())
    return errors


def fit_staged(spec, source: str | None = None, out: str | Path | None = None, resume: bool = False,
               epochs: int | None = None, verbose: int = 1, distribute=None) -> dict:
    """Train every ``|`` stage of ``spec`` with least-squares hand-overs.

    ``out`` holds checkpoints, the final ``model.keras`` and ``report.json``;
    with ``resume=True`` a run found there continues where it stopped.
    ``epochs`` overrides the epochs of every stage.  Returns the report: per
    stage the trainable parameters, the hand-over error per layer, test
    accuracy before and after the hand-over and at the end; every epoch's
    metrics; the final test accuracy and loss and the per-layer table.

    ``distribute`` trains on several devices or machines: "mirrored" (this
    machine's devices; on JAX ``keras.distribution.DataParallel``),
    "multi-worker" (the cluster in TF_CONFIG), or a ``distribute.Distribution``.
    The spec's batch_size is the global batch.  Every worker calls
    ``fit_staged`` alike; only the chief writes to ``out``.
    """
    import keras

    from .specs import load_spec
    from .run import load_data

    # First: a multi-worker strategy configures collective ops, which must precede any other TF work.
    dist = distribute if isinstance(distribute, distribution.Distribution) else distribution.make(distribute)
    spec = load_spec(spec)
    out = Path(out or f"runs/{spec.name}")
    if dist.is_chief:
        out.mkdir(parents=True, exist_ok=True)
    state = _State.load(out) if resume else None
    if resume and state is None:
        where = "" if dist.is_chief else (" (seen from this non-chief worker: every worker must read the "
                                           "chief's --out, e.g. on a shared filesystem)")
        raise DecompError(f"nothing to resume in {out}: no checkpoint was written there{where}",
                          hint="run without --resume to start")
    if state is not None and state.data["spec"] != spec.name:
        raise DecompError(f"the checkpoint in {out} is of spec '{state.data['spec']}', not '{spec.name}'",
                          hint="resume with the spec that started the run, or choose another --out")
    if state is not None and state.data.get("model_fingerprint", fingerprint(spec)) != fingerprint(spec):
        raise DecompError(f"the spec '{spec.name}' describes another model than the one checkpointed in {out}: "
                          "its seed, input, params, fixed bases or layers changed since the run started",
                          hint="resume with the spec as it was, or choose another --out (training settings "
                               "such as epochs and learning rate may change between runs)")
    state = state or _State.new(spec)
    keras.utils.set_random_seed(spec.seed)
    data = load_data(spec, source)
    batch = spec.train.get("batch_size", 128)
    limit = spec.data.get("limit")
    data, held_out = _validation_split(data, spec.data.get("validation"))
    dist.check_batches(batch, {"training": len(data.x_train[:limit]), "test": len(data.x_test[:limit])})
    train_ds, test_ds = data.pipelines(batch_size=batch, seed=spec.seed, limit=limit)
    val_ds = test_ds if held_out is None else held_out.pipelines(batch_size=batch, seed=spec.seed)[1]
    steps = math.ceil(len(data.x_train[:limit]) / batch)
    runner = _Runner(spec, state, out, (dist.shard(train_ds), dist.shard(val_ds), dist.shard(test_ds)), steps,
                     verbose, epochs)
    from .run import write_outputs
    with dist.scope():
        model = runner.run()
        report = {**runner.report(data.source, model), "distribution": dist.describe()}
        if dist.is_chief:
            write_outputs(model, report, out)
        else:
            dist.save(model, None)  # the chief's write_outputs saves collectively
    return report


def _validation_split(data, count):
    """(training data without its last ``count`` images, those images as a data set whose
    test split they are), or (data, None) without ``count``: then the test split is what
    fit reports as validation, and no callback may choose on it (specs.py checks)."""
    if not count:
        return data, None
    if count >= len(data.x_train):
        raise DecompError(f"data.validation={count} leaves no training images ({len(data.x_train)} in all)",
                          hint="hold out fewer, e.g. a tenth of the training set")
    kept = dataclasses.replace(data, x_train=data.x_train[:-count], y_train=data.y_train[:-count])
    held = dataclasses.replace(data, x_test=data.x_train[-count:], y_test=data.y_train[-count:])
    return kept, held


def fingerprint(spec) -> str:
    """A short hash of what makes a spec's model: seed, input, params, fixed bases and layers
    (not its training settings, which a resumed run may change).

    >>> from .specs import load_spec
    >>> a = load_spec({"input": {"shape": [4]}, "layers": [{"Dense": {"units": 2}}]})
    >>> b = load_spec({"input": {"shape": [4]}, "layers": [{"Dense": {"units": 3}}]})
    >>> len(fingerprint(a)), fingerprint(a) == fingerprint(b)
    (16, False)
    """
    model = {"seed": spec.seed, "input": list(spec.input_shape), "params": spec.params, "fixed": spec.fixed,
             "layers": [[layer.class_name, layer.config] for layer in spec.layers]}
    text = json.dumps(model, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _State:
    """What a checkpoint records: where we are and everything measured so far."""

    def __init__(self, data: dict):
        self.data = data

    @classmethod
    def new(cls, spec):
        return cls({"spec": spec.name, "model_fingerprint": fingerprint(spec), "stage": 0, "epoch": 0,
                    "stages": [], "history": [],
                    "started": time.time(), "elapsed": 0.0})

    @classmethod
    def load(cls, out: Path):
        path = out / "checkpoint" / "state.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if not (out / "checkpoint" / data.get("model", "")).is_file():
            raise DecompError(f"{path} names the model file '{data.get('model')}', which is not there",
                              hint="the checkpoint is damaged; run without --resume to start again")
        return cls(data)

    def model_path(self, out: Path) -> Path:
        return out / "checkpoint" / self.data["model"]

    def save(self, out: Path, model) -> None:
        folder = out / "checkpoint"
        name = f"model-s{self.data['stage']}-e{self.data['epoch']}.keras"
        tmp = folder / f"tmp-{name}"
        dist = distribution.current()
        if dist.is_chief:
            folder.mkdir(exist_ok=True)
        if not dist.save(model, tmp):  # not the chief: it writes the checkpoint
            self.data["model"] = name
            return
        atomic.replace(tmp, folder / name)
        _write_json(folder / "state.json", {**self.data, "model": name})  # the commit point
        self.data["model"] = name
        for old in folder.glob("*model-*.keras"):  # older epochs, and parts left by a kill
            if old.name != name:
                old.unlink()


def _write_json(path: Path, data: dict) -> None:
    """Replace ``path`` atomically: readers see the old or the new file, never a part."""
    atomic.write_text(path, json.dumps(data, indent=1))


class _Runner:
    """The stages of one run; ``run`` and ``report`` are called inside the distribution's scope."""

    def __init__(self, spec, state, out, datasets, steps_per_epoch, verbose, epochs):
        self.spec, self.state, self.out = spec, state, out
        self.train_ds, self.val_ds, self.test_ds = datasets
        self.steps_per_epoch = steps_per_epoch
        self.verbose, self.epochs_override = verbose, epochs

    def epochs(self, stage: int) -> int:
        if self.epochs_override is not None:
            return self.epochs_override
        if self.spec.stages:
            return self.spec.stages[stage].get("epochs", self.spec.train.get("epochs", 1))
        return self.spec.train.get("epochs", 1)

    def settings(self, stage: int) -> dict:
        return recipe.settings_for(self.spec, stage)

    def steps(self, stage: int) -> int:
        """Training steps of one stage: what ``auto`` in a learning-rate schedule stands for."""
        return self.steps_per_epoch * self.epochs(stage)

    def model_for(self, stage: int):
        from .builder import build
        from .run import compile_model
        model = build(self.spec, stage=stage)
        return compile_model(model, self.settings(stage), steps=self.steps(stage))

    def evaluate(self, model) -> float:
        return float(model.evaluate(self.test_ds, verbose=0)[1])

    def run(self):
        from ..layers import load_model
        stages = self.spec.num_stages
        s = self.state.data
        if "model" in s:  # resuming
            model = load_model(self.state.model_path(self.out))
            # the spec's learning rate, not the saved one: lowering it is how a diverged run goes on;
            # a schedule stays the saved one, which goes on from the saved step count
            rate = self.settings(s["stage"]).get("learning_rate", 1e-3)
            if not isinstance(rate, dict):
                model.optimizer.learning_rate = float(rate)
        else:
            model = self.model_for(0)
            s["stages"].append(self.stage_entry(0, model, {}, None, None))
            self.state.save(self.out, model)
        while True:
            stage = s["stage"]
            self.train_stage(model, stage)
            s["stages"][stage]["accuracy_end"] = self.evaluate(model)
            if stage + 1 >= stages:
                break
            before = s["stages"][stage]["accuracy_end"]
            new = self.model_for(stage + 1)
            errors = hand_over(model, new)
            after = self.evaluate(new)
            s["stages"].append(self.stage_entry(stage + 1, new, errors, before, after))
            s["stage"], s["epoch"], model = stage + 1, 0, new
            self.state.save(self.out, model)
        return model

    def stage_entry(self, stage, model, errors, before, after) -> dict:
        return {"stage": stage, "trainable_params": int(sum(int(np.prod(v.shape)) for v in model.trainable_variables)),
                "handover_error": errors, "accuracy_before_handover": before,
                "accuracy_after_handover": after, "accuracy_end": None}

    def train_stage(self, model, stage: int) -> None:
        if self.state.data["epoch"] >= self.epochs(stage):  # resumed after its last epoch
            return
        model.fit(self.train_ds, epochs=self.epochs(stage), initial_epoch=self.state.data["epoch"],
                  validation_data=self.val_ds, verbose=self.verbose, callbacks=self.callbacks(stage),
                  shuffle=False)  # the pipeline shuffles; Keras warns that its own flag is ignored
        if self.state.data["epoch"] < self.epochs(stage):  # a callback (EarlyStopping) ended the stage
            self.state.data["stopped_early"] = {**self.state.data.get("stopped_early", {}),
                                                str(stage): self.state.data["epoch"]}
            self.state.data["epoch"] = self.epochs(stage)
            self.state.save(self.out, model)

    def callbacks(self, stage: int) -> list:
        """The Keras callbacks of one stage's ``fit``: the guard against non-finite
        weights, then the per-epoch checkpoint (so a diverged epoch is never saved)."""
        import keras
        runner = self

        class Checkpoint(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                s = runner.state.data
                s["history"].append({"stage": stage, "epoch": epoch,
                                     **{k: float(v) for k, v in (logs or {}).items()}})
                s["epoch"] = epoch + 1
                runner.state.save(runner.out, self.model)

        # the spec's own (EarlyStopping restoring its best weights) before the checkpoint
        return [finite_guard(stage, self.out / "checkpoint"), *recipe.callbacks(self.settings(stage)), Checkpoint()]

    def report(self, data_source: str, model) -> dict:
        from ..layers.report import layer_table
        s = self.state.data
        loss, accuracy = model.evaluate(self.test_ds, verbose=0)[:2]
        return {"spec": self.spec.name, "source": self.spec.source, "data_source": data_source,
                "seed": self.spec.seed, "test_accuracy": float(accuracy), "test_loss": float(loss),
                "trainable_params": s["stages"][-1]["trainable_params"], "layers": layer_table(model),
                "stages": s["stages"], "history": s["history"],
                "wall_time_s": round(time.time() - s["started"], 2)}
