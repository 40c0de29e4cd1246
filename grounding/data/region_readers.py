"""Readers of region data (images with binary region masks and their words) in every supported format.

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
  index = label value), category id = the label value, region id ``"<stem>:<label>"``. The PNGs, class
  and image lists are read by ``grounding.data.label_maps``.

Every reader returns ``(records, class_names, SkipReport)``. Broken inputs fail with an error naming the
file (and the offending id): missing annotation / refs / label / classes files (FileNotFoundError),
malformed JSON, unknown category ids, refs pointing at annotations or images that are not there, label
values outside the class list, a mask whose size differs from its image (ValueError, or ImageReadError
from ``read_rgb_image`` when an annotation file's width/height contradict the image file). Recoverable
problems are counted and logged skips: "missing image", "empty mask" (a region whose mask decodes to
nothing, e.g. a degenerate polygon; checked at load time, and again after decoding), "image without
regions". Masks are decoded lazily, in ``RegionDataset.__getitem__``.

``grounding.data.regions`` turns the records into a dataset and a DataModule.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from grounding.constants import IGNORE_INDEX
from grounding.data.coco_file import read_coco
from grounding.data.images import image_sizes
from grounding.data.label_maps import find_image, label_folder_stems, read_class_names, read_label_png
from grounding.data.masks import decode_mask, mask_area
from grounding.data.skips import SkipReport


# ------------------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class SegmentationMask:
    """Union of COCO segmentations; a part without segmentation is its box ``[x, y, w, h]``.

    parts: ``(segmentation or None, bbox)`` pairs; ``where``: names the source in errors.
    """

    parts: tuple
    where: str = ""

    def area(self, height: int, width: int) -> int:
        """Pixels in the union upper bound (sum of the parts' areas): 0 exactly when the union is empty."""
        return mask_area(self.parts, height, width, self.where)

    def decode(self, height: int, width: int, cache: dict | None = None) -> np.ndarray:
        """Bool (height, width) mask."""
        return decode_mask(self.parts, height, width, self.where)


@dataclass(frozen=True)
class LabelMask:
    """Pixels of a label PNG equal to ``value`` (the PNG is read once per image through ``cache``)."""

    path: Path
    value: int

    def decode(self, height: int, width: int, cache: dict | None = None) -> np.ndarray:
        """Bool (height, width) mask."""
        cache = {} if cache is None else cache
        if self.path not in cache:
            cache[self.path] = read_label_png(self.path)
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
    coco = read_coco(path)
    categories = coco.categories
    report = SkipReport(str(path))
    by_image = coco.annotations_by_image()

    records = []
    for image in coco.images.values():
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
    coco = read_coco(instances_path)
    categories, images = coco.categories, coco.images
    annotations = {ann["id"]: ann for ann in coco.annotations}
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
                    width, height = image_sizes(image_path)[1]
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
def load_semantic_regions(
    image_dir: str | Path, label_dir: str | Path, classes_file: str | Path, ignore_background: bool = True,
    image_list: str | Path | None = None,
) -> tuple[list[RegionImageRecord], list[str], SkipReport]:
    """One region per class present in each image's label PNG (``label_dir/<stem>.png``, images jpg/png).

    Which images: the stems of ``image_list`` (VOC's ImageSets file) when given, else every image of
    ``image_dir`` and every PNG of ``label_dir``. Nothing is dropped without a word: an image without its
    label PNG is a counted, logged skip ("missing label PNG"), a label without its image too ("missing image").
    Label value ``IGNORE_INDEX`` (255) is in no mask; label 0 gives no region when ``ignore_background``.
    class_names: the classes file's names, without the first (background) when ``ignore_background``;
    a region's ``category_id`` is its label value either way.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    classes = read_class_names(classes_file)
    stems = label_folder_stems(image_dir, label_dir, image_list)
    report = SkipReport(str(label_dir))

    records = []
    for stem in stems:
        image_path, label_path = find_image(image_dir, stem), label_dir / f"{stem}.png"
        if image_path is None:
            report.add("missing image", f"{stem}: no {stem}.jpg/.png in {image_dir}")
            continue
        if not label_path.is_file():
            report.add("missing label PNG", f"{stem}: no {label_path}")
            continue
        values = read_label_png(label_path)
        height, width = values.shape
        stored, oriented = image_sizes(image_path)
        if (width, height) not in (stored, oriented):
            raise ValueError(f"label PNG {label_path} is {width}x{height} but its image {image_path} is {oriented[0]}x{oriented[1]}")
        present = np.unique(values).tolist()
        bad = [v for v in present if v != IGNORE_INDEX and not 0 <= v < len(classes)]
        if bad:
            raise ValueError(
                f"label PNG {label_path} has label value {bad[0]} but {classes_file} lists {len(classes)} classes"
                f" (values 0..{len(classes) - 1}, {IGNORE_INDEX} = ignore)"
            )
        record = RegionImageRecord(stem, image_path, width, height)
        for value in present:
            if value == IGNORE_INDEX or (ignore_background and value == 0):
                continue
            record.regions.append(Region(f"{stem}:{value}", LabelMask(label_path, value), classes[value], value, []))
        records.append(record)
    names = classes[1:] if ignore_background else classes
    return _keep_records(records, report, label_dir), names, report
