"""grounding-predict and grounding-eval on the same checkpoint and the same synthetic val images: the same COCO AP.

The checkpoint is two training steps of the tiny detector (``grounding.cli.train``); evaluation and prediction
then run through the entry points as a user runs them, with the run's own config.yaml (so the same resize).
Evaluation keeps, per image, the best ``num_detections`` (query, category) pairs, each scored by the mean
probability of the category's tokens (``ImageGroundingModule.detect``). grounding-predict gives exactly those
with ``--every_class --box_threshold 0 --top_k <that count>``; predictions.json mapped onto the val COCO file
(file stem -> image id, label -> category id) then scores the AP that grounding-eval prints.

Without ``--every_class`` each box comes out once, labelled with its best category, scored by transformers'
post-processing (the largest probability of any prompt token), so its AP is another one: a box whose best
category is wrong still counts for the right category in evaluation, never there (on a model trained 60 steps,
val AP50 0.41 against 0.01). That mode is checked against the same evaluated pairs box by box.

Two steps leave AP50 at 0, so the detections are also scored at IoU 0.1, where they are not.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from grounding.cli import evaluate, predict, train

from .conftest import TEST_MODEL_CONFIG

#: the resize of the run: the 96 px synthetic images are read at 80 px (a real resize, no cap reached)
IMAGE_SIZE, MAX_SIZE = 80, 120
QUIET = ["--trainer.logger", "false", "--progress.mode", "never", "--trainer.enable_progress_bar", "false"]


def coco_stats(annotation_file: Path, detections: list[dict], iou: float | None = None) -> np.ndarray:
    """pycocotools' 12 box statistics over every image of the annotation file; ``iou``: at that IoU alone."""
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotation_file))
        evaluator = COCOeval(truth, truth.loadRes(copy.deepcopy(detections)), iouType="bbox")
        evaluator.params.imgIds = sorted(truth.getImgIds())
        if iou is not None:
            evaluator.params.iouThrs = np.array([iou])
        evaluator.evaluate()
        evaluator.accumulate()
        if iou is not None:  # summarize() reads fixed thresholds: the mean precision of the one threshold given
            precision = evaluator.eval["precision"][0, :, :, 0, -1]
            return np.array([precision[precision > -1].mean()])
        evaluator.summarize()
    return evaluator.stats


