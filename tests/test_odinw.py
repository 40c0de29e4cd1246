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


# ------------------------------------------------------------------------------ ODinW-35 and the split setting
#: the datasets GLIP evaluates on mini_val (configs/odinw_35: TEST ("minival",)); mmdetection reads valid for all
GLIP_MINI_VAL = {"brackishUnderwater", "DroneControl", "EgoHands_generic", "EgoHands_specific", "openPoetryVision",
                 "OxfordPets_by_breed", "OxfordPets_by_species", "PKLot", "UnoCards", "VehiclesOpenImages",
                 "websiteScreenshots"}


def test_odinw35_lists_the_35_datasets_of_the_release():
    suite = odinw.ODINW35_DATASETS
    assert len(suite) == 35 and len(set(odinw.ODINW35_NAMES)) == 35
    assert {d.name for d in suite if d.glip_mini_val} == GLIP_MINI_VAL
    assert {d.name for d in odinw.ODINW13_DATASETS if d.glip_mini_val} == {"EgoHands", "VehiclesOpenImages"}
    valid_files = {d.files("valid") for d in suite}
    assert all(d.files("valid") in valid_files for d in odinw.ODINW13_DATASETS)  # ODinW-13 is part of ODinW-35
    by_name = {d.name: d for d in suite}
    assert by_name["boggleBoards"].files("mini_val") == (
        "boggleBoards/416x416AutoOrient/export/val_annotations_without_background.json", "boggleBoards/416x416AutoOrient/export")
    assert by_name["EgoHands_specific"].files("mini_val") == (
        "EgoHands/specific/mini_val/annotations_without_background.json", "EgoHands/specific/mini_val")
    assert by_name["EgoHands_specific"].files("valid") == (
        "EgoHands/specific/valid/annotations_without_background.json", "EgoHands/specific/valid")
    assert by_name["DroneControl"].files("mini_val")[1] == "DroneControl/Drone Control.v3-raw.coco/mini_val"
    assert all(d.files("valid")[0].endswith("annotations_without_background.json") for d in suite)


def _both_splits(root, suite, names):
    """Annotation files (content unused) of both split variants of the named datasets of ``suite``."""
    for dataset in odinw.SUITE_DATASETS[suite]:
        if dataset.name in names:
            for variant in odinw.SPLIT_VARIANTS:
                path = root / dataset.files(variant)[0]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")


def test_the_split_variant_chooses_mini_val_or_valid(tmp_path, monkeypatch, capsys):
    root = tmp_path / "odinw"
    _both_splits(root, "odinw13", ["EgoHands", "Aquarium"])
    for variant, folder in (("valid", "valid"), ("mini_val", "mini_val")):
        calls = _fake_evaluate(monkeypatch, {"Aquarium": (0.3, 0.5), "EgoHands": (0.6, 0.8)})
        summary = odinw.main(["--root", str(root), "--datasets", "EgoHands", "Aquarium", "--split-variant", variant,
                              "--save-dir", str(tmp_path / "runs")])
        ego = calls[1]
        assert ego[ego.index("--data.val_annotations") + 1] == str(root / f"EgoHands/generic/{folder}/annotations_without_background.json")
        assert ego[ego.index("--data.val_images") + 1] == str(root / f"EgoHands/generic/{folder}")
        assert calls[0][calls[0].index("--data.val_images") + 1] == str(root / "Aquarium/Aquarium Combined.v2-raw-1024.coco/valid")
        assert summary["split_variant"] == variant and summary["splits"] == {"Aquarium": "valid", "EgoHands": folder}
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    text = odinw.table(summary)
    assert ("Splits: mini_val for EgoHands (--split-variant mini_val, as GLIP evaluates them), valid for the rest; "
            "references: [1] valid for every dataset; [2] does not say.") in text
    summary["splits"]["EgoHands"] = "valid"
    assert "Splits: valid for every dataset (--split-variant valid; GLIP evaluates EgoHands on mini_val)" in odinw.table(summary)
    with pytest.raises(SystemExit):
        odinw.main(["--root", str(root), "--split-variant", "minival"])


def test_odinw35_suite_its_mean_and_references(tmp_path, monkeypatch):
    root = tmp_path / "odinw"
    _both_splits(root, "odinw35", ["PKLot", "BCCD"])
    calls = _fake_evaluate(monkeypatch, {"BCCD": (0.1, 0.2), "PKLot": (0.3, 0.4)})
    summary = odinw.run(root, ["--config", "x.yaml"], skip_missing=True, save_dir=str(tmp_path / "runs"), suite="odinw35")
    assert list(summary["datasets"]) == ["BCCD", "PKLot"] and summary["suite"] == "odinw35"  # the suite's order
    assert calls[1][calls[1].index("--data.val_images") + 1] == str(root / "PKLot/640/mini_val")
    assert summary["mean_AP"] == 0.2 and summary["note"] == "mean over 2 of the 35 datasets"
    rows = _table_rows(odinw.table(summary))
    assert rows["ODinW-35 mean (over 2 datasets)"] == ["20.00", "30.00", "22.7 [1]; 28.4 [2]"]
    text = odinw.table(summary)
    assert "[2] mmdetection's MM-Grounding-DINO model table: Swin-T MM-Grounding-DINO pretrained on O365+GoldG+GRIT+V3Det" in text
    assert "not over all 35 datasets, the ODinW-35 references are" in text and "IMAGE" not in text
    everything = dict(summary, datasets={name: {"AP": 0.1, "AP50": 0.2} for name in odinw.ODINW35_NAMES},
                      mean_AP_over=35, mean_AP50_over=35, splits=None, split_variant="valid")
    rows = _table_rows(odinw.table(everything))
    assert list(rows)[-2:] == ["ODinW-35 mean", "COCO val2017"] and len(rows) == 37
    with pytest.raises(ValueError, match=r"unknown ODinW-35 datasets \['EgoHands'\]"):  # ODinW-35 says EgoHands_generic
        odinw.run(root, [], datasets=["EgoHands"], suite="odinw35")
    with pytest.raises(FileNotFoundError, match="ODinW dataset UnoCards: annotation file not found: .*UnoCards/raw/mini_val/"):
        odinw.run(root, [], datasets=["UnoCards"], suite="odinw35")
    with pytest.raises(FileNotFoundError, match="no ODinW-35 dataset found under"):
        odinw.run(root, [], datasets=["UnoCards"], suite="odinw35", skip_missing=True)
    assert len(calls) == 2
