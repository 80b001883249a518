"""YAML model specs -> checked ``Spec`` -> ``keras.Model``.

A spec names its layers by Keras's own class names and arguments, and adds
``W:`` where a kernel is decomposed.  Layers are made by Keras's
deserialisation, so any Keras layer works without new code here.  YAML is read
with ``safe_load`` only.  Every error names the file, line and key path:
``specs/x.yaml:7 layers[1].Conv2D.W: ...``.

>>> model = build('''
... input: {shape: [16]}
... layers:
...   - Dense: {units: 8, activation: relu, W: "lowrank(r=2)"}
...   - Dense: {units: 3}
... ''')
>>> model.output_shape, model.count_params()
((None, 3), 83)
"""

from __future__ import annotations

import difflib
import inspect
import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import DecompError, SpecError

TOP_KEYS = ("name", "description", "seed", "input", "params", "fixed", "layers", "data", "train",
            "stages", "export")
TRAIN_KEYS = ("batch_size", "optimizer", "learning_rate", "epochs", "loss", "from_logits", "metrics")
STAGE_KEYS = ("epochs", "learning_rate", "batch_size")
DATA_KEYS = ("name", "source", "limit")
EXPORT_KEYS = ("tflite", "saved_model")
DECOMPOSED = ("Dense", "Conv2D")
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

    @property
    def num_stages(self) -> int:
        """The most ``|`` stages of any decomposed layer (1 if none)."""
        from .parse import parse_syntax
        counts = [len(parse_syntax(layer.config["W"]).stages) for layer in self.layers if "W" in layer.config]
        return max(counts, default=1)

    def error(self, path: str, message: str, hint: str | None = None) -> SpecError:
        """A SpecError located at ``path`` (file:line key.path: message)."""
        line = self.lines.get(path)
        while line is None and path:
            path_up = path.rsplit(".", 1)[0] if "." in path else path.rsplit("[", 1)[0]
            if path_up == path:
                break
            path, line = path_up, self.lines.get(path_up)
        where = f"{self.source}:{line}" if line else self.source
        return SpecError(f"{where} {path}: {message}" if path else f"{where}: {message}", hint=hint)


def load_spec(spec) -> Spec:
    """A YAML path, YAML text or dict -> a checked ``Spec``."""
    source, folder, lines = "<spec>", Path.cwd(), {}
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Path) or (isinstance(spec, str) and "\n" not in spec and spec.endswith((".yaml", ".yml"))):
        path = Path(spec)
        if not path.is_file():
            raise SpecError(f"{path}: no such spec file")
        source, folder, text = str(path), path.resolve().parent, path.read_text()
        data, lines = _read_yaml(text, source)
    elif isinstance(spec, str):
        data, lines = _read_yaml(spec, source)
    elif isinstance(spec, dict):
        data = spec
    else:
        raise SpecError(f"a spec is a YAML path, YAML text or a dict, not {type(spec).__name__}")
    return _check(data, source, folder, lines)


def _read_yaml(text: str, source: str) -> tuple[Any, dict]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SpecError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    lines: dict[str, int] = {}
    if node is not None:
        _record_lines(node, "", lines)
    return data, lines


def _record_lines(node, path: str, lines: dict) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            lines[sub] = key.start_mark.line + 1
            _record_lines(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, f"{path}[{i}]", lines)


def _nearest(word: str, choices) -> str | None:
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


def _check(data, source, folder, lines) -> Spec:
    probe = Spec("", 0, (), {}, {}, (), {}, {}, (), {}, source, folder, lines)
    if not isinstance(data, dict):
        raise probe.error("", f"a spec must be a mapping of keys, got {type(data).__name__}")
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
    _known_keys(probe, data_cfg, "data", DATA_KEYS)
    train = _typed(probe, data, "train", dict, {})
    _known_keys(probe, train, "train", TRAIN_KEYS)
    stages = _typed(probe, data, "stages", list, [])
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise probe.error(f"stages[{i}]", "a stage is a mapping such as {epochs: 3}")
        _known_keys(probe, stage, f"stages[{i}]", STAGE_KEYS)
    export = _typed(probe, data, "export", dict, {})
    _check_export(probe, export)
    fixed = _check_fixed(probe, _typed(probe, data, "fixed", dict, {}), folder)
    input_shape = _check_input(probe, data, data_cfg)
    layers = _check_layers(probe, data)
    spec = Spec(name, seed, input_shape, params, fixed, layers, data_cfg, train, tuple(stages), export,
                source, folder, lines)
    if stages and len(stages) != spec.num_stages:
        raise spec.error("stages", f"{len(stages)} stage entries, but the layers have {spec.num_stages} "
                                   "'|' stage(s)", "give one entry per stage of the longest expression")
    return spec


