"""Train specs on the full Fashion-MNIST for several seeds; a CSV row per run and a
markdown table (mean ± std of the test accuracy over seeds) per spec.

Each run is one ``keras-decomp train SPEC --data full --seed S --out DIR --quiet``
process (a fresh process per run: no Keras state carried from one model to the next),
with the spec's own train settings (epochs, stages, learning rate) unless ``--epochs``
overrides the epochs of every stage. The figures come from the run's ``report.json``.

    .venv/bin/python benchmarks/fashion_specs.py                          # every spec in specs/, seeds 0,1,2
    .venv/bin/python benchmarks/fashion_specs.py linear_dct mlp --seeds 0  # the ones named
    .venv/bin/python benchmarks/fashion_specs.py lenet --seeds 0 --epochs 1 --csv runs/quick.csv
    .venv/bin/python benchmarks/fashion_specs.py --table-only             # the table of the CSV, no training

Resumable: a (spec, seed, epochs) row already in the CSV is not run again, and a run
interrupted half-way continues from its checkpoint (``--resume``). The CSV and the
markdown file are replaced atomically after every run.

Columns: spec, seed, trainable_params, total_params (every Keras weight: trainable plus
non-trainable, e.g. normalisation statistics; fixed bases, regenerated from seeds, are
not weights and not counted), test_accuracy, epochs (per stage, "3+2" for two stages),
train_seconds (the report's wall time: training, the per-epoch test evaluation and
checkpoints), data_source, command.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("spec", "seed", "trainable_params", "total_params", "test_accuracy", "epochs", "train_seconds",
          "data_source", "command")


def spec_path(name: str) -> Path:
    """A spec name (``lenet``) or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    return ROOT / "specs" / f"{name}.yaml"


def stage_epochs(path: Path, override: int | None) -> str:
    """The epochs of each stage as the spec (or ``override``) sets them: "3", or "3+2" for
    two stages. Read from the YAML alone, so that this process needs no Keras."""
    import yaml

    data = yaml.safe_load(path.read_text())
    train = data.get("train") or {}
    stages = data.get("stages") or []
    if not stages:
        expressions = [str(config["W"]) for layer in data.get("layers") or [] if isinstance(layer, dict)
                       for config in layer.values() if isinstance(config, dict) and "W" in config]
        stages = [{}] * max([e.count("|") + 1 for e in expressions] or [1])
    if override is not None:
        return "+".join([str(override)] * len(stages))
    return "+".join(str(s.get("epochs", train.get("epochs", 1))) for s in stages)


def spec_name(path: Path) -> str:
    """The spec's ``name:`` (what its report and CSV rows say), else the file's stem."""
    import yaml

    data = yaml.safe_load(path.read_text())
    return str(data.get("name") or path.stem) if isinstance(data, dict) else path.stem


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def run_one(path: Path, seed: int, epochs: int | None, data: str, out: Path, quiet: bool) -> dict | None:
    """Train one spec for one seed in a fresh process; the CSV row, or None if it failed."""
    shown_path = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    shown_out = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    command = [sys.executable, "-m", "keras_decomp.cli", "train", str(shown_path), "--data", data,
               "--seed", str(seed), "--out", str(shown_out), "--quiet"]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    if (out / "checkpoint" / "state.json").is_file() and not (out / "report.json").is_file():
        command.append("--resume")
    shown = " ".join(shlex.quote(a) for a in [".venv/bin/keras-decomp"] + command[3:] if a != "--resume")
    print(f"$ {shown}", flush=True)
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE if quiet else None,
                            stderr=subprocess.STDOUT if quiet else None, text=True)
    if result.returncode != 0:
        if quiet and result.stdout:
            print(result.stdout[-3000:], file=sys.stderr)
        print(f"FAILED ({result.returncode}) after {time.time() - started:.0f} s: {shown}", file=sys.stderr)
        return None
    report = json.loads((out / "report.json").read_text())
    total = sum(int(row["params"]) for row in report["layers"])
    return {"spec": report["spec"], "seed": seed, "trainable_params": report["trainable_params"],
            "total_params": total, "test_accuracy": f"{report['test_accuracy']:.4f}",
            "epochs": stage_epochs(path, epochs), "train_seconds": f"{report['wall_time_s']:.1f}",
            "data_source": report["data_source"], "command": shown}


