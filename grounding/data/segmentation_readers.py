"""Readers of semantic-segmentation data: images with label maps (one class index per pixel, 255 = ignore),
one reader per format; ``grounding.data.segmentation`` turns their records into a dataset and a DataModule.

A ``SegmentationRecord`` names an image file and where its labels come from (``LabelPng``: a label PNG;
``CocoObjectLabels``: COCO annotations painted when read). Every reader returns ``(records, class_names,
SkipReport)``; docs/data.md shows the layouts:

- ``load_voc``: PASCAL VOC 2012 under ``root``: ``JPEGImages/<stem>.jpg``, ``SegmentationClass/<stem>.png``
  (palette PNG of class indices, 255 = object borders, ignored), ``ImageSets/Segmentation/<split>.txt``.
  Classes: ``VOC_CLASSES`` (background + 20), or a classes file (one name a line, line index = label).
  ``load_voc20``: the same files without background (VOC20): 0 -> 255, v -> v - 1, the 20 foreground classes.
- ``load_context60`` / ``load_context59``: PASCAL Context as mmsegmentation's converter writes it under the
  ``VOC2010`` folder: ``JPEGImages/<stem>.jpg``, ``SegmentationClassContext/<stem>.png`` (0 = background,
  1..59 the classes), ``ImageSets/SegmentationContext/<split>.txt``. Context-60 reads the values as they are
  (background + 59); Context-59 drops the background (0 -> 255, v -> v - 1).
- ``load_coco_stuff`` / ``load_coco_object_stuff``: COCO-Stuff-164k converted to train ids under ``root``:
  ``images/<split>/<stem>.jpg``, ``annotations/<split>/<stem>_labelTrainIds.png`` (0..170, 255 = unlabeled).
  COCO-Stuff keeps the 171 classes; COCO-Object turns things 0..79 into 1..80 and stuff into 0 (background).
- ``load_cityscapes``: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (the 19 train ids, 255 = ignore); id ``<name>``.
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
    COCO_STUFF_THINGS,
    LABEL_CONVERSIONS,
    check_label_values,
    files_by_key,
    find_image,
    label_folder_stems,
    label_png_size,
    read_class_names,
    read_image_list,
    read_label_png,
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

VOC20_CLASSES = VOC_CLASSES[1:]
"""VOC20: PASCAL VOC 2012 without background; label = VOC label - 1."""

CONTEXT60_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
"""PASCAL Context's 60 classes (background + the 59 most frequent); index = label value of the converted PNGs."""

CONTEXT59_CLASSES = CONTEXT60_CLASSES[1:]
"""Context-59: the 59 classes without background; label = PNG value - 1."""

COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
"""COCO-Stuff-164k's 171 classes by train id: COCO's 80 things (0..79), then the 91 stuff classes (80..170)."""

COCO_OBJECT_CLASSES = ("background",) + COCO_STUFF_CLASSES[:COCO_STUFF_THINGS]
"""COCO-Object made from COCO-Stuff: background + the 80 things; label = thing train id + 1."""

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
"""Cityscapes' 19 evaluated classes by train id."""


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
    """Labels stored in a PNG (palette, grey or 16-bit) of class indices, optionally converted.

    conversion: None, or a name of ``label_maps.LABEL_CONVERSIONS`` (``"reduce_zero_label"``, ...).
    """

    path: Path
    conversion: str | None = None

    def read(self, num_classes: int) -> np.ndarray:
        """(H, W) int64 labels, checked against the class list."""
        labels, where = read_label_png(self.path), f"label PNG {self.path}"
        if self.conversion is not None:
            convert, what = LABEL_CONVERSIONS[self.conversion]
            labels, where = convert(labels), f"{where} (after {self.conversion}: {what})"
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
    image_dir: Path, label_dir: Path, stems: list[str], conversion: str | None, report: SkipReport, list_file: Path | None = None,
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
            records.append(SegmentationRecord(stem, image_path, LabelPng(label_path, conversion)))
    if not records:
        raise ValueError(f"{label_dir}: no image with its label PNG; skipped: {dict(report.counts)}")
    return records


def _read_voc_layout(
    root: str | Path, split: str, label_folder: str, list_folder: str, dataset: str, conversion: str | None = None,
) -> tuple[list[SegmentationRecord], SkipReport]:
    """The images of ``root/ImageSets/<list_folder>/<split>.txt``: ``root/JPEGImages/<stem>.jpg`` with
    ``root/<label_folder>/<stem>.png``; ``dataset`` names the data in errors."""
    root = _existing_dir(root, f"{dataset} root")
    image_dir = _existing_dir(root / "JPEGImages", f"{dataset} image folder")
    label_dir = _existing_dir(root / label_folder, f"{dataset} label folder")
    list_file = root / "ImageSets" / list_folder / f"{split}.txt"
    report = SkipReport(str(label_dir))
    return _pair_label_pngs(image_dir, label_dir, read_image_list(list_file), conversion, report, list_file), report


