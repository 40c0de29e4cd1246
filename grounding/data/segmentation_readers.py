"""Readers of semantic-segmentation data: images with label maps (one class index per pixel, 255 = ignore),
one reader per format; ``grounding.data.segmentation`` turns their records into a dataset and a DataModule.

A ``SegmentationRecord`` names an image file and where its labels come from (``LabelPng``: a label PNG;
``CocoObjectLabels``: COCO annotations painted when read). Every reader returns ``(records, class_names,
SkipReport)``; docs/data.md shows the layouts:

- ``load_voc``: PASCAL VOC 2012 under ``root``: ``JPEGImages/<stem>.jpg``, ``SegmentationClass/<stem>.png``
  (palette PNG of class indices, 255 = object borders, ignored), ``ImageSets/Segmentation/<split>.txt``.
  Classes: ``VOC_CLASSES`` (background + 20), or a classes file (one name a line, line index = label).
- ``load_label_folder``: any image folder and label-PNG folder (same stems) with a classes file: Pascal
  Context-59, ADE20K-150 exports. ``reduce_zero`` is the usual convention for ADE20K's PNGs, where 0 means
  "other" and 1..150 the classes: 0 becomes 255 (ignore) and every other value v becomes v - 1.
- ``load_coco_object``: COCO-Object, built from a COCO instances file and its images: label 0 is background,
  1..K the file's categories sorted by id. Each image's map is painted on the fly (``paint_label_map``):
  crowd regions first as 255 (ignore), then the instances from the largest to the smallest, so a small
  object lying on a large one stays visible.
- ``load_synthetic_segmentation``: the semantic PNGs of the project's synthetic dataset (background + its
  categories).

Broken input fails with an error naming the file: a missing folder, list or classes file, an unreadable
or non-index label PNG, a label value outside the class list, a label map whose size is not its image's.
An image without its label PNG ("missing label PNG") or a label without its image ("missing image") is a
counted skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from grounding.constants import IGNORE_INDEX
from grounding.data.coco_file import read_coco
from grounding.data.images import check_image, image_sizes
from grounding.data.label_maps import (
    check_label_values,
    find_image,
    label_folder_stems,
    label_png_size,
    read_class_names,
    read_image_list,
    read_label_png,
    reduce_zero_label,
)
from grounding.data.masks import decode_mask
from grounding.data.skips import SkipReport
from grounding.data.synthetic import images_dir, semantic_dir

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""PASCAL VOC 2012's class names; index = label value."""

VOC_PROMPT_NAMES = tuple(
    {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}.get(name, name)
    for name in VOC_CLASSES
)
"""``VOC_CLASSES`` in natural words for text prompts: the three run-together names are split
("dining table", "potted plant", "tv monitor"); every other name is kept as VOC spells it."""


# ------------------------------------------------------------------------------------- label sources
def paint_label_map(height: int, width: int, masks: Sequence[np.ndarray], labels: Sequence[int], crowd: Sequence[bool]) -> np.ndarray:
    """Instance masks -> one label map (height, width) int64, background 0.

    masks: bool (height, width) each; labels: the class index of each; crowd: whether each is a crowd region.
    Crowd regions are painted first, as IGNORE_INDEX; then the other masks in order of decreasing pixel
    count (a stable order: equal sizes keep the given order), each over what is already painted, so the
    smallest instances end on top and no object is hidden under a larger one.
    """
    painted = np.zeros((height, width), dtype=np.int64)
    for mask, is_crowd in zip(masks, crowd):
        if is_crowd:
            painted[mask] = IGNORE_INDEX
    instances = [(mask, label) for mask, label, is_crowd in zip(masks, labels, crowd) if not is_crowd]
    order = sorted(range(len(instances)), key=lambda i: -int(instances[i][0].sum()))
    for i in order:
        mask, label = instances[i]
        painted[mask] = label
    return painted


@dataclass(frozen=True)
class LabelPng:
    """Labels stored in a PNG (palette, grey or 16-bit) of class indices, optionally ``reduce_zero_label``-ed."""

    path: Path
    reduce_zero_label: bool = False

    def read(self, num_classes: int) -> np.ndarray:
        """(H, W) int64 labels, checked against the class list."""
        labels = read_label_png(self.path)
        if self.reduce_zero_label:
            labels = reduce_zero_label(labels)
        where = f"label PNG {self.path}" + (" (after reduce_zero_label: 0 -> 255, v -> v - 1)" if self.reduce_zero_label else "")
        check_label_values(labels, num_classes, where)
        return labels


