"""COCO box AP through pycocotools, on exactly the ground truth the loader kept, gathered across processes.

``CocoBoxMetric`` is a torchmetrics ``Metric``: each process adds its detections; ``compute`` gathers them
(torchmetrics' distributed sync; every evaluation loader reads each image on exactly one process,
``grounding.data.sampling.evaluation_sampler``), runs ``COCOeval`` once, on rank 0, restricted to the
evaluated images, and broadcasts the 12 statistics to every rank. The ground truth is a pycocotools
``COCO`` built from the annotations the data loader kept (``CocoDetectionDataModule.ground_truth``), not
the raw file: a box the loader reported as skipped (NaN, zero area, outside its image) is not silently
evaluated against.

Statistics that COCOeval reports as undefined (−1: no ground-truth object in an area range, e.g. no large
objects, or a split without any annotation) are returned as NaN and printed as ``null``; they are never
turned into 0. The detections can be written as a COCO results JSON, exactly COCO's results format
(``image_id``, ``category_id``, ``bbox`` [x, y, w, h] in original pixels, ``score``): pycocotools' own
``loadRes`` adds keys to the dicts it is given, so it only ever sees copies.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import torch
from torchmetrics import Metric


#: COCOeval's 12 summary numbers, in ``stats`` order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def ground_truth_of_file(annotation_file: str | Path):
    """pycocotools ``COCO`` of every image and annotation of a validated instances file."""
    from grounding.data.coco_file import ground_truth, read_coco

    coco_file = read_coco(annotation_file)
    return ground_truth(coco_file, {a["id"] for a in coco_file.annotations}, list(coco_file.images))


def coco_evaluate(ground_truth, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCOeval box statistics of ``detections`` (COCO results dicts, left unchanged) over ``image_ids``.

    ground_truth: a pycocotools ``COCO`` (``CocoBoxMetric`` builds it). Undefined statistics are NaN.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            results = ground_truth.loadRes(copy.deepcopy(detections))
        else:  # pycocotools' loadRes cannot take an empty list: an empty results set scores every object missed
            results = COCO()
            results.dataset = {"images": list(ground_truth.dataset["images"]), "categories": list(ground_truth.dataset["categories"]), "annotations": []}
            results.createIndex()
        evaluator = COCOeval(ground_truth, results, iouType="bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (float(value) if value >= 0 else math.nan) for name, value in zip(COCO_STAT_NAMES, evaluator.stats)}


class CocoBoxMetric(Metric):
    """Accumulates detections per image; ``compute`` returns COCO box AP/AP50/.../AR (NaN where undefined).

    ground_truth: pycocotools ``COCO`` of the evaluated split as the loader kept it, or an instances file.
    update(image_ids (B,), boxes list of (n_i, 4) xywh original pixels, scores list of (n_i,),
    category_ids list of (n_i,)). Every image passed to ``update`` counts as evaluated, detections or not.
    """

    full_state_update = False

    def __init__(self, ground_truth, **kwargs):
        super().__init__(**kwargs)
        from pycocotools.coco import COCO

        self.ground_truth = ground_truth if isinstance(ground_truth, COCO) else ground_truth_of_file(ground_truth)
        self.add_state("images", default=[], dist_reduce_fx="cat")  # (image_id,) one row per evaluated image
        # one row per detection: (image_id, category_id, x, y, w, h, score)
        self.add_state("detections", default=[], dist_reduce_fx="cat")
        self.last_results: tuple[list[int], list[dict]] = ([], [])

    def update(self, image_ids: torch.Tensor, boxes: list[torch.Tensor], scores: list[torch.Tensor], category_ids: list[torch.Tensor]) -> None:
        for image_id, image_boxes, image_scores, image_categories in zip(image_ids.tolist(), boxes, scores, category_ids):
            self.images.append(torch.tensor([float(image_id)], dtype=torch.float64, device=self.device))
            n = image_boxes.shape[0]
            rows = torch.cat(
                [
                    torch.full((n, 1), float(image_id), dtype=torch.float64, device=self.device),
                    image_categories.reshape(n, 1).to(self.device, torch.float64),
                    image_boxes.reshape(n, 4).to(self.device, torch.float64),
                    image_scores.reshape(n, 1).to(self.device, torch.float64),
                ],
                dim=1,
            )
            self.detections.append(rows)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.images if isinstance(self.images, torch.Tensor) else (torch.cat(self.images) if self.images else torch.zeros(0, dtype=torch.float64))
        detections = (
            self.detections
            if isinstance(self.detections, torch.Tensor)
            else (torch.cat(self.detections) if self.detections else torch.zeros(0, 7, dtype=torch.float64))
        )
        return images.reshape(-1).cpu(), detections.reshape(-1, 7).cpu()

    def results(self) -> tuple[list[int], list[dict]]:
        """Evaluated image ids (sorted) and the COCO results dicts of every process."""
        images, detections = self._gathered()
        results = [
            {"image_id": int(image_id), "category_id": int(category_id), "bbox": [x, y, w, h], "score": score}
            for image_id, category_id, x, y, w, h, score in detections.tolist()
        ]
        return sorted({int(i) for i in images.tolist()}), results

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics, the same on every rank (COCOeval runs on rank 0 only); the gathered detections stay
        in ``last_results`` (image ids, results) for export."""
        image_ids, results = self.results()
        self.last_results = (image_ids, results)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        stats = torch.full((len(COCO_STAT_NAMES),), math.nan, dtype=torch.float64, device=self.device)
        if not distributed or torch.distributed.get_rank() == 0:
            values = coco_evaluate(self.ground_truth, results, image_ids)
            stats = torch.tensor([values[name] for name in COCO_STAT_NAMES], dtype=torch.float64, device=self.device)
        if distributed:
            torch.distributed.broadcast(stats, src=0)
        return {name: stats[i].cpu() for i, name in enumerate(COCO_STAT_NAMES)}
