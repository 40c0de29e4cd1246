"""ODinW-13 driver: per-dataset AP equals grounding-eval on that dataset, the mean is over the datasets evaluated;
COCO in the same run, the table with the reference numbers and ``--table``."""

import json
import shutil
from pathlib import Path

import pytest

from .conftest import TEST_MODEL_CONFIG

from grounding.cli import evaluate
from grounding.protocols import odinw


def _layout(synthetic_root, root, names):
    """Put the synthetic val split where the ODinW release keeps each named dataset."""
    entries = {name: (a, i) for name, a, i in odinw.ODINW13}
    for name in names:
        annotations, images = entries[name]
        shutil.copytree(Path(synthetic_root) / "images" / "val", root / images, dirs_exist_ok=True)
        (root / annotations).write_text((Path(synthetic_root) / "annotations" / "instances_val.json").read_text())


def _args(save_dir):
    return [
        "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--data.image_size", "96", "--data.max_size", "128",
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir),
    ]


@pytest.mark.slow
def test_per_dataset_results_and_mean(synthetic_root, tmp_path):
    root = tmp_path / "odinw"
    _layout(synthetic_root, root, ["Aquarium", "pothole"])
    summary = odinw.run(root, _args(tmp_path / "unused"), datasets=["Aquarium", "pothole"], save_dir=str(tmp_path / "runs"))
    assert sorted(summary["datasets"]) == ["Aquarium", "pothole"] and summary["evaluated"] == 2
    direct = evaluate([
        *_args(tmp_path / "direct"), "--data.synthetic_root", "null",
        "--data.val_annotations", str(root / "pothole/valid/annotations_without_background.json"),
        "--data.val_images", str(root / "pothole/valid"),
    ])
    assert summary["datasets"]["pothole"]["AP50"] == pytest.approx(direct["AP50"], abs=1e-6)
    assert summary["datasets"]["pothole"]["AP"] == pytest.approx(direct["AP"], abs=1e-6)
    expected = sum(r["AP50"] for r in summary["datasets"].values()) / 2
    assert summary["mean_AP50"] == pytest.approx(expected, abs=1e-4) and summary["mean_AP50_over"] == 2
    assert (tmp_path / "runs" / "Aquarium").is_dir()  # one run folder per dataset


def test_missing_and_unknown_datasets_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ODinW dataset Raccoon: annotation file not found: .*Raccoon.v2-raw.coco/valid"):
        odinw.run(tmp_path, [], datasets=["Raccoon"])
    with pytest.raises(FileNotFoundError, match="no ODinW-13 dataset found under"):
        odinw.run(tmp_path, [], datasets=["Raccoon"], skip_missing=True)
    with pytest.raises(ValueError, match=r"unknown ODinW-13 datasets \['Zebra'\]"):
        odinw.run(tmp_path, [], datasets=["Zebra"])


@pytest.mark.slow
def test_an_undefined_statistic_is_left_out_of_the_mean(synthetic_root, tmp_path):
    """A dataset without annotations has an undefined AP (null): the mean is over the others, never with a 0."""
    root = tmp_path / "odinw"
    _layout(synthetic_root, root, ["Aquarium", "pothole"])
    empty = root / dict((n, a) for n, a, _ in odinw.ODINW13)["pothole"]
    empty.write_text(json.dumps(dict(json.loads(empty.read_text()), annotations=[])))
    summary = odinw.run(root, _args(tmp_path / "unused"), datasets=["Aquarium", "pothole"], save_dir=str(tmp_path / "runs"))
    assert summary["datasets"]["pothole"]["AP"] is None and summary["datasets"]["Aquarium"]["AP"] is not None
    assert summary["mean_AP"] == summary["datasets"]["Aquarium"]["AP"] and summary["mean_AP_over"] == 1


# ------------------------------------------------------------------------------------- COCO, the table, --table
def _fake_evaluate(monkeypatch, values):
    """``grounding.cli.evaluate`` replaced: (AP, AP50) by logger name; returns the list of the calls' arguments."""
    calls = []

    def evaluate(args):
        calls.append(args)
        ap, ap50 = values[args[args.index("--trainer.logger.init_args.name") + 1]]
        return {"AP": ap, "AP50": ap50}

    monkeypatch.setattr("grounding.cli.evaluate", evaluate)
    return calls


def _files(root, names):
    """Annotation files (content unused) where the ODinW release keeps each named dataset."""
    for name, annotations, _ in odinw.ODINW13:
        if name in names:
            (root / annotations).parent.mkdir(parents=True, exist_ok=True)
            (root / annotations).write_text("{}")


