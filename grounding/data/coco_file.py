"""The one validated reader of COCO instances files, shared by detection, region and metric code.

``read_coco(path)`` parses a file once per process (cached by path, size and modification time) and
checks everything that would otherwise fail late or silently: JSON that is not a COCO instances file;
ids that are missing, not integers (COCO ids are integers; a string id trains and then breaks the
evaluation) or duplicated; images without a file name or with a non-positive size; annotations that
point at unknown images or categories; categories with an empty name, or two categories with the same
name (a prompt would hold the name twice and the model could not tell them apart). Every error names
the file and the offending id.

What is done with the boxes and masks (skipped, clipped, decoded) is the business of the readers built
on top: ``grounding.data.coco`` (detection) and ``grounding.data.region_readers`` (regions).
``ground_truth(coco_file, annotation_ids, image_ids)`` gives pycocotools the ground truth a loader kept.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from grounding.data.prompts import clean_category_name

_CACHE: OrderedDict[tuple, "CocoFile"] = OrderedDict()
_CACHE_SIZE = 8


@dataclass(frozen=True)
class CocoFile:
    """A validated COCO instances file.

    images: id -> image entry (``file_name``, ``width``, ``height``, ...), in file order.
    annotations: the annotation entries, in file order (ids, image and category ids validated).
    categories: id -> cleaned name (lower case, single spaces), in file order.
    category_entries: the category entries as in the file (for pycocotools).
    """

    path: Path
    images: dict[int, dict]
    annotations: list[dict]
    categories: dict[int, str]
    category_entries: list[dict]

    def annotations_by_image(self) -> dict[int, list[dict]]:
        """image id -> its annotations (every image present, possibly with an empty list)."""
        grouped: dict[int, list[dict]] = {image_id: [] for image_id in self.images}
        for annotation in self.annotations:
            grouped[annotation["image_id"]].append(annotation)
        return grouped


def _integer_id(value: object, what: str, path: Path, context: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"annotation file {path}: {what} id {value!r}{context} is not an integer (COCO ids are integers;"
            f" renumber the {what}s)"
        )
    return value


def _unique_ids(entries: list, what: str, path: Path) -> list[int]:
    seen: set[int] = set()
    ids = []
    for entry in entries:
        if not isinstance(entry, dict) or "id" not in entry:
            raise ValueError(f"annotation file {path}: a {what} entry has no id: {entry!r:.200}")
        entry_id = _integer_id(entry["id"], what, path)
        if entry_id in seen:
            raise ValueError(f"annotation file {path}: duplicate {what} id {entry_id}")
        seen.add(entry_id)
        ids.append(entry_id)
    return ids


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(f"annotation file {path} is not a COCO instances file (needs lists images, annotations, categories)")
    return data


def _validate(data: dict, path: Path) -> CocoFile:
    _unique_ids(data["categories"], "category", path)
    categories: dict[int, str] = {}
    by_name: dict[str, int] = {}
    for entry in data["categories"]:
        try:
            name = clean_category_name(entry["id"], entry.get("name"))
        except ValueError as error:
            raise ValueError(f"annotation file {path}: {error}") from None
        if name in by_name:
            raise ValueError(
                f"annotation file {path}: category ids {by_name[name]} and {entry['id']} have the same name {name!r};"
                " a prompt cannot tell them apart (merge or rename them)"
            )
        by_name[name] = entry["id"]
        categories[entry["id"]] = name

    _unique_ids(data["images"], "image", path)
    images: dict[int, dict] = {}
    for image in data["images"]:
        where = f"annotation file {path}: image id {image['id']}"
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise ValueError(f"{where} has no file_name")
        for key in ("width", "height"):
            value = image.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or int(value) != value:
                raise ValueError(f"{where} has {key} {value!r}; expected a positive integer")
        images[image["id"]] = image

    _unique_ids(data["annotations"], "annotation", path)
    for annotation in data["annotations"]:
        annotation_id = annotation["id"]
        if annotation.get("category_id") not in categories:
            raise ValueError(
                f"annotation file {path}: annotation id {annotation_id} has unknown category id"
                f" {annotation.get('category_id')!r} (known: {sorted(categories)})"
            )
        if annotation.get("image_id") not in images:
            raise ValueError(
                f"annotation file {path}: annotation id {annotation_id} refers to unknown image id {annotation.get('image_id')!r}"
            )
    return CocoFile(path, images, list(data["annotations"]), categories, list(data["categories"]))


def read_coco(path: str | Path) -> CocoFile:
    """The validated file (see the module docstring); parsed once per process while it is unchanged."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    parsed = _validate(_load_json(path), path)
    _CACHE[key] = parsed
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return parsed


def read_categories(path: str | Path) -> dict[int, str]:
    """Category id -> cleaned name of an instances file, in file order."""
    return dict(read_coco(path).categories)


def ground_truth(coco_file: CocoFile, annotation_ids: set[int], image_ids: list[int]):
    """A pycocotools ``COCO`` holding exactly ``image_ids`` and the annotations ``annotation_ids`` of the file.

    This is what COCOeval should see: the images and boxes a loader kept, not the ones it reported as
    skipped (a NaN box left in the ground truth changes AP). An annotation without ``area`` gets its
    box area, without ``iscrowd`` 0 (COCOeval needs both).
    """
    from pycocotools.coco import COCO

    chosen = set(image_ids)
    annotations = []
    for annotation in coco_file.annotations:
        if annotation["id"] in annotation_ids and annotation["image_id"] in chosen:
            entry = dict(annotation)
            if "area" not in entry:
                entry["area"] = float(entry["bbox"][2] * entry["bbox"][3])
            entry.setdefault("iscrowd", 0)
            annotations.append(entry)
    coco = COCO()
    coco.dataset = {
        "images": [coco_file.images[i] for i in image_ids],
        "annotations": annotations,
        "categories": coco_file.category_entries,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
