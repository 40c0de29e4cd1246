"""COCO-format detection data: any instances file + image folder (COCO 2017, ODinW, a user's export).

``load_coco_detection`` turns a file validated by ``grounding.data.coco_file.read_coco`` (which fails,
naming the file and id, on duplicate or non-integer ids, unknown category or image ids, empty or repeated
category names) into ``ImageRecord``s. Bad but recoverable entries are skipped, counted in ``SkipReport``
and logged (missing image files, malformed boxes, boxes of zero or negative size or entirely outside their
image, images without annotations when training), or fail by the setting ``invalid_boxes="error"``. Boxes
that stick out of their image are clipped.

``CocoDetection`` returns per image ``(image (3, H, W) float normalized, target)`` with target keys
``image_id``, ``orig_size`` (h, w), ``size`` (h, w after transforms), ``boxes`` (n, 4) normalized
(cx, cy, w, h), ``category_ids`` (n,) dataset ids, ``annotation_ids`` (n,), and ``masks`` (n, H, W)
when ``return_masks``. With ``skip_unreadable`` (training) an image that cannot be read gives an
``UnreadableImage`` instead, which ``collate_detection`` leaves out of the batch and hands on for counting
(``grounding.data.skips``). The DataModule over it is ``grounding.data.detection.CocoDetectionDataModule``.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from grounding.constants import IMAGENET_MEAN, IMAGENET_STD
from grounding.data.coco_file import read_coco
from grounding.data.images import ImageReadError, check_image, read_rgb_image
from grounding.data.masks import decode_mask
from grounding.data.skips import SkipReport, UnreadableImage


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


INVALID_BOXES = ("skip", "error")


def load_coco_detection(
    annotation_file: str | Path,
    image_dir: str | Path,
    keep_images_without_annotations: bool = True,
    invalid_boxes: str = "skip",
) -> tuple[list[ImageRecord], dict[int, str], SkipReport]:
    """Validated image records, the categories (id -> name) and what was skipped.

    invalid_boxes: ``"skip"`` leaves boxes that are malformed (NaN, not 4 numbers), of zero or negative size
    or entirely outside their image out (counted in the report, and out of the evaluation's ground truth
    too); ``"error"`` fails on the first one, naming the file and the annotation id.
    """
    if invalid_boxes not in INVALID_BOXES:
        raise ValueError(f"invalid_boxes must be one of {INVALID_BOXES}, got {invalid_boxes!r}")
    path = Path(annotation_file)
    image_dir = Path(image_dir)
    coco = read_coco(path)
    report = SkipReport(str(path))

    def reject(reason: str, what: str) -> None:
        if invalid_boxes == "error":
            raise ValueError(f"annotation file {path}: {what}: {reason} (data.invalid_boxes=error)")
        report.add(reason, what)

    records: dict[int, ImageRecord] = {
        image_id: ImageRecord(id=image_id, path=image_dir / image["file_name"], width=int(image["width"]), height=int(image["height"]))
        for image_id, image in coco.images.items()
    }
    for ann in coco.annotations:
        ann_id, record = ann["id"], records[ann["image_id"]]
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
        ):
            reject("malformed box", f"annotation id {ann_id}: bbox {bbox!r}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            reject("box of zero or negative size", f"annotation id {ann_id}: bbox {bbox}")
            continue
        x0, y0 = min(max(x, 0.0), record.width), min(max(y, 0.0), record.height)
        x1, y1 = min(max(x + w, 0.0), record.width), min(max(y + h, 0.0), record.height)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            reject("box outside its image", f"annotation id {ann_id}: bbox {bbox} in {record.width}x{record.height}")
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
    return kept, dict(coco.categories), report


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


def _xywh(box: tuple[float, float, float, float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random seed of one training sample's augmentation: a function of (seed, epoch, index) only, so
    that a sample looks the same whatever process, worker or resumed run loads it."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class CocoDetection(Dataset):
    """Images and box targets of a validated COCO instances file (see the module docstring).

    ``dataset[i]`` draws the augmentation from the global random state; ``dataset[(i, epoch)]`` (what
    ``grounding.data.sampling.EpochSampler`` yields) from ``sample_seed(seed, epoch, i)``, leaving the
    global state untouched.

    check_images: read every image's header first (size against the file, truncated JPEG/PNG), so that a
        bad file fails now, naming it, instead of when a batch first needs it.
    skip_unreadable: an image that cannot be read (``ImageReadError``: it does not decode, or its size
        contradicts the file) gives an ``UnreadableImage`` naming it instead of raising (training, where
        ``collate_detection`` leaves it out and the DataModule counts it against its limit).
    """

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
        invalid_boxes: str = "skip",
        check_images: bool = False,
        seed: int = 0,
        skip_unreadable: bool = False,
    ):
        self.annotation_file = Path(annotation_file)
        records, self.categories, self.skipped = load_coco_detection(
            annotation_file, image_dir, keep_images_without_annotations=not train, invalid_boxes=invalid_boxes
        )
        if shots_per_category:
            records = k_shot_subset(records, shots_per_category, subset_seed)
        records = fraction_subset(records, train_fraction, subset_seed)
        self.records = records
        self.skipped.log()
        if check_images:
            for record in records:
                check_image(record.path, (record.width, record.height), record.id)
        self.transforms = transforms or detection_transforms(train=False)
        self.train = train
        self.return_masks = return_masks
        self.seed = seed
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return [record.id for record in self.records]

    @property
    def annotation_ids(self) -> set[int]:
        """Ids of the annotations kept (crowd ones included: COCOeval ignores detections matched to them)."""
        return {a.id for record in self.records for a in record.annotations}

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict] | UnreadableImage:
        index = key[0] if isinstance(key, tuple) else key
        try:
            if isinstance(key, tuple):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(sample_seed(self.seed, key[1], index))
                    return self._load(index)
            return self._load(index)
        except ImageReadError as error:
            if not self.skip_unreadable:
                raise
            record = self.records[index]
            return UnreadableImage(str(record.path), record.id, str(error))

    def _load(self, index: int) -> tuple[torch.Tensor, dict]:
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
            masks = [
                torch.from_numpy(decode_mask(((a.segmentation, _xywh(a.box)),), *size, f"{self.annotation_file}: annotation id {a.id}"))
                for a in annotations
            ]
            sample["masks"] = tv_tensors.Mask(torch.stack(masks) if masks else torch.zeros(0, *size, dtype=torch.bool))
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


def collate_detection(batch: list[tuple[torch.Tensor, dict] | UnreadableImage]) -> dict:
    """Pad images to the largest height and width of the batch.

    Returns ``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W) long, 1 on real pixels, and ``targets``.
    ``UnreadableImage`` entries are left out and listed under ``"unreadable"`` (a key present only then); a
    batch of nothing else is ``{"unreadable": [...]}`` alone.
    """
    unreadable = [sample for sample in batch if isinstance(sample, UnreadableImage)]
    if unreadable:
        batch = [sample for sample in batch if not isinstance(sample, UnreadableImage)]
        if not batch:
            return {"unreadable": unreadable}
        return {**collate_detection(batch), "unreadable": unreadable}
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    pixel_values = torch.zeros(len(batch), 3, height, width)
    pixel_mask = torch.zeros(len(batch), height, width, dtype=torch.long)
    for i, (image, _) in enumerate(batch):
        pixel_values[i, :, : image.shape[1], : image.shape[2]] = image
        pixel_mask[i, : image.shape[1], : image.shape[2]] = 1
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "targets": [target for _, target in batch]}
