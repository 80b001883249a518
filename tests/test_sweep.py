"""`keras-decomp sweep`: value lists and settings (errors pinned), the Pareto front on
hand-made points, the CSV and its resume rules, and a real tiny sweep on the bundled data
that writes sweep.csv and sweep.png, records a setting that does not build and goes on."""

import csv
import json
import math
from pathlib import Path

import pytest

from keras_decomp.errors import DecompError
from keras_decomp.training.specs import load_spec
from keras_decomp.cli.sweep import (columns, expand, markdown_table, pareto_front, parse_seeds, parse_values,
                                read_rows, reference_spec, summarize, total_epochs, write_rows)

ROOT = Path(__file__).resolve().parent.parent
LINEAR_DCT = ROOT / "specs" / "linear_dct.yaml"


# --- values and settings ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("k=10,20,50", ("k", (10, 20, 50))),
    ("k=10", ("k", (10,))),
    (" r = 1, 2.5 ,4.0", ("r", (1, 2.5, 4))),
    ("lr=1e-3,0.01", ("lr", (0.001, 0.01))),
])
def test_values_are_read(text, expected):
    name, values = parse_values(text)
    assert (name, values) == expected
    assert [type(v) for v in values] == [type(v) for v in expected[1]]  # 4.0 becomes the integer 4


@pytest.mark.parametrize("text, message", [
    ("k", r"--param expects NAME=V1,V2,..., got 'k'\ne\.g\. --param k=10,20,50"),
    ("=10,20", r"--param expects NAME=V1,V2,..., got '=10,20'"),
    ("k=", r"--param expects NAME=V1,V2,..., got 'k='"),
    ("k=10,,20", r"--param k=10,,20: '' is not a number"),
    ("k=10;20", r"--param k=10;20: '10;20' is not a number\nseparate the values by commas"),
    ("k=ten", r"--param k=ten: 'ten' is not a number"),
    ("k=10,nan", r"'nan' is not a finite number"),
    ("k=10,20,10.0", r"--param k=10,20,10.0: the value 10 is given twice"),
])
def test_bad_values_are_errors(text, message):
    with pytest.raises(DecompError, match=message):
        parse_values(text)


def test_seeds():
    assert parse_seeds("0,1,2") == (0, 1, 2)
    assert parse_seeds("7") == (7,)
    for bad, message in (("0,x", "--seeds expects integers separated by commas, got '0,x'"),
                         ("0,0", "seeds are distinct integers >= 0"), ("-1", "seeds are distinct integers >= 0"),
                         ("1.5", "--seeds expects integers")):
        with pytest.raises(DecompError, match=message):
            parse_seeds(bad)


def test_settings_are_every_combination_for_each_seed():
    settings = expand({"k": 100, "r": 2, "q": 1}, [("k", (10, 20)), ("r", (1, 2, 3))], seeds=(5, 6))
    assert len(settings) == 12
    assert settings[:3] == [{"k": 10, "r": 1, "seed": 5}, {"k": 10, "r": 2, "seed": 5}, {"k": 10, "r": 3, "seed": 5}]
    assert [s["seed"] for s in settings] == [5] * 6 + [6] * 6  # a whole curve before the next seed
    assert {(s["k"], s["r"]) for s in settings[6:]} == {(k, r) for k in (10, 20) for r in (1, 2, 3)}
    assert expand({"k": 1}, [], seeds=(0, 1)) == [{"seed": 0}, {"seed": 1}]  # seeds of the spec as it is


@pytest.mark.parametrize("params, swept, message", [
    ({"k": 100}, [("kk", (1,))], r"--param kk: specs/x\.yaml has no parameter 'kk'\ndid you mean 'k'\?"),
    ({"rank": 4, "k": 1}, [("rnak", (1,))], r"has no parameter 'rnak'\ndid you mean 'rank'\?"),
    ({"k": 100, "r": 2}, [("depth", (1,))], r"has no parameter 'depth'\nits params: k, r"),
    ({}, [("k", (1,))], r"has no parameter 'k'\nit has no params: section; add e\.g\. params: \{k: 100\}"),
    ({"k": 100}, [("k", (1,)), ("k", (2,))], r"--param k is given twice\nlist all its values once: k=V1,V2"),
])
def test_unknown_or_repeated_names_are_errors(params, swept, message):
    with pytest.raises(DecompError, match=message):
        expand(params, swept, spec_name="specs/x.yaml")


def test_total_epochs_counts_every_stage():
    dct = load_spec(LINEAR_DCT)
    assert total_epochs(dct) == dct.train["epochs"] == 3
    assert total_epochs(dct, 1) == 1
    staged = load_spec(ROOT / "specs" / "staged_sums.yaml")
    assert staged.num_stages > 1
    assert total_epochs(staged) == sum(s.get("epochs", staged.train.get("epochs", 1)) for s in staged.stages)
    assert total_epochs(staged, 2) == 2 * staged.num_stages


