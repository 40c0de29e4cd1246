"""COCO-format detection data: any instances file + image folder (COCO 2017, ODinW, a user's export).

``load_coco_detection`` reads and validates an annotation file into ``ImageRecord``s. Broken files fail
with an error naming the file and the offending id (duplicate ids, unknown category or image ids, empty
category names); bad but recoverable entries are skipped, counted in ``SkipReport`` and logged (missing
image files, boxes of zero or negative size, boxes entirely outside their image, images without
annotations when training). Boxes that stick out of their image are clipped.

``CocoDetection`` returns per image ``(image (3, H, W) float normalized, target)`` with target keys
``image_id``, ``orig_size`` (h, w), ``size`` (h, w after transforms), ``boxes`` (n, 4) normalized
(cx, cy, w, h), ``category_ids`` (n,) dataset ids, ``annotation_ids`` (n,), and ``masks`` (n, H, W)
when ``return_masks``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from grounding.data.images import read_rgb_image
from grounding.data.prompts import clean_category_name

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Annotation:
    id: int
    category_id: int
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) pixels, clipped to the image
    segmentation: object = None
    iscrowd: bool = False


@dataclass
class ImageRecord:
    id: int
    path: Path
    width: int
    height: int
    annotations: list[Annotation] = field(default_factory=list)


@dataclass
class SkipReport:
    """What was left out of a dataset and why: counts and the first few ids per reason."""

    source: str
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, what: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(what)

    def log(self) -> None:
        for reason, count in sorted(self.counts.items()):
            log.warning("%s: skipped %d (%s), e.g. %s", self.source, count, reason, "; ".join(self.examples[reason]))


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise ValueError(f"annotation file {path} is not a COCO instances file (needs images, annotations, categories)")
    return data


def _unique_ids(entries: list[dict], what: str, path: Path) -> None:
    seen = set()
    for entry in entries:
        if "id" not in entry:
            raise ValueError(f"annotation file {path}: a {what} entry has no id: {entry!r:.200}")
        if entry["id"] in seen:
            raise ValueError(f"annotation file {path}: duplicate {what} id {entry['id']}")
        seen.add(entry["id"])


def read_categories(path: str | Path) -> dict[int, str]:
    """Category id -> cleaned name of an instances file, in file order; errors name the file and id."""
    path = Path(path)
    return categories_of(_read_json(path), path)


def categories_of(data: dict, path: Path) -> dict[int, str]:
    """Category id -> cleaned name of a parsed instances file (``path`` names it in errors)."""
    _unique_ids(data["categories"], "category", path)
    try:
        return {int(c["id"]): clean_category_name(c["id"], c.get("name")) for c in data["categories"]}
    except ValueError as error:
        raise ValueError(f"annotation file {path}: {error}") from None


def load_coco_detection(
    annotation_file: str | Path, image_dir: str | Path, keep_images_without_annotations: bool = True
) -> tuple[list[ImageRecord], dict[int, str], SkipReport]:
    """Validated image records, the categories (id -> name) and what was skipped."""
    path = Path(annotation_file)
    image_dir = Path(image_dir)
    data = _read_json(path)
    categories = read_categories(path)
    _unique_ids(data["images"], "image", path)
    _unique_ids(data["annotations"], "annotation", path)
    report = SkipReport(str(path))

    records: dict[int, ImageRecord] = {}
    for image in data["images"]:
        records[image["id"]] = ImageRecord(
            id=image["id"], path=image_dir / image["file_name"], width=int(image["width"]), height=int(image["height"])
        )
    for ann in data["annotations"]:
        ann_id = ann["id"]
        if ann.get("category_id") not in categories:
            raise ValueError(
                f"annotation file {path}: annotation id {ann_id} has unknown category id {ann.get('category_id')!r}"
                f" (known: {sorted(categories)})"
            )
        record = records.get(ann.get("image_id"))
        if record is None:
            raise ValueError(f"annotation file {path}: annotation id {ann_id} refers to unknown image id {ann.get('image_id')!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
            report.add("malformed box", f"annotation id {ann_id}: bbox {bbox!r}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            report.add("box of zero or negative size", f"annotation id {ann_id}: bbox {bbox}")
            continue
        x0, y0 = min(max(x, 0.0), record.width), min(max(y, 0.0), record.height)
        x1, y1 = min(max(x + w, 0.0), record.width), min(max(y + h, 0.0), record.height)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            report.add("box outside its image", f"annotation id {ann_id}: bbox {bbox} in {record.width}x{record.height}")
            continue
        record.annotations.append(
            Annotation(ann_id, ann["category_id"], (x0, y0, x1, y1), ann.get("segmentation"), bool(ann.get("iscrowd", 0)))
        )

    kept = []
    for record in records.values():
        if not record.path.is_file():
            report.add("missing image file", f"image id {record.id}: {record.path}")
        elif not keep_images_without_annotations and not any(not a.iscrowd for a in record.annotations):
            report.add("image without annotations", f"image id {record.id}")
        else:
            kept.append(record)
    if not kept:
        raise ValueError(f"annotation file {path}: no usable image (image folder {image_dir}); skipped: {dict(report.counts)}")
    return kept, categories, report


def fraction_subset(records: list[ImageRecord], fraction: float, seed: int) -> list[ImageRecord]:
    """A random ``fraction`` of the images (low-data protocol), at least one, reproducible for a seed."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return records
    count = max(1, round(fraction * len(records)))
    chosen = set(random.Random(seed).sample(range(len(records)), count))
    return [r for i, r in enumerate(records) if i in chosen]


