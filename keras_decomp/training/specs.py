"""YAML model specs -> a checked ``Spec`` (``builder.py`` makes the ``keras.Model``).

A spec names its layers by Keras's own class names and arguments, and adds
``W:`` where a kernel is decomposed.  YAML is read with ``safe_load`` only
(yaml_source.py).  Every error names the file, line and key path:
``specs/x.yaml:7 layers[1].Conv2D.W: ...``.

>>> spec = load_spec('''
... input: {shape: [16]}
... layers:
...   - Dense: {units: 8, activation: relu, W: "lowrank(r=2)"}
...   - Dense: {units: 3}
... ''')
>>> spec.input_shape, [layer.class_name for layer in spec.layers], spec.num_stages
((16,), ['Dense', 'Dense'], 1)
"""

from __future__ import annotations

import difflib
import inspect
import re

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DATASETS, SOURCES
from ..errors import DecompError, SpecError
from .yaml_source import read_text, read_yaml

TOP_KEYS = ("name", "description", "seed", "input", "params", "fixed", "layers", "data", "train",
            "stages", "export", "reference")
TRAIN_KEYS = ("batch_size", "optimizer", "learning_rate", "epochs", "loss", "from_logits", "metrics",
              "label_smoothing", "callbacks", "use_ema")
STAGE_KEYS = ("epochs", "learning_rate", "batch_size", "optimizer", "label_smoothing", "callbacks", "use_ema")
DATA_KEYS = ("name", "source", "limit", "validation")
EXPORT_KEYS = ("tflite", "saved_model")
DECOMPOSED = ("Dense", "EinsumDense", "Conv1D", "Conv2D")
DECLARABLE = ("G", "S", "R", "D", "P", "F")  # the bases a fixed: declaration may name (lower.declared_leaf)

_COUNT = ("a positive integer", (int,), True)
# A key of data:, train: or stages[i]: -> (what its value must be, its types, whether it must be > 0).
VALUE_KINDS = {"epochs": _COUNT, "batch_size": _COUNT, "limit": _COUNT, "validation": _COUNT,
               "learning_rate": ("a positive number or a schedule {ClassName: {argument: value}}",
                                 (int, float, dict), False),
               "optimizer": ("a name or a mapping {ClassName: {argument: value}}", (str, dict), False),
               "label_smoothing": ("a number in [0, 1)", (int, float), False),
               "callbacks": ("a list such as [{EarlyStopping: {patience: 3}}]", (list,), False),
               "use_ema": ("true or false", (bool,), False),
               "loss": ("a string", (str,), False), "metrics": ("a list", (list,), False),
               "from_logits": ("true or false", (bool,), False)}
TYPE_NAMES = {int: "an integer", str: "a string", dict: "a mapping", list: "a list"}
DEFAULT_INPUTS = {"fashion_mnist": [28, 28, 1], "mnist": [28, 28, 1]}


@dataclass(frozen=True)
class LayerSpec:
    class_name: str
    config: dict
    path: str  # key path, e.g. "layers[1].Conv2D"


@dataclass(frozen=True)
class Spec:
    """A checked model spec."""

    name: str
    seed: int
    input_shape: tuple[int, ...]
    params: dict
    fixed: dict
    layers: tuple[LayerSpec, ...]
    data: dict
    train: dict
    stages: tuple[dict, ...]
    export: dict
    source: str = "<spec>"
    folder: Path = field(default_factory=Path.cwd)
    lines: dict = field(default_factory=dict, repr=False, compare=False)
    reference: Path | None = None  # the dense reference's spec file (``reference:``), for sweeps

    @property
    def num_stages(self) -> int:
        """The most ``|`` stages of any decomposed layer (1 if none)."""
        from ..language.parse import parse_syntax
        counts = [len(parse_syntax(layer.config["W"]).stages) for layer in self.layers if "W" in layer.config]
        return max(counts, default=1)

    def error(self, path: str, message: str, hint: str | None = None) -> SpecError:
        """A SpecError located at ``path`` (file:line key.path: message); a key that is
        not in the file takes the line of the nearest enclosing one."""
        up, line = path, self.lines.get(path)
        while line is None and up:
            up = up.rsplit(".", 1)[0] if "." in up else up.rsplit("[", 1)[0] if "[" in up else ""
            line = self.lines.get(up)
        where = f"{self.source}:{line}" if line else self.source
        return SpecError(f"{where} {path}: {message}" if path else f"{where}: {message}", hint=hint)