@dataclass(frozen=True)
class CocoObjectLabels:
    """The annotations of one COCO image, painted into a label map when read (see ``paint_label_map``).

    label_of_category: COCO category id -> label value (1..K); where: the file, for errors.
    """

    annotations: tuple
    label_of_category: dict
    width: int
    height: int
    where: str

    def read(self, num_classes: int) -> np.ndarray:
        """(height, width) int64 labels (num_classes is not needed: every label comes from the file's categories)."""
        masks, labels, crowd = [], [], []
        for ann in self.annotations:
            where = f"{self.where}: annotation id {ann['id']}"
            masks.append(decode_mask(((ann.get("segmentation"), ann.get("bbox")),), self.height, self.width, where))
            labels.append(self.label_of_category[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
        return paint_label_map(self.height, self.width, masks, labels, crowd)


@dataclass(frozen=True)
class SegmentationRecord:
    """One image and its label source.

    size: (width, height) from an annotation file (COCO); None when the label PNG itself gives it.
    """

    image_id: str
    path: Path
    labels: LabelPng | CocoObjectLabels
    size: tuple[int, int] | None = None


# ------------------------------------------------------------------------------------- readers
def check_same_size(label_path: Path, label_size: tuple[int, int], image_path: Path) -> None:
    """A label map must cover its image pixel for pixel (the stored or the EXIF-oriented image)."""
    stored, oriented = image_sizes(image_path)
    if tuple(label_size) not in (stored, oriented):
        raise ValueError(
            f"label PNG {label_path} is {label_size[0]}x{label_size[1]} but its image {image_path} is {oriented[0]}x{oriented[1]}"
        )


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _pair_label_pngs(
    image_dir: Path, label_dir: Path, stems: list[str], reduce_zero: bool, report: SkipReport, list_file: Path | None = None,
) -> list[SegmentationRecord]:
    """Records of the stems that have both an image (jpg/png) and ``label_dir/<stem>.png``; the others are counted skips."""
    seen: set[str] = set()
    records = []
    for stem in stems:
        if stem in seen:
            raise ValueError(f"image list {list_file} names {stem!r} twice (an image would be scored twice)")
        seen.add(stem)
        image_path, label_path = find_image(image_dir, stem), label_dir / f"{stem}.png"
        if image_path is None:
            report.add("missing image", f"{stem}: no {stem}.jpg/.png in {image_dir}")
        elif not label_path.is_file():
            report.add("missing label PNG", f"{stem}: no {label_path}")
        else:
            records.append(SegmentationRecord(stem, image_path, LabelPng(label_path, reduce_zero)))
    if not records:
        raise ValueError(f"{label_dir}: no image with its label PNG; skipped: {dict(report.counts)}")
    return records


def load_voc(
    root: str | Path, split: str, classes_file: str | Path | None = None
) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """PASCAL VOC 2012 layout under ``root``; the images of ``ImageSets/Segmentation/<split>.txt``.

    class_names: ``VOC_CLASSES``, or the names of ``classes_file`` when given.
    """
    root = _existing_dir(root, "VOC root")
    image_dir = _existing_dir(root / "JPEGImages", "VOC image folder")
    label_dir = _existing_dir(root / "SegmentationClass", "VOC label folder")
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    names = read_class_names(classes_file) if classes_file is not None else list(VOC_CLASSES)
    report = SkipReport(str(label_dir))
    return _pair_label_pngs(image_dir, label_dir, read_image_list(list_file), False, report, list_file), names, report


def load_label_folder(
    image_dir: str | Path, label_dir: str | Path, classes_file: str | Path, image_list: str | Path | None = None,
    reduce_zero: bool = False,
) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """Images of ``image_dir`` with ``label_dir/<stem>.png``; the stems of ``image_list`` when given, else
    every image and every label PNG found (so that an unmatched one is reported, not silently ignored).

    reduce_zero: apply ``reduce_zero_label`` (ADE20K's PNGs); line i of the classes file then names
    label i after the reduction, i.e. the PNG value i + 1.
    """
    names = read_class_names(classes_file)
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    list_file = Path(image_list) if image_list is not None else None
    stems = label_folder_stems(image_dir, label_dir, list_file)
    report = SkipReport(str(label_dir))
    return _pair_label_pngs(image_dir, label_dir, stems, reduce_zero, report, list_file), names, report


def load_coco_object(annotation_file: str | Path, image_dir: str | Path) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """COCO-Object from a COCO instances file: class_names ``["background", <categories by id>]``.

    Every image of the file with its file present is kept, also one without annotations (all background);
    a missing image file is a counted skip.
    """
    path, image_dir = Path(annotation_file), _existing_dir(image_dir, "image folder")
    coco = read_coco(path)
    category_ids = sorted(coco.categories)
    if "background" in coco.categories.values():
        raise ValueError(f"annotation file {path}: a category is named 'background', the name of label 0 in COCO-Object")
    if len(category_ids) >= IGNORE_INDEX:
        raise ValueError(f"annotation file {path} has {len(category_ids)} categories; label maps hold at most {IGNORE_INDEX - 1}")
    label_of_category = {category_id: label for label, category_id in enumerate(category_ids, 1)}
    names = ["background"] + [coco.categories[c] for c in category_ids]
    report = SkipReport(str(path))
    by_image = coco.annotations_by_image()
    records = []
    for image_id, image in coco.images.items():
        image_path = image_dir / image["file_name"]
        if not image_path.is_file():
            report.add("missing image", f"image id {image_id}: {image_path}")
            continue
        width, height = int(image["width"]), int(image["height"])
        labels = CocoObjectLabels(tuple(by_image[image_id]), label_of_category, width, height, f"annotation file {path}")
        records.append(SegmentationRecord(str(image_id), image_path, labels, (width, height)))
    if not records:
        raise ValueError(f"annotation file {path}: no image file found in {image_dir}; skipped: {dict(report.counts)}")
    return records, names, report


def check_records(records: Sequence[SegmentationRecord]) -> None:
    """The quick pass before evaluation reads the data: every image header decodes, is not cut short and
    has the annotation file's size; every label PNG header decodes and has its image's size."""
    for record in records:
        check_image(record.path, record.size, record.image_id)
        if isinstance(record.labels, LabelPng):
            check_same_size(record.labels.path, label_png_size(record.labels.path), record.path)


def load_synthetic_segmentation(synthetic_root: str | Path, split: str) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """The semantic label PNGs of a split of the synthetic dataset at ``synthetic_root`` (which must exist):
    ``semantic/<split>/<stem>.png`` with ``images/<split>/<stem>.jpg``, classes of ``semantic/classes.txt``."""
    root = Path(synthetic_root)
    return load_label_folder(images_dir(root, split), semantic_dir(root, split), root / "semantic" / "classes.txt")
