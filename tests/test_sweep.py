"""k-shot / low-data sweep driver: the grid, each cell's arguments, resuming, SLURM files, the mean ± std table."""

import csv
import io
import json
import math
import subprocess
from pathlib import Path

import pytest

from .conftest import TEST_MODEL_CONFIG

from grounding.protocols import sweep
from grounding.protocols.sweep import Cell


def test_grid_is_value_major_with_names():
    grid = sweep.cells([1, 5], None, [3, 30])
    assert grid == [Cell("shots", 1, 3), Cell("shots", 1, 30), Cell("shots", 5, 3), Cell("shots", 5, 30)]
    assert [c.name for c in grid] == ["shots1_seed3", "shots1_seed30", "shots5_seed3", "shots5_seed30"]
    assert [c.name for c in sweep.cells(None, [0.05, 0.3], [7])] == ["fraction0.05_seed7", "fraction0.3_seed7"]


def test_cell_arguments_follow_the_users():
    base = ["--config", "c.yaml", "--trainer.max_steps", "9"]
    assert sweep.cell_args(Cell("shots", 5, 30), base, "sw") == [
        "--config", "c.yaml", "--trainer.max_steps", "9", "--data.shots_per_category", "5", "--data.subset_seed", "30",
        "--seed_everything", "30", "--trainer.logger.init_args.save_dir", str(Path("sw") / "shots5_seed30"),
    ]
    assert sweep.cell_args(Cell("fraction", 0.05, 3), [], "sw")[:2] == ["--data.train_fraction", "0.05"]
    with pytest.raises(ValueError, match=r"^the train arguments set --data.subset_seed, which the sweep sets for every cell"):
        sweep.cell_args(Cell("shots", 1, 3), ["--data.init_args.subset_seed=4"], "sw")
    with pytest.raises(ValueError, match=r"^the train arguments set --trainer.logger.init_args.save_dir, "):
        sweep.cell_args(Cell("shots", 1, 3), ["--trainer.logger.init_args.save_dir", "x"], "sw")


@pytest.mark.parametrize("argv, message", [
    (["--shots", "1", "--fractions", "0.1"], "sweep: give either --shots or --fractions, not both"),
    ([], "sweep: give --shots K [K ...] or --fractions F [F ...]"),
    (["--shots", "1", "--seeds"], "sweep: --seeds: give at least one seed"),
    (["--shots", "0"], "sweep: --shots: k must be >= 1, got 0"),
    (["--fractions", "1.5"], "sweep: --fractions: f must be in (0, 1], got 1.5"),
    (["--shots", "1", "--seeds", "3", "3"], "sweep: --seeds: [3] given more than once"),
])
def test_setting_errors_are_exact(tmp_path, argv, message):
    with pytest.raises(SystemExit) as raised:
        sweep.main(["--out", str(tmp_path / "sw"), *argv, "--", "--trainer.max_steps", "1"])
    assert str(raised.value.code) == message
    assert not (tmp_path / "sw").exists()  # nothing written for a rejected sweep


def _fake_runner(calls, fail=(), metrics=None):
    """Records the arguments; a cell whose save_dir ends with a name in ``fail`` exits 3."""
    def runner(args, cell_dir):
        calls.append(args)
        name = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1]).name
        assert Path(cell_dir).name == name
        if name in fail:
            return subprocess.CompletedProcess(args, 3, "", "\n".join(f"line {i}" for i in range(100)))
        trained = (metrics or {}).get(name, {"AP": 0.1, "AP50": 0.2, "AP75": 0.05})
        return subprocess.CompletedProcess(args, 0, "noise\n" + json.dumps({"untrained": {}, "trained": trained, "steps": 1}), "")
    return runner