def _table_rows(text):
    """{first cell: other cells} of the table rows (header and rule left out)."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")][1:]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_coco_in_the_same_run_and_the_table(tmp_path, monkeypatch, capsys):
    """Known metrics: the mean is over the datasets present, COCO gets the same arguments, the table is exact."""
    root, coco_dir = tmp_path / "odinw", tmp_path / "coco" / "val2017"
    _files(root, ["Aquarium", "pothole"])  # Raccoon asked for but missing
    coco_dir.mkdir(parents=True)
    (coco_dir.parent / "instances_val2017.json").write_text("{}")
    calls = _fake_evaluate(monkeypatch, {"Aquarium": (0.3, 0.5), "pothole": (0.1234, 0.25), "COCO": (0.4321, 0.6)})
    table_file = tmp_path / "out" / "table.md"
    summary = odinw.main([
        "--root", str(root), "--datasets", "Raccoon", "pothole", "Aquarium", "--skip-missing",
        "--save-dir", str(tmp_path / "runs"), "--coco-annotations", str(coco_dir.parent / "instances_val2017.json"),
        "--coco-images", str(coco_dir), "--table", str(table_file), "--", "--config", "x.yaml", "--ckpt_path", "c.ckpt",
    ])
    out = capsys.readouterr().out
    assert summary["mean_AP"] == 0.2117 and summary["mean_AP_over"] == 2  # (0.3 + 0.1234) / 2, not over 3
    assert summary["mean_AP50"] == 0.375 and summary["coco"] == {"AP": 0.4321, "AP50": 0.6}
    assert json.loads(out.strip().splitlines()[-1]) == summary  # the JSON line stays last
    assert summary["references"]["mmdetection"]["COCO_val2017_AP_percent"] == 48.4
    assert summary["references"]["mmdetection"]["ODinW13_mean_AP_percent"] == 51.4
    assert summary["references"]["IMAGE"]["ODinW13_mean_AP_percent"] == 25.1
    coco_call = calls[-1]
    assert len(calls) == 3 and all(call[:4] == ["--config", "x.yaml", "--ckpt_path", "c.ckpt"] for call in calls)
    for flag, value in (("--data.val_annotations", str(coco_dir.parent / "instances_val2017.json")),
                        ("--data.val_images", str(coco_dir)), ("--trainer.logger.init_args.name", "COCO"),
                        ("--trainer.logger.init_args.save_dir", str(tmp_path / "runs")), ("--data.synthetic_root", "null")):
        assert coco_call[coco_call.index(flag) + 1] == value
    written = table_file.read_text()
    assert written.startswith(
        "| dataset | AP (%) | AP50 (%) | reference AP (%) |\n"
        "|---|---:|---:|---:|\n"
        "| Aquarium | 30.00 | 50.00 |  |\n"
        "| pothole | 12.34 | 25.00 |  |\n"
        "| ODinW-13 mean (over 2 datasets) | 21.17 | 37.50 | 51.4 [1]; 25.1 [2] |\n"
        "| COCO val2017 | 43.21 | 60.00 | 48.4 [1] |\n\n"
        "[1] mmdetection's Grounding DINO model table: Swin-T Grounding DINO pretrained on O365+GoldG+Cap4M, zero-shot.\n"
        "[2] the IMAGE paper (adaptive masking): zero-shot,"
    )
    assert "not comparable with each other" in written and "not over all 13 datasets" in written
    assert written in out and written == odinw.table(summary)  # --table holds the printed table
    assert sorted(p.name for p in table_file.parent.iterdir()) == ["table.md"]  # no temporary file left


def test_table_of_all_13_and_of_undefined_values():
    """Over all 13 the mean row has no "over n"; an undefined value is n/a; COCO not asked for is "not run"."""
    datasets = {name: {"AP": 0.5, "AP50": None if name == "pothole" else 0.7} for name in odinw.NAMES}
    summary = {"datasets": datasets, "evaluated": 13, "mean_AP": 0.5, "mean_AP_over": 13, "mean_AP50": 0.7,
               "mean_AP50_over": 12, "coco": None}
    rows = _table_rows(odinw.table(summary))
    assert list(rows) == [*odinw.NAMES, "ODinW-13 mean (AP over 13, AP50 over 12 datasets)", "COCO val2017"]
    assert rows["pothole"] == ["50.00", "n/a", ""] and rows["COCO val2017"] == ["not run", "not run", "48.4 [1]"]
    summary["datasets"]["pothole"]["AP50"], summary["mean_AP50_over"] = 0.7, 13
    text = odinw.table(summary)
    assert "| ODinW-13 mean | 50.00 | 70.00 | 51.4 [1]; 25.1 [2] |" in text and "not over all" not in text


def test_a_missing_coco_file_is_named_before_any_evaluation(tmp_path, monkeypatch):
    root = tmp_path / "odinw"
    _files(root, ["Aquarium"])
    calls = _fake_evaluate(monkeypatch, {"Aquarium": (0.3, 0.5)})
    missing = tmp_path / "coco" / "instances_val2017.json"
    with pytest.raises(FileNotFoundError) as error:
        odinw.run(root, [], datasets=["Aquarium"], coco_annotations=missing, coco_images=tmp_path)
    assert str(error.value) == f"COCO: annotation file not found: {missing} (--skip-missing to go on)"
    missing.parent.mkdir()
    missing.write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        odinw.run(root, [], datasets=["Aquarium"], coco_annotations=missing, coco_images=tmp_path / "val2017")
    assert str(error.value) == f"COCO: image folder not found: {tmp_path / 'val2017'} (--skip-missing to go on)"
    assert calls == []  # looked for before the first evaluation
    summary = odinw.run(root, [], datasets=["Aquarium"], skip_missing=True, coco_annotations=missing,
                        coco_images=tmp_path / "val2017")
    assert summary["coco"] is None and len(calls) == 1
    with pytest.raises(SystemExit):  # one of the two COCO options alone
        odinw.main(["--root", str(root), "--coco-annotations", str(missing)])


@pytest.mark.slow
def test_tiny_run_with_coco_prints_the_table_of_its_json(synthetic_root, tmp_path, capsys):
    """A real tiny run: the table's numbers are the JSON's (in percent); COCO on the same data as pothole gives
    pothole's numbers; the mean row is the mean of the rows present; --table holds the printed table."""
    root = tmp_path / "odinw"
    _layout(synthetic_root, root, ["Aquarium", "pothole"])
    aquarium = root / dict((n, a) for n, a, _ in odinw.ODINW13)["Aquarium"]
    fewer = json.loads(aquarium.read_text())  # Aquarium: the first two images only, so the datasets differ
    fewer["images"] = fewer["images"][:2]
    fewer["annotations"] = [a for a in fewer["annotations"] if a["image_id"] in {i["id"] for i in fewer["images"]}]
    aquarium.write_text(json.dumps(fewer))
    table_file = tmp_path / "table.md"
    summary = odinw.main([
        "--root", str(root), "--datasets", "Aquarium", "pothole", "Raccoon", "--skip-missing",
        "--save-dir", str(tmp_path / "runs"), "--table", str(table_file),
        "--coco-annotations", str(Path(synthetic_root) / "annotations" / "instances_val.json"),
        "--coco-images", str(Path(synthetic_root) / "images" / "val"), "--", *_args(tmp_path / "unused"),
    ])
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == summary
    written = table_file.read_text()
    assert written in out
    rows = _table_rows(written)
    assert list(rows) == ["Aquarium", "pothole", "ODinW-13 mean (over 2 datasets)", "COCO val2017"]
    expected = {"Aquarium": summary["datasets"]["Aquarium"], "pothole": summary["datasets"]["pothole"],
                "ODinW-13 mean (over 2 datasets)": {"AP": summary["mean_AP"], "AP50": summary["mean_AP50"]},
                "COCO val2017": summary["coco"]}
    for row, values in expected.items():
        assert [float(cell) for cell in rows[row][:2]] == pytest.approx([100 * values["AP"], 100 * values["AP50"]], abs=1e-9)
    assert summary["coco"] == summary["datasets"]["pothole"]  # the same files through the same arguments
    assert rows["Aquarium"][1] != rows["pothole"][1], "the two datasets should differ for the mean check to mean anything"
    for column in (0, 1):
        assert float(rows["ODinW-13 mean (over 2 datasets)"][column]) == pytest.approx(
            (float(rows["Aquarium"][column]) + float(rows["pothole"][column])) / 2, abs=0.006)
    assert [rows[r][2] for r in rows] == ["", "", "51.4 [1]; 25.1 [2]", "48.4 [1]"]
    assert (tmp_path / "runs" / "COCO").is_dir()
