"""A spec's ``train:`` section, and its per-stage overrides, -> Keras objects.

Objects are written as layers are, by Keras class name and arguments::

    train:
      optimizer: {AdamW: {weight_decay: 1.0e-4}}      # or a name: adam
      learning_rate: {CosineDecay: {initial_learning_rate: 3.0e-3, decay_steps: auto}}
      label_smoothing: 0.1
      callbacks: [{EarlyStopping: {monitor: val_accuracy, patience: 3}}]
      use_ema: true

``auto`` stands for the number of training steps of the stage the setting applies
to (each ``|`` stage trains with a fresh optimizer).  Every key is checked when the
spec loads, so a mistake is reported with its file, line and key path.

>>> settings = {"optimizer": {"AdamW": {"weight_decay": 1e-4}},
...             "learning_rate": {"CosineDecay": {"initial_learning_rate": 1e-2, "decay_steps": "auto"}}}
>>> opt = optimizer(settings, steps=100)
>>> type(opt).__name__, round(float(opt.learning_rate), 6), round(float(opt._learning_rate(50)), 6)
('AdamW', 0.01, 0.005)
"""

from __future__ import annotations

import difflib
import inspect
import numbers

import keras

from ..errors import SpecError

# Callbacks a spec may name: none of them writes files or runs code given as text.
CALLBACKS = ("EarlyStopping", "ReduceLROnPlateau", "TerminateOnNaN")
AUTO = "auto"


def settings_for(spec, stage: int) -> dict:
    """The ``train:`` section with stage ``stage``'s overrides applied."""
    entry = spec.stages[stage] if spec.stages else {}
    return {**spec.train, **entry}


def optimizer(settings: dict, steps: int, learning_rate=None):
    """The optimizer of ``settings``; ``steps`` is what ``auto`` stands for."""
    name, args = _object(settings.get("optimizer", "adam"), "optimizer")
    cls = _class(keras.optimizers, name, "optimizer", _optimizer_names())
    if "learning_rate" in args:
        raise SpecError("optimizer: give the learning rate as train.learning_rate (a number or a schedule), "
                        "not as an optimizer argument")
    if settings.get("use_ema"):
        args = {"use_ema": True, **args}
    rate = learning_rate if learning_rate is not None else schedule(settings.get("learning_rate", 1e-3), steps)
    return _make(cls, {"learning_rate": rate, **args}, "optimizer")


def schedule(value, steps: int):
    """A number stays a number; ``{Class: {args}}`` becomes a Keras learning-rate schedule
    with ``auto`` replaced by the stage's steps (less the warm-up steps, where the
    schedule has them, so that warm-up and decay end with the stage)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value <= 0:
            raise SpecError(f"learning_rate: must be a positive number, got {value!r}")
        return float(value)
    name, args = _object(value, "learning_rate")
    cls = _class(keras.optimizers.schedules, name, "learning_rate", _schedule_names())
    warmup = args.get("warmup_steps", 0) if isinstance(args.get("warmup_steps", 0), int) else 0
    args = {k: (max(1, steps - warmup) if v == AUTO else v) for k, v in args.items()}
    return _make(cls, args, "learning_rate")


def loss(model, settings: dict):
    """The loss: sparse categorical cross-entropy (from logits unless the model ends in a
    softmax), with ``label_smoothing`` where the spec asks for it."""
    name = settings.get("loss", "sparse_categorical_crossentropy")
    smoothing = _smoothing(settings)
    if name != "sparse_categorical_crossentropy":
        if smoothing:
            raise SpecError(f"label_smoothing: works with the default loss, not with loss: {name}")
        return name
    last = model.layers[-1]
    from_logits = settings.get("from_logits", getattr(last, "activation", None) is not keras.activations.softmax)
    if smoothing:
        return SmoothedSparseCrossentropy(smoothing=float(smoothing), from_logits=from_logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def callbacks(settings: dict) -> list:
    """The spec's own callbacks (``EarlyStopping``, ``ReduceLROnPlateau``, ...)."""
    entries = settings.get("callbacks") or []
    if not isinstance(entries, list):
        raise SpecError(f"callbacks: must be a list such as [{{EarlyStopping: {{patience: 3}}}}], got {entries!r}")
    made = []
    for i, entry in enumerate(entries):
        name, args = _object(entry, f"callbacks[{i}]")
        if name not in CALLBACKS:
            raise SpecError(f"callbacks[{i}]: '{name}' is not a callback a spec may name; one of: "
                            + ", ".join(CALLBACKS), hint=_suggest(name, CALLBACKS))
        made.append(_make(getattr(keras.callbacks, name), args, f"callbacks[{i}]"))
    return made


