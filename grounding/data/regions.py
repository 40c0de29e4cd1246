"""Region data for mask-region methods (MaskInversion): images with binary region masks and their words.

A *region* is a binary mask at the image's original size plus a class name and/or referring expressions.
Readers turn each supported format into ``RegionImageRecord``s (one per image, holding its ``Region``s):

- COCO instances files (``load_coco_regions``): at ``level="class"`` one region per (image, category),
  the union of all that category's instance masks in the image (polygons, RLE or uncompressed RLE,
  crowd annotations included), region id ``"<image_id>:<category_id>"``; at ``level="instance"`` one
  region per annotation, region id ``"<annotation_id>"``. Class name from the categories, no expressions.
- RefCOCO / RefCOCO+ / RefCOCOg (``load_refcoco_regions``): ``refs(<who>).p`` + ``instances.json``; one
  region per ref of the split, the mask of the ref's annotation, expressions = the ref's ``sent``
  strings, class name from the category, region id ``"<ref_id>"``.
- PhraseCut (``load_phrasecut_regions``): ``refer_<split>.json``; one region per task, the union of all
  polygons of all its instances, expressions = [phrase], class name = ``phrase_structure["name"]`` when
  present (else None), region id = the task id.
- VOC / Pascal-Context style label PNGs (``load_semantic_regions``): one region per class present in an
  image, mask = ``labels == class`` (255 = ignore, in no mask), class name from ``classes.txt`` (line
  index = label value), category id = the label value, region id ``"<stem>:<label>"``.

Every reader returns ``(records, class_names, SkipReport)``. Broken inputs fail with an error naming the
file (and the offending id): missing annotation / refs / label / classes files (FileNotFoundError),
malformed JSON, unknown category ids, refs pointing at annotations or images that are not there, label
values outside the class list, a mask whose size differs from its image (ValueError, or ImageReadError
from ``read_rgb_image`` when an annotation file's width/height contradict the image file). Recoverable
problems are counted and logged skips: "missing image", "empty mask" (a region whose mask decodes to
nothing, e.g. a degenerate polygon; checked at load time, and again after decoding), "image without
regions". Masks are decoded lazily, in ``RegionDataset.__getitem__``.

``RegionDataset`` yields one dict per image (see its docstring); ``RegionDataModule`` builds it from
LightningCLI-friendly settings, including the embedded synthetic dataset.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from grounding.data.coco import SkipReport, _read_json, _unique_ids, categories_of
from grounding.data.images import ImageReadError, read_rgb_image
from grounding.data.prompts import clean_category_name

log = logging.getLogger(__name__)

IGNORE_LABEL = 255
"""Label value of pixels that belong to no region (VOC's object borders, unlabelled pixels)."""

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
_EXIF_ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------- masks
def _segmentation_rle(segmentation: object, height: int, width: int, where: str) -> dict | None:
    """Compressed RLE of one COCO segmentation (polygons, RLE, uncompressed RLE); None if it has no polygon.

    Polygons with fewer than 3 points are dropped first (they enclose nothing, and pycocotools would take
    a 4-number polygon for a box). An RLE whose size is not (height, width) is an error naming ``where``.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not all(isinstance(p, (list, tuple)) and all(isinstance(v, (int, float)) for v in p) for p in segmentation):
            raise ValueError(f"{where}: segmentation is not a list of polygons (lists of numbers): {segmentation!r:.120}")
        polygons = [[float(v) for v in p] for p in segmentation if len(p) >= 6]
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"{where}: RLE mask is {size[1]}x{size[0]} (w x h) but its image is {width}x{height}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"{where}: segmentation is neither polygons nor RLE: {segmentation!r:.120}")


def _box_pixels(box_xywh: object, height: int, width: int, where: str) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1), clipped, of a COCO [x, y, w, h] box (same rounding as coco.annotation_mask)."""
    if not isinstance(box_xywh, (list, tuple)) or len(box_xywh) != 4 or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in box_xywh
    ):
        raise ValueError(f"{where}: no segmentation and no valid bbox to use instead (bbox {box_xywh!r})")
    x, y, w, h = (float(v) for v in box_xywh)
    x0, y0 = min(max(int(x), 0), width), min(max(int(y), 0), height)
    x1, y1 = min(max(math.ceil(x + w), 0), width), min(max(math.ceil(y + h), 0), height)
    return x0, y0, max(x1, x0), max(y1, y0)


