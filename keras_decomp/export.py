"""SavedModel and TFLite export, checked against Keras.

Per decomposed layer, ``mode`` picks the form written to the file:
- "folded": W materialised once into a constant (the file equals a dense model);
- "factored": the apply form kept (x U then V, SSS recursions, sparse
  factors), so the converter sees products with the input and cannot fold
  them back into a dense kernel;
- "auto": per layer, the form with fewer bytes, ties broken by FLOPs.
After writing, the TFLite file runs in the LiteRT interpreter and the
SavedModel is reloaded; both are compared with the Keras model.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import DecompError
from .fixed import FixedLeaf
from .ir import Add, Node, Product, Scale, Slice, Transpose
from .structures.basic import SumOf

MODES = ("folded", "factored", "auto")
QUANTIZE = (None, "dynamic", "int8")


def stored_entries(node: Node, forced: bool = True) -> int:
    """Numbers a file keeps for ``node`` in apply form at batch 1, once the
    converter has folded whatever depends on constants only."""
    if not forced and node.flops(1, "materialize") <= node.flops(1, "apply"):
        return math.prod(node.shape)
    if isinstance(node, (Product, Add)):
        return sum(stored_entries(c, False) for c in node.children())
    if isinstance(node, (Scale, Transpose, Slice)):
        return stored_entries(node.children()[0], forced) + (1 if isinstance(node, Scale) else 0)
    if isinstance(node, SumOf) and node.mode in ("linear", "shared"):
        return sum(math.prod(s) for s in node.draws[0].array_shapes().values())
    if isinstance(node, FixedLeaf):
        return node.num_fixed
    return node.num_params + node.num_fixed


def choose_forms(model, mode: str) -> dict[str, str]:
    """layer name -> "folded" or "factored" for every decomposed layer."""
    from .layers import _Decomposed

    if mode not in MODES:
        raise DecompError(f"mode must be one of {MODES}, got {mode!r}")
    forms = {}
    for layer in model.layers:
        if not isinstance(layer, _Decomposed):
            continue
        if mode != "auto":
            forms[layer.name] = mode
            continue
        node = layer.node
        folded, factored = math.prod(node.shape), stored_entries(node)
        if factored != folded:
            forms[layer.name] = "factored" if factored < folded else "folded"
        else:
            cheaper = node.flops(1, "apply") < node.flops(1, "materialize")
            forms[layer.name] = "factored" if cheaper else "folded"
    return forms


def inference_model(model, forms: dict[str, str]):
    """A copy of ``model`` with folded layers as plain Keras layers holding W,
    and factored layers forced to apply mode."""
    import keras

    from .layers import _Decomposed, tying

    def clone(layer):
        config = layer.get_config()
        if layer.name in forms and forms[layer.name] == "folded":
            return _plain_class(layer).from_config(_plain_config(layer, config))
        if layer.name in forms:
            config["mode"] = "apply"
        return layer.__class__.from_config(config)

    with tying():
        copy = keras.models.clone_model(model, clone_function=clone)
    for old, new in zip(model.layers, copy.layers):
        if isinstance(old, _Decomposed) and forms.get(old.name) == "folded":
            kernel = keras.ops.convert_to_numpy(old.materialize()).reshape(new.kernel.shape)
            new.kernel.assign(kernel)
            if old.bias is not None:
                new.bias.assign(keras.ops.convert_to_numpy(old.bias))
        else:
            new.set_weights(old.get_weights())
    return copy


def _plain_class(layer):
    import keras
    return keras.layers.Conv2D if type(layer).__name__ == "Conv2D" else keras.layers.Dense


def _plain_config(layer, config: dict) -> dict:
    drop = {"W", "params", "seed", "mode", "stage", "fixed_dtype", "tied", "fixed"}
    return {k: v for k, v in config.items() if k not in drop}


def export(model, path, format: str = "tflite", mode: str = "auto", quantize: str | None = None,
           representative_data=None, sample=None, check: bool = True) -> dict:
    """Write ``model`` as a SavedModel folder or a ``.tflite`` file; check it.

    ``sample``: inputs to compare on (default: 32 random inputs);
    ``representative_data``: inputs for full int8 calibration.  Returns a
    report: path, bytes, forms per layer, parameters stored, and where
    checked, max abs difference, top-1 agreement and batch-1 latency.
    """
    if format not in ("tflite", "saved_model"):
        raise DecompError(f"format must be 'tflite' or 'saved_model', got {format!r}")
    if quantize not in QUANTIZE:
        raise DecompError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if quantize == "int8" and representative_data is None:
        raise DecompError("quantize='int8' needs representative_data: a few hundred typical inputs")
    if quantize and format == "saved_model":
        raise DecompError("quantization applies to TFLite files only", hint="use format='tflite'")
    forms = choose_forms(model, mode)
    prepared = inference_model(model, forms)
    path = Path(path)
    sample = _sample(model, sample)
    report = {"path": str(path), "format": format, "mode": mode, "quantize": quantize, "forms": forms,
              "parameters_stored": _stored(prepared, forms, model)}
    if format == "saved_model":
        prepared.export(str(path), format="tf_saved_model", verbose=False)
        report["bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if check:
            report.update(_check_saved_model(path, model, sample))
        return report
    content = _convert(prepared, quantize, representative_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
    report["bytes"] = len(content)
    if check:
        report.update(check_tflite(path, model, sample))
    return report


def _stored(prepared, forms, model) -> int:
    from .layers import _Decomposed
    total = 0
    for layer in model.layers:
        if isinstance(layer, _Decomposed) and forms.get(layer.name) == "factored":
            total += stored_entries(layer.node) + (layer.bias.shape[0] if layer.bias is not None else 0)
        else:
            total += layer.count_params() if not isinstance(layer, _Decomposed) else \
                math.prod(layer.node.shape) + (layer.bias.shape[0] if layer.bias is not None else 0)
    return total


def _sample(model, sample):
    if sample is not None:
        return np.asarray(sample, dtype="float32")
    shape = tuple(d for d in model.input_shape[1:])
    return np.random.default_rng(0).random((32,) + shape).astype("float32")


def _convert(prepared, quantize, representative_data) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as folder:
        prepared.export(folder, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        if quantize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "int8":
            data = np.asarray(representative_data, dtype="float32")
            converter.representative_dataset = lambda: ([row[None]] for row in data[:300])
        return converter.convert()


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(path, x: np.ndarray) -> np.ndarray:
    """The TFLite file's outputs for the rows of ``x``, one at a time (batch 1)."""
    interpreter = _interpreter(path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None].astype(inp["dtype"]))
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(rows)