def _typed(spec, data, key, kind, default):
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise spec.error(key, f"must be a {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _known_keys(spec, mapping, path, valid):
    for key in mapping:
        if key not in valid:
            raise spec.error(f"{path}.{key}", f"unknown key '{key}'",
                             _nearest(key, valid) or "valid keys: " + ", ".join(valid))


def _check_export(spec, export) -> None:
    _known_keys(spec, export, "export", EXPORT_KEYS)
    for fmt, options in export.items():
        if options is None:
            continue
        if not isinstance(options, dict):
            raise spec.error(f"export.{fmt}", "must be a mapping such as {mode: auto}")
        _known_keys(spec, options, f"export.{fmt}", ("mode", "quantize") if fmt == "tflite" else ("mode",))
        if options.get("mode", "auto") not in ("folded", "factored", "auto"):
            raise spec.error(f"export.{fmt}.mode", f"must be folded, factored or auto, got {options['mode']!r}")
        if options.get("quantize") not in (None, "dynamic", "int8"):
            raise spec.error(f"export.{fmt}.quantize", f"must be dynamic or int8, got {options['quantize']!r}")


def _check_fixed(spec, fixed, folder) -> dict:
    out = {}
    for name, decl in fixed.items():
        path = f"fixed.{name}"
        if not str(name)[:1].isupper():
            raise spec.error(path, f"a fixed matrix name starts with an uppercase letter, got '{name}'")
        if not isinstance(decl, dict) or len(decl) != 1 or next(iter(decl)) not in ("basis", "file"):
            raise spec.error(path, "declare a fixed matrix as {basis: R} or {file: basis.npy}")
        if "file" in decl:
            out[name] = {"file": str(_inside(spec, path, folder, decl["file"]))}
        else:
            out[name] = {"basis": str(decl["basis"])}
    return out


def _inside(spec, path, folder: Path, file) -> Path:
    """A basis file must lie under the spec's folder."""
    target = (folder / str(file)).resolve()
    if folder.resolve() not in target.parents:
        raise spec.error(path, f"the file {file} lies outside the spec's folder {folder}",
                         "put basis files beside the spec")
    if not target.is_file():
        raise spec.error(path, f"no such file: {target}")
    return target


def _check_input(spec, data, data_cfg) -> tuple[int, ...]:
    raw = data.get("input")
    if raw is None:
        shape = DEFAULT_INPUTS.get(data_cfg.get("name"))
        if shape is None:
            raise spec.error("input", "the spec needs an input shape", "add: input: {shape: [28, 28, 1]}")
        return tuple(shape)
    if not isinstance(raw, dict) or set(raw) != {"shape"}:
        raise spec.error("input", "input must be a mapping with the one key 'shape'", "input: {shape: [28, 28, 1]}")
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
    out = []
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
            raise spec.error(f"{path}.{key}", f"only {' and '.join(DECOMPOSED)} layers take '{key}'")
        _check_arguments(spec, path, class_name, config)
        if "W" in config:
            _check_expression(spec, f"{path}.W", config["W"])
        out.append(LayerSpec(str(class_name), dict(config), path))
    return tuple(out)


def _check_expression(spec, path, text) -> None:
    from .parse import parse_syntax

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
    from . import layers as kd_layers

    cls = getattr(kd_layers, class_name) if "W" in config else getattr(keras.layers, class_name)
    valid = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            valid |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs", "args")}
    valid |= {"name", "dtype", "trainable", "input_shape", "batch_size", "input_dim", "autocast"}
    for key in config:
        if key not in valid:
            raise spec.error(f"{path}.{key}", f"{class_name} has no argument '{key}'", _nearest(key, valid))


def build(spec, stage: int = 0) -> "keras.Model":
    """A spec (YAML path, YAML text or dict) -> an uncompiled ``keras.Model``.

    Decomposed layers use their ``|`` stage ``stage`` (a layer with fewer
    stages keeps its last).  Named trainable parameters are tied across the
    model's layers.
    """
    import keras
    from .layers import tying

    spec = load_spec(spec)
    with tying():
        inputs = x = keras.Input(spec.input_shape)
        for index, layer in enumerate(spec.layers):
            made = _make_layer(spec, index, layer, stage)
            try:
                x = made(x)
            except DecompError as err:
                raise _with_path(spec, f"{layer.path}.W" if "W" in layer.config else layer.path, err) from None
            except (ValueError, TypeError) as err:
                raise spec.error(layer.path, f"does not fit its input of shape {tuple(x.shape)}: "
                                             f"{_first_line(err)}") from None
        model = keras.Model(inputs, x, name=spec.name)
    model.keras_decomp_spec = spec
    return model


def _make_layer(spec: Spec, index: int, layer: LayerSpec, stage: int = 0):
    import keras

    from .parse import parse_syntax

    config = dict(layer.config)
    if "W" in config:
        config["stage"] = min(stage, len(parse_syntax(config["W"]).stages) - 1)
        config["params"] = {**spec.params, **(config.get("params") or {})}
        config.setdefault("seed", spec.seed * 1000 + index)
        if spec.fixed:
            config.setdefault("fixed", spec.fixed)
        cls, module = f"keras_decomp>{layer.class_name}", "keras_decomp.layers"
    else:
        cls, module = layer.class_name, "keras.layers"
    # Names by position, not Keras's process-wide counters: unique and the same in every build.
    config.setdefault("name", f"{_snake(layer.class_name)}_{index}")
    try:
        return keras.layers.deserialize({"module": module, "class_name": layer.class_name,
                                         "registered_name": cls if "W" in config else None,
                                         "config": config})
    except DecompError as err:
        raise _with_path(spec, f"{layer.path}.W", err) from None
    except (ValueError, TypeError) as err:
        raise spec.error(layer.path, f"Keras could not make this layer: {_first_line(err)}") from None


def _snake(class_name: str) -> str:
    """``MaxPooling2D`` -> ``max_pooling2d``, as Keras names its layers."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", class_name).lower()


def _with_path(spec: Spec, path: str, err: DecompError) -> SpecError:
    located = spec.error(path, str(err))
    return SpecError(located.fact)


def _first_line(err: Exception) -> str:
    """The informative line of an exception (Keras wraps its own in boilerplate)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # Keras colours its messages
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception encountered", "Arguments received", "•"))]
    return (useful or lines or [type(err).__name__])[0]