def load_spec(spec, allow_files_outside: bool = False) -> Spec:
    """A YAML path, YAML text or dict -> a checked ``Spec``.

    A ``fixed: {C: {file: basis.npy}}`` file must lie under the spec's folder (the
    working directory for YAML text or a dict), so that a spec from elsewhere cannot
    read arbitrary files; ``allow_files_outside=True`` (``keras-decomp train
    --allow-files-outside``) lifts that for a spec you trust.  Files are read with
    ``numpy.load(allow_pickle=False)`` either way.
    """
    source, folder, lines = "<spec>", Path.cwd(), {}
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and spec.endswith((".yaml", ".yml"))):
        path = Path(spec)
        if not path.is_file():
            near = _nearest(path.name, [p.name for p in path.parent.glob("*.y*ml")]) if path.parent.is_dir() else None
            raise SpecError(f"{path}: no such spec file", hint=near)
        source, folder, text = str(path), path.resolve().parent, read_text(path)
        data, lines = read_yaml(text, source)
    elif isinstance(spec, str):
        data, lines = read_yaml(spec, source)
    elif isinstance(spec, dict):
        data = spec
    else:
        raise SpecError(f"a spec is a YAML path, YAML text or a dict, not {type(spec).__name__}")
    return _check(data, source, folder, lines, allow_files_outside)


def _nearest(word: str, choices) -> str | None:
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


def _check(data, source, folder, lines, allow_files_outside=False) -> Spec:
    probe = Spec("", 0, (), {}, {}, (), {}, {}, (), {}, source, folder, lines)
    if not isinstance(data, dict):
        raise probe.error("", f"a spec must be a mapping of keys, got {type(data).__name__}",
                          "a path must exist and end in .yaml" if isinstance(data, str) else None)
    for key in data:
        if key not in TOP_KEYS:
            raise probe.error(str(key), f"unknown key '{key}'", _nearest(key, TOP_KEYS) or
                              "valid keys: " + ", ".join(TOP_KEYS))
    name = _typed(probe, data, "name", str, "model")
    seed = _typed(probe, data, "seed", int, 0)
    params = _typed(probe, data, "params", dict, {})
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise probe.error(f"params.{key}", f"a parameter must be a number, got {value!r}")
    data_cfg = _typed(probe, data, "data", dict, {})
    _known_keys(probe, data_cfg, "data", DATA_KEYS, {"name": DATASETS, "source": SOURCES})
    train = _typed(probe, data, "train", dict, {})
    _known_keys(probe, train, "train", TRAIN_KEYS)
    _check_recipe(probe, train, "train", data_cfg)
    stages = _typed(probe, data, "stages", list, [])
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise probe.error(f"stages[{i}]", "a stage is a mapping such as {epochs: 3}")
        _known_keys(probe, stage, f"stages[{i}]", STAGE_KEYS)
        _check_recipe(probe, {**train, **stage}, f"stages[{i}]", data_cfg, own=stage)
    export = _typed(probe, data, "export", dict, {})
    _check_export(probe, export)
    fixed = _check_fixed(probe, _typed(probe, data, "fixed", dict, {}), folder, allow_files_outside)
    input_shape = _check_input(probe, data, data_cfg)
    layers = _check_layers(probe, data)
    spec = Spec(name, seed, input_shape, params, fixed, layers, data_cfg, train, tuple(stages), export,
                source, folder, lines,
                reference=_check_reference(probe, _typed(probe, data, "reference", str, None), folder))
    if stages and len(stages) != spec.num_stages:
        raise spec.error("stages", f"{len(stages)} stage entries, but the layers have {spec.num_stages} "
                                   "'|' stage(s)", "give one entry per stage of the longest expression")
    return spec


def _typed(spec, data, key, kind, default):
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise spec.error(key, f"must be {TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}")
    return value


def _known_keys(spec, mapping, path, valid, choices=None):
    """Unknown keys get the nearest valid one suggested; known ones are type-checked,
    and checked against ``choices`` (key -> valid values) where it has them."""
    for key, value in mapping.items():
        if key not in valid:
            raise spec.error(f"{path}.{key}", f"unknown key '{key}'",
                             _nearest(key, valid) or "valid keys: " + ", ".join(valid))
        what, types, positive = VALUE_KINDS.get(key, (None, (object,), False))
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) or (positive and value <= 0):
            hint = ("YAML reads 1e-3 as text: write 1.0e-3" if isinstance(value, str) and
                    re.fullmatch(r"[-+]?[0-9.]+e[-+]?[0-9]+", value) else None)
            raise spec.error(f"{path}.{key}", f"must be {what}, got {value!r}", hint)
        if key in (choices or {}) and value not in list(choices[key]):  # a list or dict value is unhashable
            raise spec.error(f"{path}.{key}", f"unknown {key} {value!r}",
                             _nearest(value, choices[key]) or "one of: " + ", ".join(choices[key]))