@dataclass(frozen=True)
class SegmentationMask:
    """Union of COCO segmentations; a part without segmentation is its box ``[x, y, w, h]``.

    parts: ``(segmentation or None, bbox)`` pairs; ``where``: names the source in errors.
    """

    parts: tuple
    where: str = ""

    def area(self, height: int, width: int) -> int:
        """Pixels in the union upper bound (sum of the parts' areas): 0 exactly when the union is empty."""
        from pycocotools import mask as mask_utils

        total = 0
        for segmentation, box in self.parts:
            if not segmentation:
                x0, y0, x1, y1 = _box_pixels(box, height, width, self.where)
                total += (x1 - x0) * (y1 - y0)
            else:
                rle = _segmentation_rle(segmentation, height, width, self.where)
                total += 0 if rle is None else int(mask_utils.area(rle))
        return total

    def decode(self, height: int, width: int, cache: dict | None = None) -> np.ndarray:
        """Bool (height, width) mask."""
        from pycocotools import mask as mask_utils

        mask = np.zeros((height, width), dtype=bool)
        for segmentation, box in self.parts:
            if not segmentation:
                x0, y0, x1, y1 = _box_pixels(box, height, width, self.where)
                mask[y0:y1, x0:x1] = True
            else:
                rle = _segmentation_rle(segmentation, height, width, self.where)
                if rle is not None:
                    mask |= mask_utils.decode(rle).astype(bool)
        return mask


@dataclass(frozen=True)
class LabelMask:
    """Pixels of a label PNG equal to ``value`` (the PNG is read once per image through ``cache``)."""

    path: Path
    value: int

    def decode(self, height: int, width: int, cache: dict | None = None) -> np.ndarray:
        """Bool (height, width) mask."""
        cache = {} if cache is None else cache
        if self.path not in cache:
            cache[self.path] = _read_label_png(self.path)
        labels = cache[self.path]
        if labels.shape != (height, width):
            raise ValueError(f"label PNG {self.path} is {labels.shape[1]}x{labels.shape[0]} but its image is {width}x{height}")
        return labels == self.value


# ------------------------------------------------------------------------------------- records
@dataclass
class Region:
    """One region: a lazily decoded mask and its words.

    region_id: unique within the dataset and stable across runs (see the module docstring).
    mask: a ``SegmentationMask`` or ``LabelMask`` (anything with ``decode(height, width, cache)``).
    """

    region_id: str
    mask: SegmentationMask | LabelMask
    class_name: str | None = None
    category_id: int | None = None
    expressions: list[str] = field(default_factory=list)


@dataclass
class RegionImageRecord:
    """An image file, its original size and its regions."""

    image_id: str
    path: Path
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)


def _image_sizes(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stored, EXIF-oriented) (width, height) of an image file, from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error
    return (width, height), ((height, width) if orientation in (5, 6, 7, 8) else (width, height))


def _keep_records(records: list[RegionImageRecord], report: SkipReport, source: Path) -> list[RegionImageRecord]:
    """Drop (and count) images without regions; an error naming ``source`` when nothing is left."""
    kept = []
    for record in records:
        if record.regions:
            kept.append(record)
        else:
            report.add("image without regions", f"image id {record.image_id}")
    if not kept:
        raise ValueError(f"{source}: no image with a usable region; skipped: {dict(report.counts)}")
    return kept


def _read_json_file(path: Path, what: str) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from error


