import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounding.metrics.coco_eval import COCO_STAT_NAMES, CocoBoxMetric, write_json_atomic


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


def test_metric_equals_direct_pycocotools_and_drops_padding_copies(synthetic_root):
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
    first_id = next(iter(per_image))
    # a distributed sampler's padding evaluates an image a second time: that copy must not count
    update_with(metric, first_id, [{"bbox": [0, 0, 5, 5], "score": 0.99, "category_id": 1}] * 3)
    values = metric.compute()
    expected = direct_cocoeval(annotation_file, detections, sorted(per_image))
    for name, value in zip(COCO_STAT_NAMES, expected):
        assert values[name].item() == pytest.approx(max(value, 0.0), abs=1e-12)
    image_ids, results = metric.last_results
    assert image_ids == sorted(per_image) and len(results) == len(detections)


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
