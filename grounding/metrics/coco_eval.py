"""COCO box AP through pycocotools on the original annotation file, gathered across processes.

``CocoBoxMetric`` is a torchmetrics ``Metric``: each process adds its detections, ``compute`` gathers
them (torchmetrics' distributed sync), drops the copies of images that a distributed sampler evaluated
twice (it pads the last batch by repeating images), and runs ``COCOeval`` restricted to the evaluated
images. The detections can be written as a COCO results JSON (``image_id``, ``category_id``,
``bbox`` [x, y, w, h] in original pixels, ``score``).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from torchmetrics import Metric

from grounding.utils import write_atomic

#: COCOeval's 12 summary numbers, in ``stats`` order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def write_json_atomic(path: str | Path, payload: object) -> None:
    """Write JSON next to ``path`` and rename over it: an interrupted write never leaves a partial file."""

    def dump(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(payload, stream)

    write_atomic(path, dump)


def coco_evaluate(annotation_file: str | Path, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCOeval box metrics of ``detections`` (COCO results dicts) over ``image_ids`` of the file."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        if not detections:
            return {name: 0.0 for name in COCO_STAT_NAMES}
        results = ground_truth.loadRes(detections)
        evaluator = COCOeval(ground_truth, results, iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: max(float(value), 0.0) for name, value in zip(COCO_STAT_NAMES, evaluator.stats)}


class CocoBoxMetric(Metric):
    """Accumulates detections per image; ``compute`` returns COCO box AP/AP50/.../AR on the original file.

    update(image_ids (B,), boxes list of (n_i, 4) xywh original pixels, scores list of (n_i,),
    category_ids list of (n_i,)). Every image passed to ``update`` counts as evaluated, detections or not.
    """

    full_state_update = False

    def __init__(self, annotation_file: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.annotation_file = str(annotation_file)
        # one row per evaluated image occurrence: (image_id, occurrence key)
        self.add_state("images", default=[], dist_reduce_fx="cat")
        # one row per detection: (occurrence key, category_id, x, y, w, h, score)
        self.add_state("detections", default=[], dist_reduce_fx="cat")
        self._occurrences = 0
        self.last_results: tuple[list[int], list[dict]] = ([], [])

    def update(self, image_ids: torch.Tensor, boxes: list[torch.Tensor], scores: list[torch.Tensor], category_ids: list[torch.Tensor]) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        for image_id, image_boxes, image_scores, image_categories in zip(image_ids.tolist(), boxes, scores, category_ids):
            key = float(rank * 2**32 + self._occurrences)  # exact in float64
            self._occurrences += 1
            self.images.append(torch.tensor([[image_id, key]], dtype=torch.float64, device=self.device))
            n = image_boxes.shape[0]
            rows = torch.cat(
                [
                    torch.full((n, 1), key, dtype=torch.float64, device=self.device),
                    image_categories.reshape(n, 1).to(self.device, torch.float64),
                    image_boxes.reshape(n, 4).to(self.device, torch.float64),
                    image_scores.reshape(n, 1).to(self.device, torch.float64),
                ],
                dim=1,
            )
            self.detections.append(rows)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images if isinstance(self.images, torch.Tensor) else (torch.cat(self.images) if self.images else torch.zeros(0, 2, dtype=torch.float64))
        detections = (
            self.detections
            if isinstance(self.detections, torch.Tensor)
            else (torch.cat(self.detections) if self.detections else torch.zeros(0, 7, dtype=torch.float64))
        )
        return images.reshape(-1, 2).cpu(), detections.reshape(-1, 7).cpu()

    def results(self) -> tuple[list[int], list[dict]]:
        """Evaluated image ids and COCO results dicts, one occurrence per image (the first one gathered)."""
        images, detections = self._gathered()
        first: dict[int, float] = {}
        for image_id, key in images.tolist():
            first.setdefault(int(image_id), key)
        image_of = {key: image_id for image_id, key in first.items()}
        results = []
        for key, category_id, x, y, w, h, score in detections.tolist():
            if key in image_of:
                results.append(
                    {"image_id": image_of[key], "category_id": int(category_id), "bbox": [x, y, w, h], "score": score}
                )
        return sorted(first), results

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics; the gathered detections stay in ``last_results`` (image ids, results) for export."""
        image_ids, results = self.results()
        self.last_results = (image_ids, results)
        stats = coco_evaluate(self.annotation_file, results, image_ids)
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in stats.items()}