def test_sequential_sweep_resumes_and_reports_failures(tmp_path, capsys):
    out = tmp_path / "sw"
    grid = sweep.cells([1, 3], None, [3, 30])
    (out / "shots1_seed3").mkdir(parents=True)
    (out / "shots1_seed3" / "summary.json").write_text(json.dumps({"trained": {"AP": 0.3, "AP50": 0.5, "AP75": None}}))
    calls = []
    outcome = sweep.run_sweep(grid, ["--trainer.max_steps", "1"], out, runner=_fake_runner(calls, fail={"shots3_seed3"}))
    assert outcome == {"done": ["shots1_seed30", "shots3_seed30"], "skipped": ["shots1_seed3"], "failed": ["shots3_seed3"]}
    assert [a[a.index("--data.subset_seed") + 1] for a in calls] == ["30", "3", "30"]  # the finished cell is not rerun
    error = (out / "shots3_seed3" / "error.txt").read_text()
    assert error.startswith("cell shots3_seed3 failed: exit code 3\n")
    assert error.endswith("last lines of stderr:\n" + "\n".join(f"line {i}" for i in range(60, 100)) + "\n")  # the last 40
    assert not (out / "shots3_seed3" / "summary.json").exists()
    assert json.loads((out / "shots3_seed30" / "summary.json").read_text())["trained"]["AP50"] == 0.2
    stored = json.loads((out / "cells.json").read_text())
    assert [e["name"] for e in stored] == [c.name for c in grid] and stored[2]["args"] == calls[1]
    assert "| 1 | 2 |" in (out / "table.md").read_text() and "| 3 | 1 |" in capsys.readouterr().out

    calls.clear()  # the same command again: only the failed cell runs, and its error.txt goes once it succeeds
    outcome = sweep.run_sweep(grid, ["--trainer.max_steps", "1"], out, runner=_fake_runner(calls))
    assert outcome["done"] == ["shots3_seed3"] and len(calls) == 1
    assert not (out / "shots3_seed3" / "error.txt").exists()
    with pytest.raises(ValueError, match=r"cell shots1_seed3 was set up with other train arguments"):
        sweep.run_sweep(grid, ["--trainer.max_steps", "2"], out, runner=_fake_runner(calls))


def test_a_run_without_a_summary_line_is_a_failure(tmp_path):
    def silent(args, cell_dir):
        return subprocess.CompletedProcess(args, 0, "no json here\n", "")

    outcome = sweep.run_sweep(sweep.cells([1], None, [0]), [], tmp_path, runner=silent)
    assert outcome["failed"] == ["shots1_seed0"]
    assert "exit code 0 but no summary line on stdout" in (tmp_path / "shots1_seed0" / "error.txt").read_text()


def test_slurm_files_and_cell_index(tmp_path):
    out = tmp_path / "sw"
    grid = sweep.cells(None, [0.1, 0.3], [3, 30, 300])
    script = sweep.write_slurm(grid, ["--trainer.max_steps", "1"], out, ["--time=1:00:00"]).read_text()
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --array=0-5" in lines
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --time=1:00:00" in lines
    assert lines[-1].endswith(f"-m grounding.protocols.sweep --out {out.resolve()} --cell $SLURM_ARRAY_TASK_ID")
    own_gpus = sweep.write_slurm(grid, ["--trainer.max_steps", "1"], out, ["--gres=gpu:a100:2"]).read_text()
    assert "#SBATCH --gres=gpu:1" not in own_gpus and "#SBATCH --gres=gpu:a100:2" in own_gpus
    assert len(json.loads((out / "cells.json").read_text())) == 6

    calls = []
    assert sweep.run_one(out, 4, runner=_fake_runner(calls)) == "done"  # cell 4: fraction 0.3, seed 30
    assert calls[0][-8:] == ["--data.train_fraction", "0.3", "--data.subset_seed", "30", "--seed_everything", "30",
                             "--trainer.logger.init_args.save_dir", str(out / "fraction0.3_seed30")]
    with pytest.raises(IndexError, match=r"^--cell 6 is out of range: .*cells.json has 6 cells \(0-5\)$"):
        sweep.run_one(out, 6, runner=_fake_runner(calls))
    with pytest.raises(SystemExit) as raised:
        sweep.main(["--out", str(out), "--cell", "-1"])
    assert str(raised.value.code) == f"sweep: --cell -1 is out of range: {out / 'cells.json'} has 6 cells (0-5)"


