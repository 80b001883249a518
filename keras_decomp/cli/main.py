"""The ``keras-decomp`` command.

    keras-decomp parse "W = sum(G, n=8) | dense" --in 784 --out 10 [--param k=100] [--seed 0]
    keras-decomp train SPEC.yaml [--data full|bundled|auto] [--epochs N] [--seed N] [--out DIR] [--resume]
                       [--distribute mirrored|multi-worker] [--allow-files-outside]
    keras-decomp export MODEL.keras --tflite OUT.tflite [--mode auto] [--prefer size] [--quantize dynamic]
    keras-decomp compress MODEL.keras --layer PATTERN="EXPR" [--layer ...] [--budget 0.25] --out NEW.keras
                          [--data bundled] [--calibrate 1000] [--epochs 1 [--distill]] [--quiet]
    keras-decomp prune MODEL.keras --sparsity 0.9 [--method trifactor] [--fine-tune-epochs N] --out NEW.keras
    keras-decomp sweep SPEC.yaml --param k=10,20,50 [--param ...] [--seeds 0,1,2] [--data full|bundled|auto]
                       [--epochs N] [--limit N] [--reference SPEC|none] [--out DIR]

Errors in what the user wrote print as the DecompError message and exit 2.
TensorFlow's own log lines are hidden unless ``--verbose`` (``logs.py``).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import DecompError


def _param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value of {name} must be a number, got {value!r}") from None
    return name.strip(), int(number) if number.is_integer() else number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keras-decomp", description="Structured weight decompositions for Keras 3.")
    parser.add_argument("--verbose", dest="log_lines", action="store_true",
                        help="show TensorFlow's C++ and absl log lines (hidden by default)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("parse", help="parse an expression and print its per-node table")
    p.add_argument("expression", help='e.g. "W = sum(G, n=8) | dense"')
    p.add_argument("--in", dest="n", type=int, required=True, help="input size n (rows of W)")
    p.add_argument("--out", dest="m", type=int, required=True, help="output size m (columns of W)")
    p.add_argument("--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="bind a symbol, e.g. --param k=100 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, action="append", help="batch sizes for the FLOPs columns (default 1 and 128)")
    t = commands.add_parser("train", help="train a YAML spec, evaluate it, write the model and a report")
    t.add_argument("spec", help="a YAML spec, e.g. specs/linear_dct.yaml")
    t.add_argument("--data", choices=("auto", "full", "bundled", "tfds", "idx"), default=None,
                   help="where the data comes from (default: the spec's, else auto)")
    t.add_argument("--epochs", type=int, default=None, help="override the spec's epochs")
    t.add_argument("--out", default=None, help="folder for model.keras and report.json (default runs/<spec name>)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--allow-files-outside", dest="allow_files_outside", action="store_true",
                   help="let the spec's fixed: {file: ...} bases lie outside its folder (for a spec you trust)")
    t.add_argument("--seed", type=int, default=None,
                   help="override the spec's seed (initial weights, fixed bases, data order)")
    t.add_argument("--distribute", choices=("mirrored", "multi-worker"), default=None,
                   help="mirrored: all devices of this machine; multi-worker: the machines in TF_CONFIG, "
                        "each running this same command (see docs/distributed.md)")
    e = commands.add_parser("export", help="export a saved model to TFLite and/or SavedModel, checked")
    e.add_argument("model", help="a .keras file")
    e.add_argument("--tflite", help="write this .tflite file")
    e.add_argument("--saved-model", dest="saved_model", help="write this SavedModel folder")
    e.add_argument("--mode", choices=("folded", "factored", "auto"), default="auto",
                   help="per decomposed layer: W as one constant (folded), the factors kept (factored), "
                        "or whichever stores fewer bytes (auto, the default)")
    e.add_argument("--prefer", choices=("size", "speed"), default="size",
                   help="what --mode auto chooses by: fewer stored numbers (size, the default) or the faster "
                        "file at batch 1, each layer exported both ways and timed here (speed)")
    e.add_argument("--quantize", choices=("dynamic", "int8"), default=None,
                   help="TFLite only: int8 weights (dynamic), or int8 weights and activations (int8, needs --data)")
    e.add_argument("--data", choices=("auto", "bundled", "full"), default=None,
                   help="compare on 500 test images of this data and report both accuracies; int8 calibrates "
                        "on 300 of its training images (default: 32 random inputs)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    c = commands.add_parser("compress", help="decompose layers of a trained .keras model, initialised from "
                                             "their kernels; print a before/after table")
    c.add_argument("model", help="a trained model, e.g. runs/lenet/model.keras")
    c.add_argument("--layer", action="append", type=_layer, required=True, metavar='PATTERN="EXPR"',
                   help='a layer name, path or glob over paths and its expression, e.g. dense_1="lowrank(r=16)" '
                        'or "*feedforward*"="lowrank" with --budget (repeatable); Dense, EinsumDense, Conv1D and '
                        'Conv2D layers at any depth')
    c.add_argument("--budget", type=float, default=None,
                   help="keep at most this fraction of the matched kernels' parameters, each layer's size "
                        "chosen from its error curve (expressions without sizes: lowrank, sss(p=16) ...)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--out", required=True, help="where to write the new model (a .keras file)")
    c.add_argument("--data", choices=("auto", "full", "bundled", "tfds", "idx", "none"), default="auto",
                   help="where the test split for the accuracy comes from; none: do not evaluate")
    c.add_argument("--dataset", default="fashion_mnist", help="the data set to evaluate on (default fashion_mnist)")
    c.add_argument("--param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="bind a symbol of the expressions, e.g. --param k=100 (repeatable)")
    c.add_argument("--seed", type=int, default=0, help="seed of the expressions' random bases")
    c.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="fit each layer to its inputs over N training images (the data norm), layer after "
                        "layer on the compressed model's activations (default 0: fit the kernels alone)")
    c.add_argument("--calibration", choices=("asymmetric", "sequential", "original"), default="asymmetric",
                   help="with --calibrate: inputs from the compressed model, outputs from the original "
                        "(asymmetric, the default), or both from the compressed model (sequential), or both "
                        "from the original (original)")
    c.add_argument("--epochs", type=int, default=0, help="epochs of fine-tuning after compression (default 0)")
    c.add_argument("--distill", action="store_true",
                   help="fine-tune by distillation from the original model (KL on temperature-scaled logits "
                        "plus the labels) instead of the labels alone")
    c.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    c.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (default 0.5)")
    r = commands.add_parser("prune", help="prune the Dense kernels of a trained .keras model with masks, "
                                          "fine-tune, save")
    r.add_argument("model", help="a trained model with Dense layers")
    r.add_argument("--sparsity", type=float, default=0.9, help="fraction of each kernel to prune (default 0.9)")
    r.add_argument("--method", choices=("trifactor", "magnitude"), default="trifactor")
    r.add_argument("--criterion", choices=("approximation", "paper"), default="approximation",
                   help="trifactor: prune the smallest |w_hat| (approximation) or where |w| - |w_hat| is lowest")
    r.add_argument("--ranks", type=float, default=None,
                   help="rank of each layer of neurons: a number, or a fraction of its width (default 0.25)")
    r.add_argument("--fine-tune-epochs", type=int, default=0, help="epochs of fine-tuning with the masks held")
    r.add_argument("--data", choices=("auto", "full", "bundled", "tfds", "idx", "none"), default="auto",
                   help="data for fine-tuning and test accuracy; none: neither")
    r.add_argument("--dataset", default="fashion_mnist")
    r.add_argument("--strip", action="store_true", help="save plain Dense layers (no masks, for export)")
    r.add_argument("--out", required=True, help="where to write the pruned model (a .keras file)")
    w = commands.add_parser(
        "sweep", help="train a spec at every combination of --param values and --seeds, beside its dense "
                      "reference; write sweep.csv and sweep.png (accuracy against parameters)",
        description="Train SPEC at every combination of the --param values, for each seed, and its dense "
                    "reference (the spec's reference: key, or --reference) at each seed; write OUT/sweep.csv "
                    "(one row per run: parameters, seed, trainable parameters, test accuracy, time, epochs, "
                    "error) after every run, and OUT/sweep.png (test accuracy against trainable parameters, "
                    "the means over seeds, the reference, the Pareto front). A run that fails is recorded "
                    "with its error and the sweep goes on; running the same command again skips the runs "
                    "sweep.csv has done and retries the failed ones.")
    w.add_argument("spec", help="a YAML spec with params:, e.g. specs/linear_dct.yaml")
    w.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="values of one of the spec's params:, e.g. --param k=10,20,50, or of a training "
                        "setting, e.g. --param train.label_smoothing=0,0.1 or "
                        "train.learning_rate.CosineDecay.initial_learning_rate=1e-3,3e-3 (repeatable: "
                        "every combination is trained)")
    w.add_argument("--seeds", default=None, help="seeds, e.g. 0,1,2 (default: the spec's seed)")
    w.add_argument("--data", choices=("auto", "full", "bundled", "tfds", "idx"), default=None,
                   help="where the data comes from (default: the spec's, else auto)")
    w.add_argument("--epochs", type=int, default=None, help="override the spec's epochs (per stage)")
    w.add_argument("--limit", type=int, default=None, help="train and test on the first N images only")
    w.add_argument("--reference", default=None,
                   help="the dense reference spec (default: the spec's reference:); none: no reference")
    w.add_argument("--out", default=None,
                   help="folder for sweep.csv, sweep.png and the runs (default runs/sweep-<spec name>)")
    w.add_argument("--verbose", action="store_true", help="Keras's line per epoch, and TensorFlow's log lines")
    for name, command in commands.choices.items():
        if name != "sweep":
            command.add_argument("--verbose", dest="log_lines", action="store_true", default=argparse.SUPPRESS,
                                 help="show TensorFlow's C++ and absl log lines (hidden by default)")
    return parser


def _layer(text: str) -> tuple[str, str]:
    name, sep, expression = text.partition("=")
    name = name.strip()
    plain = name.translate(str.maketrans("", "", "_-/*?[]."))
    if not sep or not name or not expression.strip() or (plain and not plain.isalnum()):
        raise argparse.ArgumentTypeError(f'expected NAME="EXPR" (a layer name and its expression), got {text!r}')
    return name, expression.strip()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (args.log_lines or getattr(args, "verbose", False)):
        from .logs import silence_tensorflow

        silence_tensorflow()
    try:
        if args.command == "parse":
            return _parse(args)
        if args.command == "train":
            return _train(args)
        if args.command == "export":
            return _export(args)
        if args.command == "compress":
            return _compress(args)
        if args.command == "prune":
            return _prune(args)
        if args.command == "sweep":
            return _sweep(args)
    except DecompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


def _parse(args) -> int:
    from ..language.parse import parse

    d = parse(args.expression, args.n, args.m, params=dict(args.param), seed=args.seed)
    print(d.summary(batches=tuple(args.batch or (1, 128))))
    dense = args.n * args.m
    print(f"\n{len(d.stages)} stage(s); first stage: {d.num_params} trainable parameters "
          f"for a {args.n}x{args.m} kernel ({dense} dense, {dense / max(d.num_params, 1):.1f}x fewer)")
    return 0


def _train(args) -> int:
    from ..training.distribute import make
    from ..layers.report import format_table
    from ..training.specs import load_spec
    from ..training.staging import fit_staged

    dist = make(args.distribute)  # before any other TensorFlow work (multi-worker needs that)
    spec = load_spec(args.spec, allow_files_outside=args.allow_files_outside)
    if args.seed is not None:
        import dataclasses
        spec = dataclasses.replace(spec, seed=args.seed)
    out = args.out or f"runs/{spec.name}"
    report = fit_staged(spec, source=args.data, out=out, resume=args.resume, epochs=args.epochs,
                        verbose=0 if args.quiet else 2, distribute=dist)
    if not dist.is_chief:
        print(f"test accuracy {report['test_accuracy']:.4f}; this worker is done, the chief writes "
              f"{out}/model.keras and {out}/report.json")
        return 0
    print(format_table(report["layers"]))
    for stage in report["stages"][1:]:
        errors = ", ".join(f"{k} {v:.2e}" for k, v in stage["handover_error"].items())
        print(f"stage {stage['stage']}: hand-over error {errors}; accuracy {stage['accuracy_before_handover']:.4f} "
              f"-> {stage['accuracy_after_handover']:.4f} -> {stage['accuracy_end']:.4f}")
    print(f"\ndata: {report['data_source']}")
    print(f"test accuracy {report['test_accuracy']:.4f}, test loss {report['test_loss']:.4f}, "
          f"{report['trainable_params']} trainable parameters, {report['wall_time_s']} s")
    print(f"wrote {out}/model.keras and {out}/report.json")
    if spec.export:
        _export_trained(spec, out, args.data)
    return 0


def _export_trained(spec, out, source) -> None:
    """The spec's export section, checked on 500 test images (int8 calibrated on 300
    training images); the reports go to the screen and into report.json."""
    import json

    from ..training import atomic
    from ..export import export_from_spec, format_report
    from ..layers import load_model
    from ..training.run import load_data

    model = load_model(f"{out}/model.keras")
    data = load_data(spec, source)
    sample, labels, calibration = _export_inputs(data)
    reports = export_from_spec(model, spec.export, out, sample=sample, labels=labels,
                               representative_data=calibration)
    path = f"{out}/report.json"
    with open(path) as f:
        full = json.load(f)
    full["export"] = reports
    atomic.write_text(path, json.dumps(full, indent=2))
    print(f"\nexport ({', '.join(reports)}; also in {path}):")
    for report in reports.values():
        print(format_report(report))


def _export(args) -> int:
    from ..export import export, format_report
    from ..layers import load_model

    targets = [("tflite", args.tflite), ("saved_model", args.saved_model)]
    if not any(path for _, path in targets):
        raise DecompError("nothing to export to", hint="give --tflite OUT.tflite and/or --saved-model DIR")
    if args.quantize == "int8" and not args.data:
        raise DecompError("--quantize int8 needs --data: images to calibrate the activations on",
                          hint="e.g. --data bundled, or --quantize dynamic")
    model = load_model(args.model)
    sample = labels = calibration = None
    if args.data:
        from ..training.data import load
        data = load(source=args.data)
        if tuple(model.input_shape[1:]) != data.input_shape:
            raise DecompError(f"--data {args.data}: the model takes inputs of shape {tuple(model.input_shape[1:])}, "
                              f"the data set's images are {data.input_shape}",
                              hint="leave out --data to compare on random inputs")
        sample, labels, calibration = _export_inputs(data)
    for fmt, path in targets:
        if path:
            report = export(model, path, format=fmt, mode=args.mode, prefer=args.prefer,
                            quantize=args.quantize if fmt == "tflite" else None, sample=sample, labels=labels,
                            representative_data=calibration)
            print(format_report(report))
    return 0


def _export_inputs(data):
    """500 test images (scaled as in training) and their labels to check an export
    on, and 300 training images to calibrate int8 with."""
    scale = lambda images: images.astype("float32") / 255.0  # noqa: E731
    return scale(data.x_test[:500]), data.y_test[:500], scale(data.x_train[:300])


def _model_paths(args, what: str):
    """The model to read and the .keras file to write, checked before any work."""
    from pathlib import Path

    source, out = Path(args.model), Path(args.out)
    if not source.is_file():
        raise DecompError(f"{source}: no such model file")
    if out.suffix != ".keras":
        raise DecompError(f"--out {out}: the {what} model is saved as a .keras file",
                          hint=f"e.g. --out {out.stem}.keras")
    return source, out


def _compress(args) -> int:
    from .compress import compress

    return compress(args, *_model_paths(args, "new"))


def _prune(args) -> int:
    from ..compression.decompose import accuracy_on
    from ..layers import load_model
    from ..compression.prune import mask_sparsity, prune, strip
    from ..training.run import compile_model

    source, out = _model_paths(args, "pruned")
    if args.fine_tune_epochs and args.data == "none":
        raise DecompError("--fine-tune-epochs needs data", hint="drop --data none")
    ranks = int(args.ranks) if args.ranks is not None and args.ranks.is_integer() else args.ranks
    model = load_model(source)
    pruned = prune(model, method=args.method, sparsity=args.sparsity, ranks=ranks, criterion=args.criterion)
    if not pruned.compiled:
        compile_model(pruned, {})
    accuracies = []
    if args.data != "none":
        from ..training.data import load

        data = load(args.dataset, source=args.data)
        for stage, candidate in (("before pruning", model), ("after pruning", pruned)):
            accuracy, why = accuracy_on(candidate, data)
            accuracies.append(f"{stage} {accuracy:.4f}" if accuracy is not None else f"not evaluated ({why})")
        if args.fine_tune_epochs:
            if tuple(pruned.input_shape[1:]) != data.input_shape:
                raise DecompError(f"cannot fine-tune: the model takes inputs of shape {tuple(pruned.input_shape[1:])}, "
                                  f"{data.name} images are {data.input_shape}")
            train, _ = data.pipelines(batch_size=128)
            pruned.fit(train, epochs=args.fine_tune_epochs, verbose=2)
            tuned = accuracy_on(pruned, data)[0]
            accuracies.append(f"after {args.fine_tune_epochs} epoch(s) of fine-tuning {tuned:.4f}")
        print(f"data: {data.name}, {data.source}")
    for name, sparsity in mask_sparsity(pruned).items():
        print(f"{name}: sparsity {sparsity:.4f}")
    if accuracies:
        print("test accuracy: " + "; ".join(accuracies))
    out.parent.mkdir(parents=True, exist_ok=True)
    (strip(pruned) if args.strip else pruned).save(out)
    print(f"wrote {out}" + (" (masks stripped)" if args.strip else " (with masks)"))
    return 0


def _sweep(args) -> int:
    from .sweep import parse_seeds, parse_values, run_sweep

    swept = [parse_values(text) for text in args.param]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if args.limit is not None and args.limit < 1:
        raise DecompError(f"--limit must be a positive integer, got {args.limit}")
    rows = run_sweep(args.spec, swept, seeds=seeds, source=args.data, epochs=args.epochs, out=args.out,
                     reference=args.reference, limit=args.limit, verbose=2 if args.verbose else 0,
                     print_fn=lambda line: print(line, flush=True))
    return 0 if any(not row["error"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
