import contextlib
import copy
import io
import json
import math

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounding.metrics.coco_eval import COCO_STAT_NAMES, CocoBoxMetric, coco_evaluate
from grounding.utils import write_json_atomic


def direct_cocoeval(annotation_file, detections, image_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def ground_truth(annotation_file):
    data = json.loads(annotation_file.read_text())
    return data, {i["id"]: [a for a in data["annotations"] if a["image_id"] == i["id"]] for i in data["images"]}


def update_with(metric, image_id, detections):
    metric.update(
        torch.tensor([image_id]),
        [torch.tensor([d["bbox"] for d in detections]).reshape(-1, 4)],
        [torch.tensor([d["score"] for d in detections])],
        [torch.tensor([d["category_id"] for d in detections], dtype=torch.long)],
    )


def test_ground_truth_as_predictions_scores_one(synthetic_root):
    annotation_file = synthetic_root / "annotations" / "instances_val.json"
    _, per_image = ground_truth(annotation_file)
    metric = CocoBoxMetric(annotation_file)
    for image_id, anns in per_image.items():
        update_with(metric, image_id, [{"bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]} for a in anns])
    values = metric.compute()
    assert values["AP"].item() == pytest.approx(1.0) and values["AP50"].item() == pytest.approx(1.0)


def test_metric_equals_direct_pycocotools(synthetic_root):
    annotation_file = synthetic_root / "annotations" / "instances_val.json"
    _, per_image = ground_truth(annotation_file)
    generator = torch.Generator().manual_seed(0)
    detections, metric = [], CocoBoxMetric(annotation_file)
    for image_id, anns in per_image.items():
        image = []
        for a in anns:  # jittered boxes, random scores, sometimes the wrong category
            jitter = (torch.rand(4, generator=generator) - 0.5) * 8
            category = a["category_id"] if torch.rand(1, generator=generator) > 0.3 else 1
            image.append({"image_id": image_id, "bbox": (torch.tensor(a["bbox"]) + jitter).tolist(), "score": torch.rand(1, generator=generator).item(), "category_id": category})
        detections += image
        update_with(metric, image_id, image)
    values = metric.compute()
    expected = direct_cocoeval(annotation_file, detections, sorted(per_image))
    for name, value in zip(COCO_STAT_NAMES, expected):
        if value < 0:  # undefined for pycocotools (no object of that size): stays undefined, never 0
            assert math.isnan(values[name].item()), name
        else:
            assert values[name].item() == pytest.approx(value, abs=1e-12)
    image_ids, results = metric.last_results
    assert image_ids == sorted(per_image) and len(results) == len(detections)
    assert [(r["image_id"], r["category_id"]) for r in results] == [(d["image_id"], d["category_id"]) for d in detections]


def test_evaluated_images_without_detections_count_as_misses(synthetic_root):
    annotation_file = synthetic_root / "annotations" / "instances_val.json"
    _, per_image = ground_truth(annotation_file)
    ids = sorted(per_image)
    metric = CocoBoxMetric(annotation_file)
    update_with(metric, ids[0], [{"bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]} for a in per_image[ids[0]]])
    update_with(metric, ids[1], [])
    recall = metric.compute()["AR100"].item()
    n0, n1 = len(per_image[ids[0]]), len(per_image[ids[1]])
    # recall averaged over categories: ≤ 1 and strictly below 1 since image 1's objects are missed
    assert 0 < recall < 1
    assert metric.last_results[0] == ids[:2] and n0 + n1 > n0


def test_atomic_json_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "predictions.json"
    write_json_atomic(path, [1, 2])
    with pytest.raises(TypeError):
        write_json_atomic(path, [object()])
    assert json.loads(path.read_text()) == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.json"]


def test_undefined_statistics_are_nan_never_zero(synthetic_root, tmp_path):
    annotation_file = synthetic_root / "annotations" / "instances_val.json"
    data, per_image = ground_truth(annotation_file)
    metric = CocoBoxMetric(annotation_file)
    for image_id, anns in per_image.items():
        update_with(metric, image_id, [{"bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]} for a in anns])
    values = metric.compute()
    # 96 px images: no object reaches COCO's "large" area (96² px); pycocotools says -1 there
    assert all(a["area"] < 96 ** 2 for a in data["annotations"])
    assert math.isnan(values["APl"].item()) and math.isnan(values["ARl"].item())
    assert values["APs"].item() == pytest.approx(1.0)
    # a split without any annotation: every statistic is undefined, also with detections
    empty = dict(data, annotations=[])
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    metric = CocoBoxMetric(tmp_path / "empty.json")
    update_with(metric, data["images"][0]["id"], [{"bbox": [1, 1, 5, 5], "score": 0.5, "category_id": 1}])
    assert all(math.isnan(v.item()) for v in metric.compute().values())
    # and without detections: AP of a split with objects but no detection is 0 (all missed), not undefined
    metric = CocoBoxMetric(annotation_file)
    update_with(metric, data["images"][0]["id"], [])
    assert metric.compute()["AP"].item() == 0.0


def test_exported_results_keep_cocos_results_format(synthetic_root):
    annotation_file = synthetic_root / "annotations" / "instances_val.json"
    _, per_image = ground_truth(annotation_file)
    metric = CocoBoxMetric(annotation_file)
    for image_id, anns in per_image.items():
        update_with(metric, image_id, [{"bbox": a["bbox"], "score": 0.9, "category_id": a["category_id"]} for a in anns])
    metric.compute()
    image_ids, results = metric.last_results
    assert results and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    before = copy.deepcopy(results)
    coco_evaluate(metric.ground_truth, results, image_ids)  # loadRes adds area/id/iscrowd/...: only to copies
    assert results == before


def test_ground_truth_is_what_the_loader_kept(synthetic_root, tmp_path):
    """A box the loader skips (NaN, zero area, outside) is not evaluated against; the same predictions score
    as on a file without it. With the raw file, COCOeval would count it as a missed object."""
    from grounding.data.detection import CocoDetectionDataModule

    data = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    image = data["images"][0]
    broken = copy.deepcopy(data)
    next_id = max(a["id"] for a in data["annotations"]) + 1
    broken["annotations"] += [
        {"id": next_id, "image_id": image["id"], "category_id": 1, "bbox": [float("nan"), 2, 5, 5], "area": 25, "iscrowd": 0},
        {"id": next_id + 1, "image_id": image["id"], "category_id": 2, "bbox": [2, 2, 0, 5], "area": 0, "iscrowd": 0},
        {"id": next_id + 2, "image_id": image["id"], "category_id": 3, "bbox": [500, 500, 5, 5], "area": 25, "iscrowd": 0},
    ]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    images = str(synthetic_root / "images" / "val")
    module = CocoDetectionDataModule(val_annotations=str(tmp_path / "broken.json"), val_images=images, image_size=64, max_size=100)
    truth = module.ground_truth("val")
    assert sorted(truth.getAnnIds()) == sorted(a["id"] for a in data["annotations"])
    kept, raw = CocoBoxMetric(truth), CocoBoxMetric(tmp_path / "broken.json")
    for metric in (kept, raw):
        for entry in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == entry["id"]]
            update_with(metric, entry["id"], [{"bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]} for a in anns])
    assert kept.compute()["AP50"].item() == pytest.approx(1.0)
    assert raw.compute()["AR100"].item() < 1.0  # the raw file's extra objects are missed
    failing = CocoDetectionDataModule(val_annotations=str(tmp_path / "broken.json"), val_images=images, invalid_boxes="error")
    with pytest.raises(ValueError, match=rf"broken.json: annotation id {next_id}: bbox \[nan.*malformed box \(data.invalid_boxes=error\)"):
        failing.setup("validate")
