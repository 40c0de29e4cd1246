"""LVIS box Fixed AP from the data to grounding-eval: LVIS v1 files read (image paths from ``coco_url``),
``data.evaluator=lvis`` scoring the detector with ``LvisFixedAPMetric``, equal to ``lvis.LVISEval`` run
directly on the predictions file the run wrote."""

import importlib.util
import json
import logging
import math

import numpy
import pytest

from grounding import cli
from grounding.data.coco import load_coco_detection
from grounding.data.coco_file import read_coco
from grounding.data.detection import CocoDetectionDataModule
from grounding.data.synthetic.lvis import write_synthetic_lvis

from ..conftest import TEST_MODEL_CONFIG

needs_lvis = pytest.mark.skipif(importlib.util.find_spec("lvis") is None,
                                reason="the optional lvis package is not installed (pip install 'grounding[lvis]')")
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@pytest.fixture(scope="module")
def lvis_file(synthetic_root):
    """The synthetic val split as an LVIS v1 file; its images lie under ``synthetic_root / "images"``."""
    return write_synthetic_lvis(synthetic_root, "val")


def direct_lvis_eval(annotation_file, detections):
    """``lvis.LVISEval`` as its documentation runs it (no per-image cap), NumPy's removed ``np.float`` restored."""
    from lvis import LVIS, LVISEval, LVISResults

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(numpy, "float", float, raising=False)  # lvis 0.5.3 still calls np.float
        ground_truth = LVIS(str(annotation_file))
        evaluator = LVISEval(ground_truth, LVISResults(ground_truth, detections, max_dets=-1), iou_type="bbox")
        evaluator.run()
    return {name: (math.nan if evaluator.results[name] < 0 else evaluator.results[name]) for name in STATS}


@needs_lvis
def test_grounding_eval_with_the_lvis_evaluator_equals_lvis_eval_of_its_predictions_file(lvis_file, synthetic_root, tmp_path, monkeypatch):
    logged = []  # the unrounded values that grounding-eval rounds to 4 digits for its summary line
    metrics_line = cli.metrics_line
    monkeypatch.setattr(cli, "metrics_line", lambda prefix, metrics: (logged.append(metrics), metrics_line(prefix, metrics))[1])
    summary = cli.evaluate([
        "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--model.log_images", "false",
        "--data.synthetic_root", str(synthetic_root),  # its train / test files: the same categories, named with spaces
        "--data.val_annotations", str(lvis_file), "--data.val_images", str(synthetic_root / "images"),
        "--data.evaluator", "lvis", "--data.image_size", "96", "--data.max_size", "128", "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path),
    ])
    predictions = json.loads((tmp_path / "image_synthetic" / "version_0" / "predictions" / "lvis_val.json").read_text())
    document = json.loads(lvis_file.read_text())
    images = {image["id"] for image in document["images"]}
    per_image = min(300, TEST_MODEL_CONFIG["num_queries"] * len(document["categories"]))  # every (query, category) pair
    assert {p["image_id"] for p in predictions} == images and len(predictions) == per_image * len(images)  # none capped

    expected = direct_lvis_eval(lvis_file, predictions)
    (raw,) = logged
    values = {key.split("/", 1)[1]: value for result in raw for key, value in result.items()}
    assert set(values) == set(STATS) and summary["split"] == "val"
    for name in STATS:
        got, want = float(values[name]), expected[name]
        assert (math.isnan(got) if math.isnan(want) else got == pytest.approx(want, abs=1e-9)), (name, got, want)
        assert summary[name] == (None if math.isnan(want) else pytest.approx(round(want, 4), abs=1e-9)), name
    assert not math.isnan(expected["APc"]) and not math.isnan(expected["APf"])  # objects of these groups exist
    assert math.isnan(expected["APl"])  # no object above 96² px in 96 px images: undefined, not 0