def table(rows: list[dict]) -> str:
    """Markdown: one line per (spec, epochs), mean ± std (sample std, n - 1) over seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["spec"], row["epochs"]), []).append(row)
    lines = ["| spec | trainable params | total params | test accuracy (mean ± std) | seeds | epochs "
             "| train s (mean) |", "|---|---:|---:|---|---|---|---:|"]
    order = sorted(groups, key=lambda key: (int(groups[key][0]["trainable_params"]), key))
    for key in order:
        group = sorted(groups[key], key=lambda r: int(r["seed"]))
        accuracies = [float(r["test_accuracy"]) for r in group]
        mean = statistics.fmean(accuracies)
        spread = f" ± {statistics.stdev(accuracies):.4f}" if len(accuracies) > 1 else ""
        seconds = statistics.fmean(float(r["train_seconds"]) for r in group)
        params = sorted({r["trainable_params"] for r in group})
        totals = sorted({r["total_params"] for r in group})
        lines.append(f"| {key[0]} | {'/'.join(params)} | {'/'.join(totals)} | {mean:.4f}{spread} "
                     f"| {','.join(r['seed'] for r in group)} | {key[1]} | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", help="spec names in specs/ or YAML paths (default: every spec in specs/)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="override the epochs of every stage")
    parser.add_argument("--data", default="full", choices=("full", "auto", "bundled", "idx", "tfds"),
                        help="data source (default full)")
    parser.add_argument("--csv", default="runs/fashion_specs/results.csv", help="the CSV of runs (read and extended)")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    parser.add_argument("--runs", default="runs/fashion_specs", help="folder of the runs' model and report folders")
    parser.add_argument("--table-only", action="store_true", help="print the table of the CSV; train nothing")
    parser.add_argument("--verbose", action="store_true", help="show each run's own output")
    args = parser.parse_args(argv)

    csv_path = ROOT / args.csv if not Path(args.csv).is_absolute() else Path(args.csv)
    rows = read_rows(csv_path)
    paths = [spec_path(s) for s in args.specs] or sorted((ROOT / "specs").glob("*.yaml"))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print("# .venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"# nproc {os.cpu_count()}, {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"load average at start {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if not args.table_only:
        for path in paths:
            if not path.is_file():
                print(f"no such spec: {path}", file=sys.stderr)
                return 2
            epochs = stage_epochs(path, args.epochs)
            name = spec_name(path)
            for seed in seeds:
                if any(r["spec"] == name and int(r["seed"]) == seed and r["epochs"] == epochs for r in rows):
                    print(f"# {name} seed {seed} epochs {epochs}: in {args.csv} already, skipped")
                    continue
                suffix = f"-e{args.epochs}" if args.epochs is not None else ""
                out = Path(args.runs) / f"{name}-s{seed}{suffix}"
                row = run_one(path, seed, args.epochs, args.data, ROOT / out, quiet=not args.verbose)
                if row is None:
                    continue
                print(f"{row['spec']} seed {seed}: test accuracy {row['test_accuracy']}, "
                      f"{row['trainable_params']} trainable, {row['train_seconds']} s", flush=True)
                rows = [r for r in read_rows(csv_path) if not (r["spec"] == name and int(r["seed"]) == seed
                                                                and r["epochs"] == epochs)] + [row]
                write_rows(csv_path, rows)
                rows = read_rows(csv_path)
    wanted = {spec_name(p) for p in paths if p.is_file()}
    shown = [r for r in rows if r["spec"] in wanted] if args.specs else rows
    text = table(shown)
    print(f"\n# load average at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(text)
    if args.markdown:
        write_atomic(Path(args.markdown), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