def _check_recipe(spec, settings: dict, path: str, data_cfg: dict, own: dict | None = None) -> None:
    """Build the training objects of ``settings`` once (recipe.check), placing a mistake at
    its key under ``path``; ``own`` is what a stage sets itself (its errors are its own)."""
    from . import recipe

    try:
        recipe.check(settings, path)
    except SpecError as err:
        key, _, fact = err.fact.partition(": ")
        if own is not None and key.split(".")[0].split("[")[0] not in own:
            return  # the train: section's own mistake, reported there
        raise spec.error(f"{path}.{key}", fact, err.hint) from None
    if recipe.monitors_validation(settings) and not data_cfg.get("validation"):
        raise spec.error(f"{path}.callbacks", "a callback watches a validation metric, but the spec has no "
                         "validation split: it would choose on the test set",
                         "hold out part of the training set with data.validation (e.g. 5000), or watch "
                         "a training metric (monitor: loss)")


def _check_reference(spec, reference, folder: Path) -> Path | None:
    """``reference: linear_dense.yaml``: the dense reference's spec, beside this one.  Whether
    it exists is checked where it is used (``sweep``): a spec copied alone still loads."""
    if reference is None:
        return None
    if not reference.endswith((".yaml", ".yml")):
        raise spec.error("reference", f"must name a spec file (.yaml), got {reference!r}",
                         "e.g. reference: linear_dense.yaml")
    return folder / reference


def _check_export(spec, export) -> None:
    _known_keys(spec, export, "export", EXPORT_KEYS)
    for fmt, options in export.items():
        if options is None:
            continue
        if not isinstance(options, dict):
            raise spec.error(f"export.{fmt}", "must be a mapping such as {mode: auto}")
        _known_keys(spec, options, f"export.{fmt}", ("mode", "quantize", "prefer") if fmt == "tflite" else ("mode",))
        if options.get("mode", "auto") not in ("folded", "factored", "auto"):
            raise spec.error(f"export.{fmt}.mode", f"must be folded, factored or auto, got {options['mode']!r}")
        if options.get("quantize") not in (None, "dynamic", "int8"):
            raise spec.error(f"export.{fmt}.quantize", f"must be dynamic or int8, got {options['quantize']!r}")
        if options.get("prefer", "size") not in ("size", "speed"):
            raise spec.error(f"export.{fmt}.prefer", f"must be size or speed, got {options['prefer']!r}")


def _check_fixed(spec, fixed, folder, allow_outside=False) -> dict:
    out = {}
    for name, decl in fixed.items():
        path = f"fixed.{name}"
        if not str(name)[:1].isupper():
            raise spec.error(path, f"a fixed matrix name starts with an uppercase letter, got '{name}'")
        if not isinstance(decl, dict) or len(decl) != 1 or next(iter(decl)) not in ("basis", "file"):
            key = next(iter(decl)) if isinstance(decl, dict) and len(decl) == 1 else None
            raise spec.error(path, "declare a fixed matrix as {basis: R} or {file: basis.npy}",
                             _nearest(key, ("basis", "file")) if key is not None else None)
        if "file" in decl:
            out[name] = {"file": str(_basis_file(spec, f"{path}.file", folder, decl["file"], allow_outside))}
        elif decl["basis"] not in DECLARABLE:
            raise spec.error(f"{path}.basis", f"unknown basis {decl['basis']!r}",
                             _nearest(decl["basis"], DECLARABLE) or "a declared basis is one of " + ", ".join(DECLARABLE))
        else:
            out[name] = {"basis": decl["basis"]}
    return out


