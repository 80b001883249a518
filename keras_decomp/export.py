"""SavedModel and TFLite export, checked against Keras.

Per decomposed layer, ``mode`` picks the form written to the file:
- "folded": W multiplied out once (in float64) into the kernel of a plain Keras
  layer: the file is a dense model;
- "factored": the layer forced to its apply form (x U then V, SSS recursions,
  sparse factors), so every constant meets the input before it meets another
  constant and the converter has no product of constants to fold back into a
  dense kernel; ``stored_entries`` predicts what the file keeps, sub-products
  that are cheaper materialised (and a transpose, which has no apply of its
  own) included;
- "auto": per layer, with ``prefer="size"`` (the default: free and the same on
  every machine) the form whose file keeps fewer numbers, ties broken by FLOPs
  at batch 1; with ``prefer="speed"`` the form whose one-layer file runs faster
  at batch 1 here (each layer exported both ways and timed: seconds per layer).
A TFLite file is traced at batch 1 (the sub-products' forms are chosen for one
row, as ``stored_entries`` assumes), runs in the LiteRT interpreter and is
compared with the Keras model; a SavedModel keeps a dynamic batch and is
reloaded with ``keras.layers.TFSMLayer`` and compared.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from .training import atomic
from .errors import DecompError
from .operators.fixed import FixedLeaf
from .operators.ir import Add, Node, Product, Scale, Slice, Tile, Transpose
from .operators.structures.kron import Kron
from .operators.structures.basic import SumOf

MODES = ("folded", "factored", "auto")
PREFER = ("size", "speed")
QUANTIZE = (None, "dynamic", "int8")


def stored_entries(node: Node, forced: bool = True, batch: int = 1) -> int:
    """Numbers a TFLite file keeps for ``node`` in apply form, once the converter
    has folded every subgraph that depends on constants only.

    Each sub-node below runs as ``best_apply`` picks for ``batch`` rows (a TFLite
    file is traced at batch 1: one row for a Dense layer on vectors):
    materialised, then folded into one dense constant of its shape, where that
    costs no more FLOPs, else in its own apply form.  ``forced``: ``node``
    itself runs in apply form (a layer forced to mode="apply").

    >>> from keras_decomp import parse
    >>> stored_entries(parse("lowrank(r=8)", 512, 512).stages[0])  # u and v, not W
    8192
    >>> stored_entries(parse("lowrank(r=8)'", 512, 512).stages[0])  # x W^T: W^T is folded
    262144
    """
    def below(child):
        return stored_entries(child, False, batch)

    if not forced and node.choose(batch) == "materialize":
        return math.prod(node.shape)
    if isinstance(node, Transpose):  # no apply of its own: x @ transpose(materialize(child))
        return math.prod(node.shape)
    if isinstance(node, (Product, Add, Tile)):  # each child by its best_apply
        return sum(below(c) for c in node.children())
    if isinstance(node, (Scale, Slice)):
        return below(node.children()[0]) + (1 if isinstance(node, Scale) else 0)
    if isinstance(node, Kron):  # one einsum with both factors materialised
        return math.prod(node.a.shape) + math.prod(node.b.shape)
    if isinstance(node, SumOf):
        if node.mode in ("linear", "shared"):  # sum_j c_j E_j folds into one draw's arrays
            return sum(math.prod(s) for s in node.draws[0].array_shapes().values()) + (node.mode == "shared")
        if node.mode is None:  # draw by draw, then one tensordot with c
            return sum(below(d) for d in node.draws) + len(node.draws)
    if isinstance(node, FixedLeaf):
        return node.num_fixed
    # dense, diag, lowrank, rank-1 sums and the structures with a module of their own
    # (sss, sketch, sparse, tri): the apply form multiplies x by their own arrays
    return node.num_params + node.num_fixed


def layer_entries(layer) -> int:
    """Numbers a factored TFLite file keeps for a decomposed layer's kernel (not
    its bias), traced at batch 1.

    A Dense or EinsumDense layer applies W to as many rows as one input (batch 1)
    has positions outside the contracted axes.  A convolution in apply mode
    convolves with the first factor of a product or lowrank (materialised as the conv
    kernel) and applies the rest to the channels of every output position; any
    other kernel is materialised."""
    from .layers.base import conv_factors

    node = layer.node
    shape = _input_shape(layer)
    if type(layer).__name__ not in ("Conv1D", "Conv2D"):
        return stored_entries(node, True, _rows(layer, shape))
    factors = conv_factors(node)
    if not factors:
        return math.prod(node.shape)
    first = factors[0]
    rest = factors[1] if len(factors) == 2 else Product((first.shape[1], node.shape[1]), factors=factors[1:])
    out = layer.compute_output_shape((1,) + tuple(shape[1:]))
    spatial = out[1:-1] if layer.data_format == "channels_last" else out[2:]
    return math.prod(first.shape) + stored_entries(rest, False, math.prod(d or 1 for d in spatial))


def _input_shape(layer) -> tuple:
    from .layers.convert import input_shape_of

    return input_shape_of(layer)


def _rows(layer, shape) -> int:
    """Rows the kernel matrix meets for one input: the input's positions outside its
    contracted axes (its last axis for Dense)."""
    spec = getattr(layer, "spec", None)
    if spec is not None:  # EinsumDense
        batch_axes = [a for a in spec.input_perm[:len(spec.input_perm) - spec.num_contracted] if a != 0]
        return math.prod(shape[a] or 1 for a in batch_axes)
    return math.prod(d or 1 for d in shape[1:-1])


def _decomposed(model):
    """(relative path, layer) of every decomposed layer of ``model``, at any depth."""
    from .layers.base import _Decomposed
    from .layers.surgery import relative_path, walk

    return [(relative_path(model, layer), layer) for layer, _, _ in walk(model) if isinstance(layer, _Decomposed)]


def choose_forms(model, mode: str, prefer: str = "size") -> dict[str, str]:
    """layer path -> "folded" or "factored" for every decomposed layer, at any depth.

    >>> import keras
    >>> from keras_decomp.layers import Dense
    >>> model = keras.Sequential([keras.Input((784,)), Dense(10, W="DCT2[:100] dense", name="dct"),
    ...                           Dense(512, W="lowrank(r=8)", name="low")])
    >>> choose_forms(model, "auto")  # 78400 + 1000 numbers against 7840; 4176 against 5120
    {'dct': 'folded', 'low': 'factored'}
    """
    if mode not in MODES:
        raise DecompError(f"mode must be one of {MODES}, got {mode!r}",
                          hint="folded: W as one constant; factored: the factors kept; "
                               "auto: per layer, whichever keeps fewer numbers")
    if prefer not in PREFER:
        raise DecompError(f"prefer must be one of {PREFER}, got {prefer!r}",
                          hint="size: fewer stored numbers; speed: the faster file at batch 1, measured")
    forms = {}
    for path, layer in _decomposed(model):
        if mode != "auto":
            forms[path] = mode
            continue
        if prefer == "speed":
            forms[path] = _faster_form(layer)
            continue
        node = layer.node
        folded, factored = math.prod(node.shape), layer_entries(layer)
        if factored != folded:
            forms[path] = "factored" if factored < folded else "folded"
        else:
            cheaper = node.flops(1, "apply") < node.flops(1, "materialize")
            forms[path] = "factored" if cheaper else "folded"
    return forms


def _faster_form(layer) -> str:
    """"folded" or "factored": the one whose TFLite file of ``layer`` alone runs faster
    at batch 1 on this machine (unknown input sizes taken as 1)."""
    import keras

    shape = (1,) + tuple(d or 1 for d in _input_shape(layer)[1:])
    copy = type(layer).from_config(layer.get_config())  # its own path: forms are keyed by path
    alone = keras.Sequential([keras.Input(batch_shape=shape), copy])
    copy.set_weights(layer.get_weights())
    x = np.random.default_rng(0).random(shape).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        seconds = {form: latency(export(alone, f"{folder}/{form}.tflite", mode=form, check=False)["path"], x, runs=50)
                   for form in ("folded", "factored")}
    return min(seconds, key=seconds.get)


def inference_model(model, forms: dict[str, str]):
    """A copy of ``model`` with folded layers as plain Keras layers holding W,
    and factored layers forced to apply mode (``layers.fold``)."""
    from .layers.fold import fold

    import keras

    from .layers import surgery

    prepared = fold(model, forms)
    for layer, parents, _ in surgery.walk(prepared):
        if training_only(layer):  # identity at inference: left out, so no random op reaches the file
            identity = keras.layers.Identity(name=layer.name)
            surgery.build_like(identity, layer)
            surgery.replace(parents, layer, identity)
    return prepared


def training_only(layer) -> bool:
    """A Keras augmentation layer (RandomFlip, RandomTranslation, ...): it changes training
    batches and passes inputs through unchanged at inference."""
    import keras

    name = type(layer).__name__
    return name.startswith("Random") and getattr(keras.layers, name, None) is type(layer)


def export(model, path, format: str = "tflite", mode: str = "auto", quantize: str | None = None,
           representative_data=None, sample=None, check: bool = True, labels=None, prefer: str = "size") -> dict:
    """Write ``model`` as a SavedModel folder or a ``.tflite`` file; check it.

    ``sample``: inputs to compare on (default: 32 random inputs); ``labels``:
    their classes, to report both models' accuracy; ``representative_data``:
    inputs for full int8 calibration.  Returns a report: path, bytes, forms
    per layer, parameters stored, and where checked, max abs difference, top-1
    agreement and batch-1 latency.  A TFLite file is traced at batch 1.  ``prefer``
    ("size" or "speed") is what ``mode="auto"`` chooses by (see the module's text).

    >>> import keras, tempfile
    >>> from keras_decomp.layers import Dense
    >>> model = keras.Sequential([keras.Input((64,)), Dense(64, W="lowrank(r=4)", name="low")])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     report = export(model, folder + "/low.tflite", mode="auto")
    >>> report["forms"], report["parameters_stored"], report["max_abs_diff"] < 1e-5
    ({'low': 'factored'}, 576, True)
    """
    if format not in ("tflite", "saved_model"):
        raise DecompError(f"format must be 'tflite' or 'saved_model', got {format!r}",
                          hint="'tflite' writes one .tflite file, 'saved_model' a folder")
    if quantize not in QUANTIZE:
        raise DecompError(f"quantize must be one of {QUANTIZE}, got {quantize!r}",
                          hint="None keeps float32; 'dynamic' stores int8 weights; 'int8' also "
                               "computes in int8, calibrated on representative_data")
    if quantize == "int8" and representative_data is None:
        raise DecompError("quantize='int8' needs representative_data: a few hundred typical inputs",
                          hint="pass e.g. 300 training inputs, or use quantize='dynamic'")
    if quantize and format == "saved_model":
        raise DecompError("quantization applies to TFLite files only", hint="use format='tflite'")
    forms = choose_forms(model, mode, prefer)
    prepared = inference_model(model, forms)
    path = Path(path)
    sample = _sample(model, sample)
    report = {"path": str(path), "format": format, "mode": mode, "prefer": prefer, "quantize": quantize, "forms": forms,
              "parameters_stored": _stored(forms, model, format)}
    if format == "saved_model":
        prepared.export(str(path), format="tf_saved_model", verbose=False)
        report["bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if check:
            report.update(_check_saved_model(path, model, sample, labels))
        return report
    content = _convert(prepared, quantize, representative_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, content)
    report["bytes"] = len(content)
    if check:
        report.update(check_tflite(path, model, sample, labels))
    return report


def _stored(forms, model, format: str) -> int:
    """Numbers the file keeps.  A TFLite file: what the converter leaves (see
    ``layer_entries``); a SavedModel keeps a factored layer's variables as they
    are, every fixed array included, and folds nothing."""
    total = model.count_params()
    for path, layer in _decomposed(model):
        total -= layer.count_params()
        bias = math.prod(layer.bias.shape) if layer.bias is not None else 0
        if forms.get(path) != "factored":
            total += math.prod(layer.node.shape) + bias
        elif format == "tflite":
            total += layer_entries(layer) + bias
        else:
            total += layer.node.num_params + sum(math.prod(a.shape) for a in layer._fixed.arrays.values()) + bias
    return total


def _sample(model, sample):
    if sample is not None:
        return np.asarray(sample, dtype="float32")
    shape = tuple(d for d in model.input_shape[1:])
    return np.random.default_rng(0).random((32,) + shape).astype("float32")


def _convert(prepared, quantize, representative_data) -> bytes:
    import keras
    import tensorflow as tf

    # Traced at batch 1, the device's batch: every sub-product then takes the form
    # that is cheaper at batch 1, which is what stored_entries counts (at an unknown
    # batch the IR plans for 128 rows and materialises more, e.g. A1*a + B1*b).
    (spec,) = prepared.inputs
    signature = [keras.InputSpec(shape=(1,) + tuple(spec.shape[1:]), dtype=spec.dtype)]
    with tempfile.TemporaryDirectory() as folder:
        prepared.export(folder, format="tf_saved_model", verbose=False, input_signature=signature)
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


def _compare(reference, got, labels=None) -> dict:
    reference, got = np.asarray(reference, dtype=np.float64), np.asarray(got, dtype=np.float64)
    agree = float(np.mean(np.argmax(reference, -1) == np.argmax(got, -1))) if reference.ndim > 1 else 1.0
    out = {"max_abs_diff": float(np.max(np.abs(reference - got))), "top1_agreement": agree}
    if labels is not None and reference.ndim > 1:
        labels = np.asarray(labels).reshape(-1)
        out["accuracy"] = {"keras": float(np.mean(np.argmax(reference, -1) == labels)),
                           "exported": float(np.mean(np.argmax(got, -1) == labels)), "images": len(labels)}
    return out


def check_tflite(path, model, sample, labels=None) -> dict:
    """The file's outputs on ``sample`` (batch 1, LiteRT) against Keras's, and its latency."""
    reference = np.asarray(model(sample, training=False))  # inference: augmentation layers pass through
    return {**_compare(reference, run_tflite(path, sample), labels), "latency_s": latency(path, sample)}


def _check_saved_model(path, model, sample, labels=None) -> dict:
    import keras
    reloaded = keras.layers.TFSMLayer(str(path), call_endpoint="serve")
    return _compare(np.asarray(model(sample, training=False)), np.asarray(reloaded(sample)), labels)


def export_from_spec(model, section: dict, out, sample=None, representative_data=None, labels=None) -> dict:
    """The spec's ``export:`` section ({tflite: {mode, quantize, prefer}, saved_model: {mode}})
    written under ``out``; returns the reports by format."""
    reports = {}
    for fmt, options in section.items():
        options = dict(options or {})
        name = "model.tflite" if fmt == "tflite" else "saved_model"
        reports[fmt] = export(model, Path(out) / name, format=fmt, sample=sample, labels=labels,
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
    if "accuracy" in report:
        accuracy = report["accuracy"]
        lines.append(f"  test accuracy on {accuracy['images']} images: Keras {accuracy['keras']:.4f}, "
                     f"exported {accuracy['exported']:.4f}")
    if "latency_s" in report:
        lines.append(f"  batch-1 latency (median of 200, 1 thread): {1e6 * report['latency_s']:.1f} us")
    return "\n".join(lines)
