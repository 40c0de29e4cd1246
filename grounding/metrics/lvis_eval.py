"""LVIS box Fixed AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in the
Details"), through the ``lvis`` package, gathered across processes and evaluated once on rank 0.

Fixed AP replaces LVIS's limit of 300 detections per image by a limit per category over the whole split:
of every category, only the 10,000 highest-scoring detections of the split are kept (``max_per_category``),
whatever their images, and no image has a limit of its own. The kept detections are then evaluated by
``lvis.LVISEval`` (box IoU, LVIS's federated rules: a detection of a category neither verified present nor
in the image's ``neg_category_ids`` is not evaluated; an unmatched one of a category in its
``not_exhaustive_category_ids`` is ignored) with ``LVISResults(..., max_dets=-1)`` (no per-image cap),
reporting AP (IoU 0.50:0.95), AP50, AP75, APs/APm/APl (area < 32², 32²–96², > 96²) and APr/APc/APf
(AP over the rare, common and frequent categories). Statistics that LVISEval reports as undefined (−1: no
object of an area range or frequency group) are NaN, never 0.

The cap keeps, for each category, the detections ranked first by score (a stable sort: equal scores in
the order given; ``LvisFixedAPMetric`` orders its gathered detections by image id first, so the choice
does not depend on how many processes evaluated) and removes the others without reordering what is
kept. It is applied after gathering every process's detections: a cap per process would keep up to
10,000 per category and process. Only the images passed to ``update`` are evaluated (like
``grounding.metrics.coco_eval``); over a whole split that is what Dave et al.'s ``evaluate_ap_fixed.py``
computes.

``lvis`` is an optional dependency (``pip install 'grounding[lvis]'``). Its latest release (0.5.3) still
calls ``np.float``, which NumPy removed in 1.24: evaluation runs with ``numpy.float`` set to the builtin
``float`` (what that alias was) and removes it again afterwards. Importing ``lvis`` configures the root
logger (``logging.basicConfig``); that is undone.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torchmetrics import Metric

from grounding.utils import write_json_atomic

#: LVISEval's AP summary numbers, in its order
LVIS_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
#: Fixed AP's detections per category over the whole split (Dave et al., for LVIS)
FIXED_AP_DETECTIONS_PER_CATEGORY = 10_000
LVIS_MISSING = ("LVIS Fixed AP needs the optional `lvis` package, which is not installed: "
                "pip install 'grounding[lvis]' (or pip install lvis)")


def require_lvis():
    """The ``lvis`` module; ImportError naming the ``lvis`` extra when it is missing. The root logger's
    handlers and level are restored after the first import (``lvis`` calls ``logging.basicConfig``)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import lvis
    except ImportError as error:
        raise ImportError(LVIS_MISSING) from error
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return lvis


@contextlib.contextmanager
def _lvis_running() -> Iterator[None]:
    """``numpy.float`` while lvis 0.5.3 evaluates (it calls the alias NumPy removed), and the lvis
    loggers quiet (it warns "Assuming user provided the results in correct format" on every list)."""
    import numpy

    added = not hasattr(numpy, "float")
    if added:
        numpy.float = float
    loggers = [logging.getLogger(name) for name in ("lvis", "lvis.lvis", "lvis.results", "lvis.eval")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels):
            logger.setLevel(previous)
        if added:
            del numpy.float


def lvis_ground_truth(source):
    """An ``lvis.LVIS`` from an ``LVIS`` (returned as is), an LVIS-format dict (``images`` with
    ``neg_category_ids`` / ``not_exhaustive_category_ids``, ``annotations`` with ``area``, ``categories`` with
    ``frequency`` r/c/f) or the path of such a JSON file."""
    lvis = require_lvis()
    if isinstance(source, lvis.LVIS):
        return source
    if isinstance(source, Mapping):
        ground_truth = lvis.LVIS.__new__(lvis.LVIS)  # LVIS() reads only files: index the dict the same way
        ground_truth.logger = logging.getLogger(lvis.lvis.__name__)
        ground_truth.dataset = copy.deepcopy(dict(source))  # LVISEval adds keys to the annotations it evaluates
        with _lvis_running():
            ground_truth._create_index()
        return ground_truth
    with _lvis_running():
        return lvis.LVIS(str(source))