# ------------------------------------------------------------------------------------- COCO
def load_coco_regions(
    annotation_file: str | Path, image_dir: str | Path, level: str = "class"
) -> tuple[list[RegionImageRecord], list[str], SkipReport]:
    """Class-level (union per image and category) or instance-level regions of a COCO instances file.

    class_names: the category names in category-id order. Images are ``image_dir / file_name``.
    """
    if level not in ("class", "instance"):
        raise ValueError(f"level must be 'class' or 'instance', got {level!r}")
    path, image_dir = Path(annotation_file), Path(image_dir)
    data = _read_json(path)
    categories = categories_of(data, path)
    _unique_ids(data["images"], "image", path)
    _unique_ids(data["annotations"], "annotation", path)
    report = SkipReport(str(path))

    by_image: dict[object, list[dict]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        if ann.get("category_id") not in categories:
            raise ValueError(
                f"annotation file {path}: annotation id {ann['id']} has unknown category id {ann.get('category_id')!r}"
                f" (known: {sorted(categories)})"
            )
        if ann.get("image_id") not in by_image:
            raise ValueError(f"annotation file {path}: annotation id {ann['id']} refers to unknown image id {ann.get('image_id')!r}")
        by_image[ann["image_id"]].append(ann)

    records = []
    for image in data["images"]:
        record = RegionImageRecord(str(image["id"]), image_dir / image["file_name"], int(image["width"]), int(image["height"]))
        if not record.path.is_file():
            report.add("missing image", f"image id {record.image_id}: {record.path}")
            continue
        if level == "instance":
            groups = [(str(a["id"]), a["category_id"], [a]) for a in by_image[image["id"]]]
        else:
            per_category: dict[int, list[dict]] = {}
            for ann in by_image[image["id"]]:
                per_category.setdefault(ann["category_id"], []).append(ann)
            groups = [(f"{image['id']}:{c}", c, anns) for c, anns in sorted(per_category.items())]
        for region_id, category_id, anns in groups:
            where = f"annotation file {path}: annotation id {', '.join(str(a['id']) for a in anns)}"
            mask = SegmentationMask(tuple((a.get("segmentation"), a.get("bbox")) for a in anns), where)
            if mask.area(record.height, record.width) == 0:
                report.add("empty mask", region_id)
                continue
            record.regions.append(Region(region_id, mask, categories[category_id], category_id, []))
        records.append(record)
    names = [categories[c] for c in sorted(categories)]
    return _keep_records(records, report, path), names, report


# ------------------------------------------------------------------------------------- RefCOCO
def _read_refs(path: Path) -> list[dict]:
    """The refs of a RefCOCO ``refs(<who>).p`` pickle (or the same list as JSON)."""
    if path.suffix == ".json":
        refs = _read_json_file(path, "refs file")
    else:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"refs file not found: {path}") from None
        try:
            refs = pickle.loads(raw)
        except UnicodeDecodeError:  # Python 2 pickles with non-ASCII str
            refs = pickle.loads(raw, encoding="latin1")
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a broken file
            raise ValueError(f"refs file {path} is not a readable pickle: {error}") from error
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"refs file {path} is not a list of refs (dicts with ref_id, ann_id, image_id, split, sentences)")
    return refs