def latency(path, x: np.ndarray, runs: int = 200, warmup: int = 20) -> float:
    """Median seconds of one batch-1 invoke, 1 thread, after warm-up."""
    interpreter = _interpreter(path)
    inp = interpreter.get_input_details()[0]
    interpreter.set_tensor(inp["index"], x[:1].astype(inp["dtype"]))
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _compare(reference, got) -> dict:
    reference, got = np.asarray(reference, dtype=np.float64), np.asarray(got, dtype=np.float64)
    agree = float(np.mean(np.argmax(reference, -1) == np.argmax(got, -1))) if reference.ndim > 1 else 1.0
    return {"max_abs_diff": float(np.max(np.abs(reference - got))), "top1_agreement": agree}


def check_tflite(path, model, sample) -> dict:
    reference = np.asarray(model(sample))
    return {**_compare(reference, run_tflite(path, sample)), "latency_s": latency(path, sample)}


def _check_saved_model(path, model, sample) -> dict:
    import keras
    reloaded = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
    return _compare(np.asarray(model(sample)), np.asarray(reloaded(sample)))


def export_from_spec(model, section: dict, out, sample=None, representative_data=None) -> dict:
    """The spec's ``export:`` section ({tflite: {mode, quantize}, saved_model: {mode}})
    written under ``out``; returns the reports by format."""
    reports = {}
    for fmt, options in section.items():
        options = dict(options or {})
        name = "model.tflite" if fmt == "tflite" else "saved_model"
        reports[fmt] = export(model, Path(out) / name, format=fmt, sample=sample,
                              representative_data=representative_data, **options)
    return reports


def format_report(report: dict) -> str:
    """One line per fact of an export report, for people."""
    lines = [f"{report['format']} -> {report['path']}: {report['bytes']:,} bytes, "
             f"{report['parameters_stored']:,} parameters stored"]
    forms = ", ".join(f"{k}={v}" for k, v in report["forms"].items())
    if forms:
        lines.append(f"  forms: {forms}")
    if "max_abs_diff" in report:
        lines.append(f"  vs Keras: max abs diff {report['max_abs_diff']:.2e}, "
                     f"top-1 agreement {100 * report['top1_agreement']:.2f}%")
    if "latency_s" in report:
        lines.append(f"  batch-1 latency (median of 200, 1 thread): {1e6 * report['latency_s']:.1f} us")
    return "\n".join(lines)