def load_voc(
    root: str | Path, split: str, classes_file: str | Path | None = None
) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """PASCAL VOC 2012 layout under ``root``; the images of ``ImageSets/Segmentation/<split>.txt``.

    class_names: ``VOC_CLASSES``, or the names of ``classes_file`` when given.
    """
    names = read_class_names(classes_file) if classes_file is not None else list(VOC_CLASSES)
    records, report = _read_voc_layout(root, split, "SegmentationClass", "Segmentation", "VOC")
    return records, names, report


def load_voc20(root: str | Path, split: str) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """VOC20: the files of ``load_voc`` without background: 0 -> 255 (ignored), v -> v - 1; ``VOC20_CLASSES``."""
    records, report = _read_voc_layout(root, split, "SegmentationClass", "Segmentation", "VOC", "reduce_zero_label")
    return records, list(VOC20_CLASSES), report


def load_context60(root: str | Path, split: str) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """PASCAL Context-60 under the ``VOC2010`` folder ``root``: ``SegmentationClassContext/<stem>.png`` (0 =
    background, 1..59) for the images of ``ImageSets/SegmentationContext/<split>.txt``; ``CONTEXT60_CLASSES``."""
    records, report = _read_voc_layout(root, split, "SegmentationClassContext", "SegmentationContext", "Pascal Context")
    return records, list(CONTEXT60_CLASSES), report


def load_context59(root: str | Path, split: str) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """Context-59: the files of ``load_context60`` without background: 0 -> 255, v -> v - 1; ``CONTEXT59_CLASSES``."""
    records, report = _read_voc_layout(
        root, split, "SegmentationClassContext", "SegmentationContext", "Pascal Context", "reduce_zero_label"
    )
    return records, list(CONTEXT59_CLASSES), report


def _pair_suffixed(
    image_dir: Path, image_suffix: str, label_dir: Path, label_suffix: str, conversion: str | None, nested: bool = False,
) -> tuple[list[SegmentationRecord], SkipReport]:
    """Records of the names with both ``image_dir/<name><image_suffix>`` and ``label_dir/<name><label_suffix>``
    (``nested``: one subfolder deeper, e.g. Cityscapes' cities); one without the other is a counted skip."""
    images, labels = files_by_key(image_dir, image_suffix, nested), files_by_key(label_dir, label_suffix, nested)
    if not labels:
        raise ValueError(f"label folder {label_dir} has no *{label_suffix} file")
    report, records = SkipReport(str(label_dir)), []
    for name in sorted(images.keys() | labels.keys()):
        if name not in images:
            report.add("missing image", f"{name}: no {name}{image_suffix} in {image_dir}")
        elif name not in labels:
            report.add("missing label PNG", f"{name}: no {name}{label_suffix} in {label_dir}")
        else:
            records.append(SegmentationRecord(name, images[name], LabelPng(labels[name], conversion)))
    if not records:
        raise ValueError(f"{label_dir}: no image with its label PNG; skipped: {dict(report.counts)}")
    return records, report


def _read_coco_stuff(root: str | Path, split: str, conversion: str | None) -> tuple[list[SegmentationRecord], SkipReport]:
    root = _existing_dir(root, "COCO-Stuff root")
    image_dir = _existing_dir(root / "images" / split, "COCO-Stuff image folder")
    label_dir = _existing_dir(root / "annotations" / split, "COCO-Stuff label folder")
    return _pair_suffixed(image_dir, ".jpg", label_dir, "_labelTrainIds.png", conversion)


def load_coco_stuff(root: str | Path, split: str) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """COCO-Stuff-164k under ``root``: ``images/<split>/<stem>.jpg`` with ``annotations/<split>/<stem>_labelTrainIds.png``
    (train ids 0..170, 255 = unlabeled); ``COCO_STUFF_CLASSES``. ``split``: the folder name, ``val2017``."""
    records, report = _read_coco_stuff(root, split, None)
    return records, list(COCO_STUFF_CLASSES), report


def load_coco_object_stuff(root: str | Path, split: str) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """COCO-Object from the files of ``load_coco_stuff``, as the benchmark converts them: things 0..79 -> 1..80,
    stuff 80..170 -> 0 (background), 255 stays; ``COCO_OBJECT_CLASSES``."""
    records, report = _read_coco_stuff(root, split, "coco_stuff_to_object")
    return records, list(COCO_OBJECT_CLASSES), report


def load_cityscapes(root: str | Path, split: str) -> tuple[list[SegmentationRecord], list[str], SkipReport]:
    """Cityscapes under ``root``: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png`` (train ids 0..18, 255 = ignore); image id
    ``<name>`` (it starts with the city); ``CITYSCAPES_CLASSES``."""
    root = _existing_dir(root, "Cityscapes root")
    image_dir = _existing_dir(root / "leftImg8bit" / split, "Cityscapes image folder")
    label_dir = _existing_dir(root / "gtFine" / split, "Cityscapes label folder")
    records, report = _pair_suffixed(image_dir, "_leftImg8bit.png", label_dir, "_gtFine_labelTrainIds.png", None, nested=True)
    return records, list(CITYSCAPES_CLASSES), report


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
    conversion = "reduce_zero_label" if reduce_zero else None
    return _pair_label_pngs(image_dir, label_dir, stems, conversion, report, list_file), names, report


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