def monitors_validation(settings: dict) -> bool:
    """Whether a callback watches a validation metric (``val_...``, the default of most)."""
    for entry in settings.get("callbacks") or []:
        name, args = _object(entry, "callbacks")
        if name != "TerminateOnNaN" and str(args.get("monitor", "val_loss")).startswith("val_"):
            return True
    return False


def check(settings: dict, path: str) -> None:
    """Build every object of ``settings`` once, so that mistakes surface when the spec
    loads; a SpecError's fact starts with the key it is about, relative to ``path``."""
    if "optimizer" in settings or "learning_rate" in settings or "use_ema" in settings:
        opt = optimizer(settings, steps=1000)
        has_schedule = isinstance(opt._learning_rate, keras.optimizers.schedules.LearningRateSchedule)
        if has_schedule and any("ReduceLROnPlateau" in entry for entry in settings.get("callbacks") or []
                                if isinstance(entry, dict)):
            raise SpecError("callbacks: ReduceLROnPlateau changes the learning rate, which a schedule "
                            "(learning_rate: {...}) already sets; use one or the other")
    callbacks(settings)
    _smoothing(settings)
    if "use_ema" in settings and not isinstance(settings["use_ema"], bool):
        raise SpecError(f"use_ema: must be true or false, got {settings['use_ema']!r}")


def _smoothing(settings: dict) -> float:
    """``label_smoothing``, checked: a number in [0, 1) (0 when not given)."""
    smoothing = settings.get("label_smoothing", 0.0)
    if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= smoothing < 1:
        raise SpecError(f"label_smoothing: must be a number in [0, 1), got {smoothing!r}")
    return smoothing


@keras.saving.register_keras_serializable(package="keras_decomp")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels against targets smoothed towards uniform:
    (1 - smoothing) on the true class plus smoothing / classes on every class."""

    def __init__(self, smoothing=0.1, from_logits=True, name="smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smoothing, self.from_logits = float(smoothing), bool(from_logits)

    def call(self, y_true, y_pred):
        classes = keras.ops.shape(y_pred)[-1]
        labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), (-1,))
        target = keras.ops.one_hot(labels, classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(target, y_pred, from_logits=self.from_logits,
                                                     label_smoothing=self.smoothing)

    def get_config(self):
        return {**super().get_config(), "smoothing": self.smoothing, "from_logits": self.from_logits}


# ---- reading {Class: {args}} ------------------------------------------------------

def _object(value, key: str) -> tuple[str, dict]:
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and len(value) == 1:
        (name, args), = value.items()
        args = {} if args is None else args
        if isinstance(name, str) and isinstance(args, dict):
            return name, dict(args)
    raise SpecError(f"{key}: must be a name or a mapping {{ClassName: {{argument: value}}}}, got {value!r}")


def _class(module, name: str, key: str, choices: list[str]):
    found = {n.lower(): n for n in choices}.get(name.lower())
    if found is None:
        raise SpecError(f"{key}: unknown {key.split('[')[0].replace('_', ' ')} '{name}'",
                        hint=_suggest(name, [n.lower() for n in choices] + choices))  # adam or Adam
    return getattr(module, found)


def _make(cls, args: dict, key: str):
    valid = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            valid |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs", "args")}
    for arg in args:
        if arg not in valid:
            raise SpecError(f"{key}.{cls.__name__}.{arg}: {cls.__name__} has no argument '{arg}'",
                            hint=_suggest(arg, sorted(valid)))
    try:
        return cls(**args)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{key}.{cls.__name__}: Keras refused the arguments: {str(err).splitlines()[0]}") from None


def _suggest(word: str, choices) -> str | None:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _optimizer_names() -> list[str]:
    return [n for n in dir(keras.optimizers) if n[:1].isupper() and n not in ("Optimizer", "LossScaleOptimizer")]


def _schedule_names() -> list[str]:
    return [n for n in dir(keras.optimizers.schedules) if n[:1].isupper() and n != "LearningRateSchedule"]