# --- the Pareto front ------------------------------------------------------------------------

@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(10, 0.5)], [(10, 0.5)]),
    # a costlier, worse point is dominated; input order does not matter
    ([(300, 0.84), (100, 0.80), (200, 0.85), (50, 0.82)], [(50, 0.82), (200, 0.85)]),
    # the same count twice: only the better one
    ([(100, 0.70), (100, 0.75), (200, 0.74)], [(100, 0.75)]),
    # the same accuracy for more parameters is no gain
    ([(100, 0.8), (200, 0.8), (300, 0.9)], [(100, 0.8), (300, 0.9)]),
    # every point better than the cheaper ones: all kept, by increasing parameters
    ([(3, 0.3), (1, 0.1), (2, 0.2)], [(1, 0.1), (2, 0.2), (3, 0.3)]),
    # the cheapest is the best: it alone
    ([(1, 0.9), (2, 0.5), (3, 0.8)], [(1, 0.9)]),
    # a failed (NaN) point is left out, even the cheapest
    ([(1, math.nan), (2, 0.5), (3, 0.6)], [(2, 0.5), (3, 0.6)]),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


# --- rows and tables -------------------------------------------------------------------------

def _row(role="sweep", spec="s", k="10", seed="0", params="110", accuracy="0.5", error=""):
    return {"role": role, "spec": spec, "k": k, "seed": seed, "epochs": "1", "data": "bundled", "limit": "",
            "trainable_params": params, "test_accuracy": accuracy, "train_time_s": "1.0",
            "data_source": "" if error else "bundled", "error": error}


def test_rows_round_trip_and_a_different_sweep_is_refused(tmp_path):
    path = tmp_path / "sweep.csv"
    rows = [_row(), _row(k="20", params="210", accuracy="", error="SpecError: a, \"quoted\"\nsecond line")]
    write_rows(path, ["k"], rows)
    assert read_rows(path, ["k"]) == rows
    assert path.read_text().splitlines()[0] == ",".join(columns(["k"]))
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.csv"]  # no temporary file left
    assert read_rows(tmp_path / "none.csv", ["k"]) == []
    with pytest.raises(DecompError, match=r"holds a sweep with the columns role, spec, k, .*not role, spec, r, "
                                          r".*\nsweep the same parameters to resume it, or choose another --out"):
        read_rows(path, ["r"])


def test_summary_averages_the_successful_runs_per_setting():
    rows = [_row(seed="0", accuracy="0.5"), _row(seed="1", accuracy="0.7"), _row(seed="2", accuracy="", error="E"),
            _row(k="20", params="210", accuracy="0.6"),
            _row(role="reference", spec="dense", k="", params="7850", accuracy="0.8")]
    groups = summarize(rows, ["k"])
    assert [(g["role"], g["setting"], g["params"]) for g in groups] == [
        ("sweep", {"k": "10"}, 110), ("sweep", {"k": "20"}, 210), ("reference", {"k": ""}, 7850)]
    assert groups[0]["accuracy"] == pytest.approx(0.6) and groups[0]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert groups[0]["accuracies"] == [0.5, 0.7] and groups[1]["std"] == 0.0
    table = markdown_table(groups).splitlines()
    assert table[2].startswith("| k=10 | 110 | 0.6000 ± 0.1414 | 0.5000, 0.7000 |") and table[2].endswith("| yes |")
    assert table[3].startswith("| k=20 | 210 |") and table[3].endswith("|  |")  # 0.6 for more: not on the front
    assert table[4].startswith("| dense (dense reference) | 7850 | 0.8000") and table[4].endswith("| yes |")


# --- the reference ---------------------------------------------------------------------------

def test_the_reference_comes_from_the_spec_or_the_command(tmp_path):
    assert load_spec(LINEAR_DCT).reference == ROOT / "specs" / "linear_dense.yaml"
    assert reference_spec(load_spec(LINEAR_DCT)).name == "linear_dense"
    assert reference_spec(load_spec(LINEAR_DCT), "none") is None
    assert reference_spec(load_spec(LINEAR_DCT), str(ROOT / "specs" / "mlp.yaml")).name == "mlp"
    (tmp_path / "linear_dense.yaml").write_text((ROOT / "specs" / "linear_dense.yaml").read_text())
    spec = tmp_path / "x.yaml"
    spec.write_text(LINEAR_DCT.read_text().replace("reference: linear_dense.yaml", "reference: linear_dnse.yaml"))
    with pytest.raises(DecompError, match=rf"{spec}:6 reference: no spec file .*linear_dnse\.yaml\n"
                                          r"did you mean 'linear_dense\.yaml'\?"):
        reference_spec(load_spec(spec))
    spec.write_text(LINEAR_DCT.read_text().replace("reference: linear_dense.yaml", "reference: dense"))
    with pytest.raises(DecompError, match=r":6 reference: must name a spec file \(\.yaml\), got 'dense'"):
        load_spec(spec)
    spec.write_text(LINEAR_DCT.read_text().replace("reference: linear_dense.yaml", "reference: [a]"))
    with pytest.raises(DecompError, match=r":6 reference: must be a string, got list"):
        load_spec(spec)