def test_lvis_image_paths_come_from_coco_url_and_names_lose_their_underscores(lvis_file, synthetic_root):
    document = json.loads(lvis_file.read_text())
    assert all("file_name" not in image and "coco_url" in image for image in document["images"])
    coco = read_coco(lvis_file)
    assert coco.lvis
    assert {i: image["file_name"] for i, image in coco.images.items()} == {
        image["id"]: "val/" + image["coco_url"].rsplit("/", 1)[1] for image in document["images"]}
    assert coco.categories == {c["id"]: c["name"].replace("_", " ") for c in document["categories"]}
    assert "red_circle" in {c["name"] for c in document["categories"]}

    records, categories, skipped = load_coco_detection(lvis_file, synthetic_root / "images")
    plain, _, _ = load_coco_detection(synthetic_root / "annotations" / "instances_val.json", synthetic_root / "images" / "val")
    assert [(r.id, r.path, r.width, r.height) for r in records] == [(r.id, r.path, r.width, r.height) for r in plain]
    assert all(r.path.is_file() for r in records) and not skipped.counts
    assert categories == read_coco(synthetic_root / "annotations" / "instances_val.json").categories


def test_an_lvis_image_without_file_name_or_coco_url_is_named(lvis_file, tmp_path):
    document = json.loads(lvis_file.read_text())
    image = document["images"][1]
    del image["coco_url"]
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError) as error:
        read_coco(path)
    assert str(error.value) == f"annotation file {path}: image id {image['id']} has no file_name (nor an LVIS coco_url to take the path from)"

    image["coco_url"] = "000001.jpg"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=rf"lvis.json: image id {image['id']} has coco_url '000001.jpg', which does not end in"):
        read_coco(path)


@needs_lvis
def test_the_lvis_evaluator_names_what_a_coco_file_lacks(lvis_file, synthetic_root, tmp_path):
    coco_file = synthetic_root / "annotations" / "instances_val.json"
    data = CocoDetectionDataModule(val_annotations=str(coco_file), val_images=str(synthetic_root / "images" / "val"), evaluator="lvis")
    with pytest.raises(ValueError, match=r"instances_val.json: category id 1 has frequency None; LVIS evaluation needs one of"):
        data.lvis_ground_truth("val")

    document = json.loads(lvis_file.read_text())
    first = document["images"][0]["id"]
    del document["images"][0]["neg_category_ids"]
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(document))
    data = CocoDetectionDataModule(val_annotations=str(path), val_images=str(synthetic_root / "images"), evaluator="lvis")
    with pytest.raises(ValueError, match=rf"lvis.json: image id {first} has neg_category_ids None; LVIS evaluation needs a list"):
        data.lvis_ground_truth("val")


def test_an_lvis_file_scored_by_cocoeval_is_warned_about(lvis_file, synthetic_root, caplog):
    data = CocoDetectionDataModule(val_annotations=str(lvis_file), val_images=str(synthetic_root / "images"))
    with caplog.at_level(logging.WARNING, logger="grounding.data.detection"):
        truth = data.ground_truth("val")
    assert len(truth.dataset["images"]) == len(json.loads(lvis_file.read_text())["images"])
    assert [r.getMessage() for r in caplog.records] == [
        f"{lvis_file} is an LVIS file scored by COCOeval; --data.evaluator lvis scores it by LVIS's rules (Fixed AP)"]


def test_an_unknown_evaluator_is_refused(lvis_file, synthetic_root, capsys):
    with pytest.raises(ValueError, match=r"data.evaluator must be 'coco' \(COCOeval box AP\) or 'lvis' .*, got 'lvsi'"):
        CocoDetectionDataModule(val_annotations=str(lvis_file), val_images=str(synthetic_root / "images"), evaluator="lvsi")
    with pytest.raises(SystemExit) as exit_info:
        cli.build_cli(["--data.val_annotations", str(lvis_file), "--data.val_images", str(synthetic_root / "images"),
                       "--data.evaluator", "lvsi"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.rstrip().endswith("error: --data.evaluator: expected one of 'coco', 'lvis', got 'lvsi'")