def k_shot_subset(records: list[ImageRecord], shots: int, seed: int) -> list[ImageRecord]:
    """GLIP-style k-shot: per category, ``shots`` random images containing it; images keep all their boxes.

    [choice] An image drawn for one category also counts towards the others it contains, and categories
    with fewer than ``shots`` images keep all of theirs.
    """
    if shots < 1:
        raise ValueError(f"shots_per_category must be >= 1, got {shots}")
    rng = random.Random(seed)
    by_category: dict[int, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        for category_id in sorted({a.category_id for a in record.annotations if not a.iscrowd}):
            by_category[category_id].append(index)
    chosen: set[int] = set()
    for category_id in sorted(by_category):
        candidates = by_category[category_id]
        have = sum(1 for i in candidates if i in chosen)
        pool = [i for i in candidates if i not in chosen]
        chosen.update(rng.sample(pool, min(max(shots - have, 0), len(pool))))
    return [r for i, r in enumerate(records) if i in chosen]


def detection_transforms(
    train: bool,
    image_size: int = 800,
    max_size: int = 1333,
    train_scales: list[int] | None = None,
    flip_prob: float = 0.5,
    crop_prob: float = 0.5,
    crop_scale: tuple[float, float] = (0.3, 1.0),
) -> v2.Compose:
    """transforms.v2 pipeline keeping boxes and masks consistent with the image.

    Evaluation: resize the shorter side to ``image_size`` (longer side at most ``max_size``). Training:
    random horizontal flip, a random resized crop with probability ``crop_prob``, then a random shorter
    side from ``train_scales`` (default: ``image_size`` only) under the same ``max_size``.
    """
    if train:
        steps = [v2.RandomHorizontalFlip(flip_prob)]
        if crop_prob > 0:
            steps.append(v2.RandomApply([v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)], p=crop_prob))
        steps.append(v2.RandomShortestSize(list(train_scales or [image_size]), max_size=max_size, antialias=True))
    else:
        steps = [v2.Resize(image_size, max_size=max_size, antialias=True)]
    steps += [v2.ClampBoundingBoxes(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def annotation_mask(segmentation: object, box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """Binary (H, W) mask of a COCO segmentation (polygons, RLE or uncompressed RLE); the box if absent."""
    from pycocotools import mask as mask_utils

    if not segmentation:
        mask = torch.zeros(height, width, dtype=torch.uint8)
        x0, y0, x1, y1 = box
        mask[int(y0):math.ceil(y1), int(x0):math.ceil(x1)] = 1
        return mask
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation, counts=segmentation["counts"].encode() if isinstance(segmentation["counts"], str) else segmentation["counts"])
    return torch.from_numpy(mask_utils.decode(rle)).to(torch.uint8)


class CocoDetection(Dataset):
    """Images and box targets of a validated COCO instances file (see the module docstring)."""

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        transforms: v2.Compose | None = None,
        train: bool = False,
        return_masks: bool = False,
        train_fraction: float = 1.0,
        shots_per_category: int | None = None,
        subset_seed: int = 0,
    ):
        self.annotation_file = Path(annotation_file)
        records, self.categories, self.skipped = load_coco_detection(annotation_file, image_dir, keep_images_without_annotations=not train)
        if shots_per_category:
            records = k_shot_subset(records, shots_per_category, subset_seed)
        records = fraction_subset(records, train_fraction, subset_seed)
        self.records = records
        self.skipped.log()
        self.transforms = transforms or detection_transforms(train=False)
        self.train = train
        self.return_masks = return_masks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        record = self.records[index]
        image = read_rgb_image(record.path, (record.width, record.height), record.id)
        annotations = [a for a in record.annotations if not (self.train and a.iscrowd)]
        size = (record.height, record.width)
        sample = {
            "image": tv_tensors.Image(F.pil_to_tensor(image)),
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor([a.box for a in annotations], dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=size
            ),
        }
        if self.return_masks:
            masks = [annotation_mask(a.segmentation, a.box, *size) for a in annotations]
            sample["masks"] = tv_tensors.Mask(torch.stack(masks) if masks else torch.zeros(0, *size, dtype=torch.uint8))
        sample = self.transforms(sample)
        image, boxes = sample["image"], sample["boxes"]
        height, width = image.shape[-2:]
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)  # crops can empty a box
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            "image_id": record.id,
            "orig_size": torch.tensor(size),
            "size": torch.tensor([height, width]),
            "boxes": box_convert(boxes[keep].as_subclass(torch.Tensor), "xyxy", "cxcywh") / scale,
            "category_ids": torch.tensor([a.category_id for a in annotations], dtype=torch.long)[keep],
            "annotation_ids": torch.tensor([a.id for a in annotations], dtype=torch.long)[keep],
        }
        if self.return_masks:
            target["masks"] = sample["masks"].as_subclass(torch.Tensor)[keep].bool()
        return image.as_subclass(torch.Tensor), target


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> dict:
    """Pad images to the largest height and width of the batch.

    Returns ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W) long, 1 on real pixels, and ``targets``.
    """
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    pixel_values = torch.zeros(len(batch), 3, height, width)
    pixel_mask = torch.zeros(len(batch), height, width, dtype=torch.long)
    for i, (image, _) in enumerate(batch):
        pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        pixel_mask[i, : image.shape[1], : image.shape[2]] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "targets": [target for _, target in batch]}
