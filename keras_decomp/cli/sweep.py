"""Sweeps: train a spec at every combination of values of its ``params:`` (and of its
training settings, ``train.label_smoothing=0,0.1``) and several seeds,
beside its dense reference, and plot test accuracy against trainable parameters.

The pieces are small and pure where they can be: ``parse_values`` reads ``k=10,20``,
``expand`` makes the settings, ``pareto_front`` keeps the points that no cheaper point beats,
``summarize`` averages over seeds, ``plot`` draws ``sweep.png``.  ``run_sweep`` trains each
run with ``fit_staged`` and rewrites ``sweep.csv`` (atomically) after every run, so a crash
loses at most the run in progress: a re-run with the same ``out`` skips the runs the CSV has
done and retries those it records as failed.

>>> expand({"k": 100, "r": 2}, [("k", (10, 20)), ("r", (1,))], seeds=(0, 1))
[{'k': 10, 'r': 1, 'seed': 0}, {'k': 20, 'r': 1, 'seed': 0}, {'k': 10, 'r': 1, 'seed': 1}, {'k': 20, 'r': 1, 'seed': 1}]
>>> pareto_front([(100, 0.80), (50, 0.82), (200, 0.85), (300, 0.84)])
[(50, 0.82), (200, 0.85)]
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import itertools
import math
import shutil
import statistics
import time
from pathlib import Path

from ..training import atomic
from ..errors import DecompError
from ..training.variants import TRAIN_PREFIX, check_train_key, with_setting

RESULT_COLUMNS = ("trainable_params", "test_accuracy", "train_time_s", "data_source", "error")


def parse_values(text: str) -> tuple[str, tuple]:
    """``"k=10,20,50"`` -> ``("k", (10, 20, 50))``; integers stay integers.

    >>> parse_values("lr=0.1, 1e-2")
    ('lr', (0.1, 0.01))
    """
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise DecompError(f"--param expects NAME=V1,V2,..., got {text!r}", hint="e.g. --param k=10,20,50")
    out = []
    for item in values.split(","):
        try:
            number = float(item)
        except ValueError:
            raise DecompError(f"--param {text}: {item.strip()!r} is not a number",
                              hint="separate the values by commas: --param k=10,20,50") from None
        if not math.isfinite(number):
            raise DecompError(f"--param {text}: {item.strip()!r} is not a finite number")
        value = int(number) if number.is_integer() else number
        if value in out:
            raise DecompError(f"--param {text}: the value {value} is given twice")
        out.append(value)
    return name, tuple(out)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``."""
    try:
        seeds = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise DecompError(f"--seeds expects integers separated by commas, got {text!r}",
                          hint="e.g. --seeds 0,1,2") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise DecompError(f"--seeds {text}: seeds are distinct integers >= 0")
    return seeds


def expand(params: dict, swept: list[tuple[str, tuple]], seeds=(0,), spec_name: str = "the spec") -> list[dict]:
    """Every combination of the swept values, for each seed (seed outermost: one whole
    curve comes before the next seed's).  Each swept name must be one of ``params``."""
    names = [name for name, _ in swept]
    for name in names:
        if name.startswith(TRAIN_PREFIX):
            check_train_key(name)
        elif name not in params:
            near = difflib.get_close_matches(name, list(params), n=1, cutoff=0.6)
            hint = (f"did you mean '{near[0]}'?" if near else
                    f"its params: {', '.join(params)}" if params else
                    "it has no params: section; add e.g. params: {k: 100} and use k in an expression")
            raise DecompError(f"--param {name}: {spec_name} has no parameter '{name}'", hint=hint)
        if names.count(name) > 1:
            raise DecompError(f"--param {name} is given twice", hint=f"list all its values once: {name}=V1,V2")
    combos = itertools.product(*(values for _, values in swept))
    settings = [dict(zip(names, combo)) for combo in combos]
    return [{**setting, "seed": seed} for seed in seeds for setting in settings]


