"""``keras-decomp compress``: decompose layers of a trained model, optionally fitted to
calibration images (the data norm) and fine-tuned, by the labels or by distillation from
the original model."""

from __future__ import annotations

from ..errors import DecompError


def compress(args, source, out) -> int:
    """Decompose, optionally calibrate and fine-tune, save, print the table."""
    from ..compression.decompose import accuracy_on, comparison, decompose
    from ..fitting import progress
    from ..layers import load_model
    from ..training.data import load

    expressions = {}
    for name, expression in args.layer:
        if name in expressions:
            raise DecompError(f"--layer {name} is given twice")
        expressions[name] = expression
    if (args.calibrate or args.epochs or args.distill) and args.data == "none":
        raise DecompError("--calibrate, --epochs and --distill need data", hint="drop --data none")
    if args.distill and not args.epochs:
        raise DecompError("--distill fine-tunes: give the number of epochs", hint="e.g. --distill --epochs 1")
    for flag, value in (("--calibrate", args.calibrate), ("--epochs", args.epochs)):
        if value < 0:
            raise DecompError(f"{flag} must be 0 or more, got {value}")
    model = load_model(source)
    data = load(args.dataset, source=args.data) if args.calibrate or args.epochs else None
    errors, data_errors = {}, {}
    calibration = _calibration_images(data, args.calibrate, args.seed) if args.calibrate else None
    with progress.reporting(enabled=not args.quiet):
        new = decompose(model, expressions, budget=args.budget, params=dict(args.param), seed=args.seed,
                        report=errors, data=calibration, calibration=args.calibration,
                        data_report=data_errors)
    out.parent.mkdir(parents=True, exist_ok=True)
    new.save(out)  # before evaluating: a missing data set must not lose the new model
    accuracy, why = (None, None), "--data none"
    if data is None and args.data != "none":
        data = load(args.dataset, source=args.data)
    if data is not None:
        before, why = accuracy_on(model, data)
        if before is not None:
            accuracy = (before, accuracy_on(new, data)[0])
        print(f"data: {data.name}, {data.source}" + (f"; calibrated on {len(calibration)} training images"
                                                      if calibration is not None else ""))
    print(comparison(model, new, errors, accuracy, why, data_errors=data_errors))
    if args.epochs:
        _fine_tune(model, new, data, args)
        new.save(out)
    print(f"wrote {out}")
    return 0


def _calibration_images(data, count, seed):
    """``count`` training images, scaled as the training pipelines scale them."""
    import numpy as np

    pick = np.random.default_rng(seed).choice(len(data.x_train), min(count, len(data.x_train)), replace=False)
    return data.x_train[np.sort(pick)].astype("float32") / 255.0


def _fine_tune(teacher, student, data, args) -> None:
    from ..compression.decompose import accuracy_on
    from ..compression.distill import fine_tune
    from ..training.run import compile_model

    if tuple(student.input_shape[1:]) != data.input_shape:
        raise DecompError(f"cannot fine-tune: the model takes inputs of shape {tuple(student.input_shape[1:])}, "
                          f"{data.name} images are {data.input_shape}")
    x, y = data.x_train.astype("float32") / 255.0, data.y_train
    if args.distill:
        fine_tune(student, teacher, (x, y), epochs=args.epochs, temperature=args.temperature, alpha=args.alpha,
                  verbose=2)
        how = f"distillation (temperature {args.temperature}, alpha {args.alpha})"
    else:
        compile_model(student, {})
        student.fit(x, y, epochs=args.epochs, batch_size=128, verbose=2)
        how = "the labels"
    tuned, why = accuracy_on(student, data)
    result = f"{tuned:.4f}" if tuned is not None else f"not evaluated ({why})"
    print(f"test accuracy after {args.epochs} epoch(s) of fine-tuning by {how}: {result}")