# --- the command -----------------------------------------------------------------------------

def test_a_bad_param_stops_the_command_before_any_training(tmp_path, capsys):
    from keras_decomp.cli.main import main

    out = tmp_path / "sweep"
    assert main(["sweep", str(LINEAR_DCT), "--param", "kk=10,20", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --param kk: " in err and "has no parameter 'kk'\ndid you mean 'k'?" in err
    assert main(["sweep", str(LINEAR_DCT), "--param", "k=10,x", "--out", str(out)]) == 2
    assert "error: --param k=10,x: 'x' is not a number" in capsys.readouterr().err
    assert not out.exists()


def _read(out):
    with open(out / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory):
    """A real sweep: the dense reference, k=10 and k=2000 (which does not fit 784 inputs)."""
    import contextlib
    import io

    from keras_decomp.cli.main import main

    out = tmp_path_factory.mktemp("sweep")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["sweep", str(LINEAR_DCT), "--param", "k=10,2000", "--data", "bundled", "--epochs", "1",
                     "--limit", "300", "--seeds", "3", "--out", str(out)])
    return out, code, printed.getvalue(), _read(out)


def test_sweep_writes_one_row_per_run_and_a_plot(first_sweep):
    out, code, printed, rows = first_sweep
    assert code == 0
    assert [(r["role"], r["spec"], r["k"], r["seed"]) for r in rows] == [
        ("reference", "linear_dense", "", "3"), ("sweep", "linear_dct", "10", "3"),
        ("sweep", "linear_dct", "2000", "3")]
    reference, k10, _ = rows
    assert (reference["trainable_params"], k10["trainable_params"]) == ("7850", "110")  # 784*10+10, 10*10+10
    for row in (reference, k10):
        assert row["error"] == "" and row["epochs"] == "1" and row["data"] == "bundled" and row["limit"] == "300"
        # the row holds what the run's own report says, and its time covers the run's training
        run = "-".join([row["role"], row["spec"]] + ([f"k{row['k']}"] if row["k"] else []) + [f"seed{row['seed']}"])
        own = json.loads((out / "runs" / run / "report.json").read_text())
        assert row["test_accuracy"] == f"{own['test_accuracy']:.4f}"
        assert float(row["train_time_s"]) >= round(own["wall_time_s"], 1) - 0.1
        assert row["data_source"].startswith("bundled subset")
    # the CSV holds what each run's own report says
    report = json.loads((out / "runs" / "sweep-linear_dct-k10-seed3" / "report.json").read_text())
    assert report["seed"] == 3 and report["trainable_params"] == 110
    assert f"{report['test_accuracy']:.4f}" == k10["test_accuracy"]
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["runs", "sweep.csv", "sweep.png"]  # no temporary files


def test_a_failing_setting_is_recorded_and_the_sweep_goes_on(first_sweep):
    out, _, printed, rows = first_sweep
    failed = rows[2]
    assert failed["trainable_params"] == failed["test_accuracy"] == ""
    assert failed["error"].startswith("SpecError: ")
    assert "the slice [0:2000] does not fit 784 columns" in failed["error"]
    assert "[3/3] linear_dct k=2000, seed 3: FAILED: SpecError:" in printed
    assert "1 run(s) failed; their errors are in" in printed


def test_progress_is_shown_per_run(first_sweep):
    _, _, printed, rows = first_sweep
    assert "[1/3] linear_dense (dense reference), seed 3: training" in printed
    assert (f"[2/3] linear_dct k=10, seed 3: accuracy {rows[1]['test_accuracy']}, 110 params, "
            f"{rows[1]['train_time_s']} s; ETA ") in printed
    assert "| k=10 | 110 |" in printed and "| linear_dense (dense reference) | 7850 |" in printed


def test_a_rerun_skips_done_runs_and_retries_failed_ones(first_sweep, capsys):
    from keras_decomp.cli.main import main

    out, _, _, before = first_sweep
    assert main(["sweep", str(LINEAR_DCT), "--param", "k=10,20,2000", "--data", "bundled", "--epochs", "1",
                 "--limit", "300", "--seeds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 of 4 runs already done, skipped" in printed
    assert "[1/2] linear_dct k=20, seed 3: training" in printed  # the new setting
    assert "[2/2] linear_dct k=2000, seed 3: training" in printed  # the failed one, again
    assert "k=10, seed 3: training" not in printed and "linear_dense (dense reference), seed 3: training" not in printed
    after = _read(out)
    assert after[:2] == before[:2]  # done rows untouched
    assert [(r["k"], r["trainable_params"]) for r in after] == [
        ("", "7850"), ("10", "110"), ("2000", ""), ("20", "210")]
    assert after[2]["error"] and not after[3]["error"]