def pareto_front(points) -> list[tuple[float, float]]:
    """The points (params, accuracy) that no point with as few or fewer parameters
    matches in accuracy, by increasing parameters.  NaN accuracies are left out."""
    front, best = [], -math.inf
    for params, accuracy in sorted((p for p in points if not math.isnan(p[1])), key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((params, accuracy))
            best = accuracy
    return front


def total_epochs(spec, override: int | None = None) -> int:
    """Epochs a run of ``spec`` trains, over all its ``|`` stages (as ``fit_staged`` does)."""
    default = spec.train.get("epochs", 1)
    if override is not None:
        return override * spec.num_stages
    if spec.stages:
        return sum(stage.get("epochs", default) for stage in spec.stages)
    return default * spec.num_stages


def columns(names) -> tuple[str, ...]:
    """The CSV columns of a sweep over the parameters ``names``."""
    return ("role", "spec", *names, "seed", "epochs", "data", "limit", *RESULT_COLUMNS)


def key(row: dict, names) -> tuple[str, ...]:
    """What identifies a run: everything but its results, as the CSV's text."""
    return tuple(str(row[c]) for c in columns(names) if c not in RESULT_COLUMNS)


def read_rows(path: Path, names) -> list[dict]:
    """The rows of an earlier sweep in ``path`` (none if there is no file)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != columns(names):
            raise DecompError(f"{path} holds a sweep with the columns {', '.join(reader.fieldnames or ())}, "
                              f"not {', '.join(columns(names))}",
                              hint="sweep the same parameters to resume it, or choose another --out")
        return list(reader)


def write_rows(path: Path, names, rows: list[dict]) -> None:
    """Replace ``path`` by the CSV of ``rows`` atomically (temporary file + rename)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns(names), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, text.getvalue())


