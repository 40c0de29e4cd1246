"""The ablation-table driver: each row's arguments, the table over seeds, resuming, and two tiny real runs."""

import json
import statistics
import subprocess

import pytest
import yaml

from grounding.protocols import ablation
from grounding.protocols.ablation import ROWS, row_args, run_ablation

from .conftest import TEST_MODEL_CONFIG


def test_row_args_put_the_row_settings_seed_and_folder_after_the_base(tmp_path):
    args = row_args("random", 2, ["--config", "c.yaml"], tmp_path)
    assert args == ["--config", "c.yaml", "--model.masking.variant", "random", "--seed_everything", "2",
                    "--trainer.logger.init_args.save_dir", str(tmp_path / "random_seed2")]
    assert set(ROWS) == {"rf_gam", "random", "threshold", "static", "ratios_20_50", "ratios_30_60", "no_masking"}


@pytest.mark.parametrize(
    "rows, seeds, base, message",
    [
        (["rf_gam", "dropout"], [0], [], r"unknown ablation row 'dropout'; rows: rf_gam, random"),
        (["rf_gam"], [0], ["--seed_everything", "4"], r"the train arguments set --seed_everything, which the ablation sets"),
        (["rf_gam", "rf_gam"], [0], [], r"rows \['rf_gam'\] given more than once"),
        (["rf_gam"], [], [], r"give at least one row and one seed"),
    ],
)
def test_bad_requests_are_named_before_anything_runs(tmp_path, rows, seeds, base, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        run_ablation(rows, seeds, base, tmp_path, runner=lambda args, folder: calls.append(args))
    assert calls == []


def fake_runner(calls, fail=()):
    """AP of a run = 0.1 * (row index + 1) + 0.01 * seed; runs named in ``fail`` exit 1."""
    def run(args, folder):
        calls.append(folder.name)
        if folder.name in fail:
            return subprocess.CompletedProcess(args, 1, "", "boom")
        row, seed = folder.name.rsplit("_seed", 1)
        ap = 0.1 * (list(ROWS).index(row) + 1) + 0.01 * int(seed)
        return subprocess.CompletedProcess(args, 0, json.dumps({"trained": {"AP": ap, "AP50": 2 * ap, "AP75": None}}), "")
    return run


def test_the_table_is_mean_and_std_over_seeds_in_the_rows_order_and_resumes(tmp_path):
    calls = []
    markdown, failed = run_ablation(["threshold", "rf_gam"], [0, 3], [], tmp_path, runner=fake_runner(calls))
    assert failed == [] and calls == ["threshold_seed0", "threshold_seed3", "rf_gam_seed0", "rf_gam_seed3"]
    lines = markdown.splitlines()
    threshold = [0.3 + 0.00, 0.3 + 0.03]
    assert lines[0] == "| row | n | AP | AP50 | AP75 |"
    assert lines[2].startswith(f"| threshold | 2 | {statistics.fmean(threshold):.4f} ± {statistics.stdev(threshold):.4f} | ")
    assert lines[3].startswith("| rf_gam | 2 | 0.1150 ± 0.0212 | 0.2300 ± 0.0424 | undefined (2 undefined)")
    assert (tmp_path / "table.md").read_text() == markdown and (tmp_path / "table.csv").read_text().startswith("row,n,AP_mean")
    again = []
    assert run_ablation(["threshold", "rf_gam"], [0, 3], [], tmp_path, runner=fake_runner(again))[0] == markdown
    assert again == []  # every run had its summary.json


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path):
    calls = []
    markdown, failed = run_ablation(["rf_gam", "static"], [0], [], tmp_path, runner=fake_runner(calls, fail={"rf_gam_seed0"}))
    assert failed == ["rf_gam_seed0"] and calls == ["rf_gam_seed0", "static_seed0"]
    assert "exit code 1" in (tmp_path / "rf_gam_seed0" / "error.txt").read_text()
    assert "| rf_gam | 0 | undefined |" in markdown and "| static | 1 | 0.4000 |" in markdown


@pytest.mark.slow
def test_two_tiny_rows_end_to_end(synthetic_root, tmp_path, monkeypatch):
    """random and static masks, one seed, one step each: the runs carry the row's settings, the table two rows."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.chdir(tmp_path)
    base = [
        "--data.synthetic_root", str(synthetic_root), "--data.image_size", "96", "--data.max_size", "128",
        "--data.num_workers", "0", "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "1", "--validate_before_fit", "false", "--trainer.enable_progress_bar", "false",
    ]
    assert ablation.main(["--out", "ab", "--rows", "random", "static", "--seeds", "0", "--", *base]) == 0
    for row, key, expected in (("random", "variant", "random"), ("static", "progressive", False)):
        summary = json.loads((tmp_path / "ab" / f"{row}_seed0" / "summary.json").read_text())
        run_dir = tmp_path / summary["run_dir"]  # the run folder, relative to where the command ran (or absolute)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["model"]["init_args"]["masking"][key] == expected and config["seed_everything"] == 0
    table = (tmp_path / "ab" / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == ["| random", "| static"]