def as_coco(records: list[dict], document: dict) -> list[dict]:
    """predictions.json as COCO results of the annotation file: stem -> image id, label -> category id."""
    image_ids = {Path(image["file_name"]).stem: image["id"] for image in document["images"]}
    category_ids = {category["name"]: category["id"] for category in document["categories"]}
    return [{"image_id": image_ids[record["image_id"]], "category_id": category_ids[label],
             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            for record in records
            for (x0, y0, x1, y1), score, label in zip(record["boxes"], record["scores"], record["labels"])]


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """Two training steps, then grounding-eval and grounding-predict (both modes) of that checkpoint on val.

    On one torch thread: about 5 s of work; with two threads on a 2-core machine shared with other jobs, the
    threads waiting for each other made it 40 s. The thread count is put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _runs(synthetic_root, tmp_path_factory.mktemp("predict_ap"))
    finally:
        torch.set_num_threads(threads)


def _runs(synthetic_root, folder: Path) -> dict:
    trained = train([
        "--config", "configs/image/synthetic.yaml", *QUIET, "--trainer.accelerator", "cpu",
        "--data.synthetic_root", str(synthetic_root), "--data.image_size", str(IMAGE_SIZE), "--data.max_size", str(MAX_SIZE),
        "--model.model_config", json.dumps(TEST_MODEL_CONFIG), "--model.denoising.number", "3",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--validate_before_fit", "false",
        "--trainer.default_root_dir", str(folder / "train"),
    ])
    run_dir = Path(trained["run_dir"])
    config, checkpoint = run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt"
    assert trained["steps"] == 2 and checkpoint.is_file()

    metrics = evaluate(["--config", str(config), *QUIET, "--ckpt_path", str(checkpoint), "--data.split", "val",
                        "--trainer.default_root_dir", str(folder / "eval")])
    exported = json.loads((Path(metrics["run_dir"]) / "predictions" / "val.json").read_text())

    annotations = Path(synthetic_root) / "annotations" / "instances_val.json"
    document = json.loads(annotations.read_text())
    names = [c["name"] for c in sorted(document["categories"], key=lambda c: c["id"])]  # the prompt's order
    queries = TEST_MODEL_CONFIG["num_queries"]
    kept = min(yaml.safe_load(config.read_text())["model"]["init_args"]["num_detections"], queries * len(names))
    records = {}
    for mode, extra in (("every_class", ["--every_class"]), ("per_box", [])):
        out = folder / mode
        summary = predict(["--config", str(config), *QUIET, "--ckpt_path", str(checkpoint),
                           "--inputs", str(Path(synthetic_root) / "images" / "val"), "--classes", ", ".join(names),
                           "--box_threshold", "0", "--top_k", str(kept), *extra, "--out", str(out),
                           "--trainer.default_root_dir", str(folder / f"predict_{mode}")])
        assert summary["predicted"] == summary["images"] == len(document["images"])
        records[mode] = json.loads((out / "predictions.json").read_text())
    return {"metrics": metrics, "exported": exported, "records": records, "document": document,
            "annotations": annotations, "queries": queries, "kept": kept}


def test_every_class_predictions_score_the_evaluation_ap(runs):
    annotations, exported = runs["annotations"], runs["exported"]
    predicted = as_coco(runs["records"]["every_class"], runs["document"])
    assert len(predicted) == len(exported) == runs["kept"] * len(runs["document"]["images"])
    ours, theirs = coco_stats(annotations, predicted), coco_stats(annotations, exported)
    # grounding-eval prints pycocotools' statistics of the detections it exports, to 4 decimals
    assert runs["metrics"]["AP50"] == pytest.approx(round(theirs[1], 4), abs=1e-9)
    assert runs["metrics"]["AP"] == pytest.approx(round(theirs[0], 4), abs=1e-9)
    assert np.allclose(ours, theirs, rtol=0, atol=1e-6)
    assert ours[1] == pytest.approx(runs["metrics"]["AP50"], abs=5e-5)
    # where two steps of training already find something: the same AP at IoU 0.1
    loose_ours, loose_theirs = coco_stats(annotations, predicted, iou=0.1), coco_stats(annotations, exported, iou=0.1)
    assert loose_theirs[0] > 0.01
    assert loose_ours[0] == pytest.approx(loose_theirs[0], abs=1e-6)


def test_every_class_predictions_are_the_evaluated_pairs(runs):
    """Pair by pair: the same (image, category, box) with the same score; and in evaluation's order (by score)."""
    predicted = as_coco(runs["records"]["every_class"], runs["document"])
    evaluated: dict[tuple[int, int], list[dict]] = {}
    for detection in runs["exported"]:
        evaluated.setdefault((detection["image_id"], detection["category_id"]), []).append(detection)
    for got in predicted:
        candidates = evaluated[(got["image_id"], got["category_id"])]
        distance = [max(abs(a - b) for a, b in zip(got["bbox"], d["bbox"])) for d in candidates]
        expected = candidates[int(np.argmin(distance))]
        assert min(distance) < 1e-3  # pixels of 96 px images: one query's box
        # the evaluation transform and transformers' processor normalize the pixels 1e-5 apart (float32 rounding)
        assert got["score"] == pytest.approx(expected["score"], abs=1e-5)
        candidates.remove(expected)
    assert not any(evaluated.values())  # every evaluated pair came out once
    for record in runs["records"]["every_class"]:
        assert record["scores"] == sorted(record["scores"], reverse=True)


def test_per_box_predictions_are_the_evaluated_boxes_with_their_best_category(runs):
    document, exported = runs["document"], runs["exported"]
    image_ids = {Path(image["file_name"]).stem: image["id"] for image in document["images"]}
    category_ids = {category["name"]: category["id"] for category in document["categories"]}
    by_image: dict[int, list[dict]] = {}
    for detection in exported:
        by_image.setdefault(detection["image_id"], []).append(detection)
    records = runs["records"]["per_box"]
    assert sorted(r["image_id"] for r in records) == sorted(image_ids)
    queries, categories = runs["queries"], len(category_ids)
    for record in records:
        evaluated = by_image[image_ids[record["image_id"]]]
        assert len(evaluated) == runs["kept"] == queries * categories  # every (query, category) pair
        assert len(record["boxes"]) == queries  # one detection per query, none dropped by threshold or top_k
        boxes = torch.tensor([d["bbox"] for d in evaluated], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        scores = torch.tensor([d["score"] for d in evaluated], dtype=torch.float64)
        evaluated_categories = torch.tensor([d["category_id"] for d in evaluated])
        matched = torch.zeros(len(evaluated), dtype=torch.bool)
        for box, score, label in zip(record["boxes"], record["scores"], record["labels"]):
            same = (boxes - torch.tensor(box, dtype=torch.float64)).abs().amax(-1) < 1e-3  # pixels of 96 px images
            assert int(same.sum()) == categories  # the box of one query, scored once per category by evaluation
            matched |= same
            pair = same & (evaluated_categories == category_ids[label])
            assert int(pair.sum()) == 1
            # the label is the category evaluation scores highest for this box (up to the input's float rounding:
            # the evaluation transform and transformers' processor normalize 1e-5 apart)
            assert float(scores[pair]) >= float(scores[same].max()) - 1e-5
            # the largest probability of any prompt token is at least the mean over the label's tokens
            assert score >= float(scores[pair]) - 1e-5
        assert bool(matched.all())  # and every evaluated box is one of them