def summarize(rows: list[dict], names) -> list[dict]:
    """The successful rows grouped per setting (role, spec, parameter values), in order of
    first appearance: mean and spread of the accuracy over seeds, parameters, mean time."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if not row["error"]:
            groups.setdefault((row["role"], row["spec"], *(row[n] for n in names)), []).append(row)
    out = []
    for (role, spec, *values), members in groups.items():
        accuracies = [float(r["test_accuracy"]) for r in members]
        out.append({"role": role, "spec": spec, "setting": dict(zip(names, values)),
                    "params": round(statistics.mean(int(r["trainable_params"]) for r in members)),
                    "accuracy": statistics.mean(accuracies),
                    "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                    "accuracies": accuracies, "time": statistics.mean(float(r["train_time_s"]) for r in members)})
    return out


def label(group: dict) -> str:
    """``k=10``, or ``linear_dense (dense reference)``."""
    if group["role"] == "reference":
        return f"{group['spec']} (dense reference)"
    return ", ".join(f"{n}={v}" for n, v in group["setting"].items()) or group["spec"]


def markdown_table(groups: list[dict]) -> str:
    """The groups of ``summarize`` as a Markdown table, the Pareto-front ones marked."""
    front = set(pareto_front([(g["params"], g["accuracy"]) for g in groups]))
    lines = ["| setting | trainable params | test accuracy, mean ± sd | per seed | train time (s) | Pareto |",
             "|---|---:|---:|---|---:|:---:|"]
    for g in sorted(groups, key=lambda g: g["params"]):
        seeds = ", ".join(f"{a:.4f}" for a in g["accuracies"])
        mark = "yes" if (g["params"], g["accuracy"]) in front else ""
        lines.append(f"| {label(g)} | {g['params']} | {g['accuracy']:.4f} ± {g['std']:.4f} | {seeds} | "
                     f"{g['time']:.1f} | {mark} |")
    return "\n".join(lines)


def plot(rows: list[dict], names, path: Path, title: str) -> None:
    """Test accuracy against trainable parameters (log x): a small marker per run, a large
    one per setting (mean over seeds), the dense reference as a star, the Pareto front of
    the means as a step line.  Written atomically to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r["error"]]
    groups = summarize(done, names)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for role, marker, colour, runs in (("sweep", "o", "tab:blue", "runs"), ("reference", "*", "tab:red", None)):
        mine = [r for r in done if r["role"] == role]
        ax.scatter([int(r["trainable_params"]) for r in mine], [float(r["test_accuracy"]) for r in mine],
                   marker=marker, s=18, color=colour, alpha=0.35, label=f"{runs} (one per seed)" if runs else None)
    for g in groups:
        reference = g["role"] == "reference"
        ax.errorbar(g["params"], g["accuracy"], yerr=g["std"], fmt="*" if reference else "o",
                    markersize=14 if reference else 7, color="tab:red" if reference else "tab:blue", capsize=3,
                    label=f"{label(g)}, {g['params']} params" if reference else None)
        ax.annotate(label(g) if not reference else "dense reference", (g["params"], g["accuracy"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=8)
    front = pareto_front([(g["params"], g["accuracy"]) for g in groups])
    if front:
        right = max(g["params"] for g in groups)
        xs, ys = [p for p, _ in front] + [right], [a for _, a in front] + [front[-1][1]]
        ax.step(xs, ys, where="post", color="tab:green", linewidth=1.2, label="Pareto front (means)")
    ax.scatter([], [], marker="o", s=40, color="tab:blue", label="mean over seeds (± sd)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = atomic.temporary(path)
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    atomic.replace(tmp, path)


def reference_spec(spec, override: str | None = None):
    """The dense reference to train beside ``spec``: ``override`` (a path, or "none"),
    else the spec's ``reference:``, else None."""
    from ..training.specs import load_spec

    if override is not None:
        return None if override == "none" else load_spec(override)
    if spec.reference is None:
        return None
    if not Path(spec.reference).is_file():
        folder = Path(spec.reference).parent
        near = difflib.get_close_matches(Path(spec.reference).name, [p.name for p in folder.glob("*.y*ml")], n=1)
        raise spec.error("reference", f"no spec file {spec.reference}",
                         f"did you mean '{near[0]}'?" if near else "give --reference SPEC, or --reference none")
    return load_spec(spec.reference)


def run_sweep(spec, swept: list[tuple[str, tuple]], seeds=None, source: str | None = None,
              epochs: int | None = None, out=None, reference: str | None = None, limit: int | None = None,
              verbose: int = 0, print_fn=print) -> list[dict]:
    """Train ``spec`` at every setting of ``expand`` and its dense reference at every
    seed; write ``out``/sweep.csv after each run and ``out``/sweep.png at the end.
    Returns the rows of this sweep (earlier ones from the CSV included)."""
    from ..training.specs import load_spec

    spec = load_spec(spec)
    names = [name for name, _ in swept]
    seeds = tuple(seeds) if seeds is not None else (spec.seed,)
    settings = expand(spec.params, swept, seeds, spec_name=spec.source)  # errors before any training
    for setting in settings:
        with_setting(spec, {n: setting[n] for n in names})
    ref = reference_spec(spec, reference)
    out = Path(out or f"runs/sweep-{spec.name}")
    out.mkdir(parents=True, exist_ok=True)
    data = source or spec.data.get("source", "auto")
    plan = _plan(spec, ref, names, settings, seeds, {"data": data, "limit": limit or ""}, epochs)
    csv_path = out / "sweep.csv"
    rows = read_rows(csv_path, names)
    index = {key(row, names): i for i, row in enumerate(rows)}
    todo = [run for run in plan if key(run[2], names) not in index or rows[index[key(run[2], names)]]["error"]]
    if len(todo) < len(plan):
        print_fn(f"{csv_path}: {len(plan) - len(todo)} of {len(plan)} runs already done, skipped")
    started = time.time()
    for number, (run_spec, setting, row) in enumerate(todo, 1):
        name = f"[{number}/{len(todo)}] {_describe(row, names)}"
        print_fn(f"{name}: training")
        row.update(_train(run_spec, setting, row, source, epochs, limit, out, verbose))
        i = index.setdefault(key(row, names), len(rows))
        rows[i:i + 1] = [row]  # replaces a failed row, or appends
        write_rows(csv_path, names, rows)
        left = (time.time() - started) / number * (len(todo) - number)
        result = (f"FAILED: {row['error']}" if row["error"] else
                  f"accuracy {float(row['test_accuracy']):.4f}, {row['trainable_params']} params")
        print_fn(f"{name}: {result}, {row['train_time_s']} s; ETA {_duration(left)}")
    planned = {key(row, names) for _, _, row in plan}
    this = [row for row in rows if key(row, names) in planned]
    _finish(this, names, out, spec, seeds, print_fn)
    return this


def _plan(spec, ref, names, settings, seeds, where: dict, epochs) -> list[tuple]:
    """(spec, parameter values, CSV row without results) of every run; per seed the
    reference first, then the curve."""
    runs = [("reference", ref, {"seed": s}) for s in seeds] if ref is not None else []
    runs += [("sweep", spec, setting) for setting in settings]
    plan = []
    for role, run_spec, setting in sorted(runs, key=lambda run: seeds.index(run[2]["seed"])):
        values = {n: setting[n] for n in names if role == "sweep"}
        row = {"role": role, "spec": run_spec.name, **{n: values.get(n, "") for n in names},
               "seed": setting["seed"], "epochs": total_epochs(run_spec, epochs), **where}
        plan.append((run_spec, values, {c: str(v) for c, v in row.items()}))
    return plan


def _train(run_spec, setting: dict, row: dict, source, epochs, limit, out: Path, verbose) -> dict:
    """One run -> its result columns; an exception becomes the ``error`` column."""
    import keras

    from ..training.staging import fit_staged

    changed = dataclasses.replace(with_setting(run_spec, setting), seed=int(row["seed"]),
                                  data={**run_spec.data, "limit": limit} if limit else run_spec.data)
    folder = out / "runs" / "-".join([row["role"], run_spec.name, *(f"{n}{v}" for n, v in setting.items()),
                                      f"seed{row['seed']}"])
    keras.backend.clear_session()  # one process trains many models: drop the previous ones' state
    start = time.time()
    try:
        report = fit_staged(changed, source=source, out=folder, epochs=epochs, verbose=verbose)
    except Exception as err:  # noqa: BLE001 -- a run that fails is recorded, and the sweep goes on
        fact = (str(err).strip().splitlines() or [""])[0]  # the caret lines and hint stay out of the CSV
        return {"trainable_params": "", "test_accuracy": "", "train_time_s": f"{time.time() - start:.1f}",
                "data_source": "", "error": f"{type(err).__name__}: {fact}"}
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # model.keras and report.json stay
    return {"trainable_params": str(report["trainable_params"]), "test_accuracy": f"{report['test_accuracy']:.4f}",
            "train_time_s": f"{time.time() - start:.1f}", "data_source": report["data_source"], "error": ""}


def _finish(rows, names, out: Path, spec, seeds, print_fn) -> None:
    groups = summarize(rows, names)
    failed = [r for r in rows if r["error"]]
    if failed:
        print_fn(f"{len(failed)} run(s) failed; their errors are in {out}/sweep.csv")
    if not groups:
        print_fn("no run succeeded: no plot")
        return
    done = sorted((r for r in rows if not r["error"]), key=lambda r: r["role"] != "sweep")
    source, runs = done[0]["data_source"], done[0]
    title = (f"{spec.name}: test accuracy against trainable parameters\n"
             f"{spec.data.get('name', 'fashion_mnist')}, {source}, {runs['epochs']} epoch(s), "
             f"seeds {','.join(map(str, seeds))}" + (f", first {runs['limit']} images" if runs["limit"] else ""))
    plot(rows, names, out / "sweep.png", title)
    print_fn(markdown_table(groups))
    print_fn(f"wrote {out}/sweep.csv and {out}/sweep.png")


def _describe(row: dict, names) -> str:
    what = [f"{n}={row[n]}" for n in names] if row["role"] == "sweep" else ["(dense reference)"]
    return " ".join([row["spec"], ", ".join(what)]).strip() + f", seed {row['seed']}"


def _duration(seconds: float) -> str:
    """``75`` -> ``'1 min 15 s'``."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