def _basis_file(spec, path, folder: Path, file, allow_outside=False) -> Path:
    """A basis file: under the spec's folder unless ``allow_outside``; a 2-D array of
    finite numbers in .npy format (never a pickle)."""
    target = (folder / str(file)).resolve()
    if not allow_outside and folder.resolve() not in target.parents:
        raise spec.error(path, f"the file {file} lies outside the spec's folder {folder}",
                         "put basis files beside the spec, or allow it for a spec you trust: "
                         "load_spec(path, allow_files_outside=True), keras-decomp train --allow-files-outside")
    if not target.is_file():
        raise spec.error(path, f"no such file: {target}")
    try:
        matrix = np.load(target, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise spec.error(path, f"{file} is not a .npy array file: {_first_line(err)}", "save it with numpy.save") from None
    if matrix.ndim != 2:
        raise spec.error(path, f"{file} holds an array of shape {matrix.shape}, not a matrix")
    if not np.issubdtype(matrix.dtype, np.number) or np.issubdtype(matrix.dtype, np.complexfloating):
        raise spec.error(path, f"{file} holds {matrix.dtype} values, not real numbers")
    bad = int(matrix.size - np.count_nonzero(np.isfinite(matrix)))
    if bad:
        raise spec.error(path, f"{file} holds {bad} NaN or infinite entries", "a basis must be finite")
    return target


def _check_input(spec, data, data_cfg) -> tuple[int, ...]:
    raw = data.get("input")
    if raw is None:
        shape = DEFAULT_INPUTS.get(data_cfg.get("name"))
        if shape is None:
            raise spec.error("input", "the spec needs an input shape", "add: input: {shape: [28, 28, 1]}")
        return tuple(shape)
    if not isinstance(raw, dict) or set(raw) != {"shape"}:
        wrong = [k for k in raw if k != "shape"] if isinstance(raw, dict) else []
        raise spec.error(f"input.{wrong[0]}" if wrong else "input", "input must be a mapping with the one key 'shape'",
                         (_nearest(wrong[0], ["shape"]) if wrong else None) or "input: {shape: [28, 28, 1]}")
    shape = raw["shape"]
    if not isinstance(shape, list) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise spec.error("input.shape", f"must be a list of positive integers, got {shape!r}")
    return tuple(shape)


def _check_layers(spec, data) -> tuple[LayerSpec, ...]:
    import keras

    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise spec.error("layers", "a spec needs a non-empty list of layers",
                         "layers:\n  - Dense: {units: 10}")
    out, names = [], set()
    for i, item in enumerate(layers):
        path = f"layers[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise spec.error(path, "each layer is a one-key mapping: {ClassName: {arguments}}",
                             "e.g. - Dense: {units: 10}")
        class_name, config = next(iter(item.items()))
        path = f"{path}.{class_name}"
        config = {} if config is None else config
        if not isinstance(config, dict):
            raise spec.error(path, f"the arguments of {class_name} must be a mapping, got {config!r}")
        cls = getattr(keras.layers, str(class_name), None)
        if not (inspect.isclass(cls) and issubclass(cls, keras.layers.Layer)):
            raise spec.error(path, f"unknown layer class '{class_name}'",
                             _nearest(class_name, [n for n in dir(keras.layers) if n[:1].isupper()]))
        if ("W" in config or "params" in config) and class_name not in DECOMPOSED:
            key = "W" if "W" in config else "params"
            raise spec.error(f"{path}.{key}", f"only {', '.join(DECOMPOSED[:-1])} and {DECOMPOSED[-1]} layers take '{key}'")
        _check_arguments(spec, path, class_name, config)
        if "W" in config:
            _check_expression(spec, f"{path}.W", config["W"])
        name = config.get("name", _layer_name(class_name, i))
        if name in names:
            raise spec.error(f"{path}.name", f"a second layer named '{name}'", "layer names must be unique")
        names.add(name)
        out.append(LayerSpec(str(class_name), dict(config), path))
    return tuple(out)


def _check_expression(spec, path, text) -> None:
    from ..language.parse import parse_syntax

    if not isinstance(text, str):
        raise spec.error(path, f"an expression must be a string, got {type(text).__name__} {text!r}",
                         'quote it: W: "sum(G, n=8)"')
    try:
        parse_syntax(text)
    except DecompError as err:
        raise _with_path(spec, path, err) from None


def _check_arguments(spec, path, class_name, config) -> None:
    """Unknown arguments get the nearest valid one suggested."""
    import keras
    from .. import layers as kd_layers

    cls = getattr(kd_layers, class_name) if "W" in config else getattr(keras.layers, class_name)
    valid = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            valid |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs", "args")}
    valid |= {"name", "dtype", "trainable", "input_shape", "batch_size", "input_dim", "autocast"}
    for key in config:
        if key not in valid:
            raise spec.error(f"{path}.{key}", f"{class_name} has no argument '{key}'", _nearest(key, valid))


def _layer_name(class_name: str, index: int) -> str:
    """``MaxPooling2D``, 3 -> ``max_pooling2d_3``: Keras's snake case, numbered by position."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=.)(?=[A-Z][a-z])", "_", class_name).lower() + f"_{index}"


def _with_path(spec: Spec, path: str, err: DecompError) -> SpecError:
    located = spec.error(path, str(err))
    return SpecError(located.fact)


def _first_line(err: Exception) -> str:
    """The informative line of an exception (Keras wraps its own in boilerplate)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # Keras colours its messages
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception encountered", "Arguments received", "•"))]
    return (useful or lines or [type(err).__name__])[0]