def load_refcoco_regions(
    refs_file: str | Path, instances_file: str | Path, image_dir: str | Path, split: str
) -> tuple[list[RegionImageRecord], list[str], SkipReport]:
    """One region per ref of ``split`` (RefCOCO/+/g layout); the image path comes from instances.json.

    Refs without sentences are counted skips ("ref without sentences").
    """
    refs_path, instances_path, image_dir = Path(refs_file), Path(instances_file), Path(image_dir)
    refs = _read_refs(refs_path)
    data = _read_json(instances_path)
    categories = categories_of(data, instances_path)
    images = {image["id"]: image for image in data["images"]}
    annotations = {ann["id"]: ann for ann in data["annotations"]}
    report = SkipReport(str(refs_path))

    chosen = [r for r in refs if r.get("split") == split]
    if not chosen:
        splits = sorted({str(r.get("split")) for r in refs})
        raise ValueError(f"refs file {refs_path} has no ref of split {split!r} (splits: {', '.join(splits)})")
    records: dict[object, RegionImageRecord] = {}
    seen: set[str] = set()
    for ref in chosen:
        missing = [k for k in ("ref_id", "ann_id", "image_id", "sentences") if k not in ref]
        if missing:
            raise ValueError(f"refs file {refs_path}: ref {ref.get('ref_id', '?')} lacks {', '.join(missing)}")
        ref_id = str(ref["ref_id"])
        if ref_id in seen:
            raise ValueError(f"refs file {refs_path}: duplicate ref id {ref_id}")
        seen.add(ref_id)
        ann = annotations.get(ref["ann_id"])
        if ann is None:
            raise ValueError(f"refs file {refs_path}: ref id {ref_id} refers to annotation id {ref['ann_id']} missing from {instances_path}")
        image = images.get(ref["image_id"])
        if image is None:
            raise ValueError(f"refs file {refs_path}: ref id {ref_id} refers to image id {ref['image_id']} missing from {instances_path}")
        if ann.get("image_id") != ref["image_id"]:
            raise ValueError(
                f"refs file {refs_path}: ref id {ref_id} has image id {ref['image_id']} but its annotation {ref['ann_id']}"
                f" belongs to image id {ann.get('image_id')} in {instances_path}"
            )
        category_id = ref.get("category_id", ann.get("category_id"))
        if category_id not in categories:
            raise ValueError(f"refs file {refs_path}: ref id {ref_id} has unknown category id {category_id!r} (categories of {instances_path})")
        record = records.get(ref["image_id"])
        if record is None:
            record = RegionImageRecord(str(image["id"]), image_dir / image["file_name"], int(image["width"]), int(image["height"]))
            records[ref["image_id"]] = record
        expressions = [str(s["sent"]) for s in ref["sentences"]]
        if not expressions:
            report.add("ref without sentences", f"ref id {ref_id}")
            continue
        where = f"instances file {instances_path}: annotation id {ann['id']} (ref id {ref_id})"
        mask = SegmentationMask(((ann.get("segmentation"), ann.get("bbox")),), where)
        if mask.area(record.height, record.width) == 0:
            report.add("empty mask", ref_id)
            continue
        record.regions.append(Region(ref_id, mask, categories[category_id], category_id, expressions))

    present = []
    for record in records.values():
        if record.path.is_file():
            present.append(record)
        else:
            report.add("missing image", f"image id {record.image_id}: {record.path}")
    names = [categories[c] for c in sorted(categories)]
    return _keep_records(present, report, refs_path), names, report


# ------------------------------------------------------------------------------------- PhraseCut
def load_phrasecut_regions(
    refer_file: str | Path, image_dir: str | Path, image_data_file: str | Path | None = None, file_pattern: str = "{image_id}.jpg"
) -> tuple[list[RegionImageRecord], list[str], SkipReport]:
    """One region per PhraseCut task: the union of all polygons of all its instances, expressions [phrase].

    Images are ``image_dir / file_pattern.format(image_id=<int id>)``; their sizes come from
    ``image_data_file`` (a JSON list of ``{"image_id", "width", "height"}``) when given, else from the
    image files. class_names: the sorted distinct ``phrase_structure["name"]`` head nouns (may be empty).
    """
    path, image_dir = Path(refer_file), Path(image_dir)
    tasks = _read_json_file(path, "PhraseCut file")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ValueError(f"PhraseCut file {path} is not a JSON list of tasks")
    sizes: dict[int, tuple[int, int]] | None = None
    if image_data_file is not None:
        data_path = Path(image_data_file)
        entries = _read_json_file(data_path, "PhraseCut image data file")
        try:
            sizes = {int(e["image_id"]): (int(e["width"]), int(e["height"])) for e in entries}
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"PhraseCut image data file {data_path} is not a list of {{image_id, width, height}}: {error!r}") from None
    report = SkipReport(str(path))

    records: dict[int, RegionImageRecord | None] = {}
    seen: set[str] = set()
    for task in tasks:
        missing = [k for k in ("task_id", "image_id", "phrase", "Polygons") if k not in task]
        if missing:
            raise ValueError(f"PhraseCut file {path}: task {task.get('task_id', '?')} lacks {', '.join(missing)}")
        task_id, image_id = str(task["task_id"]), int(task["image_id"])
        if task_id in seen:
            raise ValueError(f"PhraseCut file {path}: duplicate task id {task_id}")
        seen.add(task_id)
        if image_id not in records:
            image_path = image_dir / file_pattern.format(image_id=image_id)
            if not image_path.is_file():
                report.add("missing image", f"image id {image_id}: {image_path}")
                records[image_id] = None
            else:
                if sizes is None:
                    width, height = _image_sizes(image_path)[1]
                elif image_id in sizes:
                    width, height = sizes[image_id]
                else:
                    raise ValueError(f"PhraseCut file {path}: task {task_id} has image id {image_id}, absent from {image_data_file}")
                records[image_id] = RegionImageRecord(str(image_id), image_path, width, height)
        record = records[image_id]
        if record is None:
            continue
        where = f"PhraseCut file {path}: task {task_id}"
        try:
            polygons = [[float(v) for point in polygon for v in point] for instance in task["Polygons"] for polygon in instance]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: Polygons is not a list (per instance) of polygons of [x, y] points") from None
        mask = SegmentationMask(((polygons, None),), where) if polygons else None
        if mask is None or mask.area(record.height, record.width) == 0:
            report.add("empty mask", task_id)
            continue
        structure = task.get("phrase_structure")
        name = structure.get("name") if isinstance(structure, dict) else None
        class_name = " ".join(name.lower().split()) if isinstance(name, str) and name.strip() else None
        record.regions.append(Region(task_id, mask, class_name, None, [str(task["phrase"])]))
    kept = _keep_records([r for r in records.values() if r is not None], report, path)
    names = sorted({region.class_name for r in kept for region in r.regions if region.class_name})
    return kept, names, report