def test_table_is_mean_and_sample_std_over_finished_seeds(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from grounding.protocols import plots

    drawn = {}
    real_curves = plots.curve_with_spread
    monkeypatch.setattr(plots, "curve_with_spread", lambda curves, path, *a, **k: (drawn.update(curves), real_curves(curves, path, *a, **k)))
    out = tmp_path / "sw"
    grid = sweep.cells([1, 5], None, [3, 30, 300])
    sweep.write_cells(grid, [], out)
    fake = {  # shots 5, seed 300 has not finished; seed 30 of shots 1 has an undefined AP75
        "shots1_seed3": {"AP": 0.10, "AP50": 0.30, "AP75": 0.05},
        "shots1_seed30": {"AP": 0.20, "AP50": 0.35, "AP75": None},
        "shots1_seed300": {"AP": 0.40, "AP50": 0.55, "AP75": 0.15},
        "shots5_seed3": {"AP": 0.50, "AP50": 0.70, "AP75": 0.45},
        "shots5_seed30": {"AP": 0.60, "AP50": 0.80, "AP75": 0.50},
    }
    for name, trained in fake.items():
        (out / name).mkdir()
        (out / name / "summary.json").write_text(json.dumps({"untrained": {}, "trained": trained}))
    markdown = sweep.collect(out)

    def mean_std(values):  # by hand: sample standard deviation, ddof = 1
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [(r["shots"], r["n"]) for r in rows] == [("1", "3"), ("5", "2")]
    for row, names in ((rows[0], ["shots1_seed3", "shots1_seed30", "shots1_seed300"]), (rows[1], ["shots5_seed3", "shots5_seed30"])):
        for metric in ("AP", "AP50", "AP75"):
            defined = [fake[n][metric] for n in names if fake[n][metric] is not None]
            mean, std = mean_std(defined)
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, abs=1e-6)
            assert float(row[f"{metric}_std"]) == pytest.approx(std, abs=1e-6)
    assert rows[0]["AP75_undefined"] == "1" and rows[1]["AP75_undefined"] == "0"
    ap_mean, ap_std = mean_std([0.10, 0.20, 0.40])
    assert markdown.splitlines() == [
        "| shots | n | AP | AP50 | AP75 |",
        "| ---: | ---: | --- | --- | --- |",
        f"| 1 | 3 | {ap_mean:.4f} ± {ap_std:.4f} | 0.4000 ± 0.1323 | 0.1000 ± 0.0707 (1 undefined) |",
        "| 5 | 2 | 0.5500 ± 0.0707 | 0.7500 ± 0.0707 | 0.4750 ± 0.0354 |",
    ]
    assert (out / "table.md").read_text() == markdown and markdown in capsys.readouterr().out
    # the plot: a PNG that PIL reads, drawn from the table's means and stds and each finished seed's value
    assert Image.open(out / "plot.png").format == "PNG"
    (k1, mean1, std1, seeds1), (k5, mean5, std5, seeds5) = drawn["AP"]
    assert (k1, k5) == (1, 5) and seeds1 == [0.10, 0.20, 0.40] and seeds5 == [0.50, 0.60]
    assert (mean1, std1) == pytest.approx(mean_std([0.10, 0.20, 0.40])) and mean5 == pytest.approx(0.55)
    assert drawn["AP75"][0][3] == [0.05, 0.15]  # the undefined value is no dot


def test_a_single_or_no_defined_value():
    rows = [{"setting": "fraction", "value": 0.3, "seed": 3, "summary": {"trained": {"AP": 0.2, "AP50": None, "AP75": None}}},
            {"setting": "fraction", "value": 0.3, "seed": 30, "summary": None}]
    (row,) = sweep.summarize(rows)
    assert row["n"] == 1 and row["AP"] == {"mean": 0.2, "std": None, "over": 1, "undefined": 0}
    assert row["AP50"] == {"mean": None, "std": None, "over": 0, "undefined": 1}
    assert sweep.markdown_table([row]).splitlines()[-1] == "| 0.3 | 1 | 0.2000 | undefined (1 undefined) | undefined (1 undefined) |"
    assert sweep.csv_table([row]).splitlines() == [
        "fraction,n,AP_mean,AP_std,AP_undefined,AP50_mean,AP50_std,AP50_undefined,AP75_mean,AP75_std,AP75_undefined",
        "0.3,1,0.2,,0,,,1,,,1",
    ]


def test_collect_without_a_sweep_names_the_file(tmp_path):
    with pytest.raises(SystemExit) as raised:
        sweep.main(["--out", str(tmp_path), "--collect"])
    assert str(raised.value.code) == f"sweep: {tmp_path / 'cells.json'} not found: run the sweep (or --slurm) with this --out first"


@pytest.mark.slow
def test_two_tiny_cells_end_to_end(synthetic_root, tmp_path, monkeypatch, capsys):
    """shots 1 × seeds 0, 1 with the default runner (one process per cell): a table row with n = 2."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.chdir(tmp_path)
    train_args = [
        "--data.synthetic_root", str(synthetic_root), "--data.image_size", "96", "--data.max_size", "128",
        "--data.num_workers", "0", "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "1", "--validate_before_fit", "false", "--trainer.enable_progress_bar", "false",
    ]
    status = sweep.main(["--out", "sw", "--shots", "1", "--seeds", "0", "1", "--", *train_args])
    assert status == 0, [p.read_text()[-3000:] for p in (tmp_path / "sw").glob("*/train.err")]
    for seed in (0, 1):
        summary = json.loads((tmp_path / "sw" / f"shots1_seed{seed}" / "summary.json").read_text())
        assert summary["steps"] == 1 and summary["trained"]["AP50"] is not None
        assert Path(summary["run_dir"]).resolve().is_relative_to((tmp_path / "sw" / f"shots1_seed{seed}").resolve())
    table = (tmp_path / "sw" / "table.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| 1 | 2 | ")
    assert "\n".join(table) in capsys.readouterr().out