def cap_per_category(results: Sequence[Mapping], max_per_category: int = FIXED_AP_DETECTIONS_PER_CATEGORY) -> list[Mapping]:
    """``results`` (LVIS / COCO results dicts) less, in each category, all but the ``max_per_category``
    highest-scoring ones (equal scores: the earlier in ``results`` first); what is kept keeps its order."""
    if max_per_category < 1:
        raise ValueError(f"max_per_category must be at least 1; got {max_per_category}")
    by_category: dict[int, list[int]] = defaultdict(list)
    for index, result in enumerate(results):
        by_category[result["category_id"]].append(index)
    kept: set[int] = set()
    for indices in by_category.values():
        # sorted() is stable: equal scores stay in their order in results
        kept.update(sorted(indices, key=lambda index: -results[index]["score"])[:max_per_category])
    return [result for index, result in enumerate(results) if index in kept]


def lvis_evaluate(ground_truth, results: Sequence[Mapping], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """LVISEval box AP statistics of ``results`` (left unchanged) over ``image_ids`` (default: every image
    of the ground truth), without LVIS's per-image cap and without capping anything else; NaN where
    undefined. ground_truth: as ``lvis_ground_truth`` takes it."""
    lvis = require_lvis()
    ground_truth = lvis_ground_truth(ground_truth)
    known = set(ground_truth.get_img_ids())
    evaluated = sorted(known if image_ids is None else {int(i) for i in image_ids})
    unknown = sorted({int(r["image_id"]) for r in results} - known) + [i for i in evaluated if i not in known]
    if unknown:
        raise ValueError(f"image ids not in the LVIS ground truth: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    with _lvis_running():
        if results:  # LVISResults adds keys (area, id, segmentation) to the dicts it gets: only to copies
            detections = lvis.LVISResults(ground_truth, [dict(r) for r in results], max_dets=-1)
        else:  # LVISResults cannot take an empty list: an empty results set, indexed like one
            detections = lvis.LVISResults.__new__(lvis.LVISResults)
            detections.logger = logging.getLogger(lvis.results.__name__)
            detections.dataset = dict(ground_truth.dataset, annotations=[])
            detections._create_index()
        evaluator = lvis.LVISEval(ground_truth, detections, iou_type="bbox")
        evaluator.params.max_dets = -1  # no per-image limit (only a label in LVISEval's printout)
        evaluator.params.img_ids = evaluated
        evaluator.run()
    return {name: (float(evaluator.results[name]) if evaluator.results[name] >= 0 else math.nan) for name in LVIS_STAT_NAMES}


def lvis_fixed_ap(ground_truth, results: Sequence[Mapping], image_ids: Sequence[int] | None = None,
                  max_per_category: int = FIXED_AP_DETECTIONS_PER_CATEGORY) -> dict[str, float]:
    """Fixed AP: ``lvis_evaluate`` of ``cap_per_category(results, max_per_category)``."""
    return lvis_evaluate(ground_truth, cap_per_category(results, max_per_category), image_ids)


class LvisFixedAPMetric(Metric):
    """Accumulates detections per image; ``compute`` returns LVIS box Fixed AP (``LVIS_STAT_NAMES``: AP,
    AP50, AP75, APs, APm, APl, APr, APc, APf; NaN where undefined), the same on every rank.

    ground_truth: an ``lvis.LVIS``, an LVIS-format dict or the path of an LVIS JSON file.
    max_per_category: Fixed AP's cap over the split (10,000). predictions_path: where ``compute`` writes
    the evaluated (capped) detections as an LVIS results JSON, atomically, on rank 0; None: nowhere.
    update(image_ids (B,), boxes list of (n_i, 4) xywh original pixels, scores list of (n_i,),
    category_ids list of (n_i,)), as ``CocoBoxMetric``. Every image passed to ``update`` is evaluated,
    detections or not.
    """

    full_state_update = False

    def __init__(self, ground_truth, max_per_category: int = FIXED_AP_DETECTIONS_PER_CATEGORY,
                 predictions_path: str | Path | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_per_category < 1:
            raise ValueError(f"max_per_category must be at least 1; got {max_per_category}")
        self.ground_truth = lvis_ground_truth(ground_truth)
        self.max_per_category = int(max_per_category)
        self.predictions_path = predictions_path
        self.add_state("images", default=[], dist_reduce_fx="cat")  # (image_id,) one row per evaluated image
        # one row per detection: (image_id, category_id, x, y, w, h, score)
        self.add_state("detections", default=[], dist_reduce_fx="cat")
        self.last_results: tuple[list[int], list[dict]] = ([], [])

    def update(self, image_ids: torch.Tensor, boxes: list[torch.Tensor], scores: list[torch.Tensor], category_ids: list[torch.Tensor]) -> None:
        image_ids = torch.as_tensor(image_ids).reshape(-1).tolist()
        if not len(image_ids) == len(boxes) == len(scores) == len(category_ids):
            raise ValueError(f"{len(image_ids)} images, {len(boxes)} box sets, {len(scores)} score sets, {len(category_ids)} category sets")
        for image_id, image_boxes, image_scores, image_categories in zip(image_ids, boxes, scores, category_ids):
            self.images.append(torch.tensor([float(image_id)], dtype=torch.float64, device=self.device))
            n = len(image_boxes)
            rows = torch.cat(
                [
                    torch.full((n, 1), float(image_id), dtype=torch.float64, device=self.device),
                    torch.as_tensor(image_categories).reshape(n, 1).to(self.device, torch.float64),
                    torch.as_tensor(image_boxes).reshape(n, 4).to(self.device, torch.float64),
                    torch.as_tensor(image_scores).reshape(n, 1).to(self.device, torch.float64),
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
        """Evaluated image ids (sorted) and the capped LVIS results dicts of every process: detections in
        image-id order (each image's in the order given), less all but the ``max_per_category`` best of
        each category."""
        images, detections = self._gathered()
        order = torch.sort(detections[:, 0], stable=True).indices
        results = [
            {"image_id": int(image_id), "category_id": int(category_id), "bbox": [x, y, w, h], "score": score}
            for image_id, category_id, x, y, w, h, score in detections[order].tolist()
        ]
        return sorted({int(i) for i in images.tolist()}), cap_per_category(results, self.max_per_category)

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics, the same on every rank (LVISEval runs on rank 0 only); the evaluated detections stay
        in ``last_results`` (image ids, capped results) and go to ``predictions_path`` when set."""
        image_ids, results = self.results()
        self.last_results = (image_ids, results)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        stats = torch.full((len(LVIS_STAT_NAMES),), math.nan, dtype=torch.float64, device=self.device)
        failure = torch.zeros(1, dtype=torch.float64, device=self.device)
        if not distributed or torch.distributed.get_rank() == 0:
            try:
                if self.predictions_path is not None:
                    write_json_atomic(self.predictions_path, results)
                values = lvis_evaluate(self.ground_truth, results, image_ids)
                stats = torch.tensor([values[name] for name in LVIS_STAT_NAMES], dtype=torch.float64, device=self.device)
            except Exception:
                if not distributed:
                    raise
                failure.fill_(1.0)  # the other ranks wait in the broadcast below: release them, then raise
                torch.distributed.broadcast(torch.cat([stats, failure]), src=0)
                raise
        if distributed:
            payload = torch.cat([stats, failure])
            torch.distributed.broadcast(payload, src=0)
            if payload[-1] > 0:
                raise RuntimeError("LVIS Fixed AP evaluation failed on rank 0 (its error is in rank 0's log)")
            stats = payload[:-1]
        return {name: stats[i].cpu() for i, name in enumerate(LVIS_STAT_NAMES)}