# ------------------------------------------------------------------------------------- semantic
def read_class_names(classes_file: str | Path) -> list[str]:
    """Class names of a ``classes.txt`` (one per line, line index = label value; trailing blank lines ignored)."""
    path = Path(classes_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"classes file not found: {path}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"classes file {path} lists no class")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"classes file {path}: line {number} is empty (the line index is the label value)")
    return [" ".join(line.lower().split()) for line in lines]


def _read_label_png(path: Path) -> np.ndarray:
    """Label values (H, W) of a palette / grey / 16-bit label PNG; an error naming the file otherwise."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise ValueError(f"label PNG {path} has mode {mode!r}; expected a palette ('P') or grey ('L') PNG of class indices")
            return np.asarray(image).astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"label PNG not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read label PNG {path}: {error}") from error


def load_semantic_regions(
    image_dir: str | Path, label_dir: str | Path, classes_file: str | Path, ignore_background: bool = True
) -> tuple[list[RegionImageRecord], list[str], SkipReport]:
    """One region per class present in each label PNG of ``label_dir`` (images matched by stem, jpg/png).

    Label value ``IGNORE_LABEL`` (255) is in no mask; label 0 gives no region when ``ignore_background``.
    class_names: the classes file's names, without the first (background) when ``ignore_background``;
    a region's ``category_id`` is its label value either way.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    classes = read_class_names(classes_file)
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_dir}")
    labels = sorted(label_dir.glob("*.png"))
    if not labels:
        raise ValueError(f"label folder {label_dir} has no PNG")
    report = SkipReport(str(label_dir))

    records = []
    for label_path in labels:
        stem = label_path.stem
        image_path = next((image_dir / f"{stem}{s}" for s in _IMAGE_SUFFIXES if (image_dir / f"{stem}{s}").is_file()), None)
        if image_path is None:
            report.add("missing image", f"{stem}: no {stem}.jpg/.png in {image_dir}")
            continue
        values = _read_label_png(label_path)
        height, width = values.shape
        stored, oriented = _image_sizes(image_path)
        if (width, height) not in (stored, oriented):
            raise ValueError(f"label PNG {label_path} is {width}x{height} but its image {image_path} is {oriented[0]}x{oriented[1]}")
        present = np.unique(values).tolist()
        bad = [v for v in present if v != IGNORE_LABEL and not 0 <= v < len(classes)]
        if bad:
            raise ValueError(
                f"label PNG {label_path} has label value {bad[0]} but {classes_file} lists {len(classes)} classes"
                f" (values 0..{len(classes) - 1}, {IGNORE_LABEL} = ignore)"
            )
        record = RegionImageRecord(stem, image_path, width, height)
        for value in present:
            if value == IGNORE_LABEL or (ignore_background and value == 0):
                continue
            record.regions.append(Region(f"{stem}:{value}", LabelMask(label_path, value), classes[value], value, []))
        records.append(record)
    names = classes[1:] if ignore_background else classes
    return _keep_records(records, report, label_dir), names, report


# ------------------------------------------------------------------------------------- dataset
class RegionDataset(Dataset):
    """Images at their original size with their region masks.

    ``dataset[i]`` is ``{"image_id": str, "image": uint8 (3, H, W), "masks": bool (R, H, W),
    "region_ids": [str] * R, "class_names": [str | None] * R, "category_ids": [int | None] * R,
    "expressions": [[str, ...]] * R}``. A region whose mask decodes to nothing is dropped, counted in
    ``report`` ("empty mask") and logged.
    """

    def __init__(self, records: list[RegionImageRecord], class_names: list[str], report: SkipReport | None = None):
        self.records = list(records)
        self.class_names = list(class_names)
        self.report = report if report is not None else SkipReport("regions")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_regions(self) -> int:
        return sum(len(r.regions) for r in self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = read_rgb_image(record.path, (record.width, record.height), record.image_id)
        image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        cache: dict = {}
        masks, regions = [], []
        for region in record.regions:
            mask = region.mask.decode(record.height, record.width, cache)
            if not mask.any():
                self.report.add("empty mask", region.region_id)
                log.warning("%s: region %s has an empty mask after decoding; left out", self.report.source, region.region_id)
                continue
            masks.append(torch.from_numpy(mask))
            regions.append(region)
        return {
            "image_id": record.image_id,
            "image": image,
            "masks": torch.stack(masks) if masks else torch.zeros(0, record.height, record.width, dtype=torch.bool),
            "region_ids": [r.region_id for r in regions],
            "class_names": [r.class_name for r in regions],
            "category_ids": [r.category_id for r in regions],
            "expressions": [list(r.expressions) for r in regions],
        }


def collate_regions(batch: list[dict]) -> list[dict]:
    """The samples unchanged (images differ in size; the consumer loops over them)."""
    return batch


# ------------------------------------------------------------------------------------- DataModule
FORMATS = ("synthetic", "coco", "refcoco", "phrasecut", "semantic")
SYNTHETIC_TASKS = ("class", "referring", "semantic", "phrasecut")


class RegionDataModule(L.LightningDataModule):
    """Region batches for test-time methods: ``test_dataloader`` / ``predict_dataloader`` yield lists of
    ``RegionDataset`` samples (see there).

    Args:
        format: synthetic | coco | refcoco | phrasecut | semantic.
        split: the split to read ("val", "test", "testA", ...): selects the refs of RefCOCO, and the
            files of the synthetic dataset.
        synthetic_root: folder of the synthetic dataset (format "synthetic"); generated there if absent
            (``synthetic`` holds generator settings, as in the detection DataModule).
        task: for format "synthetic": "class" (COCO instances of the split, at ``level``), "referring"
            (its RefCOCO files, refs of the split), "semantic" (its label PNGs), "phrasecut" (its
            PhraseCut files). Settings given explicitly below take precedence over the synthetic paths.
        annotations: coco: instances file; refcoco: instances.json; phrasecut: refer_<split>.json.
        images: image folder (refcoco: the folder ``file_name`` of instances.json is relative to).
        refs: refcoco: the ``refs(<who>).p`` pickle.
        labels, classes: semantic: label PNG folder and classes.txt.
        image_data: phrasecut: image_data_<split>.json (optional; sizes are read from the images otherwise).
        file_pattern: phrasecut: image file name pattern (default "{image_id}.jpg").
        level: coco (and synthetic "class"): "class" or "instance" regions.
        ignore_background: semantic: no region for label 0, and "background" not in ``class_names``.
        max_images: only the first N images (quick runs).
        batch_size, num_workers: loaders (batches are lists of samples).
    """

    def __init__(
        self,
        format: str = "synthetic",
        split: str = "val",
        synthetic_root: str | None = "data/synthetic",
        synthetic: dict | None = None,
        task: str = "class",
        annotations: str | None = None,
        images: str | None = None,
        refs: str | None = None,
        labels: str | None = None,
        classes: str | None = None,
        image_data: str | None = None,
        file_pattern: str | None = None,
        level: str = "class",
        ignore_background: bool = True,
        max_images: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
        if format == "synthetic" and task not in SYNTHETIC_TASKS:
            raise ValueError(f"task must be one of {', '.join(SYNTHETIC_TASKS)} (format 'synthetic'); got {task!r}")
        if format == "synthetic" and not synthetic_root:
            raise ValueError("format 'synthetic' needs synthetic_root")
        if level not in ("class", "instance"):
            raise ValueError(f"level must be 'class' or 'instance'; got {level!r}")
        if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
            raise ValueError(f"max_images must be a positive integer or None; got {max_images!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}")
        if not isinstance(split, str) or not split:
            raise ValueError(f"split must be a non-empty string; got {split!r}")
        required = {
            "coco": ("annotations", "images"),
            "refcoco": ("refs", "annotations", "images"),
            "phrasecut": ("annotations", "images"),
            "semantic": ("images", "labels", "classes"),
        }.get(format, ())
        given = {"annotations": annotations, "images": images, "refs": refs, "labels": labels, "classes": classes}
        absent = [name for name in required if not given[name]]
        if absent:
            raise ValueError(f"format {format!r} needs {', '.join(absent)} (set: {', '.join(required)})")
        self.dataset: RegionDataset | None = None

    def prepare_data(self) -> None:
        h = self.hparams
        if h.format != "synthetic":
            return
        from grounding.data.synthetic import prepare_synthetic

        prepare_synthetic(h.synthetic_root, h.synthetic)

    def _load(self) -> tuple[list[RegionImageRecord], list[str], SkipReport]:
        h = self.hparams
        fmt, paths = h.format, {k: h[k] for k in ("annotations", "images", "refs", "labels", "classes", "image_data", "file_pattern")}
        if fmt == "synthetic":
            from grounding.data import synthetic as syn

            root = Path(h.synthetic_root)
            image_format = syn.load_meta(root)["config"].get("image_format", "jpg")
            fmt, defaults = {
                "class": ("coco", {"annotations": syn.instances_path(root, h.split), "images": syn.images_dir(root, h.split)}),
                "referring": ("refcoco", {
                    "refs": syn.refcoco_dir(root) / "refs(synthetic).p",
                    "annotations": syn.refcoco_dir(root) / "instances.json",
                    "images": root / "images",
                }),
                "semantic": ("semantic", {
                    "images": syn.images_dir(root, h.split), "labels": syn.semantic_dir(root, h.split),
                    "classes": root / "semantic" / "classes.txt",
                }),
                "phrasecut": ("phrasecut", {
                    "annotations": syn.phrasecut_dir(root) / f"refer_{h.split}.json", "images": syn.images_dir(root, h.split),
                    "image_data": syn.phrasecut_dir(root) / f"image_data_{h.split}.json",
                    "file_pattern": "{image_id:06d}." + image_format,
                }),
            }[h.task]
            paths = {k: v if v is not None else defaults.get(k) for k, v in paths.items()}
            if h.task == "phrasecut" and not Path(paths["annotations"]).exists():
                raise FileNotFoundError(
                    f"PhraseCut file not found: {paths['annotations']} (the synthetic dataset at {root} predates its PhraseCut"
                    f" files: regenerate it with `python -m grounding.data.synthetic --out {root} --force`)"
                )
        if fmt == "coco":
            return load_coco_regions(paths["annotations"], paths["images"], h.level)
        if fmt == "refcoco":
            return load_refcoco_regions(paths["refs"], paths["annotations"], paths["images"], h.split)
        if fmt == "phrasecut":
            return load_phrasecut_regions(paths["annotations"], paths["images"], paths["image_data"], paths["file_pattern"] or "{image_id}.jpg")
        return load_semantic_regions(paths["images"], paths["labels"], paths["classes"], h.ignore_background)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.prepare_data()
        records, class_names, report = self._load()
        if self.hparams.max_images is not None:
            records = records[: self.hparams.max_images]
        report.log()
        self.dataset = RegionDataset(records, class_names, report)

    @property
    def class_names(self) -> list[str]:
        """Class names for class retrieval (the dataset's categories; no background for semantic)."""
        if self.dataset is None:
            self.setup()
        return self.dataset.class_names

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        h = self.hparams
        return DataLoader(
            self.dataset, batch_size=h.batch_size, shuffle=False, num_workers=h.num_workers,
            collate_fn=collate_regions, persistent_workers=h.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()
